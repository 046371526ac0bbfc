"""An engine wrapper that loads the model on the first request instead of on entering.

A job that asks nothing never pays for a model: a finished job read back, or a bank whose
neighbour vote needs no first answer (``cm.first_call: when_weighted``) on a reused bank.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Self

from runner.engines.base import ChoiceRequest, Completion, Engine


class LazyEngine:
    """Wraps ``inner``; use it wherever an engine goes. Concurrent first requests start it once."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.started = False
        self._starting = asyncio.Lock()

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def __getattr__(self, name: str) -> object:
        # what the wrapped engine tells about itself (load_seconds, an API engine's stats()) reads through
        return getattr(self.inner, name)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.started:
            self.started = False
            await self.inner.__aexit__(*exc_info)

    async def start(self) -> None:
        """Start the wrapped engine now (Ray workers need the replicas a finished estimate never started)."""
        async with self._starting:
            if not self.started:
                await self.inner.__aenter__()
                self.started = True

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if not self.started:  # the lock only until started: taking it on every request costs CPU per row
            await self.start()
        return await self.inner.complete(requests)
