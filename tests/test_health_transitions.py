"""
A machine's transitions as the health watcher serves them agree with its
state at once: one still being written to the database is shown, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred

from roller.config import load_settings
from roller.drivers.liveness import LivenessResult
from roller.health.watcher import HealthWatcher
from roller.inventory import Machine
from roller.queue import JobQueue
from roller.tasks import builtin_tasks
from roller.testing.results import result_of
from roller.testing.syncdb import run, sync_store


def test_a_transition_being_written_is_shown_with_the_state_it_made(tmp_path: Path) -> None:
    store, clock = sync_store(str(tmp_path / "h.db"))
    machine = Machine(worker_id="w1", worker_group="g", ip="127.0.0.2", pool="p")
    result_of(store.machines.insert(machine))
    settings = evolve(load_settings(None, {}, {}), health_enabled=False)
    queue = JobQueue(store, builtin_tasks(), clock)
    run(queue.start())
    watcher = HealthWatcher(clock, store, queue, settings)  # type: ignore[arg-type]
    run(watcher.start())
    real_save = store.health.save
    held: list[tuple[Deferred, tuple]] = []

    def slow_save(*args: Any) -> Deferred:
        d: Deferred = Deferred()
        held.append((d, args))
        return d

    store.health.save = slow_save  # type: ignore[method-assign]
    watcher._probed(machine, LivenessResult(alive=True, detail="answered"), None)
    clock.advance(0)  # the write starts, and waits
    assert watcher.state_of(machine.key) == "healthy" and len(held) == 1
    (shown,) = result_of(watcher.transitions(machine.key))
    assert (shown.old, shown.new) == ("unknown", "healthy")
    # written: shown once, from the database
    d, args = held.pop()
    result_of(real_save(*args))
    d.callback(None)
    assert [(t.old, t.new) for t in result_of(watcher.transitions(machine.key))] == [("unknown", "healthy")]
    store.health.save = real_save  # type: ignore[method-assign]
    run(watcher.stop())
