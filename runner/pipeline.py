"""The job's phases: estimate the memory bank on D_user, annotate D_large chunk by chunk, evaluate.

Data flows one way: spec -> data -> strategy over an engine -> bank -> parquet shards ->
metrics. Every item's first and second call run in one coroutine, so an engine batches
first calls of some items with second calls of others instead of waiting at a barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import orjson
import polars as pl

from runner import apply
from runner._fitted_store import load_fitted, save_fitted
from runner._gc import fewer_collections
from runner._memory import PeakMemory
from runner._storage import StorageError, location, on_object_store
from runner.bank import MemoryBank, Sample, UserSplitInfo, estimate_bank, load_bank, save_bank
from runner.checkpoint import (
    BATCH_DIR,
    STAGES_DIR,
    TRIAL_FILE,
    Checkpoint,
    Manifest,
    atomic_path,
    job_files,
    spec_digest,
    write_atomic,
)
from runner.data import Corpus, DataError, UserSplit, load_user_split
from runner.engines import Engine, EngineError, make_engine
from runner.engines._lazy import LazyEngine
from runner.engines._timed import TimedEngine
from runner.examples import ExamplePool, current_pool
from runner.fit import FitDraft, FittedCM, Question, accept_cascade, finish_fit, prepare_fit, through_cascade
from runner.labels import LabelSet
from runner.plots import prevalence_chart
from runner.report import (
    ANNOTATION_SCHEMA,
    METRIC_COLUMNS,
    compute_metrics,
    prevalence_metrics,
    stage_metrics,
    trust_metrics,
)
from runner.review import (
    mark_reviewed,
    read_reviewed,
    reviewed_digest,
    risk_coverage_plot,
    with_reviewed,
    write_review,
)
from runner.spec import MAIN_STAGE, JobSpec
from runner.strategies import Answer, Strategy, first_answers, make_strategy

if TYPE_CHECKING:  # imports Ray Data's executor module: only for a job on Ray
    from runner.ray_executor import RayEstimate

logger = logging.getLogger("runner")
T = TypeVar("T")

BANK_FILE = "memory_bank.json"
ESTIMATE_FILE = "estimate.parquet"
ANNOTATIONS_FILE = "annotations.parquet"
METRICS_FILE = "metrics.json"
ROW_GROUP_ROWS = 16_384
# Passes over the user split: the engine already retried each row; one more pass catches a brief outage.
ESTIMATE_PASSES = 2

REVIEW_FILE = "review.parquet"
RISK_COVERAGE_FILE = "risk_coverage.png"
PREVALENCE_FILE = "prevalence.png"

Progress = Callable[[str, int, int], None]
"""Called as progress(phase, done, total) as rows finish."""
RowSink = Callable[[pl.DataFrame], None]
"""Takes rows of a chunk as they finish, in the chunk's output schema."""
ChunkWork = Callable[[pl.DataFrame, RowSink], Awaitable[pl.DataFrame]]
"""A phase's work on a chunk's rows: their output rows, each handed to the sink as it finishes."""


class _BatchedSink(Generic[T]):
    """Hands a chunk's finished rows to a ``RowSink`` in batches, not one frame each.

    A one-row polars frame per finished row was 56% of the one-machine driver's time against an
    instant server (tests/bench/README.md); a batch is handed over every ``max_rows`` rows or
    ``max_seconds``, far within a partial shard's ``checkpoint_seconds``, and ``flush`` (called
    however the chunk's work ends) hands over the rest, so a stopped job keeps every finished row.
    """

    def __init__(
        self,
        sink: RowSink,
        rows: pl.DataFrame,
        frame: Callable[[pl.DataFrame, list[T]], pl.DataFrame],
        max_rows: int = 256,
        max_seconds: float = 0.5,
    ):
        self.sink, self.rows, self.frame = sink, rows, frame
        self.max_rows, self.max_seconds = max_rows, max_seconds
        self._indices: list[int] = []
        self._items: list[T] = []
        self._last = time.monotonic()

    def add(self, index: int, item: T) -> None:
        self._indices.append(index)
        self._items.append(item)
        if len(self._items) >= self.max_rows or time.monotonic() - self._last >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        if self._items:
            indices, items = self._indices, self._items
            self._indices, self._items = [], []
            self.sink(self.frame(self.rows[indices], items))
        self._last = time.monotonic()


Embedder = Callable[[Sequence[str]], np.ndarray]
"""Texts -> one L2-normalised vector per text (rows), so a dot product is a cosine similarity."""


@dataclass(frozen=True)
class JobResult:
    output_dir: Path
    bank: MemoryBank | None
    metrics: dict[str, Any]

    @property
    def annotations_path(self) -> Path:
        return self.output_dir / ANNOTATIONS_FILE


@dataclass(frozen=True)
class JobInputs:
    """Everything a job reads, checked: the user split, the label set, the corpus."""

    user: UserSplit
    labels: LabelSet
    corpus: Corpus
    labels_without_user_samples: list[str]


def load_inputs(spec: JobSpec, data_dir: str | Path | None = None) -> JobInputs:
    """Read and check every data file before any engine starts (errors cost nothing yet)."""
    with _naming("user_split.path"):
        user_path = spec.resolve_data_path(spec.user_split.path, data_dir)
        user = load_user_split(user_path, spec.dataset, spec.user_split)
    labels = LabelSet.build(user.labels, spec.dataset.label_descriptions)
    with _naming("corpus.path"):
        corpus_path = spec.resolve_data_path(spec.corpus.path, data_dir)
        corpus = Corpus(corpus_path, spec.dataset, spec.corpus, user.labels)
    absent = sorted(set(user.labels) - set(user.rows["label"].unique().to_list()))
    if absent:
        # Such a label is never a truth in M, so no candidate set can hold it: CM can only output it
        # through the empty-row fallback. Worth knowing before paying for a run.
        logger.warning(
            "%d label(s) have no sample in the user split and cannot be recovered by CM: %s",
            len(absent),
            ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else ""),
        )
    return JobInputs(user=user, labels=labels, corpus=corpus, labels_without_user_samples=absent)


@contextlib.contextmanager
def _naming(key: str) -> Iterator[None]:
    """An object store's refusal (no bucket, no credentials) as a data error naming the spec key."""
    try:
        yield
    except StorageError as error:
        raise DataError(f"{key}: {error}") from None


def _prompt_texts(rows: pl.DataFrame, max_chars: int | None) -> list[str]:
    texts = rows["text"]
    return (texts.str.slice(0, max_chars) if max_chars else texts).to_list()


