"""Trust end to end: confidence per row, acceptance at a target, the review file, and reviewed labels coming back."""

from __future__ import annotations

import orjson
import polars as pl
import pytest
from scipy.stats import beta

from runner import cli, run_job
from tests.scripted_engine import ScriptedEngine

LABELS = ["a", "b", "c"]
# The model is always right on a and c, and answers b for half of the c's: row b of M holds b and c.
USER = [(f"ua{i}", "a", "a") for i in range(40)]
USER += [(f"ub{i}", "b", "b") for i in range(20)]
USER += [(f"uc{i}", "c", "b" if i < 10 else "c") for i in range(20)]
CORPUS = [(f"ca{i}", "a", "a") for i in range(10)]
CORPUS += [(f"cb{i}", "b", "b") for i in range(6)]
CORPUS += [(f"cc{i}", "c", "b" if i < 3 else "c") for i in range(6)]
CM = "cm: {variant: counts, second_call: never, accept: {target_accuracy: 0.9, confidence_level: 0.95}}"


@pytest.fixture
def job(toy_job):
    spec = toy_job([(t, y) for t, y, _ in USER], [(t, y) for t, y, _ in CORPUS], labels=LABELS, extra=CM)
    answers = {t: a for t, _, a in USER + CORPUS}
    return spec, lambda: ScriptedEngine(answers, n_labels=3)


async def test_rows_answered_where_the_model_is_reliable_are_accepted_and_the_rest_go_to_review(job, tmp_path):
    spec, engine = job
    result = await run_job(spec, engine=engine())
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    # Held out, answers a (40) and c (10) are always right and answer b (30) is right 2 times in 3: the
    # calibrated confidence ranks a and c above b, and accepting a and c is 50 right of 50, whose one-sided
    # 95% Clopper-Pearson lower bound is 0.05^(1/50) = 0.942 >= 0.9; adding b's rows would give 70 of 80
    # (lower bound 0.81). So exactly the rows answered a or c are accepted.
    assert table["accepted"].to_list() == [a != "b" for _, _, a in CORPUS]
    assert table["source"].unique().to_list() == ["model"]
    trust = result.metrics["trust"]
    assert trust["user_split_accepted_share"] == pytest.approx(50 / 80)
    assert trust["user_split_accepted_accuracy"] == 1.0
    assert trust["user_split_accepted_lower_bound"] == pytest.approx(beta.ppf(0.05, 50, 1)) == pytest.approx(0.05**0.02)
    assert trust["accepted_share"] == pytest.approx(13 / 22) and trust["n_review"] == 9
    assert trust["accuracy_accepted"] == 1.0 and trust["accuracy_review"] == pytest.approx(6 / 9)
    review = pl.read_parquet(tmp_path / "out/review.parquet")
    assert sorted(review["id"].to_list()) == sorted(table.filter(~pl.col("accepted"))["id"].to_list())
    assert review["confidence"].is_sorted()  # most uncertain first
    assert all(options[0] == "b" and set(options) == {"b", "c"} for options in review["candidates"])
    assert (tmp_path / "out/risk_coverage.png").stat().st_size > 1000


async def test_reviewed_labels_come_back_as_human_rows_without_asking_the_model_again(job, tmp_path, capsys):
    spec, engine = job
    await run_job(spec, engine=engine())
    out = tmp_path / "out"
    assert cli.main(["review", "export", str(out), "--csv", "-o", str(tmp_path / "review.csv")]) == 0
    exported = pl.read_csv(tmp_path / "review.csv", schema_overrides={"id": pl.String})
    assert exported.columns == ["id", "text", "suggested", "confidence", "options", "label"]
    assert exported["options"].to_list() == ["b | c"] * 9
    gold = {t: y for t, y, _ in CORPUS}
    reviewed = exported.with_columns(pl.col("text").replace_strict(gold).alias("label"))  # the reviewer's answers
    reviewed.write_csv(tmp_path / "reviewed.csv")
    assert cli.main(["review", "import", str(out), str(tmp_path / "reviewed.csv")]) == 0

    again = engine()
    result = await run_job(spec, engine=again)
    assert again.requests == []  # first answers are reused; counts with no second calls need nothing else
    table = pl.read_parquet(out / "annotations.parquet")
    human = table.filter(pl.col("source") == "human")
    assert sorted(human["id"].to_list()) == sorted(exported["id"].to_list())
    assert (human["y_hat"] == human["gold"]).all() and human["accepted"].all()
    assert result.metrics["n_user"] == 80 and result.metrics["run"]["rows_rescored"] == 22
    fitted = orjson.loads((out / "fitted_cm.json").read_bytes())
    assert fitted["trust"]["held_out_samples"] == 80 + 9  # the reviewed rows joined the user split


def test_a_reviewed_label_outside_the_label_set_names_its_row(job, tmp_path, capsys):
    import asyncio

    spec, engine = job
    asyncio.run(run_job(spec, engine=engine()))
    (tmp_path / "bad.csv").write_text("id,label\n10,b\n11,z\n")
    assert cli.main(["review", "import", str(tmp_path / "out"), str(tmp_path / "bad.csv")]) == cli.EXIT_INPUT
    assert "row 3: label 'z' is not one of the job's labels" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("id,label\nnope,b\n")
    assert cli.main(["review", "import", str(tmp_path / "out"), str(tmp_path / "bad.csv")]) == cli.EXIT_INPUT
    assert "row 2: id 'nope' is not a row of" in capsys.readouterr().err
    assert not (tmp_path / "out/reviewed.parquet").exists()  # nothing half-imported
