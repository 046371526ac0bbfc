"""The estimate -> annotate -> evaluate flow, on a tiny dataset and a scripted engine."""

import asyncio

import orjson
import polars as pl
import pytest

from runner import load_bank, run_job
from runner.checkpoint import CheckpointError
from tests.scripted_engine import ScriptedEngine

USER = [  # (text, truth, the model's first answer)
    ("u1", "alarm", "alarm"),
    ("u2", "iot", "alarm"),  # the model says alarm when the user means iot
    ("u3", "music", "iot"),  # ... and iot when the user means music
    ("u4", "music", "music"),
]
CORPUS = [  # (text, gold, first answer, second answer when asked again)
    ("c1", "iot", "alarm", "iot"),  # row 'alarm' = {alarm, iot}: asked again, fixed
    ("c2", "music", "iot", None),  # row 'iot' = {music}: decided without a second call
    ("c3", "news", "news", None),  # 'news' never answered on the user split: empty row
    ("c4", "alarm", "alarm", "alarm"),
]


@pytest.fixture
def job(toy_job):
    spec = toy_job(
        [(t, y) for t, y, _ in USER],
        [(t, y) for t, y, *_ in CORPUS],
        labels=["alarm", "iot", "music", "news"],
        output="chunk_size: 3",
    )
    first = {t: a for t, _, a in USER} | {t: a for t, _, a, _ in CORPUS}
    second = {t: s for t, _, _, s in CORPUS if s}
    return spec, lambda: ScriptedEngine(first, second, n_labels=4)


async def test_cm_flow_end_to_end(job, tmp_path):
    spec, make_engine = job
    engine = make_engine()
    result = await run_job(spec, engine=engine)

    bank = load_bank(tmp_path / "out/memory_bank.json")
    assert bank.rows() == {"alarm": ("alarm", "iot"), "iot": ("music",), "music": ("music",), "news": ()}
    assert bank.model == "scripted" and bank.n_samples == 4

    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    assert table["y_prime"].to_list() == ["alarm", "iot", "news", "alarm"]
    assert table["candidates"].to_list() == [["alarm", "iot"], ["music"], ["news"], ["alarm", "iot"]]
    assert table["y_hat"].to_list() == ["iot", "music", "news", "alarm"]
    assert table["calls"].to_list() == [2, 1, 1, 2]  # a single candidate needs no second call
    assert table["fallback"].to_list() == [None, None, "empty_row", None]
    assert len(engine.requests) == 4 + 4 + 2  # estimate + first calls + two second calls

    metrics = orjson.loads((tmp_path / "out/metrics.json").read_bytes())
    assert metrics["accuracy_baseline"] == 0.5 and metrics["accuracy_cm"] == 1.0
    assert metrics["coverage"] == 1.0 and metrics["calls_per_item"] == 1.5
    assert metrics["n_user"] == 4 and metrics["n_empty_row_fallback"] == 1
    assert metrics["candidate_set_size"] == {"mean": 1.5, "median": 1.5, "min": 1, "max": 2}
    assert metrics == result.metrics


async def test_the_bank_of_a_drawn_split_keeps_the_pools_label_counts(job, tmp_path):
    # what the fit weighs a stratified split's held-out scores by (runner.fit.split_weights)
    spec, make_engine = job
    drawn = spec.model_copy(update={"user_split": spec.user_split.model_copy(update={"fraction": 0.5})})
    await run_job(drawn, engine=make_engine())
    bank = load_bank(tmp_path / "out/memory_bank.json")
    assert bank.user_split.pool_label_counts == {"alarm": 1, "iot": 1, "music": 2}
    assert bank.user_split.stratified and bank.n_samples == 3  # one sample a label, at least


async def test_metrics_count_rows_without_an_answer_as_wrong(job, tmp_path):
    spec, _ = job
    first = {t: a for t, _, a in USER} | {t: a for t, _, a, _ in CORPUS}
    second = {t: s for t, _, _, s in CORPUS if s}
    await run_job(spec, engine=ScriptedEngine(first, second, n_labels=4, failing={"c4"}))
    metrics = orjson.loads((tmp_path / "out/metrics.json").read_bytes())
    # By hand from CORPUS: y' right on c3 only; y_hat right on c1, c2, c3; gold in C for c1, c2, c3;
    # c4's call failed (y', y_hat null, no candidates): wrong, not left out. Calls 2 + 1 + 1 + 1 (the failed one).
    assert metrics["accuracy_baseline"] == 1 / 4 and metrics["accuracy_cm"] == 3 / 4
    assert metrics["coverage"] == 3 / 4 and metrics["calls_per_item"] == 5 / 4 and metrics["n_errors"] == 1
    # the reader's recipe: rows with gold, a null answer counted as wrong
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    scored = table.filter(pl.col("gold").is_not_null())
    assert scored.select((pl.col("y_hat") == pl.col("gold")).fill_null(False).mean()).item() == 3 / 4
    assert (table["y_hat"] == table["gold"]).mean() == 1.0  # the naive recipe skips the null row: overstated


