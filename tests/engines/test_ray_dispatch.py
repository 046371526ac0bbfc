"""The Ray replica dispatcher on a real local Ray, with replica actors that answer without vLLM.

What is under test is the dispatcher: batching, spreading over replicas, re-sending the requests
of a replica that dies, restarts, and giving up cleanly. The vLLM replicas themselves run in
tests/engines/test_ray_replicas.py (marked engine).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from typing import Any

import pytest
import pytest_asyncio
import ray

from runner.engines import make_engine
from runner.engines._ray_cluster import connect_ray
from runner.engines._replica_actor import ReplicaNotReady
from runner.engines.base import ChoiceRequest, Completion, EngineError, Message
from runner.engines.ray_replicas import RayReplicaEngine
from runner.spec import VLLMEngineSpec

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the engines live on the module's event loop
slow = pytest.mark.slow  # starts a local Ray

POISON = "poison"


class EchoReplica:
    """Answers each request with its text after a short pause; a request saying POISON kills it."""

    def __init__(self, spec: VLLMEngineSpec, index: int):
        self.index = index
        self.calls = 0
        self.requests = 0

    async def start(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": "test",
            "pid": os.getpid(),
            "load_seconds": 0.0,
        }

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        self.calls += 1
        self.requests += len(requests)
        if any(request.messages[0].content == POISON for request in requests):
            os._exit(1)
        await asyncio.sleep(0.2)
        return [Completion(text=request.messages[0].content, prompt_tokens=1) for request in requests]

    def served(self) -> tuple[int, int]:
        return self.calls, self.requests

    def shutdown(self) -> None:
        pass


class ForgetsItsEngineOnce(EchoReplica):
    """Replica 0's first batch finds no engine, as after a Ray restart the dispatcher has not seen."""

    def __init__(self, spec: VLLMEngineSpec, index: int):
        super().__init__(spec, index)
        self.forgot = False

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if self.index == 0 and not self.forgot:
            self.forgot = True
            raise ReplicaNotReady("replica 0 has no engine loaded")
        return await super().complete(requests)


def ask(text: str) -> ChoiceRequest:
    return ChoiceRequest(messages=(Message("user", text),), choices=())


def spec(**fields: Any) -> VLLMEngineSpec:
    return VLLMEngineSpec(replicas=2, num_cpus_per_replica=0, max_concurrency=64, **fields)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest_asyncio.fixture(loop_scope="module")
async def echo_engine(local_ray):
    async with RayReplicaEngine(spec(), replica_class=EchoReplica, max_restarts=3) as engine:
        yield engine


async def one_call_per_request(engine: RayReplicaEngine, texts: list[str]) -> list[Completion]:
    # How the pipeline calls an engine: one coroutine per item, all at once.
    answers = await asyncio.gather(*(engine.complete([ask(text)]) for text in texts))
    return [completions[0] for completions in answers]


async def wait_until(condition, what: str) -> None:
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


@slow
@in_module_loop
async def test_requests_are_batched_spread_over_replicas_and_answered_in_order(echo_engine):
    texts = [f"item {n}" for n in range(300)]
    completions = await one_call_per_request(echo_engine, texts)
    assert [c.text for c in completions] == texts
    served = [await actor.served.remote() for actor in echo_engine.actors]
    calls = sum(c for c, _ in served)
    assert all(requests > 0 for _, requests in served)  # both replicas did work
    assert sum(requests for _, requests in served) == 300 and calls < 300 / 4  # batches, not single requests
    assert echo_engine.load_seconds is not None and {r["index"] for r in echo_engine.replicas} == {0, 1}


@slow
@in_module_loop
async def test_a_killed_replica_is_restarted_and_its_requests_are_answered_once(echo_engine):
    texts = [f"row {n}" for n in range(400)]
    job = asyncio.ensure_future(one_call_per_request(echo_engine, texts))
    await wait_until(lambda: echo_engine.replicas[0]["outstanding"] > 0, "replica 0 holds requests")
    old_pid = echo_engine.replicas[0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    completions = await job
    assert [c.text for c in completions] == texts and all(c.error is None for c in completions)
    assert echo_engine.resent_requests > 0
    await wait_until(lambda: echo_engine.replicas[0]["ready"], "replica 0 restarted")
    assert echo_engine.replicas[0]["pid"] != old_pid and echo_engine.replicas[0]["losses"] == 1
    assert [c.text for c in await one_call_per_request(echo_engine, ["after"] * 4)] == ["after"] * 4


@slow
@in_module_loop
async def test_a_replica_found_without_its_engine_is_reloaded_and_its_batch_sent_again(local_ray):
    async with RayReplicaEngine(spec(), replica_class=ForgetsItsEngineOnce) as engine:
        texts = [f"line {n}" for n in range(100)]
        completions = await one_call_per_request(engine, texts)
        assert [c.text for c in completions] == texts and all(c.error is None for c in completions)
        assert engine.resent_requests > 0 and engine.replicas[0]["losses"] == 1


@slow
@in_module_loop
async def test_a_request_that_kills_every_replica_it_reaches_becomes_an_error_row(local_ray):
    async with RayReplicaEngine(spec(), replica_class=EchoReplica, max_restarts=3, max_losses=2) as engine:
        poisoned = await engine.complete([ask(POISON)])
        assert poisoned[0].text is None and "2 replicas died" in poisoned[0].error
        fine = await one_call_per_request(engine, ["still", "works"])
        assert [c.text for c in fine] == ["still", "works"]


@slow
@in_module_loop
async def test_when_no_replica_can_come_back_the_engine_fails_instead_of_hanging(local_ray):
    async with RayReplicaEngine(spec(), replica_class=EchoReplica, max_restarts=0) as engine:
        with pytest.raises(EngineError, match="every Ray replica died"):
            await engine.complete([ask(POISON)])
        with pytest.raises(EngineError, match="every Ray replica died"):
            await engine.complete([ask("anything")])


def test_replicas_or_a_ray_address_select_the_ray_engine():
    assert isinstance(make_engine(VLLMEngineSpec(replicas=2)), RayReplicaEngine)
    assert isinstance(make_engine(VLLMEngineSpec(ray_address="auto")), RayReplicaEngine)
    assert not isinstance(make_engine(VLLMEngineSpec()), RayReplicaEngine)


def test_settings_that_cannot_work_are_refused_before_anything_starts(monkeypatch):
    with pytest.raises(EngineError, match="tensor_parallel_size 2 needs at least that many GPUs"):
        RayReplicaEngine(VLLMEngineSpec(replicas=2, num_gpus_per_replica=1, tensor_parallel_size=2))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(EngineError, match="= 4 CPUs, but this machine has 2"):
        connect_ray(VLLMEngineSpec(replicas=4, num_cpus_per_replica=1))
