"""The Ray Data executor: the corpus's chunks annotated by worker actors; the driver only schedules.

The driver fits on the user split (as on one machine), then hands Ray Data the numbers of the
chunks still to do. Each worker actor (``_ChunkWorker``, an actor pool of ``executor.workers``)
loads once what it needs: the frozen fit, the strategy, the embedding model, and an engine (its
own HTTP client for an API, or a dispatcher over the driver's long-lived vLLM replica actors, so a
model loads once per replica per job). For each chunk number it reads that chunk from the corpus
file, runs the same block function as the one-machine executor (``pipeline.work_on_chunk`` over
``pipeline.annotate_work``) and writes the shard; the driver receives one small record per chunk
and records the shard in the manifest. No corpus row passes through the driver. A rescore (a rerun
after a review changed the fit) is the same pass over the finished chunks, each worker running
``pipeline.rescore_block`` over its chunk and that chunk's shard (``rescore_on_ray``). The estimate
phase's chunks of the user split go through the workers too (``estimate_on_ray``, over
``pipeline.estimate_work``), handed over with their rows: the driver holds the split to fit on it.

Why chunk numbers and not ``ray.data.read_parquet``: a chunk is the unit of checkpoint and resume,
numbered by position in the corpus. Ray Data's blocks have no stable numbering across runs, so
shards written from them could not be resumed by either executor; reading chunk ``n`` is a slice
(for parquet, only the row groups it spans). What Ray Data gives: the actor pool, backpressure
(chunks are handed out as workers free up), and retries of a chunk whose worker died
(``max_restarts``/``max_task_retries``): the retried chunk resumes from its partial shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from runner._cpu_stages import StageSampler, split
from runner._gc import ROWS_THRESHOLD
from runner._storage import ObjectPath, location
from runner.checkpoint import Checkpoint, Manifest
from runner.data import Corpus
from runner.engines import Engine, make_engine
from runner.fit import FittedCM
from runner.labels import LabelSet
from runner.spec import JobSpec
from runner.strategies import Strategy

if TYPE_CHECKING:
    from runner.pipeline import ChunkOutcome

PHASE = "annotate"
WORKER_STAGES = (
    *("read", "prompt", "embed", "engine_client", "cm_apply", "write"),
    *("rows", "event_loop", "other", "outside_loop"),
)
"""A worker's CPU per chunk, split (``runner._cpu_stages``): ``rows`` is the block function's bookkeeping
(each row's record, the chunk's polars frames), ``event_loop`` asyncio's own, ``outside_loop`` the
process's other threads (Ray's core worker, the sampler)."""


@dataclass(frozen=True)
class RayStage:
    """A stage of the job's cascade as a worker builds it: its spec (engine, embedder), strategy and frozen fit."""

    name: str
    spec: JobSpec
    strategy: Strategy
    fitted: FittedCM | None


@dataclass(frozen=True)
class _ChunkJob:
    """What every worker needs, pickled once by Ray for the whole pool."""

    spec: JobSpec
    corpus_path: Path | ObjectPath
    labels: LabelSet
    stages: tuple[RayStage, ...]
    reviewed: pl.DataFrame | None
    replica_actors: list[Any] | None  # the driver's vLLM replicas; None: each worker makes its own engine
    workers: int
    rescore: bool = False  # score finished chunks again with this fit (pipeline.rescore_block), not annotate
    chose_within_sets: bool = True  # a rescore's: earlier labels are the model's choices within their sets
    phase: str = PHASE  # "estimate": the chunks are the user split's, handed over with their rows
    directory: Path | ObjectPath | None = None  # where shards go (a cascade stage's own); None: output.dir


@dataclass(frozen=True)
class RayEstimate:
    """What a stage's estimate needs to run on the workers: the job's spec and engine (whose replicas they share)."""

    job_spec: JobSpec
    job_engine: Engine


