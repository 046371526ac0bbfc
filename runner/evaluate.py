"""The evaluation grid: datasets x strategies x {Z, CM+Z} x user budgets x seeds, per model.

Every cell is an ordinary job (``run_job``) with its own output directory, so a grid resumes
cell by cell and each cell's files are those of any ``cm-run`` job. One engine per model is
started once and shared by all its cells behind a request cache: Z and CM+Z make the same first
calls, and zero-shot does not depend on the user budget, so no identical prompt is paid twice.

Models run one after another (one engine in memory at a time). With ``transfer: true`` each
later model also annotates with the banks the first model estimated (the paper's Table 5).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner._durable import write_atomic
from runner.engines import ChoiceRequest, Completion, Engine, EngineError, make_engine
from runner.engines._cache import CachingEngine
from runner.examples import ExamplePool, examples_for_jobs
from runner.spec import (
    CMSpec,
    EngineSpec,
    GenerationSpec,
    JobSpec,
    OutputSpec,
    SpecError,
    StrategySpec,
    VLLMEngineSpec,
    describe_validation_error,
    load_spec,
    read_yaml_mapping,
)

Method = Literal["Z", "CM+Z"]
CellProgress = Callable[[str], None]


class GridSpec(BaseModel):
    """An evaluation grid: which jobs to vary, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    datasets: Annotated[list[str], Field(min_length=1)] = Field(
        description=(
            "Job spec files (relative to this file), one per dataset, e.g. ../paper/mtop-5pct.yaml. Each gives "
            "the dataset, its files and prompt; the grid sets budget, seed, strategy, engine, CM and output."
        )
    )
    strategies: Annotated[list[StrategySpec], Field(min_length=1)] = Field(
        default_factory=lambda: [StrategySpec()], description="Prompt strategies Z; each runs as Z and as CM+Z."
    )
    budgets: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: [0.01, 0.05], description="User split fractions the bank is estimated on."
    )
    seeds: Annotated[list[int], Field(min_length=1)] = Field(
        default_factory=lambda: [0, 1],
        description="Each seed sets the user split sample, the generation seed and the few-shot example order.",
    )
    corpus_limit: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Test items per dataset: one seeded random sample shared by every cell; null: the whole test set.",
    )
    corpus_limit_seed: int = 0
    engines: Annotated[list[EngineSpec], Field(min_length=1)] = Field(
        default_factory=lambda: [VLLMEngineSpec()],
        description="Models to evaluate, run one after another; each replaces the dataset specs' engine.",
    )
    generation: GenerationSpec | None = Field(
        default=None, description="Replaces the dataset specs' generation settings (its seed is the grid seed)."
    )
    cm: CMSpec | None = Field(
        default=None,
        description="Replaces the dataset specs' CM settings (e.g. the variant); enabled and bank are set per cell.",
    )
    transfer: bool = Field(
        default=False,
        description="Also annotate with every later engine using the memory banks the first engine estimated.",
    )
    output_dir: str = Field(description="Where cells, tables and plots go, relative to the current directory.")
    chunk_size: Annotated[int, Field(gt=0)] = 512

    @field_validator("output_dir")
    @classmethod
    def _output_dir_is_local(cls, value: str) -> str:
        if "://" in value:  # the report's HTML, plots and tables are written as local files
            raise ValueError(f"{value}: an evaluation grid's output_dir must be a local directory")
        return value

    @model_validator(mode="before")
    @classmethod
    def _engine_kind_defaults_to_vllm(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("engines"), list):
            engines = [{"kind": "vllm", **e} if isinstance(e, dict) and "kind" not in e else e for e in data["engines"]]
            data = {**data, "engines": engines}
        return data

    @model_validator(mode="after")
    def _distinct(self) -> GridSpec:
        labels = [strategy_label(s) for s in self.strategies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"strategies: two entries describe the same strategy: {labels}")
        models = [e.model for e in self.engines]
        if len(set(models)) != len(models):
            raise ValueError(f"engines: each model may appear once: {models}")
        if self.transfer and len(self.engines) < 2:
            raise ValueError("transfer needs at least two engines (the first estimates, the others annotate)")
        return self


def load_grid(path: str | Path) -> GridSpec:
    grid_path = Path(path)
    raw = read_yaml_mapping(grid_path, "grid")
    try:
        grid = GridSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, grid_path, "evaluation grid")) from None
    # dataset specs are named relative to the grid file, like a job spec's base
    return grid.model_copy(update={"datasets": [str((grid_path.parent / d).resolve()) for d in grid.datasets]})


