"""Progress as log lines, for when stderr is a file or a pipe (a scheduler's log, `nohup`, CI).

A line about every ``interval`` seconds per phase, and one when a phase ends: done/total, the
rate since this run started the phase (rows an earlier run finished are not counted as speed),
and the time left at that rate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

INTERVAL_ENV = "CM_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def interval_from_env() -> float:
    try:
        return max(float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)), 0.0)
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


@dataclass
class _Phase:
    started: float
    done_at_start: int
    last_line: float | None = None
    ended: bool = False


class ProgressLog:
    """``progress(phase, done, total)`` that writes a line through ``write`` every ``interval`` seconds."""

    def __init__(
        self,
        write: Callable[[str], None],
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.write = write
        self.interval = interval
        self.clock = clock
        self._phases: dict[str, _Phase] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        state = self._phases.get(phase)
        if state is None:
            state = self._phases[phase] = _Phase(started=now, done_at_start=done)
        if state.ended or (done < total and state.last_line is not None and now - state.last_line < self.interval):
            return
        state.last_line, state.ended = now, done >= total
        self.write(self.line(phase, done, total, state, now))

    @staticmethod
    def line(phase: str, done: int, total: int, state: _Phase, now: float) -> str:
        share = f" ({100 * done / total:.0f}%)" if total else ""
        worked = done - state.done_at_start
        elapsed = now - state.started
        text = f"{phase} {done:,}/{total:,}{share}"
        if worked > 0 and elapsed > 0:
            rate = worked / elapsed
            text += f", {rate:,.2f} items/s"
            text += f", ETA {_duration((total - done) / rate)}" if done < total else f", took {_duration(elapsed)}"
        return text