async def test_a_slow_row_does_not_hold_up_the_chunks_behind_it(job, tmp_path):
    spec, make_engine = job
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"chunk_size": 1, "chunks_in_flight": 3})})
    engine = make_engine()
    last_row_asked = asyncio.Event()
    answer = engine.complete

    async def complete(requests):
        text = requests[0].messages[-1].content
        if text == "c4":
            last_row_asked.set()
        if text == "c1":  # answered only once the fourth chunk was started: chunks must overlap
            await asyncio.wait_for(last_row_asked.wait(), timeout=10)
        return await answer(requests)

    engine.complete = complete
    await run_job(spec, engine=engine)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["text"].to_list() == ["c1", "c2", "c3", "c4"]  # shards finished out of order, read back in order
    assert table["y_hat"].to_list() == ["iot", "music", "news", "alarm"]


async def test_rerun_resumes_without_calling_the_engine_again(job):
    spec, make_engine = job
    first = await run_job(spec, engine=make_engine())
    engine = make_engine()
    again = await run_job(spec, engine=engine)
    assert engine.requests == []  # the bank and every shard were reused
    assert {k: v for k, v in again.metrics.items() if k != "run"} == {
        k: v for k, v in first.metrics.items() if k != "run"
    }


async def test_cm_disabled_keeps_the_first_answer(job, tmp_path):
    spec, make_engine = job
    spec = spec.model_copy(update={"cm": spec.cm.model_copy(update={"enabled": False, "accept": None})})
    result = await run_job(spec, engine=make_engine())
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["y_hat"].to_list() == table["y_prime"].to_list()
    assert result.metrics["calls_per_item"] == 1.0 and not (tmp_path / "out/memory_bank.json").exists()
    assert table["confidence"].null_count() == table.height  # no user split asked: nothing to calibrate on


async def test_cm_disabled_with_acceptance_still_asks_the_user_split_to_calibrate(job, tmp_path):
    spec, make_engine = job
    spec = spec.model_copy(update={"cm": spec.cm.model_copy(update={"enabled": False})})
    engine = make_engine()
    result = await run_job(spec, engine=engine)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["y_hat"].to_list() == table["y_prime"].to_list()
    assert len(engine.requests) == result.metrics["n_user"] + table.height  # the estimate, then one call a row
    assert table["confidence"].null_count() == 0 and result.metrics["trust"]["held_out_samples"] > 0


async def test_abstain_policy_leaves_empty_rows_unlabelled(job, tmp_path):
    spec, make_engine = job
    spec = spec.model_copy(update={"cm": spec.cm.model_copy(update={"empty_row": "abstain"})})
    await run_job(spec, engine=make_engine())
    row = pl.read_parquet(tmp_path / "out/annotations.parquet").filter(pl.col("text") == "c3").row(0, named=True)
    assert row["y_hat"] is None and row["candidates"] == [] and row["fallback"] == "empty_row"


async def test_unparseable_answers_are_recorded_not_dropped(job, tmp_path):
    spec, _ = job
    engine = ScriptedEngine({t: a for t, _, a in USER} | {"c1": "something else"}, n_labels=4)
    result = await run_job(spec, engine=engine)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    assert table.height == 4
    assert table["error"][0] == "answer 'something else' is not one of the 4 allowed labels"
    assert result.metrics["n_errors"] == 4  # every corpus row's answer is unknown to this script


async def test_a_changed_spec_refuses_to_resume(job):
    spec, make_engine = job
    await run_job(spec, engine=make_engine())
    changed = spec.model_copy(update={"generation": spec.generation.model_copy(update={"max_tokens": 5})})
    with pytest.raises(CheckpointError, match=r"generation.max_tokens: 32 -> 5.*--restart"):
        await run_job(changed, engine=make_engine())
    await run_job(changed, engine=make_engine(), restart=True)


async def test_an_engine_that_fails_to_start_is_closed_and_leaves_no_sampler_running(job, monkeypatch):
    import threading

    import runner.pipeline
    from runner.engines._lazy import LazyEngine
    from runner.engines.base import EngineError

    closed: list[bool] = []

    class HalfStarting(LazyEngine):
        async def __aenter__(self):
            raise EngineError("half started")

        async def __aexit__(self, *exc_info):
            closed.append(True)

    monkeypatch.setattr(runner.pipeline, "LazyEngine", HalfStarting)
    spec, _ = job
    with pytest.raises(EngineError, match="half started"):
        await run_job(spec)
    assert closed == [True]
    assert not [t for t in threading.enumerate() if t.name == "peak-memory"]
