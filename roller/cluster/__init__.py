"""
Several rollers on one PostgreSQL database: membership and heartbeats,
takeover of a dead roller's jobs, claims on the shared queue, and the
events of jobs other rollers run (L{roller.cluster.node.ClusterNode};
the statements in L{roller.cluster.sql}).
"""
