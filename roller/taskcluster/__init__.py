"""
Taskcluster, as roller calls it: Hawk-signed requests to a deployment's
services (worker-manager's workers, the queue's task-queue counts and task
statuses) with one error type, L{TaskclusterError}, whose message names the
call and never a secret.
"""