def _with_answers(rows: pl.DataFrame, answers: list[Answer]) -> pl.DataFrame:
    return rows.with_columns(
        pl.Series("y_prime", [a.label for a in answers], dtype=pl.String),
        pl.Series("y_prime_probability", [a.probability for a in answers], dtype=pl.Float64),
        pl.Series("raw_answer", [a.raw for a in answers], dtype=pl.String),
        pl.Series("error", [a.error for a in answers], dtype=pl.String),
        pl.Series("error_kind", [a.error_kind for a in answers], dtype=pl.String),
    )


async def _estimate_chunk(
    rows: pl.DataFrame,
    engine: Engine,
    strategy: Strategy,
    labels: LabelSet,
    max_chars: int | None,
    finished: RowSink | None = None,
    *,
    asks: bool = True,
) -> pl.DataFrame:
    texts = _prompt_texts(rows, max_chars)
    batched = _BatchedSink(finished, rows, _with_answers) if finished is not None else None

    async def one(index: int) -> Answer:
        # cm.first_call never: the stage's prior labels alone, and the model is asked nothing here either
        answer = (await first_answers(strategy, engine, [texts[index]], labels))[0] if asks else _SKIPPED
        if batched is not None:
            batched.add(index, answer)
        return answer

    try:
        return _with_answers(rows, await _gather(one(index) for index in range(rows.height)))
    finally:
        if batched is not None:
            batched.flush()


def estimate_work(
    engine: Engine, strategy: Strategy, labels: LabelSet, max_chars: int | None, *, asks: bool = True
) -> ChunkWork:
    """The estimate phase's block function, as both executors run it: the model's answer for each user sample."""
    return lambda chunk, finished: _estimate_chunk(chunk, engine, strategy, labels, max_chars, finished, asks=asks)


async def estimate_phase(
    spec: JobSpec,
    engine: Engine,
    strategy: Strategy,
    inputs: JobInputs,
    checkpoint: Checkpoint,
    manifest: Manifest,
    progress: Progress | None = None,
    on_ray: RayEstimate | None = None,
) -> MemoryBank:
    """Run G under Z on every user sample and count (Y', Y) pairs into the memory bank.

    Answers are checkpointed in chunks, so an interrupted estimate resumes where it stopped. ``on_ray``:
    the chunks go through the Ray Data workers, as the corpus's do.
    """
    rows = inputs.user.rows
    step = spec.output.chunk_size
    chunks = list(enumerate(rows.slice(start, step) for start in range(0, rows.height, step)))
    asks = spec.cm.first_call != "never"
    max_chars = spec.dataset.max_text_chars
    for attempt in range(ESTIMATE_PASSES):  # a later pass asks again only the rows the engine failed on
        shown = progress if attempt == 0 else None
        if on_ray is not None and asks:  # a stage that asks nothing has no calls to move
            from runner.ray_executor import estimate_on_ray  # imports Ray Data: only for a job on it

            await estimate_on_ray(on_ray, spec, strategy, inputs.labels, chunks, checkpoint, manifest, shown)
        else:
            await _run_chunks(
                "estimate",
                chunks,
                rows.height,
                estimate_work(engine, strategy, inputs.labels, max_chars, asks=asks),
                checkpoint,
                manifest,
                shown,
                _in_flight(spec, engine),
                spec.output.checkpoint_seconds,
            )
        estimate = pl.read_parquet([checkpoint.shard_path("estimate", n) for n in range(len(chunks))])
        n_failed = estimate.filter(pl.col("error_kind") == "engine").height
        if not n_failed:
            break
    with atomic_path(checkpoint.directory / ESTIMATE_FILE) as tmp:
        estimate.write_parquet(tmp)
    if n_failed:
        # A bank short of these rows would be saved and reused by every rerun: stop, keep the answered shards.
        raise EngineError(f"{n_failed} of {rows.height} user samples could not be answered; rerun to retry them")
    # Rows the server refused for good (a text too long) were never answered: they are no sample of the model.
    rejected = estimate.filter(pl.col("error_kind") == "rejected")
    if rejected.height:
        logger.warning(
            "%d of %d user samples were refused by the engine and left out of the bank (first: %s)",
            rejected.height,
            rows.height,
            rejected["error"][0],
        )
    estimate = estimate.filter(pl.col("error_kind").is_null() | (pl.col("error_kind") != "rejected"))
    split = spec.user_split
    samples = [
        Sample(id=row["id"], text=row["text"], answer=row["y_prime"], truth=row["label"])
        for row in estimate.select("id", "text", "y_prime", "label").iter_rows(named=True)
    ]
    return estimate_bank(
        zip(estimate["y_prime"].to_list(), estimate["label"].to_list(), strict=True),
        inputs.labels.labels,
        dataset=spec.dataset.name,
        model=engine.model_id,
        strategy=strategy.name,
        user_split=UserSplitInfo(
            path=split.path,
            fraction=split.fraction,
            seed=split.seed,
            stratified=split.stratified,
            n_samples=estimate.height,
            pool_label_counts=inputs.user.pool_label_counts,
        ),
        samples=samples,
    )


def _in_flight(spec: JobSpec, engine: Engine) -> int:
    """Chunks worked on at once: a whole phase for an engine that answers phases (the Batch API)."""
    return sys.maxsize if getattr(engine, "wants_whole_phase", False) else spec.output.chunks_in_flight


async def _run_chunks(
    phase: str,
    chunks: Iterable[tuple[int, pl.DataFrame]],
    total: int,
    work: ChunkWork,
    checkpoint: Checkpoint,
    manifest: Manifest,
    progress: Progress | None,
    in_flight: int = 1,
    checkpoint_seconds: float = 60.0,
) -> int:
    """The one-machine executor: ``work_on_chunk`` for each chunk, up to ``in_flight`` at once; rows worked on.

    With one chunk at a time, every chunk would wait for its slowest row (a retry after a 429, a
    long answer) while the engine idles. Chunks are pulled from ``chunks`` only when there is room,
    so memory holds at most ``in_flight`` of them.
    """
    finished = checkpoint.finished(manifest, phase)
    done = worked = 0

    def advance(rows: int) -> None:
        nonlocal done
        done += rows
        if progress:
            progress(phase, done, total)

    async def one(number: int, chunk: pl.DataFrame) -> None:
        nonlocal worked
        outcome = await work_on_chunk(
            phase, number, chunk, work, checkpoint, number in finished, checkpoint_seconds, advance
        )
        if outcome.wrote:
            checkpoint.record_shard(manifest, phase, number)
        worked += outcome.worked

    await _bounded((partial(one, number, chunk) for number, chunk in chunks), in_flight)
    return worked


@dataclass(frozen=True)
class ChunkOutcome:
    worked: int  # rows the engine was asked about
    wrote: bool  # a new shard is on disk, to be recorded in the manifest