def strategy_label(spec: StrategySpec) -> str:
    """A short readable name that tells grid strategies apart (their settings that matter)."""
    if spec.name == "few_shot":
        label = f"few_shot ({spec.selection}, k={spec.k})"
    elif spec.name == "self_consistency":
        paths = ", reasoning" if spec.sample_with == "chain_of_thought" else ""
        label = f"self_consistency (n={spec.n_samples}, T={spec.temperature:g}{paths})"
    elif spec.name == "self_refine":
        label = f"self_refine (rounds<={spec.max_rounds})"
    else:
        label = spec.name
    return label + (" [own instruction]" if spec.instruction else "")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", text).strip("-")


@dataclass(frozen=True)
class Cell:
    """One job of the grid."""

    dataset_spec: str
    dataset: str
    model: str  # the model that annotates
    strategy: str  # strategy_label
    budget: float
    seed: int
    method: Method
    bank_model: str | None  # the model the bank was estimated with; None for Z

    @property
    def variant(self) -> str:
        if self.method == "Z":
            return "z"
        return "cm" if self.bank_model == self.model else f"cm-bank-{_slug(self.bank_model or '')}"

    def directory(self, root: Path) -> Path:
        budget = f"{self.budget * 100:g}pct"
        return (
            root
            / "cells"
            / self.dataset
            / _slug(self.model)
            / _slug(self.strategy)
            / budget
            / f"seed{self.seed}"
            / self.variant
        )


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    output_dir: str
    accuracy: float | None  # of the cell's final answer (y_hat; for Z that is the first answer)
    accuracy_first_answer: float | None  # y' of the same run: for CM+Z cells, Z on the very same calls
    coverage: float | None
    calls_per_item: float | None
    prompt_tokens_per_item: float | None
    completion_tokens_per_item: float | None
    candidate_set_mean: float | None
    n_items: int
    n_user: int
    n_errors: int
    engine_requests: int  # requests this cell asked the engine for (estimate and annotate)
    cache_hits: int  # ... of which answered from the cache
    seconds: float

    def record(self) -> dict[str, Any]:
        return {**asdict(self.cell), **{k: v for k, v in asdict(self).items() if k != "cell"}}


def _plan(grid: GridSpec, base: JobSpec, dataset_spec: str, model_index: int) -> Iterator[tuple[Cell, StrategySpec]]:
    """The cells of one dataset for one model, each CM+Z before its Z (whose calls it then finds cached)."""
    model = grid.engines[model_index].model
    banks = [model] + ([grid.engines[0].model] if grid.transfer and model_index > 0 else [])
    for budget in grid.budgets:
        for seed in grid.seeds:
            for strategy in grid.strategies:
                label = strategy_label(strategy)
                for bank_model in banks:
                    yield (
                        Cell(dataset_spec, base.dataset.name, model, label, budget, seed, "CM+Z", bank_model),
                        strategy,
                    )
                yield Cell(dataset_spec, base.dataset.name, model, label, budget, seed, "Z", None), strategy


def cell_job(grid: GridSpec, base: JobSpec, cell: Cell, strategy: StrategySpec, root: Path) -> JobSpec:
    """The job spec of a cell: the dataset's spec with the grid's settings for this cell."""
    engine = next(e for e in grid.engines if e.model == cell.model)
    generation = (grid.generation or base.generation).model_copy(update={"seed": cell.seed})
    corpus = base.corpus
    if grid.corpus_limit is not None:
        corpus = corpus.model_copy(update={"limit": grid.corpus_limit, "limit_seed": grid.corpus_limit_seed})
    bank = None
    if cell.method == "CM+Z" and cell.bank_model != cell.model:
        source = Cell(**{**asdict(cell), "model": cell.bank_model, "bank_model": cell.bank_model})
        bank = str(source.directory(root) / "memory_bank.json")
    return base.model_copy(
        update={
            "name": f"{grid.name}/{cell.directory(Path()).relative_to('cells')}",
            "user_split": base.user_split.model_copy(update={"fraction": cell.budget, "seed": cell.seed}),
            "corpus": corpus,
            "strategy": strategy,
            "engine": engine,
            "generation": generation,
            "cm": (grid.cm or base.cm).model_copy(update={"enabled": cell.method == "CM+Z", "bank": bank}),
            "output": OutputSpec(dir=str(cell.directory(root)), chunk_size=grid.chunk_size),
        }
    )


class FinishedCellsOnly:
    """An engine for reading a grid back: every finished cell needs no call, any other cell fails with this."""

    def __init__(self, spec: EngineSpec):
        self.model_id = spec.model

    async def __aenter__(self) -> FinishedCellsOnly:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        raise EngineError(f"a cell of model {self.model_id!r} is not finished: run the grid without --report-only")


def _per_item(metrics: dict[str, Any], key: str) -> float | None:
    n = metrics["n_annotated"]
    return metrics[key] / n if n else None


