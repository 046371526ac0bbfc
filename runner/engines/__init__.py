"""Engines: the LLM G behind one small async interface, and the factory that picks one."""

from __future__ import annotations

from pathlib import Path

from runner.engines.base import ChoiceRequest, Completion, Engine, EngineError, Message
from runner.spec import EngineSpec


def make_engine(spec: EngineSpec, state_dir: Path | None = None) -> Engine:
    """The engine a spec asks for (imported lazily: vLLM is heavy and optional).

    ``state_dir`` is where an engine that outlives a run keeps its state (the Batch API's record);
    without one such an engine remembers nothing past its process.
    """
    if spec.kind == "vllm" and not spec.uses_ray:
        from runner.engines.vllm import VLLMEngine

        return VLLMEngine(spec)
    if spec.kind == "vllm":  # replicas > 1 or ray_address: vLLM engines in Ray actors
        from runner.engines.ray_replicas import RayReplicaEngine

        return RayReplicaEngine(spec)
    if spec.kind == "openai" and spec.batch:
        from runner.engines.openai_batch import OpenAIBatchEngine

        return OpenAIBatchEngine(spec, state_dir)
    if spec.kind == "openai":
        from runner.engines.openai import OpenAIEngine

        return OpenAIEngine(spec)
    raise EngineError(f"engine.kind {spec.kind!r} is not supported yet")


__all__ = ["ChoiceRequest", "Completion", "Engine", "EngineError", "Message", "make_engine"]
