"""A job on Ray replicas whose replicas die for good: a clean EngineDied, and the local Ray it
started stopped with every process it ran. Real Ray; the replica body answers without vLLM."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest
import ray

from runner import run_job
from runner.engines._reap import spawned_since
from runner.engines.base import ChoiceRequest, Completion, EngineDied
from runner.engines.ray_replicas import RayReplicaEngine
from runner.spec import VLLMEngineSpec

POISON = "poison"


class DiesOnPoison:
    """Answers 'a'; a request whose text says POISON kills the actor's process (as an OOM kill would)."""

    def __init__(self, spec: VLLMEngineSpec, index: int):
        self.index = index

    async def start(self) -> dict[str, Any]:
        node = ray.get_runtime_context().get_node_id()
        return {"index": self.index, "node_id": node, "hostname": "test", "pid": os.getpid(), "load_seconds": 0.0}

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if any(POISON in request.messages[-1].content for request in requests):
            os._exit(1)
        return [Completion(text="a", prompt_tokens=1) for _ in requests]

    def shutdown(self) -> None:
        pass


async def test_replicas_that_die_for_good_end_the_job_and_its_local_ray(toy_job, tmp_path):
    assert not ray.is_initialized()
    before = spawned_since(())
    corpus = [(f"c{i}", "a") for i in range(6)] + [(POISON, "b")]
    output = "chunk_size: 3, chunks_in_flight: 1"
    spec = toy_job([("u0", "a"), ("u1", "b")], corpus, output=output, extra="cm: {enabled: false}")
    engine_spec = VLLMEngineSpec(replicas=1, ray_address="local", num_cpus_per_replica=0)
    engine = RayReplicaEngine(engine_spec, replica_class=DiesOnPoison, max_restarts=0)
    with pytest.raises(EngineDied, match="every Ray replica died"):
        async with engine:
            await run_job(spec, engine=engine)
    assert not ray.is_initialized()
    assert [p.name() for p in spawned_since(before) if p.is_running()] == []  # raylet, gcs, workers: gone
    finished = sorted(p.name for p in (tmp_path / "out/annotations").glob("part-*.parquet"))
    assert finished == ["part-00000.parquet", "part-00001.parquet"]  # the rows answered before the death
