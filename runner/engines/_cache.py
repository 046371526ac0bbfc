"""An engine wrapper that never pays for the same request twice.

The evaluation grid asks the same questions many times: Z and CM+Z make the same first calls,
zero-shot does not depend on the user budget, self-refine's draft is the zero-shot request. The
cache keys on the whole request (messages, choices, max_tokens, temperature, seed), joins a
request that is already in flight instead of sending it again, and counts what it saved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Self

from runner.engines._lazy import LazyEngine
from runner.engines.base import ChoiceRequest, Completion, Engine


@dataclass(frozen=True)
class CacheStats:
    hits: int  # requests answered from memory or by joining an identical request in flight
    misses: int  # requests the wrapped engine answered

    @property
    def requests(self) -> int:
        return self.hits + self.misses


def cache_key(request: ChoiceRequest) -> ChoiceRequest | None:
    """What identifies a request's answer; None when it has no fixed answer to reuse."""
    if request.temperature == 0:
        return replace(request, seed=None)  # greedy decoding ignores the seed: any seed gives this answer
    if request.seed is None:
        return None  # an unseeded sample is meant to differ each time it is asked
    return request


def _retrieve(future: asyncio.Future[Completion]) -> None:
    if not future.cancelled():
        future.exception()  # an engine crash reaches the caller that sent it; joiners may be gone


class CachingEngine:
    """Wraps ``inner``; use it wherever an engine goes.

    ``inner`` is started on the first request the cache cannot answer, not on entering: a grid
    whose cells are all finished is read back without loading a model.
    """

    def __init__(self, inner: Engine):
        self.inner = inner
        self._engine = LazyEngine(inner)
        self._answers: dict[ChoiceRequest, Completion] = {}
        self._in_flight: dict[ChoiceRequest, asyncio.Future[Completion]] = {}
        self._hits = 0
        self._misses = 0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def cache_stats(self) -> CacheStats:
        return CacheStats(hits=self._hits, misses=self._misses)

    def __getattr__(self, name: str) -> object:
        # what the wrapped engine tells about itself (load_seconds, an API engine's stats()) reads through
        return getattr(self.inner, name)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._engine.__aexit__(*exc_info)

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[Completion]] = []
        sent: list[tuple[ChoiceRequest, ChoiceRequest | None, asyncio.Future[Completion]]] = []
        for request in requests:
            key = cache_key(request)
            if key is not None and key in self._answers:
                future = loop.create_future()
                future.set_result(self._answers[key])
                self._hits += 1
            elif key is not None and key in self._in_flight:
                future = self._in_flight[key]
                self._hits += 1
            else:
                future = loop.create_future()
                future.add_done_callback(_retrieve)
                if key is not None:
                    self._in_flight[key] = future
                sent.append((request, key, future))
                self._misses += 1
            waits.append(future)
        if sent:
            await self._send(sent)
        return [await future for future in waits]

    async def _send(self, sent: list[tuple[ChoiceRequest, ChoiceRequest | None, asyncio.Future[Completion]]]) -> None:
        try:
            completions = await self._engine.complete([request for request, _, _ in sent])
        except BaseException as error:
            for _, key, future in sent:
                if key is not None:
                    self._in_flight.pop(key, None)
                if future.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(error)
            raise
        for (_, key, future), completion in zip(sent, completions, strict=True):
            if key is not None:
                self._in_flight.pop(key, None)
                # a retryable failure (timeout) may succeed next time; everything else is the answer
                if completion.error is None or not completion.retryable:
                    self._answers[key] = completion
            future.set_result(completion)
