"""
Garbage-collector settings for the roller process (the twistd entry point
applies them; tests and embedders keep Python's defaults).

A roller holds a large, long-lived heap (the inventory cache, the queue)
and allocates many short-lived cycles per request (Deferreds, failures).
With CPython's defaults each full collection walks the whole heap on the
reactor thread: tens of milliseconds during which no request is answered.
So, once roller has started:

  - everything alive then (modules, the inventory, recovered jobs) is moved
    to the permanent generation with C{gc.freeze()}: the collector stops
    walking it;
  - the youngest generation is collected every L{GEN0_THRESHOLD}
    allocations instead of 700: fewer, still short, young collections.
"""

from __future__ import annotations

import gc

#: Python's default is 700; young collections stay well under a millisecond.
GEN0_THRESHOLD = 20_000


def settle_heap() -> None:
    """Collect once, freeze what survived, and space out young collections."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