class _Pools:
    """Few-shot example pools, one per (dataset, budget, seed), embedded once for the whole grid."""

    def __init__(self, data_dir: str | Path | None):
        self.data_dir = data_dir
        self._pools: dict[tuple[str, float, int], ExamplePool] = {}

    def for_job(self, cell: Cell, job: JobSpec) -> ExamplePool:
        key = (cell.dataset_spec, cell.budget, cell.seed)
        if key not in self._pools:
            from runner.pipeline import load_inputs

            rows = load_inputs(job, self.data_dir).user.rows
            self._pools[key] = ExamplePool.from_rows(rows, max_chars=job.dataset.max_text_chars, seed=cell.seed)
        return self._pools[key]


async def run_grid(
    grid: GridSpec,
    *,
    data_dir: str | Path | None = None,
    restart: bool = False,
    engine_factory: Callable[[EngineSpec], Engine] | None = None,
    progress: CellProgress | None = None,
) -> list[CellResult]:
    """Run every cell (finished cells are read back, not redone); one result per cell, in run order."""
    from runner.pipeline import run_job

    engine_factory = engine_factory or make_engine
    root = Path(grid.output_dir)
    bases = {path: load_spec(path) for path in grid.datasets}  # every spec checked before any engine starts
    pools = _Pools(data_dir)
    results: list[CellResult] = []
    total = sum(1 for i in range(len(grid.engines)) for p, b in bases.items() for _ in _plan(grid, b, p, i))
    for model_index, engine_spec in enumerate(grid.engines):
        async with CachingEngine(engine_factory(engine_spec)) as engine:
            for dataset_spec, base in bases.items():
                for cell, strategy in _plan(grid, base, dataset_spec, model_index):
                    job = cell_job(grid, base, cell, strategy, root)
                    pool = pools.for_job(cell, job) if strategy.name == "few_shot" else None
                    before, started = engine.cache_stats, time.perf_counter()
                    with examples_for_jobs(pool) if pool is not None else nullcontext():
                        outcome = await run_job(job, data_dir=data_dir, restart=restart, engine=engine)
                    after = engine.cache_stats
                    cost = _cell_cost(
                        Path(outcome.output_dir),
                        requests=after.requests - before.requests,
                        hits=after.hits - before.hits,
                        seconds=round(time.perf_counter() - started, 2),
                    )
                    metrics = outcome.metrics
                    result = CellResult(
                        cell=cell,
                        output_dir=str(outcome.output_dir),
                        accuracy=metrics["accuracy_cm"],
                        accuracy_first_answer=metrics["accuracy_baseline"],
                        coverage=metrics["coverage"] if cell.method == "CM+Z" else None,
                        calls_per_item=metrics["calls_per_item"],
                        prompt_tokens_per_item=_per_item(metrics, "prompt_tokens"),
                        completion_tokens_per_item=_per_item(metrics, "completion_tokens"),
                        candidate_set_mean=metrics["candidate_set_size"]["mean"] if cell.method == "CM+Z" else None,
                        n_items=metrics["n_annotated"],
                        n_user=metrics["n_user"],
                        n_errors=metrics["n_errors"],
                        engine_requests=cost["engine_requests"],
                        cache_hits=cost["cache_hits"],
                        seconds=cost["seconds"],
                    )
                    results.append(result)
                    if progress:
                        progress(_describe(len(results), total, result))
    return results


CELL_COST_FILE = "grid_cell.json"


def _cell_cost(directory: Path, *, requests: int, hits: int, seconds: float) -> dict[str, Any]:
    """What the cell cost when it ran: a cell read back from disk asks nothing, so its first run's record stands."""
    path = directory / CELL_COST_FILE
    if requests == 0 and path.is_file():
        return orjson.loads(path.read_bytes())
    cost = {"engine_requests": requests, "cache_hits": hits, "seconds": seconds}
    write_atomic(path, orjson.dumps(cost))
    return cost


def _describe(done: int, total: int, result: CellResult) -> str:
    cell = result.cell
    accuracy = "n/a" if result.accuracy is None else f"{100 * result.accuracy:.1f}%"
    bank = f" (bank {cell.bank_model})" if cell.bank_model not in (None, cell.model) else ""
    return (
        f"[{done}/{total}] {cell.dataset} {cell.model} {cell.strategy} {cell.budget * 100:g}% seed {cell.seed} "
        f"{cell.method}{bank}: accuracy {accuracy}, {result.calls_per_item or 0:.2f} calls/item, "
        f"{result.engine_requests - result.cache_hits}/{result.engine_requests} requests sent, {result.seconds:.0f} s"
    )