async def work_on_chunk(
    phase: str,
    number: int,
    chunk: pl.DataFrame,
    work: ChunkWork,
    checkpoint: Checkpoint,
    finished: bool,
    checkpoint_seconds: float,
    advance: Callable[[int], None],
) -> ChunkOutcome:
    """One chunk, as both executors run it: its shard written (not yet recorded), or its failed rows redone.

    A chunk not ``finished`` resumes from the partial shard an interrupted run saved and asks only
    for the rows it lacks; ``work`` hands over rows as they finish, and a chunk still running after
    ``checkpoint_seconds`` saves them as a partial shard (again each ``checkpoint_seconds``, and when
    the job stops), so a slow engine loses about that much work, not a whole chunk. A ``finished``
    chunk has only its rows that failed in the engine (timeouts, retries exhausted) asked again.
    The caller records a written shard in the manifest: a shard on disk but not recorded is redone.
    """
    if finished:
        shard = pl.read_parquet(checkpoint.shard_path(phase, number))
        failed = shard.filter(pl.col("error_kind") == "engine")["id"]
        redone = None
        if failed.len():
            redone = await work(chunk.filter(pl.col("id").is_in(failed.implode())), lambda rows: None)
            checkpoint.write_shard_file(phase, number, shard.update(redone, on="id", include_nulls=True))
        advance(chunk.height)
        return ChunkOutcome(redone.height if redone is not None else 0, redone is not None)

    earlier = checkpoint.read_partial(phase, number)  # what an interrupted run finished of this chunk
    todo = chunk
    if earlier is not None:
        earlier = earlier.filter(pl.col("error_kind").is_null() | (pl.col("error_kind") != "engine"))
        advance(earlier.height)
        todo = chunk.filter(~pl.col("id").is_in(earlier["id"].implode()))
    before = [earlier] if earlier is not None else []
    now: list[pl.DataFrame] = []  # rows finished in this run, one frame each
    saved = 0
    last_save = time.monotonic()

    def save_partial() -> None:
        nonlocal saved, last_save
        if len(now) > saved:
            checkpoint.write_partial(phase, number, pl.concat([*before, *now], how="vertical_relaxed"))
            saved = len(now)
        last_save = time.monotonic()

    def take(rows: pl.DataFrame) -> None:
        now.append(rows)
        advance(rows.height)
        if time.monotonic() - last_save >= checkpoint_seconds:
            save_partial()

    try:
        result = await work(todo, take) if todo.height else None
    except BaseException:
        save_partial()  # stopped or failed: the rows that finished are kept for the rerun
        raise
    rows = pl.concat([*before, result], how="vertical_relaxed") if result is not None else before[0]
    order = chunk.select("id").with_row_index("_order")
    rows = rows.join(order, on="id").sort("_order").drop("_order")  # as an uninterrupted run wrote it
    checkpoint.write_shard_file(phase, number, rows)
    return ChunkOutcome(chunk.height, True)


