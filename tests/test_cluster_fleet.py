"""
Fleet health and batches divided between two real twistd rollers on one
PostgreSQL database (roller.cluster.shares, the health watcher's share,
the batches' owner).

Health: 40 machines whose liveness is a TCP port on their own loopback
address, each a listener in this test that records every connection.
Each roller's status says how many machines it probes; together they are
the fleet, each machine's owner is the one rendezvous hashing names from
the registered rollers, and over several rounds of both rollers no
machine is connected to more than once a round (two rollers sweeping it
would double that).  Roller A is then killed with C{kill -9}: B's rounds
cover the whole fleet from the first round after C{takeover_after}, and
every machine hears from it.

Batches: a batch of 12 pings (at most 3 at once) created on A, shown the
same on B while A drives it, A killed mid-way: B adopts it once it took A
over and finishes it; from the jobs' recorded start and end times, never
more than 3 of its members ran at once, across the handover.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from roller.cluster.shares import owner
from roller.testing.postgres import PostgresServer, pg_rows
from roller.testing.process import RollerProcess, ping_skip_reason, wait_for

TAKEOVER_AFTER = 3.0
SWEEP = 1.0
MACHINES = 40


def cluster_env(url: str, host: str, **extra: str) -> dict[str, str]:
    return {"ROLLER_DATABASE_URL": url, "ROLLER_CLUSTER_TAKEOVER_AFTER": str(TAKEOVER_AFTER),
            "ROLLER_CLUSTER_POLL_INTERVAL": "0.2", "ROLLER_CLUSTER_HOST": host, **extra}


def health_env(url: str, host: str) -> dict[str, str]:
    return cluster_env(url, host, ROLLER_HEALTH_ENABLED="true", ROLLER_HEALTH_SWEEP_INTERVAL=str(SWEEP),
                       ROLLER_HEALTH_PROBE_TIMEOUT="0.5", ROLLER_HEALTH_TICK="1", ROLLER_HEALTH_TC_INTERVAL="3600")


class Listeners:
    """A TCP listener on each machine's loopback address (one port for all); every accepted connection recorded."""

    def __init__(self, count: int, base: str = "127.0.21."):
        self.addresses = [f"{base}{i + 1}" for i in range(count)]
        self.seen: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._socks: list[socket.socket] = []
        self.port = 0
        for address in self.addresses:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, self.port))
            self.port = s.getsockname()[1]
            s.listen(64)
            s.setblocking(False)
            self._sel.register(s, selectors.EVENT_READ, address)
            self._socks.append(s)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.1):
                try:
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                except OSError:
                    continue
                conn.close()
                with self.lock:
                    self.seen[key.data].append(time.time())

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {a: len(self.seen[a]) for a in self.addresses}

    def first_after(self, t: float) -> dict[str, float | None]:
        with self.lock:
            return {a: next((x for x in self.seen[a] if x > t), None) for a in self.addresses}

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for s in self._socks:
            s.close()
        self._sel.close()


def machine(i: int, port: int) -> dict[str, Any]:
    return {"worker_id": f"hf-{i:02d}", "worker_group": "hf", "ip": f"127.0.21.{i + 1}",
            "liveness": {"method": "tcp", "port": port}}


def status(roller: RollerProcess) -> dict[str, Any]:
    return dict(roller.json("GET", "/api/v1/health"))


