"""
The registry of tasks by name.

Each task lives in its own module and is listed in L{builtin_tasks}; the
configured allow-list decides which are reachable over REST.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from roller.tasks.base import Param, TaskContext, TaskFailed, TaskSpec

__all__ = ["Param", "TaskContext", "TaskFailed", "TaskSpec", "TaskRegistry", "builtin_tasks"]


class TaskRegistry:
    def __init__(self, tasks: Iterable[TaskSpec] = ()):
        self._tasks: dict[str, TaskSpec] = {}
        for t in tasks:
            self.register(t)

    def register(self, task: TaskSpec) -> None:
        if task.name in self._tasks:
            raise ValueError(f"task {task.name!r} is registered twice")
        self._tasks[task.name] = task

    def get(self, name: str) -> TaskSpec | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))

    def names(self) -> list[str]:
        return sorted(self._tasks)


def builtin_tasks() -> TaskRegistry:
    from roller.tasks import bugzilla, ipmi, loan, pdu, ping, reboot, redfish, reimage, ssh_reboot, xen

    return TaskRegistry([ping.TASK, ssh_reboot.TASK, reboot.TASK, reimage.TASK, redfish.TASK, redfish.POWER_TASK,
                         xen.TASK, *ipmi.TASKS, *pdu.TASKS, bugzilla.TASK,
                         *loan.TASKS])