async def _bounded(jobs: Iterable[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run ``jobs`` with at most ``limit`` at once; the first failure cancels the others and is raised."""
    running: set[asyncio.Task[None]] = set()

    async def settle() -> None:
        nonlocal running
        done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        failures = [task.exception() for task in done if not task.cancelled() and task.exception()]
        if failures:  # every one retrieved, so none is reported again as "never retrieved"
            raise failures[0]

    try:
        for job in jobs:
            while len(running) >= limit:
                await settle()
            running.add(asyncio.ensure_future(job()))
        while running:
            await settle()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _gather(jobs: Iterable[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the rest (no orphaned task fails unseen)."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _annotation_frame(rows: pl.DataFrame, records: list[dict[str, Any]]) -> pl.DataFrame:
    answer_schema = {k: v for k, v in ANNOTATION_SCHEMA.items() if k not in ("id", "text", "gold")}
    answers = pl.DataFrame(records, schema=answer_schema)
    base = rows.select("id", "text", pl.col("label").alias("gold"))
    return pl.concat([base, answers], how="horizontal").cast(ANNOTATION_SCHEMA)


async def annotate_rows(
    rows: pl.DataFrame,
    engine: Engine,
    strategy: Strategy,
    labels: LabelSet,
    fitted: FittedCM | Awaitable[FittedCM] | None,
    max_chars: int | None = None,
    embed: Embedder | None = None,
    previous: Sequence[dict[str, Any] | None] | None = None,
    *,
    draft: FitDraft | None = None,
    finished: RowSink | None = None,
) -> pl.DataFrame:
    """One stage's CM on a chunk: Y' from all labels, C from the fitted CM, Y_hat = G(X, C) when |C| > 1.

    Without a fitted CM (CM off and no acceptance asked for) Y_hat is Y' and has no confidence.
    ``fitted`` may still be on its way (the model being asked among held-out sets): given its
    ``draft``, first calls go out meanwhile, and each row waits for the fit only to refine.
    With ``previous`` (these rows as an earlier fit annotated them, None for a row it did not) the
    chunk is re-scored: first answers are reused, and a second call is made only where the new
    candidate set is ambiguous and differs from the one the earlier answer was chosen in.
    ``finished`` gets the rows as they are annotated, in batches (``_BatchedSink``).
    """
    known = draft if draft is not None else fitted if isinstance(fitted, FittedCM) else None
    if fitted is not None and known is None:
        raise ValueError("a fit still on its way needs its draft")
    texts = _prompt_texts(rows, max_chars)
    contexts: Sequence[apply.Neighbourhood | None] = [None] * len(texts)
    if known is not None and known.uses_neighbours:
        assert embed is not None
        # embedding is CPU work: off the event loop, so other chunks' requests keep their timeouts
        contexts = apply.neighbourhoods(known, await asyncio.to_thread(embed, texts), texts)
    earlier = previous if previous is not None else [None] * len(texts)
    ids = [str(i) for i in rows["id"].to_list()]  # a row's candidate set is randomised by its id

    skip_first = known is not None and not known.needs_answer  # Y' cannot change C (cm.first_call)
    batched = _BatchedSink(finished, rows, _annotation_frame) if finished is not None else None

    async def one(
        index: int, text: str, context: apply.Neighbourhood | None, before: dict[str, Any] | None
    ) -> dict[str, Any]:
        record = await annotate_one(text, context, before, ids[index])
        if batched is not None:
            batched.add(index, record)
        return record

    async def annotate_one(
        text: str, context: apply.Neighbourhood | None, before: dict[str, Any] | None, row_id: str
    ) -> dict[str, Any]:
        # Y', one rule: a first answer on file is kept, whether or not this fit weighs it (it was paid
        # for, and a later fit may); else none is asked when it cannot change C; else the model is asked.
        first = _stored_first(before)
        if first is None:
            first = _SKIPPED if skip_first else (await first_answers(strategy, engine, [text], labels))[0]
        record: dict[str, Any] = {
            "y_prime": first.label,
            "y_prime_probability": first.probability,
            "candidates": [],
            "y_hat": None,
            "confidence": None if fitted is None else 0.0,  # no label: certainly not right
            "accepted": None if fitted is None else False,
            "source": "model",
            "calls": first.calls,
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": first.completion_tokens,
            "fallback": None,
            "error": first.error,
            "error_kind": first.error_kind,
            "y_neighbour": None,
            "ood": None if context is None else context.ood,
        }
        if before is not None:  # what was spent on this row before counts as spent, beside what is asked now
            record.update({key: record[key] + before[key] for key in ("calls", "prompt_tokens", "completion_tokens")})
        if first.label is None and not skip_first:
            return record  # the call failed or its answer did not parse: recorded in error, error_kind
        if fitted is None:  # CM off: the answer is its own, single candidate (a free-text answer names none)
            if labels.is_label(first.label):
                record.update(candidates=[first.label], y_hat=first.label)
            return record
        final = fitted if isinstance(fitted, FittedCM) else await fitted
        refined = apply.refine(final, context, first.label, row_id=row_id)
        refinement = refined.refinement
        record.update(
            candidates=_most_probable_first(final, refined),
            fallback=refinement.fallback,
            y_neighbour=refinement.neighbour_vote,
        )
        y_hat = refinement.decided
        chosen = _stored_choice(before, refinement.candidates) if refinement.needs_second_call else None
        if chosen is not None:
            y_hat = chosen  # the model already chose within this very set
        elif refinement.needs_second_call:
            second = (await strategy.classify(engine, [text], [refinement.candidates]))[0]
            y_hat = second.label
            record.update(
                calls=record["calls"] + second.calls,
                prompt_tokens=record["prompt_tokens"] + second.prompt_tokens,
                completion_tokens=record["completion_tokens"] + second.completion_tokens,
                error=second.error,
                error_kind=second.error_kind,
            )
        confidence = apply.confidence(final, apply.score(final, refined, y_hat))
        record.update(
            y_hat=y_hat, confidence=confidence, accepted=apply.accepted(final, confidence, y_hat, record["ood"])
        )
        return record

    triples = enumerate(zip(texts, contexts, earlier, strict=True))
    try:
        records = await _gather(one(index, text, context, before) for index, (text, context, before) in triples)
    finally:
        if batched is not None:
            batched.flush()
    return _annotation_frame(rows, records)


_SKIPPED = Answer(label=None, raw="", calls=0)
"""The first answer of a row whose fit cannot use it (``needs_answer`` False): not asked for."""


def _stored_first(before: dict[str, Any] | None) -> Answer | None:
    """The outcome of the first call an earlier fit made on this row; None when there is none to keep.

    Every outcome is kept but an engine failure (asked again, as on resume): a label, an answer
    naming no label, a refusal for good. A row with no answer but candidates had its first call
    skipped (that fit could not use it); a first call that gave no label leaves no candidates.
    """
    if before is None:
        return None
    if before["y_prime"] is not None:  # nothing is spent on it now: its cost is in the row's earlier calls
        return Answer(before["y_prime"], None, 0, probability=before["y_prime_probability"])
    if before["candidates"] or before["error_kind"] not in ("unparsed", "rejected"):
        return None
    return Answer(None, None, 0, error=before["error"], error_kind=before["error_kind"])


def _stored_choice(before: dict[str, Any] | None, candidates: Sequence[str]) -> str | None:
    """The model's earlier choice for this row if it was made among exactly ``candidates`` (a reviewer's is none)."""
    if before is None or before["y_hat"] is None or before["source"] != "model":
        return None
    return before["y_hat"] if set(before["candidates"]) == set(candidates) else None


@dataclass(frozen=True)
class StageWork:
    """One stage of the cascade as the block function runs it: its engine, strategy and fit."""

    name: str
    engine: Engine
    strategy: Strategy
    fitted: FittedCM | Awaitable[FittedCM] | None
    draft: FitDraft | None = None
    embed: Embedder | None = None


async def annotate_block(
    rows: pl.DataFrame,
    stages: Sequence[StageWork],
    labels: LabelSet,
    max_chars: int | None,
    reviewed: pl.DataFrame | None,
    *,
    previous: pl.DataFrame | None = None,
    finished: RowSink | None = None,
) -> pl.DataFrame:
    """The annotate phase's block function, as both executors run it: the cascade, reviewed rows marked.

    Each stage answers the rows no earlier stage accepted (``annotate_rows``); the last keeps what it
    gets, accepted or not. A row's calls and tokens add up over the stages it passed through, and
    ``stage_calls`` keeps each stage's part. With ``previous`` (a rescore) a stage reuses the paid
    answers of the rows it answered before. ``finished`` gets rows as each is settled.
    """
    order = rows.select("id").with_row_index("_order")
    spent: pl.DataFrame | None = None  # the escalated rows' calls and tokens at earlier stages
    settled: list[pl.DataFrame] = []
    todo = rows
    if previous is not None and reviewed is not None and reviewed.height:
        # a rescore: a reviewer's label stands, so the model is asked nothing more about that row
        kept = previous.join(reviewed.select("id"), on="id", how="semi")
        if "stage" not in kept.columns:  # shards written before cascades: one stage
            kept = kept.with_columns(pl.lit(MAIN_STAGE).alias("stage"), pl.concat_list("calls").alias("stage_calls"))
        settled.append(kept.select(list(ANNOTATION_SCHEMA)).cast(ANNOTATION_SCHEMA))
        todo = rows.join(kept.select("id"), on="id", how="anti", maintain_order="left")
    for position, stage in enumerate(stages):
        if not todo.height:
            break
        last = position == len(stages) - 1

        def settle(frame: pl.DataFrame, name: str = stage.name, spent: pl.DataFrame | None = spent) -> pl.DataFrame:
            frame = frame.with_columns(
                pl.lit(name).alias("stage"), pl.concat_list(pl.col("calls")).alias("stage_calls")
            )
            if spent is None:
                return frame
            costs = ("calls", "prompt_tokens", "completion_tokens")
            joined = frame.join(spent, on="id", how="left", suffix="_before", maintain_order="left")
            return joined.with_columns(
                *(pl.col(key) + pl.col(f"{key}_before").fill_null(0) for key in costs),
                pl.concat_list(pl.col("stage_calls_before").fill_null([]), pl.col("stage_calls")).alias("stage_calls"),
            ).drop(f"{key}_before" for key in (*costs, "stage_calls"))

        def hand_over(
            done: pl.DataFrame, settle: Callable[[pl.DataFrame], pl.DataFrame] = settle, last: bool = last
        ) -> None:
            assert finished is not None
            kept = done if last else done.filter(_settled)
            if kept.height:
                finished(mark_reviewed(settle(kept), reviewed))

        answered = settle(
            await annotate_rows(
                todo,
                stage.engine,
                stage.strategy,
                labels,
                stage.fitted,
                max_chars,
                stage.embed,
                _answered_by(previous, todo, stage.name),
                draft=stage.draft,
                finished=hand_over if finished is not None else None,
            )
        )
        settled.append(answered if last else answered.filter(_settled))
        if last:
            break
        escalated = answered.filter(~_settled)
        spent = escalated.select("id", "calls", "prompt_tokens", "completion_tokens", "stage_calls")
        todo = rows.join(escalated.select("id"), on="id", how="semi", maintain_order="left")
    block = pl.concat(settled).join(order, on="id").sort("_order").drop("_order")
    return mark_reviewed(block, reviewed)


_settled = pl.col("accepted").fill_null(False) | pl.col("ood").fill_null(False)
"""A row a stage keeps: accepted, or unlike the user split (cm.ood), which no later stage's guarantee covers
either: it goes to review as it is."""


def _answered_by(previous: pl.DataFrame | None, rows: pl.DataFrame, stage: str) -> list[dict[str, Any] | None] | None:
    """Per row, how ``stage`` annotated it before (a rescore); None where another stage answered it."""
    if previous is None:
        return None
    if "stage" not in previous.columns:  # shards written before cascades: one stage
        previous = previous.with_columns(pl.lit(MAIN_STAGE).alias("stage"))
    by_id = {row["id"]: row for row in previous.filter(pl.col("stage") == stage).iter_rows(named=True)}
    return [by_id.get(row_id) for row_id in rows["id"]]


def annotate_work(
    stages: Sequence[StageWork], labels: LabelSet, max_chars: int | None, reviewed: pl.DataFrame | None
) -> ChunkWork:
    """``annotate_block`` as a chunk's work, for both executors."""

    async def work(rows: pl.DataFrame, finished: RowSink) -> pl.DataFrame:
        return await annotate_block(rows, stages, labels, max_chars, reviewed, finished=finished)

    return work


def _most_probable_first(fitted: FittedCM, refined: apply.Refined) -> list[str]:
    """The candidate set as a reviewer's options: most probable first (ties keep the set's order)."""
    index = {label: i for i, label in enumerate(fitted.labels)}
    return sorted(refined.refinement.candidates, key=lambda label: -refined.scores[index[label]])


def _embedder(spec: JobSpec) -> Embedder | None:
    if not spec.cm.enabled or spec.cm.variant not in ("neighbour_prior", "instance"):
        return None
    from runner.embeddings import embed  # loads torch and a sentence model: only when a variant needs it

    return partial(embed, model=spec.cm.embedding_model)


async def _ask_questions(
    questions: Sequence[Question], bank: MemoryBank, engine: Engine, strategy: Strategy, path: Path
) -> list[str | None]:
    """Ask the model among the user samples' held-out candidate sets, once per job.

    The choices are kept beside the checkpoints, keyed by sample and set, so a resumed or finished
    job fits the same way without asking (or loading the model) again, and a refit after a review
    asks only the questions it has not asked before. A question the engine failed on (a timeout,
    its retries exhausted) is no answer: it is asked again, as the estimate asks its failed rows
    again; one still failing stops the job with nothing kept, for a failure scored as a wrong
    choice would lower the calibration and could switch second calls off.
    """
    if not questions:
        return []
    assert bank.samples is not None  # questions are drawn from them
    samples = bank.samples
    asked = [{"id": samples[q.sample].id, "candidates": list(q.candidates)} for q in questions]
    stored = orjson.loads(path.read_bytes()) if path.is_file() else {"asked": [], "choices": []}
    known = {(a["id"], tuple(a["candidates"])): c for a, c in zip(stored["asked"], stored["choices"], strict=True)}
    choices = {n: known[key] for n, q in enumerate(asked) if (key := (q["id"], tuple(q["candidates"]))) in known}

    async def ask(n: int) -> Answer:
        return (await strategy.classify(engine, [samples[questions[n].sample].text], [questions[n].candidates]))[0]

    answers: dict[int, Answer] = {}
    todo: list[int] = [n for n in range(len(questions)) if n not in choices]
    for _ in range(ESTIMATE_PASSES):  # a later pass asks again only the questions the engine failed on
        if not todo:
            break
        answers |= dict(zip(todo, await _gather(ask(n) for n in todo), strict=True))
        todo = [n for n in todo if answers[n].error_kind == "engine"]
    if todo:
        raise EngineError(
            f"{len(todo)} of {len(questions)} held-out questions on user samples (the second-call trial) could "
            f"not be answered ({answers[todo[0]].error}); nothing fitted is saved: rerun to retry them"
        )
    choices |= {n: answer.label for n, answer in answers.items()}
    ordered = [choices[n] for n in range(len(questions))]
    if stored["asked"] != asked:  # the file holds this fit's questions
        write_atomic(path, orjson.dumps({"asked": asked, "choices": ordered}, option=orjson.OPT_INDENT_2))
    return ordered


@dataclass
class _Fit:
    """The job's fitted CM: settled before the model is asked anything (``draft``), final when asked (``final``)."""

    draft: FitDraft | FittedCM
    final: asyncio.Future[FittedCM]


async def _start_fit(
    spec: JobSpec,
    bank: MemoryBank,
    engine: Engine,
    strategy: Strategy,
    checkpoint: Checkpoint,
    embed: Embedder | None,
    key: str,
) -> _Fit:
    """The fitted CM of this job: read back when this spec, bank and review fitted it before, else fitted.

    The draft is fitted here; asking the model among the held-out sets, and what follows from the
    answers, runs as a task, so the corpus's first calls go out meanwhile (for the Batch API, in
    the same batch as the questions: one phase, not two).
    """
    loop = asyncio.get_running_loop()
    if (fitted := load_fitted(checkpoint.directory, key)) is not None:
        done: asyncio.Future[FittedCM] = loop.create_future()
        done.set_result(fitted)
        return _Fit(fitted, done)
    vectors = None
    if spec.cm.enabled and spec.cm.variant in ("neighbour_prior", "instance"):
        assert embed is not None and bank.samples is not None
        vectors = await asyncio.to_thread(embed, [sample.text for sample in bank.samples])
    draft = await asyncio.to_thread(prepare_fit, bank, spec.cm, vectors)

    async def finish() -> FittedCM:
        choices = await _ask_questions(draft.questions, bank, engine, strategy, checkpoint.directory / TRIAL_FILE)
        fitted = await asyncio.to_thread(finish_fit, draft, choices)
        save_fitted(checkpoint.directory, key, fitted)
        return fitted

    return _Fit(draft, asyncio.ensure_future(finish()))


async def rescore_block(
    chunk: pl.DataFrame,
    shard: pl.DataFrame,
    stages: Sequence[StageWork],
    labels: LabelSet,
    max_chars: int | None,
    reviewed: pl.DataFrame | None,
    chose_within_sets: bool,
) -> pl.DataFrame:
    """A finished chunk scored again with this fit, as both executors run it: ``annotate_block`` with its
    shard's answers as ``previous``. An earlier label is the model's choice within its set only if
    ``chose_within_sets``."""
    rows = chunk.join(shard.select("id"), on="id", how="semi", maintain_order="left")
    previous = rows.select("id").join(shard, on="id", how="left", maintain_order="left")
    if not chose_within_sets:  # labels decided without asking: no choice of the model's to reuse
        previous = previous.with_columns(pl.lit(None, dtype=pl.String).alias("y_hat"))
    return await annotate_block(rows, stages, labels, max_chars, reviewed, previous=previous)


async def _rescore(
    spec: JobSpec,
    inputs: JobInputs,
    stages: Sequence[StageWork],
    checkpoint: Checkpoint,
    manifest: Manifest,
    reviewed: pl.DataFrame | None,
    chose_within_sets: bool,
    in_flight: int,
) -> int:
    """Shards an earlier fit annotated, scored again with this one (after a review import); rows re-scored.

    Chunks run as the first run annotated them: ``in_flight`` at once, a whole phase for an engine
    that answers phases (one batch of second calls for the corpus, not one per chunk). An earlier
    label is reused as the model's choice within its set only if ``chose_within_sets``.
    """
    finished = checkpoint.finished(manifest, "annotate")
    total = 0

    async def one(number: int, chunk: pl.DataFrame) -> None:
        nonlocal total
        shard = pl.read_parquet(checkpoint.shard_path("annotate", number))
        max_chars = spec.dataset.max_text_chars
        rescored = await rescore_block(chunk, shard, stages, inputs.labels, max_chars, reviewed, chose_within_sets)
        checkpoint.write_shard(manifest, "annotate", number, rescored)
        total += rescored.height

    chunks = inputs.corpus.chunks(spec.output.chunk_size)
    # a chunk not finished is annotated with this fit when its turn comes
    await _bounded((partial(one, n, chunk) for n, chunk in chunks if n in finished), in_flight)
    return total


async def _bank_phase(
    spec: JobSpec,
    engine: Engine,
    strategy: Strategy,
    inputs: JobInputs,
    checkpoint: Checkpoint,
    manifest: Manifest,
    progress: Progress | None,
    on_ray: RayEstimate | None = None,
) -> MemoryBank | None:
    if not spec.cm.enabled and spec.cm.accept is None:
        return None  # no CM and no confidence asked for: the user split is not needed
    if spec.cm.bank is not None:
        return load_bank(spec.cm.bank, labels=inputs.labels.labels)
    bank_path = checkpoint.directory / BANK_FILE
    if manifest.bank_digest is not None and bank_path.is_file():
        bank = load_bank(bank_path, labels=inputs.labels.labels)
        if bank.digest() == manifest.bank_digest:
            return bank  # estimated by an earlier, interrupted run of this job
    bank = await estimate_phase(spec, engine, strategy, inputs, checkpoint, manifest, progress, on_ray)
    save_bank(bank, bank_path)
    manifest.bank_digest = bank.digest()
    checkpoint.save(manifest)
    return bank


async def run_job(
    spec: JobSpec,
    *,
    data_dir: str | Path | None = None,
    restart: bool = False,
    engine: Engine | None = None,
    progress: Progress | None = None,
    embed: Embedder | None = None,
) -> JobResult:
    """Estimate, annotate and evaluate; resumable.

    Pass ``engine`` to reuse a started one, ``embed`` to replace the sentence model that
    neighbour-based CM variants use. The output directory is locked from the first read to the
    last write: a second run on it fails at once, naming this one.
    """
    with Checkpoint(location(spec.output.dir), spec).locked():
        return await _run_job(spec, data_dir=data_dir, restart=restart, engine=engine, progress=progress, embed=embed)


@dataclass
class _Stage:
    """One stage of the job's cascade: its own spec, engine, strategy and output directory (bank, fit)."""

    name: str
    spec: JobSpec
    engine: Engine
    strategy: Strategy
    checkpoint: Checkpoint
    manifest: Manifest
    embed: Embedder | None
    bank: MemoryBank | None = None
    fit: _Fit | None = None
    key: str = ""


def _stage_strategy(spec: JobSpec, inputs: JobInputs) -> Strategy:
    examples = None
    if spec.strategy.name == "few_shot" and current_pool() is None:  # an evaluation grid shares its own pool
        examples = ExamplePool.from_rows(
            inputs.user.rows, max_chars=spec.dataset.max_text_chars, seed=spec.generation.seed
        )
    return make_strategy(spec.strategy, inputs.labels, spec.generation, examples)


def _state_dir(checkpoint: Checkpoint) -> Path | None:
    # the Batch API's record is local only (the spec refuses engine.batch with an s3:// output.dir)
    return None if on_object_store(checkpoint.directory) else checkpoint.directory / BATCH_DIR


def _open_stages(
    spec: JobSpec,
    inputs: JobInputs,
    checkpoint: Checkpoint,
    manifest: Manifest,
    job_engine: Engine,
    embed: Embedder | None,
    data_dir: str | Path | None,
    restart: bool,
    stack: contextlib.AsyncExitStack,
) -> list[_Stage]:
    """The cascade's stages. One stage keeps its bank and fit in the job's directory; several, each in
    ``stages/NAME`` with a manifest of its own, so a stage resumes (or refuses a changed spec) by itself.
    A stage with an engine spec other than the job's gets its own engine (one per distinct spec)."""
    named = spec.stages()
    engines: dict[str, Engine] = {}
    timed: dict[int, TimedEngine] = {}
    stages = []
    for name, stage_spec in named:
        if len(named) == 1:
            stage_checkpoint, stage_manifest = checkpoint, manifest
        else:
            stage_checkpoint = Checkpoint(
                checkpoint.directory / STAGES_DIR / name, stage_spec, job_files(stage_spec, data_dir)
            )
            stage_manifest = stage_checkpoint.open(restart=restart or checkpoint.created)
        engine = job_engine
        if stage_spec.engine != spec.engine:
            key = stage_spec.engine.model_dump_json()
            if key not in engines:  # loaded on its first request: a stage no row reaches loads nothing
                engines[key] = LazyEngine(make_engine(stage_spec.engine, _state_dir(stage_checkpoint)))
                stack.push_async_exit(engines[key].__aexit__)
            engine = engines[key]
        if id(engine) not in timed:  # one clock per engine: stages that share it share its time
            timed[id(engine)] = TimedEngine(engine)
        engine = timed[id(engine)]
        stage_embed = embed or _embedder(stage_spec)
        strategy = _stage_strategy(stage_spec, inputs)
        stages.append(_Stage(name, stage_spec, engine, strategy, stage_checkpoint, stage_manifest, stage_embed))
    return stages


def _reviewed_for(reviewed: pl.DataFrame | None, stage: str) -> pl.DataFrame | None:
    """The reviewed rows as a stage's bank takes them: the first answer only where this stage gave it.

    Another stage's model answered the others: its y_prime is no sample of this stage's model, but the
    text and the reviewer's label still teach its neighbours and its probe.
    """
    if reviewed is None:
        return None
    if "stage" not in reviewed.columns:
        reviewed = reviewed.with_columns(pl.lit(MAIN_STAGE).alias("stage"))
    mine = pl.col("stage").fill_null(MAIN_STAGE) == stage
    return reviewed.with_columns(pl.when(mine).then(pl.col("y_prime")).otherwise(None).alias("y_prime"))


async def _accepted(stages: Sequence[_Stage], spec: JobSpec) -> tuple[FittedCM, ...]:
    """The stages' final fits with the cascade's one acceptance (``fit.accept_cascade``)."""
    finals = []
    for stage in stages:
        assert stage.fit is not None
        finals.append(await stage.fit.final)
    return accept_cascade(finals, spec.cm.accept)


async def _pick(fits: Awaitable[tuple[FittedCM, ...]], position: int) -> FittedCM:
    return (await fits)[position]


async def _run_job(
    spec: JobSpec,
    *,
    data_dir: str | Path | None = None,
    restart: bool = False,
    engine: Engine | None = None,
    progress: Progress | None = None,
    embed: Embedder | None = None,
) -> JobResult:
    """``run_job``'s body, run under the output directory's lock."""
    inputs = load_inputs(spec, data_dir)
    checkpoint = Checkpoint(location(spec.output.dir), spec, job_files(spec, data_dir))
    manifest = checkpoint.open(restart=restart)

    owned = engine is None
    # loaded on the first request: a finished job, or one whose bank needs no answers, loads no model
    job_engine = engine or LazyEngine(make_engine(spec.engine, _state_dir(checkpoint)))
    stack = contextlib.AsyncExitStack()
    stages: list[_Stage] = []
    on_ray: RayEstimate | None = None
    accepted: asyncio.Future[tuple[FittedCM, ...]] | None = None
    run: dict[str, Any] = {}
    try:
        memory = stack.enter_context(PeakMemory())
        stack.enter_context(fewer_collections())
        if spec.runs_on_ray:
            from runner.ray_executor import ray_session  # imports Ray: only for a job that runs on it

            stack.enter_context(ray_session(spec))  # before the engine: Ray outlives its replicas
        if owned:
            stack.push_async_exit(job_engine.__aexit__)  # before entering: an engine that failed half-started is closed
            await job_engine.__aenter__()
        stages = _open_stages(spec, inputs, checkpoint, manifest, job_engine, embed, data_dir, restart, stack)
        run |= {"model": stages[0].engine.model_id, "strategy": stages[0].strategy.name}
        if len(stages) > 1:
            run["stages"] = [{"stage": s.name, "model": s.engine.model_id, "strategy": s.strategy.name} for s in stages]
        started = time.perf_counter()
        if spec.runs_on_ray:
            from runner.ray_executor import RayEstimate

            on_ray = RayEstimate(spec, job_engine)  # the user split's calls go through the workers too
        for stage in stages:
            stage.bank = await _bank_phase(
                stage.spec, stage.engine, stage.strategy, inputs, stage.checkpoint, stage.manifest, progress, on_ray
            )
        run["estimate_seconds"] = round(time.perf_counter() - started, 2)

        reviewed = read_reviewed(checkpoint.directory)
        in_flight = max(_in_flight(spec, stage.engine) for stage in stages)
        if stages[0].bank is not None:  # every stage has one: a cascade of several needs cm.accept
            reviewed_by = {stage.name: _reviewed_for(reviewed, stage.name) for stage in stages}
            for stage in stages:
                assert stage.bank is not None
                mine = reviewed_by[stage.name]
                stage.key = f"{spec_digest(stage.spec)}:{stage.bank.digest()}:{reviewed_digest(mine)}"
            key = "|".join(stage.key for stage in stages)
            # fit_key None: no fit recorded for the shards on file. Shards scored with another fit (reviewed
            # rows came back) or with one not recorded are scored anew; no shard, nothing to score
            rescore = bool(checkpoint.finished(manifest, "annotate")) and manifest.fit_key != key
            # the fits that scored them, read before these replace them on disk
            earlier = (
                [
                    load_fitted(stage.checkpoint.directory, old)
                    for stage, old in zip(stages, (manifest.fit_key or "").split("|"), strict=False)
                ]
                if rescore and manifest.fit_key
                else []
            )
            for stage in stages:
                assert stage.bank is not None
                stage.fit = await _start_fit(
                    stage.spec,
                    with_reviewed(stage.bank, reviewed_by[stage.name]),
                    stage.engine,
                    stage.strategy,
                    stage.checkpoint,
                    stage.embed,
                    stage.key,
                )
            accepted = asyncio.ensure_future(_accepted(stages, spec))
            if rescore:
                # An earlier label is the model's choice within its set only if that fit made second calls;
                # with cm.second_call auto its own trial decided (not known when it cannot be read: asked again).
                chose = all(
                    old.asks_second_call if old is not None else stage.spec.cm.second_call != "auto"
                    for stage, old in zip(stages, earlier or [None] * len(stages), strict=False)
                )
                final = await accepted
                if spec.runs_on_ray:  # the workers rescore, as they annotate: no corpus row passes through here
                    from runner.ray_executor import RayStage, rescore_on_ray

                    on_ray = tuple(RayStage(s.name, s.spec, s.strategy, f) for s, f in zip(stages, final, strict=True))
                    run["rows_rescored"] = await rescore_on_ray(
                        spec, inputs, on_ray, reviewed, job_engine, checkpoint, manifest, chose
                    )
                else:
                    work = [
                        StageWork(s.name, s.engine, s.strategy, f, None, s.embed)
                        for s, f in zip(stages, final, strict=True)
                    ]
                    run["rows_rescored"] = await _rescore(
                        spec, inputs, work, checkpoint, manifest, reviewed, chose, in_flight
                    )
            manifest.fit_key = key
            checkpoint.save(manifest)
        started, started_cpu = time.perf_counter(), time.process_time()
        if spec.runs_on_ray:
            from runner.ray_executor import RayStage, annotate_on_ray  # imports Ray: only for a job on it

            finals = await accepted if accepted else [None] * len(stages)  # the workers apply final fits, no draft
            on_ray = tuple(RayStage(s.name, s.spec, s.strategy, f) for s, f in zip(stages, finals, strict=True))
            annotated_now, run["executor"] = await annotate_on_ray(
                spec, inputs, on_ray, reviewed, job_engine, checkpoint, manifest, progress
            )
        else:
            work = [
                StageWork(
                    stage.name,
                    stage.engine,
                    stage.strategy,
                    asyncio.ensure_future(_pick(accepted, n)) if accepted else None,
                    stage.fit.draft if stage.fit else None,  # type: ignore[arg-type]
                    stage.embed,
                )
                for n, stage in enumerate(stages)
            ]
            annotated_now = await _run_chunks(
                "annotate",
                inputs.corpus.chunks(spec.output.chunk_size),
                inputs.corpus.height,
                annotate_work(work, inputs.labels, spec.dataset.max_text_chars, reviewed),
                checkpoint,
                manifest,
                progress,
                in_flight,
                spec.output.checkpoint_seconds,
            )
        fits = await accepted if accepted else None  # a corpus with no row to refine never waited for them
        elapsed = time.perf_counter() - started
        run["annotate_seconds"] = round(elapsed, 2)
        run["items_annotated_this_run"] = annotated_now
        run["items_per_second"] = round(annotated_now / elapsed, 3) if annotated_now and elapsed else None
        # this process's CPU while annotating (threads included): the driver's cost per row, whichever executor
        driver_cpu = time.process_time() - started_cpu
        run["driver_cpu_ms_per_row"] = round(1000 * driver_cpu / annotated_now, 4) if annotated_now else None
        run["engine_load_seconds"] = getattr(job_engine, "load_seconds", None)  # None: never loaded
        if (dtype := getattr(job_engine, "dtype", None)) is not None:  # a local vLLM model that was loaded
            run["engine_dtype"] = {"dtype": dtype.dtype, "reason": dtype.reason}
        if hasattr(job_engine, "stats"):  # API engines: requests, retries, tokens, errors, cost
            run["engine"] = job_engine.stats()
        # per engine, named by the first stage that asks it: stages sharing one share its figures
        asking = [s for s in stages if s.spec.cm.first_call != "never"] or stages
        distinct = {id(s.engine): s for s in reversed(asking)}.values()
        if len(stages) > 1:
            run["engines"] = {s.name: s.engine.stats() for s in distinct if hasattr(s.engine, "stats")}
        # what a local engine costs: the time it had a request out (this process's engines; Ray workers'
        # engines report their CPU in run.executor)
        run["engine_seconds"] = {s.name: round(s.engine.seconds(), 3) for s in reversed(list(distinct))}
    finally:
        for stage in stages:  # stopped while the model was being asked: ask no more
            if stage.fit is not None and not stage.fit.final.done():
                stage.fit.final.cancel()
        if accepted is not None and not accepted.done():
            accepted.cancel()
        await stack.aclose()

    fitted = fits[0] if fits else None
    annotations_path = checkpoint.directory / ANNOTATIONS_FILE
    n_chunks = -(-inputs.corpus.height // spec.output.chunk_size)
    shard_paths = [checkpoint.shard_path("annotate", n) for n in range(n_chunks)]
    with atomic_path(annotations_path) as tmp:
        if shard_paths:  # streamed shard to file: the corpus is never whole in memory
            # bounded row groups: polars' default ones hold hundreds of thousands of rows, each buffered whole
            pl.scan_parquet(shard_paths).sink_parquet(tmp, row_group_size=ROW_GROUP_ROWS)
        else:
            pl.DataFrame(schema=ANNOTATION_SCHEMA).write_parquet(tmp)
    settings: Any = fitted.settings if fitted is not None else None
    if fits and len(fits) > 1:
        settings = {stage.name: fit.settings for stage, fit in zip(stages, fits, strict=True)}
    metrics = {
        "job": spec.name,
        "dataset": spec.dataset.name,
        "n_user": inputs.user.rows.height,
        "user_fraction": spec.user_split.fraction,
        "user_seed": spec.user_split.seed,
        "cm_enabled": spec.cm.enabled,
        "labels_without_user_samples": inputs.labels_without_user_samples,
        "cm_settings": settings,
        **compute_metrics(pl.read_parquet(path, columns=METRIC_COLUMNS) for path in shard_paths),
        "trust": trust_metrics(annotations_path, fitted),
        "prevalence": prevalence_metrics(annotations_path, through_cascade(fits) if fits else None),
        # PSS of this process and its children (e.g. vLLM's engine core); Ray actors live elsewhere
        "run": {**run, "peak_rss_mb": memory.mb},
    }
    if len(stages) > 1:
        metrics["stages"] = stage_metrics(annotations_path, [stage.name for stage in stages])
    metrics["per_accepted_row"] = _per_accepted_row(metrics, run)
    if fitted is not None:
        with atomic_path(checkpoint.directory / REVIEW_FILE) as tmp:
            write_review(annotations_path, tmp)
        with atomic_path(checkpoint.directory / RISK_COVERAGE_FILE) as tmp:
            risk_coverage_plot(annotations_path, fitted, tmp)
    if metrics["prevalence"] is not None:
        with atomic_path(checkpoint.directory / PREVALENCE_FILE) as tmp:
            prevalence_chart(metrics["prevalence"], tmp)
    write_atomic(checkpoint.directory / METRICS_FILE, orjson.dumps(metrics, option=orjson.OPT_INDENT_2))
    manifest.complete = True
    checkpoint.save(manifest)
    bank = stages[0].bank if stages else None
    return JobResult(output_dir=checkpoint.directory, bank=bank, metrics=metrics)


def _per_accepted_row(metrics: dict[str, Any], run: dict[str, Any]) -> dict[str, Any] | None:
    """What the job spent per row it accepted: corpus calls, the API engines' estimated USD and every engine's
    busy seconds (the estimate included)."""
    n_accepted = (metrics.get("trust") or {}).get("n_accepted")
    if not n_accepted:
        return None
    calls = (metrics.get("calls_per_item") or 0) * (metrics.get("n_annotated") or 0)
    engines = run.get("engines") or ({"main": run["engine"]} if "engine" in run else {})
    costs = [stats["estimated_cost_usd"] for stats in engines.values() if "estimated_cost_usd" in stats]
    seconds = sum((run.get("engine_seconds") or {}).values())
    return {
        "calls": calls / n_accepted,
        "usd": sum(costs) / n_accepted if costs else None,
        "engine_seconds": seconds / n_accepted,
    }


def read_annotations(output_dir: str | Path) -> pl.DataFrame:
    return pl.read_parquet(location(output_dir) / ANNOTATIONS_FILE)
