"""The OpenAPI 3.1 document for the REST API (placeholder, being written)."""

from __future__ import annotations

from typing import Any


def openapi_document(tasks: Any, allowed: tuple[str, ...], version: str) -> dict:
    return {"openapi": "3.1.0", "info": {"title": "roller", "version": version}, "paths": {}}
