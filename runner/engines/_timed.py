"""An engine wrapper that clocks the time the engine had work: a local stage's cost in engine-seconds.

A local engine (vLLM in-process, replicas on Ray) has no price per token, so what a cascade stage
costs is the time its engine spends answering. Busy time is wall time with at least one request in
flight: overlapping requests count once, the model's load (``load_seconds``) not at all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Self

from runner.engines.base import ChoiceRequest, Completion, Engine


class TimedEngine:
    """Wraps ``inner``; use it wherever an engine goes. ``busy_seconds`` grows while a request is out."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.busy_seconds = 0.0
        self._in_flight = 0
        self._since = 0.0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)  # stats(), load_seconds, wants_whole_phase, ... read through

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.inner.__aexit__(*exc_info)

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if not self._in_flight:
            self._since = time.perf_counter()
        self._in_flight += 1
        try:
            return await self.inner.complete(requests)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self.busy_seconds += time.perf_counter() - self._since

    def seconds(self) -> float:
        """Busy so far, the request in flight included (a job stopped mid-request)."""
        open_now = time.perf_counter() - self._since if self._in_flight else 0.0
        return self.busy_seconds + open_now
