"""
Schema migrations, applied in order at start-up.

Append a new string to L{MIGRATIONS} to change the schema; never edit an
applied one.  C{schema_version} holds how many have been applied.

One history serves SQLite and PostgreSQL: write SQLite's spelling, which
L{roller.store.dialect.ddl} maps where PostgreSQL differs (C{REAL} ->
C{DOUBLE PRECISION}, C{INTEGER PRIMARY KEY AUTOINCREMENT} -> an identity,
no C{WITHOUT ROWID}); a statement for one engine only starts with the line
C{-- sqlite only} or C{-- postgresql only}.
"""

#: One row, overwritten by every heartbeat (C{roller.store.db.write_heartbeat}).
HEARTBEAT_TABLE = """
    CREATE TABLE IF NOT EXISTS heartbeat (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        at REAL NOT NULL
    )
"""

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE machines (
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        fqdn         TEXT,
        ip           TEXT,
        pool         TEXT,
        data         TEXT NOT NULL,
        created_at   REAL NOT NULL,
        updated_at   REAL NOT NULL,
        PRIMARY KEY (worker_group, worker_id)
    );
    CREATE INDEX machines_worker_id ON machines (worker_id);
    CREATE INDEX machines_ip ON machines (ip);
    CREATE INDEX machines_fqdn ON machines (fqdn);

    CREATE TABLE jobs (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,
        task_name    TEXT NOT NULL,
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        params       TEXT NOT NULL DEFAULT '{}',
        requester    TEXT NOT NULL,
        origin_ip    TEXT,
        reason       TEXT NOT NULL DEFAULT '',
        priority     INTEGER NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded',
                         'failed', 'cancelled', 'timed_out', 'interrupted')),
        created_at   REAL NOT NULL,
        started_at   REAL,
        finished_at  REAL,
        result       TEXT,
        error        TEXT
    );
    CREATE INDEX jobs_state ON jobs (state, seq);
    CREATE INDEX jobs_machine ON jobs (worker_id, worker_group, seq);
    CREATE INDEX jobs_task ON jobs (task_name, seq);

    CREATE TABLE job_events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        time    REAL NOT NULL,
        kind    TEXT NOT NULL,
        message TEXT NOT NULL,
        data    TEXT
    );
    CREATE INDEX job_events_job ON job_events (job_id, id);

    CREATE TABLE audit (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        time      REAL NOT NULL,
        actor     TEXT NOT NULL,
        source_ip TEXT,
        action    TEXT NOT NULL,
        target    TEXT,
        params    TEXT,
        result    TEXT NOT NULL
    );
    CREATE INDEX audit_time ON audit (time);
    """,
    # 2: dashboard accounts and their sessions (roller.store.users)
    """
    CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        role          TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
        password_hash TEXT NOT NULL,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        failed_logins INTEGER NOT NULL DEFAULT 0,
        locked_until  REAL NOT NULL DEFAULT 0
    );

    CREATE TABLE sessions (
        id_hash    TEXT PRIMARY KEY,
        user_name  TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        last_seen  REAL NOT NULL
    );
    CREATE INDEX sessions_user ON sessions (user_name);
    CREATE INDEX sessions_expires ON sessions (expires_at);
    """,
    # 3: machine loans (roller.store.loans); the newest ping of a machine (fleet page)
    """
    CREATE TABLE loans (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        borrower     TEXT NOT NULL,
        reason       TEXT NOT NULL DEFAULT '',
        started_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        returned_at  REAL,
        job_id       TEXT,
        return_job_id TEXT
    );
    CREATE UNIQUE INDEX loans_one_active ON loans (worker_group, worker_id) WHERE returned_at IS NULL;
    CREATE INDEX loans_machine ON loans (worker_group, worker_id, id);
    CREATE INDEX loans_active_expiry ON loans (returned_at, expires_at);
    CREATE INDEX jobs_machine_task ON jobs (worker_id, worker_group, task_name, seq);
    """,
    # 4: jobs_task (task_name, seq) cost every submission an index insert and served
    #    only listing one task across the whole fleet; per machine, jobs_machine and
    #    jobs_machine_task answer (a fleet-wide task filter now walks seq backwards).
    """
    DROP INDEX IF EXISTS jobs_task;
    """,
    # 5: one row the heartbeat and the start-up check overwrite: a real write that
    #    does not grow the database (roller.store.db.check_writable also makes it)
    HEARTBEAT_TABLE,
    # 6: fleet health (roller.store.health): each machine's current health, its
    #    transitions, the remediations started, and flags (remediation paused)
    """
    CREATE TABLE health (
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        state        TEXT NOT NULL,
        since        REAL NOT NULL,
        findings     TEXT NOT NULL DEFAULT '[]',
        maintenance  INTEGER NOT NULL DEFAULT 0,
        maintenance_reason TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (worker_group, worker_id)
    );
    CREATE TABLE health_transitions (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        time         REAL NOT NULL,
        old          TEXT NOT NULL,
        new          TEXT NOT NULL,
        reason       TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX health_transitions_machine ON health_transitions (worker_group, worker_id, id);
    CREATE TABLE remediations (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        policy       TEXT NOT NULL,
        task         TEXT NOT NULL,
        time         REAL NOT NULL,
        dry_run      INTEGER NOT NULL DEFAULT 0,
        job_id       TEXT,
        reason       TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX remediations_time ON remediations (time);
    CREATE INDEX remediations_machine ON remediations (worker_group, worker_id, time);
    CREATE TABLE health_flags (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 7: batches (roller.store.batches): one task over many machines, rolled out
    #    within limits; each member's job carries the batch's id
    """
    ALTER TABLE jobs ADD COLUMN batch_id TEXT;
    CREATE INDEX jobs_batch ON jobs (batch_id, seq) WHERE batch_id IS NOT NULL;
    CREATE TABLE batches (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        id           TEXT NOT NULL UNIQUE,
        task_name    TEXT NOT NULL,
        params       TEXT NOT NULL DEFAULT '{}',
        selector     TEXT NOT NULL,
        rollout      TEXT NOT NULL,
        requester    TEXT NOT NULL,
        origin_ip    TEXT,
        reason       TEXT NOT NULL DEFAULT '',
        priority     INTEGER NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed', 'halted', 'cancelled')),
        created_at   REAL NOT NULL,
        finished_at  REAL,
        halt_reason  TEXT,
        total        INTEGER NOT NULL DEFAULT 0,
        excluded     TEXT NOT NULL DEFAULT '[]',
        pool_sizes   TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX batches_unfinished ON batches (seq) WHERE finished_at IS NULL;
    CREATE TABLE batch_members (
        batch_id     TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
        position     INTEGER NOT NULL,
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        pool         TEXT,
        state        TEXT NOT NULL,
        job_id       TEXT,
        joined       INTEGER NOT NULL DEFAULT 0,
        attempts     INTEGER NOT NULL DEFAULT 0,
        started_at   REAL,
        finished_at  REAL,
        error        TEXT,
        PRIMARY KEY (batch_id, position)
    ) WITHOUT ROWID;
    CREATE INDEX batch_members_job ON batch_members (job_id) WHERE job_id IS NOT NULL;
    """,
    # 8: which roller last upgraded the schema (a roller too old for the database
    #    says which one it needs: roller.store.db.newer_schema_message)
    """
    ALTER TABLE schema_version ADD COLUMN roller_version TEXT;
    """,
    # 9: on PostgreSQL, a counter every write to the machines table bumps
    #    (roller.store.machines), so a roller sees another's inventory changes
    #    without reloading it all (SQLite's PRAGMA data_version does this there)
    """
    -- postgresql only
    CREATE TABLE change_counters (
        name    TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
    -- postgresql only
    INSERT INTO change_counters (name, version) VALUES ('machines', 0);
    """,
    # 10: several rollers on one PostgreSQL database (roller.cluster): the rollers
    #     and their heartbeats; which roller runs a job, and the shared endpoints it
    #     holds; at most one running job per machine, whichever roller runs it; when
    #     each shared endpoint was last given a command
    """
    -- postgresql only
    CREATE TABLE rollers (
        id        TEXT PRIMARY KEY,
        host      TEXT NOT NULL,
        pid       INTEGER NOT NULL,
        started   REAL NOT NULL,
        heartbeat REAL NOT NULL,
        reach     TEXT NOT NULL DEFAULT '[]'
    );
    -- postgresql only
    ALTER TABLE jobs ADD COLUMN roller_id TEXT;
    -- postgresql only
    ALTER TABLE jobs ADD COLUMN endpoints TEXT;
    -- postgresql only
    CREATE UNIQUE INDEX jobs_one_running_per_machine ON jobs (worker_group, worker_id) WHERE state = 'running';
    -- postgresql only
    CREATE INDEX jobs_running_by_roller ON jobs (roller_id) WHERE state = 'running';
    -- postgresql only
    CREATE INDEX jobs_queued_order ON jobs (priority DESC, seq) WHERE state = 'queued';
    -- postgresql only
    CREATE TABLE endpoint_last (
        endpoint TEXT PRIMARY KEY,
        at       REAL NOT NULL
    );
    """,
    # 11: a job running on one roller cancelled through another: who asked, until
    #     the roller running it ends it (roller.cluster)
    """
    -- postgresql only
    ALTER TABLE jobs ADD COLUMN cancel_requested TEXT;
    """,
    # 12: the roller that drives each unfinished batch (roller.cluster); a survivor
    #     adopts the batches of a roller that left or was taken over
    """
    -- postgresql only
    ALTER TABLE batches ADD COLUMN owner TEXT;
    """,
    # 13: whether a roller runs health sweeps (health.enabled): only those share
    #     the fleet's probes and remediation (roller.cluster.shares)
    """
    -- postgresql only
    ALTER TABLE rollers ADD COLUMN sweeps INTEGER NOT NULL DEFAULT 1;
    """,
    # 14: which machines each change of the machines table touched (its
    #     change_counters version), so another roller reloads only those
    #     (roller.store.machines); the oldest rows are pruned as new ones come
    """
    -- postgresql only
    CREATE TABLE machine_changes (
        version      INTEGER NOT NULL,
        worker_group TEXT NOT NULL,
        worker_id    TEXT NOT NULL,
        PRIMARY KEY (version, worker_group, worker_id)
    );
    """,
    # 15: history lookups by index (tests/test_query_plans.py shows each plan):
    #     jobs_task_state serves a task filter across the fleet, alone or with
    #     states (one walk per state, newest first, merged: a filter with no rows
    #     reads nothing; jobs_task, dropped by 4, left that to a walk over the
    #     whole history); audit_target serves the audit log of one target (the
    #     machine page, C{/audit?target=}), which scanned the table.  Each costs a
    #     submission one index insert at the end of a short range of keys.
    """
    CREATE INDEX jobs_task_state ON jobs (task_name, state, seq);
    CREATE INDEX audit_target ON audit (target, id);
    """,
    # 16: jobs_group serves the API's job list by worker group alone, the last
    #     filter that read the history through the primary key (a group with no
    #     jobs read all of it); like 15's, its insert lands at the end of a
    #     group's range of keys (about 2 us a submission)
    """
    CREATE INDEX jobs_group ON jobs (worker_group, seq);
    """,
]