def test_health_sweeps_divided_between_two_rollers_and_the_survivor_takes_the_whole_fleet(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.create_database()
    listeners = Listeners(MACHINES)
    a = RollerProcess(["--auth", "none"], state_dir=tmp_path / "a", env=health_env(url, "host-a"))
    b = RollerProcess(["--auth", "none"], state_dir=tmp_path / "b", env=health_env(url, "host-b"))
    try:
        a.start(timeout=30)
        b.start(timeout=30)
        for i in range(MACHINES):
            a.json("POST", "/api/v1/machines", machine(i, listeners.port), expect=201)

        def divided() -> tuple[dict, dict] | None:
            sa, sb = status(a)["share"], status(b)["share"]
            if sa and sb and sa["rollers"] == sb["rollers"] == 2 and sa["fleet"] == sb["fleet"] == MACHINES:
                return sa, sb
            return None

        sa, sb = wait_for(divided, 30, "both rollers to share the fleet",
                          describe=lambda: f"{status(a)['share']} {status(b)['share']}")
        # together they are the fleet, each machine has one owner: the one rendezvous hashing names
        assert sa["machines"] + sb["machines"] == MACHINES and sa["unreached"] == sb["unreached"] == 0, (sa, sb)
        assert sa["machines"] > 0 and sb["machines"] > 0, (sa, sb)
        rollers = [{"id": rid, "reach": []} for (rid,) in pg_rows(url, "SELECT id FROM rollers")]
        owners = [owner("hf", f"hf-{i:02d}", rollers) for i in range(MACHINES)]
        assert owners.count(sa["roller"]) == sa["machines"] and owners.count(sb["roller"]) == sb["machines"]

        # several rounds of both: every machine probed, none more than once a round
        def rounds() -> tuple[int, int]:
            return status(a)["sweep"]["round"], status(b)["sweep"]["round"]

        ra, rb = rounds()
        before = listeners.counts()
        wait_for(lambda: min(x - y for x, y in zip(rounds(), (ra, rb), strict=True)) >= 6, 60, "six rounds of each")
        ra2, rb2 = rounds()
        after = listeners.counts()
        most = max(ra2 - ra, rb2 - rb) + 2  # a round under way at each end of the window
        probed = {addr: after[addr] - before[addr] for addr in listeners.addresses}
        assert min(probed.values()) >= 1, probed
        assert max(probed.values()) <= most, (most, probed)  # two rollers sweeping a machine would double it

        # A killed: B probes the whole fleet from its first round after takeover_after
        killed = time.time()
        a.kill()
        sb = wait_for(lambda: (s := status(b)["share"]) and s["machines"] == MACHINES and s, 30,
                      "B to probe the whole fleet", describe=lambda: str(status(b)))
        assert sb["rollers"] == 1, sb
        whole = [r for r in status(b)["sweep"]["recent"] if r["machines"] == MACHINES and r["started"] > killed]
        assert whole, status(b)["sweep"]
        assert whole[0]["started"] - killed <= TAKEOVER_AFTER + 2 * SWEEP + 2.0, (killed, whole[0])
        first = wait_for(lambda: (f := listeners.first_after(whole[0]["started"])) and all(f.values()) and f, 30,
                         "every machine to hear from B")
        assert max(x for x in first.values() if x is not None) - whole[0]["started"] <= 2 * SWEEP + 2.0, first
        log = b.log_text()
        assert "Traceback" not in log, b.log_tail(80)
        assert f"this roller probes {MACHINES} of {MACHINES} machines (1 live roller(s)" in log, b.log_tail(40)
    except BaseException:
        print(a.log_tail(60))
        print(b.log_tail(80))
        raise
    finally:
        a.close()
        b.close()
        listeners.close()


BATCH = 12
LIMIT = 3


@pytest.mark.skipif(ping_skip_reason() is not None, reason=ping_skip_reason() or "")
@pytest.mark.parametrize("end", ["kill", "stop"])
def test_a_batch_created_on_a_killed_roller_is_finished_by_the_survivor_within_its_limits(
        postgres_server: PostgresServer, tmp_path: Path, end: str) -> None:
    url = postgres_server.create_database()
    quiet = {"ROLLER_HEALTH_ENABLED": "false"}
    a = RollerProcess(["--auth", "none"], state_dir=tmp_path / "a", env=cluster_env(url, "host-a", **quiet))
    b = RollerProcess(["--auth", "none"], state_dir=tmp_path / "b", env=cluster_env(url, "host-b", **quiet))
    try:
        a.start(timeout=30)
        b.start(timeout=30)
        for i in range(BATCH):
            a.json("POST", "/api/v1/machines", {"worker_id": f"bt-{i:02d}", "worker_group": "bt",
                                                "ip": f"127.0.22.{i + 1}"}, expect=201)
        wait_for(lambda: b.get(f"/api/v1/machines/bt/bt-{BATCH - 1:02d}").status == 200, 30, "B to see the machines")
        view = a.json("POST", "/api/v1/batches", {
            "task_name": "ping", "params": {"count": 3}, "selector": {"group": "bt"},
            "rollout": {"max_concurrent": LIMIT, "max_per_pool": None}}, expect=201)
        batch_id = view["batch_id"]

        def counts(roller: RollerProcess) -> dict[str, int]:
            return dict(roller.json("GET", f"/api/v1/batches/{batch_id}?members=false")["counts"])

        # mid-way: some members done, some still to start; B shows the batch A drives
        wait_for(lambda: counts(a)["succeeded"] >= LIMIT, 60, "the first members to succeed",
                 describe=lambda: str(counts(a)))
        on_b = wait_for(lambda: (c := counts(b))["succeeded"] >= LIMIT and c, 30, "B to show the progress")
        assert sum(on_b.values()) == BATCH, on_b
        assert pg_rows(url, "SELECT owner FROM batches WHERE id = ?", batch_id)[0][0].startswith("host-a/")
        if end == "kill":
            a.kill()
        else:
            assert a.stop(timeout=30) in (0, -15)  # SIGTERM: its running members end, then it leaves the rollers
        left = counts(b)
        assert left["pending"] > 0, left

        # B takes A over, adopts the batch and finishes it
        final = wait_for(lambda: (v := b.json("GET", f"/api/v1/batches/{batch_id}"))["state"] != "running" and v,
                         90, "the batch to end", describe=lambda: str(counts(b)) + "\n" + b.log_tail(30))
        odd = [(m["worker_id"], m["state"], m.get("attempts"), m.get("error")) for m in final["members"]
               if m["state"] != "succeeded"]
        assert final["state"] == "succeeded" and not odd, (final["state"], final.get("halt_reason"), odd,
                                                            b.log_events(), a.log_events())
        assert pg_rows(url, "SELECT owner FROM batches WHERE id = ?", batch_id)[0][0].startswith("host-b/")
        log = b.log_text()
        assert "adopted from a roller that left" in log, b.log_tail(60)
        assert ("Took over roller" in log) == (end == "kill"), b.log_tail(60)
        assert "Traceback" not in log, b.log_tail(80)

        # never more than LIMIT members at once, across the handover (interrupted ones count until B ended them)
        # (a member's end is announced before its job's row is written)
        wait_for(lambda: pg_rows(url, "SELECT count(*) FROM jobs WHERE batch_id = ? AND started_at IS NOT NULL"
                                      " AND finished_at IS NULL", batch_id) == [(0,)], 30, "every job's end recorded")
        spans = pg_rows(url, "SELECT started_at, finished_at, state FROM jobs WHERE batch_id = ?"
                             " AND started_at IS NOT NULL", batch_id)
        edges = sorted([(s, 1) for s, _, _ in spans] + [(f, -1) for _, f, _ in spans], key=lambda e: (e[0], e[1]))
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        assert peak <= LIMIT, spans
        assert sum(1 for _, _, st in spans if st == "succeeded") == BATCH, spans
        print(f"peak {peak}; {sum(1 for _, _, st in spans if st == 'interrupted')} member job(s) interrupted")
    except BaseException:
        print(a.log_tail(60))
        print(b.log_tail(80))
        raise
    finally:
        a.close()
        b.close()
