"""Fewer cyclic garbage collections while a job works through rows.

A job keeps thousands of rows in flight (an asyncio task, its coroutines and its HTTP request
objects each), and most of them outlive a young collection, so with CPython's default threshold
(a collection every 700 allocations) the collector rescans the same live objects over and over:
against an instant server it took about half of the one-machine driver's CPU (CM off, 40,000 rows,
0.57 against 0.29 ms per row; tests/bench/README.md). Almost all of a row's garbage is freed by
reference counting, not by the collector, so collecting less often costs little memory.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# young collections every 50,000 allocations instead of 700; the oldest generation after 20 x 10
# young ones, so cycles (exceptions with tracebacks, say) are still reclaimed several times a minute
ROWS_THRESHOLD = (50_000, 20, 10)


@contextmanager
def fewer_collections(threshold: tuple[int, int, int] = ROWS_THRESHOLD) -> Iterator[None]:
    """Collect garbage cycles less often inside the block; the thresholds before it are restored after."""
    before = gc.get_threshold()
    gc.set_threshold(*threshold)
    try:
        yield
    finally:
        gc.set_threshold(*before)