class _TimedCheckpoint(Checkpoint):
    """The job's checkpoint, counting the CPU its shard writes take on the calling thread (the write stage)."""

    write_seconds = 0.0

    def write_shard_file(self, phase: str, number: int, rows: pl.DataFrame) -> None:
        started = time.thread_time()
        super().write_shard_file(phase, number, rows)
        self.write_seconds += time.thread_time() - started

    def write_partial(self, phase: str, number: int, rows: pl.DataFrame) -> None:
        started = time.thread_time()
        super().write_partial(phase, number, rows)
        self.write_seconds += time.thread_time() - started


class _ChunkWorker:
    """A Ray Data actor: annotates each chunk number it is given, writing the chunk's shard."""

    def __init__(self, job: _ChunkJob):
        from runner.pipeline import StageWork, _embedder, annotate_work, estimate_work

        spec = job.spec
        self._job = job
        # the actor's process is this job's alone: the one machine's collection thresholds for all of it
        # (a chunk keeps thousands of rows in flight; runner/_gc.py says why that makes the default costly)
        gc.set_threshold(*ROWS_THRESHOLD)
        self._loop = asyncio.new_event_loop()
        # an estimate's chunks come with their rows (the user split, which the driver holds anyway)
        self._corpus = (
            Corpus(job.corpus_path, spec.dataset, spec.corpus, job.labels.labels, checked=False)
            if job.phase == PHASE
            else None
        )
        self._checkpoint = _TimedCheckpoint(job.directory or location(spec.output.dir), spec)
        self._embed_seconds = 0.0
        # one engine per distinct engine spec (the job's own is the one over the driver's replicas)
        self._engines: dict[str, Engine] = {}
        work = []
        for stage in job.stages:
            key = stage.spec.engine.model_dump_json()
            if key not in self._engines:
                self._engines[key] = _worker_engine(job, stage.spec)
                self._loop.run_until_complete(self._engines[key].__aenter__())
            fitted = stage.fitted
            embed = _embedder(stage.spec) if fitted is not None and fitted.uses_neighbours else None
            timed = self._timed_embed(embed) if embed is not None else None
            work.append(StageWork(stage.name, self._engines[key], stage.strategy, fitted, None, timed))
        self._stages = work
        if job.phase == PHASE:
            self._work = annotate_work(work, job.labels, spec.dataset.max_text_chars, job.reviewed)
        else:
            self._work = estimate_work(work[0].engine, work[0].strategy, job.labels, spec.dataset.max_text_chars)

    def _timed_embed(self, embed: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        def timed(texts: Any) -> np.ndarray:
            started = time.thread_time()  # it runs in a thread of its own: that thread's CPU only
            try:
                return embed(texts)
            finally:
                self._embed_seconds += time.thread_time() - started

        return timed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from runner.pipeline import work_on_chunk

        spec = self._job.spec
        out: dict[str, list[Any]] = {"number": [], "rows": [], "worked": [], "wrote": [], "pid": []}
        out |= {f"cpu_{stage}": [] for stage in WORKER_STAGES}
        sampler = StageSampler(threading.get_ident())  # this thread runs the chunk's event loop
        try:
            handed = batch["rows"].tolist() if "rows" in batch else [None] * len(batch["number"])
            numbers, done = batch["number"].tolist(), batch["finished"].tolist()
            for number, finished, given in zip(numbers, done, handed, strict=True):
                self._embed_seconds = self._checkpoint.write_seconds = 0.0
                process_started, started = time.process_time(), time.thread_time()
                chunk = self._corpus.chunk(number, spec.output.chunk_size) if given is None else pl.read_ipc(given)
                read = time.thread_time() - started
                sampler.take()
                started = time.thread_time()
                outcome = self._loop.run_until_complete(
                    self._rescore(number, chunk)
                    if self._job.rescore
                    else work_on_chunk(
                        self._job.phase,
                        number,
                        chunk,
                        self._work,
                        self._checkpoint,
                        finished,
                        spec.output.checkpoint_seconds,
                        lambda rows: None,
                    )
                )
                # the loop thread's CPU but the shard writes (timed themselves), split by where its samples fell
                write = self._checkpoint.write_seconds
                counts = sampler.take()
                counts.pop("write", None)
                seconds = split(time.thread_time() - started - write, counts)
                seconds |= {"read": read, "embed": self._embed_seconds, "write": write}
                # the rest of the process's CPU: Ray's threads, the sampler, the embedding's pool
                seconds["outside_loop"] = max(0.0, time.process_time() - process_started - sum(seconds.values()))
                out["number"].append(number)
                out["rows"].append(chunk.height)
                out["worked"].append(outcome.worked)
                out["wrote"].append(outcome.wrote)
                out["pid"].append(os.getpid())
                for stage in WORKER_STAGES:
                    out[f"cpu_{stage}"].append(seconds.get(stage, 0.0))
        finally:
            sampler.stop()
        return out

    async def _rescore(self, number: int, chunk: pl.DataFrame) -> ChunkOutcome:
        """A finished chunk scored again with this fit, its shard rewritten (the driver records it)."""
        from runner.pipeline import ChunkOutcome, rescore_block

        job = self._job
        shard = pl.read_parquet(self._checkpoint.shard_path(PHASE, number))
        max_chars = job.spec.dataset.max_text_chars
        rows = await rescore_block(
            chunk, shard, self._stages, job.labels, max_chars, job.reviewed, job.chose_within_sets
        )
        self._checkpoint.write_shard_file(PHASE, number, rows)
        return ChunkOutcome(rows.height, True)

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            try:
                for engine in getattr(self, "_engines", {}).values():
                    loop.run_until_complete(engine.__aexit__(None, None, None))
            finally:
                loop.close()


def _worker_engine(job: _ChunkJob, spec: JobSpec) -> Engine:
    """A worker's engine for a stage: a dispatcher over the driver's replicas (the job's own engine), or an
    API client with its share of the limits."""
    engine = spec.engine
    # the spec's limits are the whole job's (an account's rate limits, a replica's queue): each worker keeps its share
    shares: dict[str, float] = {"max_concurrency": max(1, math.ceil(engine.max_concurrency / job.workers))}
    if engine.kind == "openai":
        shares |= {
            key: value / job.workers
            for key in ("requests_per_minute", "tokens_per_minute")
            if (value := getattr(engine, key)) is not None
        }
    engine = engine.model_copy(update=shares)
    if job.replica_actors is not None and spec.engine == job.spec.engine:
        from runner.engines.ray_replicas import RayReplicaEngine

        return RayReplicaEngine(engine, actors=job.replica_actors)
    return make_engine(engine)


def workers_of(spec: JobSpec) -> int:
    return spec.executor.workers or spec.output.chunks_in_flight


@contextlib.contextmanager
def ray_session(spec: JobSpec) -> Iterator[None]:
    """Ray for a job on the Ray executor, joined or started before its engine and shut down after it.

    A local instance counts the workers' CPUs on top of the machine's, so they fit beside replicas
    that take every core.
    """
    import ray

    from runner.engines._ray_cluster import join_or_start_ray

    engine = spec.engine
    replicas = engine.kind == "vllm" and engine.uses_ray
    owns = join_or_start_ray(
        spec.executor.ray_address or (engine.ray_address if engine.kind == "vllm" else None),
        cpus=engine.replicas * engine.num_cpus_per_replica if replicas else 0.0,
        gpus=engine.replicas * engine.num_gpus_per_replica if replicas else 0.0,
        what=f"{workers_of(spec)} Ray Data worker(s)" + (f" and {engine.replicas} replica(s)" if replicas else ""),
        setting="engine.replicas x engine.num_cpus_per_replica",
        extra_cpus=workers_of(spec) * spec.executor.num_cpus_per_worker,
    )
    try:
        _configure_ray_data()
        yield
    finally:
        if owns:
            ray.shutdown()


def _configure_ray_data() -> None:
    """Ray Data imported and set up once per job, with Ray (its import takes ~0.5 s of the driver's CPU)."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its INFO lines drown cm-run's progress
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # cm-run prints its own progress
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.issue_detectors_config.detectors = []  # hang and memory checks that only log


async def annotate_on_ray(
    spec: JobSpec,
    inputs: Any,
    stages: tuple[RayStage, ...],
    reviewed: pl.DataFrame | None,
    engine: Engine,
    checkpoint: Checkpoint,
    manifest: Manifest,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[int, dict[str, Any]]:
    """Annotate every chunk not yet finished through Ray Data workers; (rows worked on, what it cost per stage).

    Runs inside ``ray_session``. ``inputs`` is the job's ``pipeline.JobInputs``: only the corpus's
    path and height are read here.
    """
    workers = workers_of(spec)
    cpu_started = time.process_time()  # the driver's share from here: the job's fit and setup are not per row
    job = _ChunkJob(
        spec=spec,
        corpus_path=inputs.corpus.path,
        labels=inputs.labels,
        stages=stages,
        reviewed=reviewed,
        replica_actors=await _replica_actors(engine),
        workers=workers,
    )
    finished = checkpoint.finished(manifest, PHASE)
    n_chunks = -(-inputs.corpus.height // spec.output.chunk_size)
    items = [{"number": n, "finished": n in finished} for n in range(n_chunks)]
    worked = done = 0
    summary = _Summary()
    async for row in _stream(job, items, workers, lambda row: _record(row, checkpoint, manifest)):
        worked += row["worked"]
        done += row["rows"]
        summary.add(row)
        if progress:
            progress(PHASE, done, inputs.corpus.height)
    return worked, summary.report(workers, time.process_time() - cpu_started)


async def rescore_on_ray(
    spec: JobSpec,
    inputs: Any,
    stages: tuple[RayStage, ...],
    reviewed: pl.DataFrame | None,
    engine: Engine,
    checkpoint: Checkpoint,
    manifest: Manifest,
    chose_within_sets: bool,
) -> int:
    """Score every finished chunk again with this fit through Ray Data workers (after a review import); rows
    rescored. The one-machine ``pipeline._rescore`` on the workers: each reads its chunk and the chunk's shard
    and runs ``pipeline.rescore_block``; the driver records the rewritten shards.
    """
    job = _ChunkJob(
        spec=spec,
        corpus_path=inputs.corpus.path,
        labels=inputs.labels,
        stages=stages,
        reviewed=reviewed,
        replica_actors=await _replica_actors(engine),
        workers=workers_of(spec),
        rescore=True,
        chose_within_sets=chose_within_sets,
    )
    items = [{"number": n, "finished": True} for n in sorted(checkpoint.finished(manifest, PHASE))]
    rescored = 0
    async for row in _stream(job, items, job.workers, lambda row: _record(row, checkpoint, manifest)):
        rescored += row["worked"]
    return rescored


async def estimate_on_ray(
    ray_job: RayEstimate,
    spec: JobSpec,
    strategy: Strategy,
    labels: LabelSet,
    chunks: list[tuple[int, pl.DataFrame]],
    checkpoint: Checkpoint,
    manifest: Manifest,
    progress: Callable[[str, int, int], None] | None,
) -> int:
    """A stage's estimate through Ray Data workers: each asks the model about chunks of the user split
    (``pipeline.estimate_work``, the one-machine block function) and writes their shards; the driver records
    them. Rows worked on. The chunks travel with their rows (Arrow IPC): the driver holds the user split to fit
    on it anyway, and the model's calls, the per-row work, are the workers'.
    """
    import io

    def ipc(chunk: pl.DataFrame) -> bytes:
        buffer = io.BytesIO()
        chunk.write_ipc(buffer)
        return buffer.getvalue()

    # the job's engine's replicas serve a stage that asks the job's model; a stage with its own API engine
    # gets a client in each worker
    shares_replicas = spec.engine == ray_job.job_spec.engine
    job = _ChunkJob(
        spec=spec,
        corpus_path=Path(),
        labels=labels,
        stages=(RayStage("estimate", spec, strategy, None),),
        reviewed=None,
        replica_actors=await _replica_actors(ray_job.job_engine) if shares_replicas else None,
        workers=workers_of(spec),
        phase="estimate",
        directory=checkpoint.directory,
    )
    finished = checkpoint.finished(manifest, "estimate")
    items = [{"number": n, "finished": n in finished, "rows": ipc(chunk)} for n, chunk in chunks]
    total = sum(chunk.height for _, chunk in chunks)
    worked = done = 0

    def record(row: dict[str, Any]) -> None:
        if row["wrote"]:
            checkpoint.record_shard(manifest, "estimate", row["number"])

    async for row in _stream(job, items, job.workers, record):
        worked += row["worked"]
        done += row["rows"]
        if progress:
            progress("estimate", done, total)
    return worked


def _record(row: dict[str, Any], checkpoint: Checkpoint, manifest: Manifest) -> None:
    if row["wrote"]:
        checkpoint.record_shard(manifest, PHASE, row["number"])


async def _replica_actors(engine: Engine) -> list[Any] | None:
    """The driver's vLLM replica actors (started now if the estimate never needed them), or None."""
    from runner.engines._lazy import LazyEngine
    from runner.engines.ray_replicas import RayReplicaEngine

    inner = engine.inner if isinstance(engine, LazyEngine) else engine
    if not isinstance(inner, RayReplicaEngine):
        return None
    if isinstance(engine, LazyEngine):
        await engine.start()
    return inner.actors


async def _stream(
    job: _ChunkJob, items: list[dict[str, Any]], workers: int, record: Callable[[dict[str, Any]], None]
) -> AsyncIterator[dict[str, Any]]:
    """Run the Ray Data pipeline in a thread of its own; yield each chunk's record as it finishes.

    Recording happens in that thread, as each record arrives: a driver stopped between two
    records loses none it received.
    """
    import ray.data

    rows: queue.Queue[dict[str, Any] | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def run() -> None:
        try:
            dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))
            annotated = dataset.map_batches(
                _ChunkWorker,
                fn_constructor_args=(job,),
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=job.spec.executor.num_cpus_per_worker,
                # Ray Data's defaults for an actor pool restart a worker that dies (a killed process, a lost
                # node) and give its chunk again: max_restarts and max_task_retries -1
            )
            # a block per chunk (batch_size 1): each batch is one chunk's record, taken without a prefetch thread
            for batch in annotated.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                if stop.is_set():
                    break
                columns = {key: values.tolist() for key, values in batch.items()}
                for row in (dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)):
                    record(row)
                    rows.put(row)
        except BaseException as error:  # handed to the driver's coroutine, raised there
            rows.put(error)
        finally:
            rows.put(None)

    thread = threading.Thread(target=run, name="cm-ray-data", daemon=True)
    thread.start()
    try:
        while True:
            row = await asyncio.to_thread(rows.get)
            if row is None:
                return
            if isinstance(row, BaseException):
                raise row
            yield row
    finally:
        stop.set()


class _Summary:
    """The workers' CPU per stage, summed over the chunks done this run."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.rows = 0
        self.pids: set[int] = set()

    def add(self, row: dict[str, Any]) -> None:
        if row["worked"]:
            self.rows += row["rows"]
        self.pids.add(row["pid"])
        for key, value in row.items():
            if key.startswith("cpu_"):
                self.cpu[key[4:]] = self.cpu.get(key[4:], 0.0) + value

    def report(self, workers: int, driver_cpu: float) -> dict[str, Any]:
        per_row = (lambda seconds: round(1000 * seconds / self.rows, 4)) if self.rows else (lambda seconds: None)
        return {
            "kind": "ray",
            "workers": workers,
            "worker_processes": len(self.pids),
            # the driver process's CPU (all threads, Ray's own included) while the pipeline ran
            "driver_cpu_ms_per_row": per_row(driver_cpu),
            "worker_cpu_ms_per_row": {stage: per_row(self.cpu.get(stage, 0.0)) for stage in WORKER_STAGES}
            | {"total": per_row(sum(self.cpu.values()))},
        }
