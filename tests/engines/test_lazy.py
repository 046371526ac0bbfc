"""LazyEngine: the model loads on the first request, so a job that asks nothing never loads one."""

import asyncio

from runner.engines._lazy import LazyEngine
from runner.engines.base import ChoiceRequest, Message
from tests.scripted_engine import ScriptedEngine


def request(text: str) -> ChoiceRequest:
    return ChoiceRequest(messages=(Message("user", text),), choices=("a", "b"))


async def test_an_engine_asked_nothing_is_never_started():
    inner = ScriptedEngine({"x": "a"})
    async with LazyEngine(inner):
        pass
    assert not inner.started


async def test_concurrent_first_requests_start_it_once_and_are_answered():
    inner = ScriptedEngine({"x": "a", "y": "b"})
    starts = 0
    original = inner.__aenter__

    async def counting_enter():
        nonlocal starts
        starts += 1
        await asyncio.sleep(0.01)  # a slow model load: the second request arrives meanwhile
        return await original()

    inner.__aenter__ = counting_enter
    async with LazyEngine(inner) as engine:
        first, second = await asyncio.gather(engine.complete([request("x")]), engine.complete([request("y")]))
    assert starts == 1 and inner.started
    assert first[0].text == "a" and second[0].text == "b"


async def test_a_rerun_of_a_finished_job_loads_no_model(toy_job, monkeypatch):
    import runner.pipeline
    from runner import run_job

    spec = toy_job([(f"u{i}", "ab"[i % 2]) for i in range(4)], [(f"c{i}", "ab"[i % 2]) for i in range(4)], name="lazy")
    answers = {f"{p}{i}": "ab"[i % 2] for p in "uc" for i in range(4)}
    made: list[ScriptedEngine] = []

    def make(_spec, _state_dir=None):
        made.append(ScriptedEngine(answers, n_labels=2))
        return made[-1]

    monkeypatch.setattr(runner.pipeline, "make_engine", make)
    first = await run_job(spec)  # the job makes its own engine
    again = await run_job(spec)
    assert made[0].started and made[0].requests
    assert not made[1].started and first.metrics["accuracy_cm"] == again.metrics["accuracy_cm"] == 1.0
