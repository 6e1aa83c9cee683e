"""Taskcluster scope satisfaction: an exact match, or a held scope ending in C{*}."""

from __future__ import annotations

from collections.abc import Iterable


def satisfies(held: Iterable[str], required: str) -> bool:
    for scope in held:
        if scope == required or (scope.endswith("*") and required.startswith(scope[:-1])):
            return True
    return False
