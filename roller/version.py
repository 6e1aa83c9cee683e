"""
What C{GET /__version__} answers (Dockerflow): the C{version.json} a build
writes, else the one shipped in this package.

The file holds C{source} (the repository URL), C{version}, C{commit} and
C{build} (a CI build URL); a build (CI, a package) overwrites the shipped
one, or points C{server.version_file} at its own.  Missing keys are filled
in (C{version} from the package), so the answer always has all four; an
unreadable file is logged and the package's values used.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import Logger

from roller import __version__

__all__ = ["PACKAGED", "load_version"]

log = Logger()

PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "version.json")
KEYS = ("source", "version", "commit", "build")


def load_version(path: str = "") -> dict[str, Any]:
    """The version document from C{path}, else the packaged C{version.json}."""
    out: dict[str, Any] = {"name": "roller", "source": "", "version": __version__, "commit": "", "build": ""}
    path = path or PACKAGED
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        if path != PACKAGED:
            log.warn("Version file {path} does not exist; /__version__ shows the package's version", path=path)
        return out
    except (OSError, ValueError) as e:
        log.warn("Version file {path} is unusable ({why}); /__version__ shows the package's version",
                 path=path, why=str(e))
        return out
    for key in KEYS:
        if isinstance(data.get(key), str) and data[key]:
            out[key] = data[key]
    return out
