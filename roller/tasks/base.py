"""
What a task is: a named operation with typed parameters, run on one machine.

A task's C{run} is an C{async} function over a L{TaskContext}; it returns
a one-line result for the job, or raises L{TaskFailed} with a readable
reason.  Cancelling the job cancels the Deferred wrapping C{run}, which
cancels whatever the task is awaiting (a process, a connection).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

from roller.drivers.errors import DriverError
from roller.drivers.reactor import IDriverReactor
from roller.errors import ValidationError
from roller.inventory import Machine
from roller.jobs import Job
from roller.secrets import Secrets

if TYPE_CHECKING:
    from roller.config import Settings
    from roller.drivers.registry import Drivers
    from roller.store import Store


class TaskFailed(Exception):
    """The task ran and did not achieve its goal; the message says why."""


@contextmanager
def driver_errors(*errors: type[Exception], prefix: str = "", redact: Callable[[str], str] | None = None,
                  on_error: Callable[[Exception], object] | None = None) -> Iterator[None]:
    """
    Run driver calls; an error of theirs becomes L{TaskFailed} (a failed
    job) with the same one-line message::

        with driver_errors():
            detail = await ctx.drivers.ipmi.power(target, "on", ctx.log)

    @param errors: The exceptions that mean "the driver failed"; by default
        any L{roller.drivers.errors.DriverError} (which every driver's errors
        are, the power drivers' through L{roller.drivers.power.PowerError}).
    @param prefix: Put before the message (C{"not loaned: "}).
    @param redact: Applied to the message (a peer may echo a secret).
    @param on_error: Called with the error first (e.g. to log that the
        command may have reached the device).
    """
    caught: tuple[type[Exception], ...] = errors or (DriverError,)
    try:
        yield
    except caught as e:
        if on_error is not None:
            on_error(e)
        message = str(e)
        raise TaskFailed(prefix + (redact(message) if redact is not None else message)) from None


_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


@frozen
class Param:
    name: str
    type: type
    default: Any = None
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    # a further check: returns the clean value or raises ValueError(reason)
    check: Callable[[Any], Any] | None = None
    required: bool = False
    # a string parameter that is a comma-separated list also takes a JSON
    # list of strings (joined with commas before the checks)
    list_ok: bool = False

    def parse(self, value: Any) -> Any:
        path = f"params.{self.name}"
        if self.list_ok and isinstance(value, list):
            if not all(isinstance(v, str) and "," not in v for v in value):
                raise ValidationError(path, "must be a comma-separated string or a list of strings")
            value = ",".join(value)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and self.type is not bool or not isinstance(value, self.type):
            raise ValidationError(path, f"must be {_TYPES[self.type]}, got {value!r}"[:200])
        if self.minimum is not None and isinstance(value, (int, float)) and value < self.minimum:
            raise ValidationError(path, f"must be at least {self.minimum:g}")
        if self.maximum is not None and isinstance(value, (int, float)) and value > self.maximum:
            raise ValidationError(path, f"must be at most {self.maximum:g}")
        if self.choices and value not in self.choices:
            raise ValidationError(path, f"must be one of {', '.join(map(str, self.choices))}")
        if isinstance(value, str) and len(value) > 1000:
            raise ValidationError(path, "must be at most 1000 characters")
        if self.check is not None:
            try:
                value = self.check(value)
            except ValueError as e:
                raise ValidationError(path, str(e)) from None
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": _TYPES[self.type], "description": self.description}
        if self.list_ok:
            out["type"] = [_TYPES[self.type], "array"]
            out["items"] = {"type": "string", "minLength": 1, "maxLength": 40, "pattern": "^[^,]+$"}
            out["minItems"], out["maxItems"] = 1, 20
        if self.default is not None:
            out["default"] = self.default
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices:
            out["enum"] = list(self.choices)
        return out


@frozen
class TaskContext:
    """
    What a running task may use.

    @ivar reactor: The injected reactor: the clock, process spawning, TCP
        and UDP (tests give a C{MemoryReactorClock} or a C{Clock}).
    @ivar log: C{log(message, **data)}: a job event, shown live.
    """

    job: Job
    machine: Machine
    reactor: IDriverReactor
    log: Callable[..., None]
    settings: Settings | None = None
    secrets: Secrets | None = None
    drivers: Drivers | None = None
    store: Store | None = None  # loans

    @property
    def config(self) -> Settings:
        """The settings; L{TaskFailed} if this job was given none."""
        if self.settings is None:
            raise TaskFailed(f"task {self.job.task_name} needs roller's settings, which this job was not given")
        return self.settings

    @property
    def driver_set(self) -> Drivers:
        """The drivers; L{TaskFailed} if this job was given none."""
        if self.drivers is None:
            raise TaskFailed(f"task {self.job.task_name} needs roller's drivers, which this job was not given")
        return self.drivers


RunFunction = Callable[[TaskContext, Mapping[str, Any]], Awaitable[str]]


@frozen
class TaskSpec:
    name: str
    description: str
    run: RunFunction
    params: tuple[Param, ...] = ()
    timeout: float = 300.0
    destructive: bool = False
    # Shared endpoints the task talks to for this machine (e.g. "pdu:host",
    # "bmc:host"); the queue caps concurrency and spaces commands per endpoint.
    endpoints: Callable[[Machine], tuple[str, ...]] = field(default=lambda machine: ())

    def parse_params(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValidationError("params", "must be an object")
        known = {p.name: p for p in self.params}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValidationError("params", f"task {self.name} has no parameter(s) {', '.join(unknown)}"[:300])
        out = {}
        for p in self.params:
            if p.name in raw:
                out[p.name] = p.parse(raw[p.name])
            elif p.default is not None:
                out[p.name] = p.default
            elif p.required:
                raise ValidationError(f"params.{p.name}", "is required")
        return out

    def to_json(self, allowed: bool = True) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "destructive": self.destructive,
            "timeout_s": self.timeout,
            "allowed": allowed,
            "params": {p.name: p.schema() for p in self.params},
        }
