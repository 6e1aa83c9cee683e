"""
The twistd plugin's options and service: C{twistd -n roller --help}.

With C{roller.tac}, the only place that picks the global reactor.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, cast

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore
from twisted.python import usage

from roller.config import ConfigError, Settings, check_names, load_settings
from roller.gctune import settle_heap
from roller.health.watcher import policies_from_settings
from roller.inventory import REBOOT_METHODS
from roller.secrets import SecretsError, load_secrets
from roller.service import IRollerReactor, RollerService
from roller.store.db import StoreError, check_writable
from roller.store.engine import database_login, database_target, is_postgresql
from roller.store.sqlite import check_not_in_use, check_schema
from roller.tasks import builtin_tasks


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "roller, the Release Operations Controller: a REST API and job queue that pings, "
        "reboots and power-cycles CI machines. Settings come from the TOML file given with "
        "--config (or $ROLLER_CONFIG), then ROLLER_* environment variables, then these options."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["db", "d", None, "SQLite database file (default STATE_DIR/roller.db)."],
        ["state-dir", "s", None, "Directory for the database and secrets (default ./state)."],
        ["auth", "a", None, "Authentication mode: taskcluster (default), local (Hawk clients in the "
         "secrets file) or none (loopback only)."],
    ]
    optFlags = [
        ["demo", None, "Add a small demo fleet of loopback machines and allow everything on loopback."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        Twisted server endpoint to listen on (default
        tcp:8000:interface=127.0.0.1); repeat for several.
        """
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def overrides(self) -> dict[str, Any]:
        return {
            "server.listen": " ".join(self["listen"]) or None,
            "database.path": self["db"],
            "state_dir": self["state-dir"],
            "auth.mode": self["auth"],
            "demo": "true" if self["demo"] else None,
        }


def settings_from_options(options: Options, environ: Any = None) -> Settings:
    overrides = options.overrides()
    env = os.environ if environ is None else environ
    if options["demo"] and overrides["auth.mode"] is None and "ROLLER_AUTH_MODE" not in env:
        overrides["auth.mode"] = "none"
    settings = load_settings(options["config"], env, overrides)
    check_names(settings, tasks=builtin_tasks().names(), reboot_methods=REBOOT_METHODS)
    policies_from_settings(settings, builtin_tasks().names())  # a bad [[health.policies]] stops start-up here
    return settings


def check_endpoints(settings: Settings, reactor: IReactorCore) -> None:
    """
    Build every C{server.listen} endpoint on C{reactor} (reading a TLS
    listener's key and certificate, asking a plugin): a string roller's own
    check let through and Twisted refuses is a L{ConfigError} at start-up.
    """
    for desc in settings.listen:
        try:
            serverFromString(reactor, desc)
        except Exception as e:  # noqa: BLE001 -- endpoint plugins raise anything; all of it means a bad string
            raise ConfigError("server.listen", f"{desc!r} is not a Twisted server endpoint: {e}") from None


def exit_with(message: str) -> None:
    """Print one readable line and exit non-zero: no traceback."""
    sys.stderr.write(f"roller: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def makeService(options: Options) -> RollerService:
    from twisted.internet import reactor as global_reactor

    # Twisted types the global reactor with a few of its interfaces only; it provides all of IRollerReactor's.
    reactor = cast(IRollerReactor, global_reactor)

    try:
        settings = settings_from_options(options)
        check_endpoints(settings, reactor)
        secrets = load_secrets(settings.secrets_file)  # refuse a readable secrets file before starting
        if is_postgresql(settings):
            login = database_login(settings, secrets)
            # refuse a server that cannot be reached or take a write, or a database from a newer roller
            check_writable(database_target(settings), time.time(), user=login.user, password=login.password)
        else:
            check_schema(settings.db_path)  # refuse a database from a newer roller, naming both versions
            check_writable(settings.db_path, time.time())  # refuse a database that cannot take a write
            check_not_in_use(settings.db_path)  # refuse a database another roller runs on
    except (ConfigError, SecretsError, StoreError) as e:
        exit_with(str(e))
    service = RollerService(settings, reactor)

    def exit_if_failed() -> None:
        if service.failed:
            sys.stderr.flush()
            os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", exit_if_failed)
    service.ready.addCallback(lambda _: settle_heap())
    # SIGHUP: read the secrets file again, on the reactor thread
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(service.reload_secrets))
    return service
