"""Peak memory of a job's whole process tree (the engine core and its workers are child processes).

``getrusage`` misses children that are killed rather than reaped, as vLLM does with its worker
at shutdown, so a background thread samples this process and every descendant. It sums the
proportional set size (PSS: a shared page counts 1/n in each of the n processes sharing it), so
libraries and shared memory the engine processes share are not counted once per process, as
summed RSS would; where PSS cannot be read, RSS stands in.

Reading PSS parses each process's smaps, which costs milliseconds per process: with a local Ray's
dozen processes under the driver, sampling every half second took 28% of a Ray driver's CPU
(tests/bench/README.md). So the sampler waits ``cost_ratio`` times as long as its last sample
took, and never more often than ``interval``: at most about 1/cost_ratio of a core.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Self

import psutil


def _proportional_size(process: psutil.Process) -> int:
    try:
        return process.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):
        return process.memory_info().rss


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mb``: the largest summed PSS seen, in MiB."""

    def __init__(self, interval: float = 0.5, cost_ratio: float = 100.0):
        self.interval = interval
        self.cost_ratio = cost_ratio
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        root = psutil.Process()
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += _proportional_size(process)
            except psutil.Error:  # a process that ended between listing and reading
                continue
        self.peak_bytes = max(self.peak_bytes, total)

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            started = time.thread_time()  # this thread's CPU, not the wall time other threads take
            self._sample()
            self._stop.wait(max(self.interval, self.cost_ratio * (time.thread_time() - started)))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)
