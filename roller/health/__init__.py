"""
Fleet health: which machines are sick, found by liveness sweeps and by
Taskcluster's view of their work, and remediation of them within limits.
"""
