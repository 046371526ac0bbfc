"""A worker's CPU per stage of a row (prompt, engine client, CM apply, ...), from stack samples of its event loop.

A chunk's rows run as interleaved coroutines on one event loop: a timer around a step would also
count the other rows' work done while that step awaited, so per-stage timers cannot split the
loop's CPU. Instead a thread samples the loop thread's stack every ``interval`` seconds and names
the stage from the innermost frame a stage owns (the engine's modules and aiohttp, the strategy's
prompts, the CM's math, ...); samples where the loop waits (in ``select``, or inside uvloop's C
loop, which Ray's workers install) are idle and not counted. The loop thread's CPU over a chunk is
then split in proportion to the samples. ``read``, ``embed`` and
``write`` are timed directly by the worker (they run as plain calls or in a thread of their own).
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from types import FrameType

# the first rule matching a frame's file, innermost frame first, names the stage
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle", ("/selectors.py",)),
    # the frame that runs the loop, innermost: the thread is inside the loop's C code (Ray workers run
    # uvloop), waiting on epoll or between callbacks; its bookkeeping CPU is shared out with the rest
    ("idle", ("/runner/ray_executor.py",)),
    ("engine_client", ("/runner/engines/", "/aiohttp/", "/yarl/", "/multidict/", "/asyncio/selector_events.py")),
    ("engine_client", ("/asyncio/sslproto.py",)),
    ("prompt", ("/runner/strategies.py", "/runner/prompts.py", "/runner/labels.py")),
    ("cm_apply", ("/runner/apply.py", "/runner/fit.py", "/runner/posterior.py", "/runner/trust.py")),
    ("cm_apply", ("/runner/probe.py", "/runner/novelty.py", "/sklearn/", "/scipy/")),
    ("write", ("/runner/checkpoint.py", "/runner/_storage.py", "/runner/_durable.py")),
    # the block function's own bookkeeping: each row's record, the chunk's polars frames
    ("rows", ("/runner/pipeline.py", "/polars/")),
    ("event_loop", ("/asyncio/",)),
)


def stage_of(frame: FrameType | None) -> str:
    """The stage owning the innermost frame of this stack that any stage owns; 'other' if none does."""
    while frame is not None:
        filename = frame.f_code.co_filename
        for stage, parts in _RULES:
            if any(part in filename for part in parts):
                return stage
        frame = frame.f_back
    return "other"


class StageSampler:
    """Counts, per stage, the samples of one thread's stack taken while it ran Python (not waiting in select)."""

    def __init__(self, thread_id: int, interval: float = 0.005):
        self.thread_id = thread_id
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cm-stage-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            self.counts[stage_of(frame)] += 1

    def take(self) -> Counter[str]:
        """The counts since the last take (idle samples dropped)."""
        counts, self.counts = self.counts, Counter()
        counts.pop("idle", None)
        return counts

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def split(seconds: float, counts: Counter[str]) -> dict[str, float]:
    """``seconds`` shared out over the stages in proportion to their samples."""
    total = sum(counts.values())
    return {stage: seconds * count / total for stage, count in counts.items()} if total else {"other": seconds}
