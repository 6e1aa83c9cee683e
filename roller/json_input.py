"""
The one reader for JSON that comes from outside: request bodies (the REST
API), uploaded inventory files (C{/admin/import}) and C{roller import}.

    data = load_json(raw)            # bytes or str
    data = load_json(raw, parse_float=...)

Python's decoder recurses once per nesting level: a body of a few thousand
C{[} would end in a C{RecursionError} (a 500) before anything looks at it.
L{load_json} measures the nesting first, without recursing and in time
linear in the input (C-speed string operations only), and refuses anything
nested deeper than L{MAX_JSON_DEPTH} levels; nothing roller accepts comes
close (a machine is 3 levels deep, a legacy C{WORKER_CONFIG} 5).

The text must be UTF-8 (RFC 8259), a leading byte order mark allowed.
Every refusal is a L{JSONInputError}, a C{ValueError} with a readable
message that quotes nothing from the input.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from itertools import accumulate, count
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "JSONInputError", "JSONTooDeep", "json_depth", "load_json"]

#: arrays and objects nested deeper than this are refused
MAX_JSON_DEPTH = 32

# After strings are removed: "[" and "{" count 2, "]" and "}" count 0,
# everything else is deleted (see json_depth).
_STEPS = str.maketrans({"[": "\x02", "{": "\x02", "]": "\x00", "}": "\x00"})
_KEEP = frozenset("[]{}")


class JSONInputError(ValueError):
    """Not JSON roller reads: not UTF-8, not JSON, or nested too deep."""


class JSONTooDeep(JSONInputError):
    """Arrays and objects nested deeper than the limit."""


def json_depth(text: str) -> int:
    """
    The deepest nesting of arrays and objects in C{text} (C{0} for a
    scalar, C{1} for C{[]} or C{{}}), counting brackets outside strings.

    No recursion and no per-character Python loop: escaped backslashes and
    escaped quotes are dropped, the text is split on the remaining quotes
    (every other piece is inside a string), and the depth is a running sum
    over the brackets that are left.  For text that is not JSON the answer
    is an upper bound of the depth a decoder reaches before it fails, which
    is what the check needs.
    """
    outside = "".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2])
    if not _KEEP.intersection(outside):
        return 0
    steps = _only_brackets(outside).translate(_STEPS).encode("latin-1")
    # after k brackets, depth = opened - closed = 2 * opened - k
    return max(0, max(map(operator.sub, accumulate(steps), count(1))))


def _only_brackets(text: str) -> str:
    # delete every character that is not a bracket, without a Python loop over them
    others = set(text) - _KEEP
    return text.translate(dict.fromkeys(map(ord, others)))


def load_json(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH,
              parse_float: Callable[[str], Any] | None = None) -> Any:
    """
    Decode C{data} (UTF-8 bytes, or text) as JSON nested at most
    C{max_depth} levels.

    @raise JSONTooDeep: nested deeper than C{max_depth}.
    @raise JSONInputError: not UTF-8, or not JSON.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise JSONInputError(f"it is not UTF-8 text (byte {e.start})") from None
    else:
        text = data.removeprefix("\ufeff")
    depth = json_depth(text)
    if depth > max_depth:
        raise JSONTooDeep(f"arrays and objects are nested {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(text, parse_float=parse_float)
    except RecursionError:  # not reached: json_depth bounds the decoder's recursion
        raise JSONTooDeep(f"arrays and objects are nested too deep; at most {max_depth} are accepted") from None
    except ValueError as e:
        raise JSONInputError(str(e)) from None
