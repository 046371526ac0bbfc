"""The request cache the evaluation grid puts in front of its engine."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from runner.engines._cache import CachingEngine, cache_key
from runner.engines.base import ChoiceRequest, Completion, Message


class Counting:
    """Answers every request with its text; counts the requests that reached it."""

    model_id = "counting"

    def __init__(self, delay: float = 0.0, fail: Completion | None = None):
        self.delay, self.fail = delay, fail
        self.received: list[ChoiceRequest] = []
        self.entered = self.exited = 0

    async def __aenter__(self) -> Counting:
        self.entered += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.exited += 1

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        self.received.extend(requests)
        await asyncio.sleep(self.delay)
        return [self.fail or Completion(r.messages[-1].content, 5, 1) for r in requests]


def ask(text: str, **options: object) -> ChoiceRequest:
    return ChoiceRequest((Message("user", text),), ("a", "b"), **options)


async def test_identical_requests_reach_the_engine_once():
    inner = Counting()
    async with CachingEngine(inner) as engine:
        first = await engine.complete([ask("x"), ask("y"), ask("x")])
        again = await engine.complete([ask("y"), ask("x", max_tokens=5)])
    assert [c.text for c in first] == ["x", "y", "x"] and again[0] == first[1]
    assert [r.messages[-1].content for r in inner.received] == ["x", "y", "x"]  # the third differs in max_tokens
    assert engine.cache_stats.hits == 2 and engine.cache_stats.misses == 3
    assert inner.entered == inner.exited == 1 and engine.model_id == "counting"


async def test_concurrent_identical_requests_share_one_call():
    inner = Counting(delay=0.05)
    engine = CachingEngine(inner)
    results = await asyncio.gather(*(engine.complete([ask("same")]) for _ in range(5)))
    assert len(inner.received) == 1 and {r[0].text for r in results} == {"same"}
    assert engine.cache_stats.hits == 4


async def test_greedy_requests_ignore_the_seed_sampled_ones_do_not():
    inner = Counting()
    engine = CachingEngine(inner)
    await engine.complete([ask("g", seed=0), ask("g", seed=1)])
    await engine.complete([ask("s", temperature=0.7, seed=0), ask("s", temperature=0.7, seed=1)])
    await engine.complete([ask("s", temperature=0.7, seed=0)])
    await engine.complete([ask("u", temperature=0.7, seed=None), ask("u", temperature=0.7, seed=None)])
    sent = [(r.messages[-1].content, r.seed) for r in inner.received]
    assert sent == [("g", 0), ("s", 0), ("s", 1), ("u", None), ("u", None)]  # unseeded samples must differ
    assert cache_key(ask("u", temperature=0.7, seed=None)) is None


async def test_retryable_failures_are_asked_again_final_ones_are_not():
    timeout = Completion(None, error="timed out", retryable=True)
    inner = Counting(fail=timeout)
    engine = CachingEngine(inner)
    await engine.complete([ask("t")])
    await engine.complete([ask("t")])
    assert len(inner.received) == 2
    too_long = Completion(None, error="longer than the context", retryable=False)
    inner = Counting(fail=too_long)
    engine = CachingEngine(inner)
    await engine.complete([ask("t")])
    assert (await engine.complete([ask("t")]))[0] == too_long and len(inner.received) == 1


async def test_an_engine_crash_reaches_every_waiting_caller():
    class Crashing(Counting):
        async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
            await asyncio.sleep(0.02)
            raise RuntimeError("engine died")

    engine = CachingEngine(Crashing())
    outcomes = await asyncio.gather(*(engine.complete([ask("x")]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    with pytest.raises(RuntimeError):  # nothing was cached: asking again asks the engine again
        await engine.complete([ask("x")])
