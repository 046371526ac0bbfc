"""Trust end to end: confidence per row, acceptance at a target, the review file, and reviewed labels coming back."""

from __future__ import annotations

import numpy as np
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
# min_accepted 40: the first threshold tested accepts the 40 held-out a's (the default, 200, exceeds the split)
ACCEPT = "{target_accuracy: 0.9, confidence_level: 0.95, min_accepted: 40}"
# tau 0.81: with the weight the split earns (0.25) an answer b gives a, b, c 0.19, 0.44, 0.37, so c (score
# 0.44 + u * 0.37 <= 0.81) joins b for every draw u, and a (0.81 + u * 0.19) for none of these ids' draws.
# A conformal tau would keep c for some rows only (the sets hold the truth 70 times in 80 with b alone).
CM = f"cm: {{variant: counts, tau: 0.81, second_call: never, accept: {ACCEPT}}}"


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
    assert exported.columns == ["id", "text", "suggested", "confidence", "options", "ood", "label"]
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
    assert fitted["trust"]["held_out_samples"] == 80  # the reviewed rows joined the bank, not the held-out samples


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


def _ece(confidence: np.ndarray, right: np.ndarray) -> float:
    """Expected calibration error, ten equal-width bins, written out here from its definition."""
    total = 0.0
    for b in range(10):
        low, high = b / 10, (b + 1) / 10
        members = (confidence >= low) & ((confidence < high) if b < 9 else (confidence <= high))
        if members.any():
            total += abs(right[members].sum() - confidence[members].sum())
    return total / len(confidence)


async def test_after_a_review_the_models_figures_are_on_its_own_rows_and_the_human_rows_apart(job, tmp_path):
    spec, engine = job
    await run_job(spec, engine=engine())
    out = tmp_path / "out"
    ids = {t: str(i) for i, (t, _, _) in enumerate(CORPUS)}  # the toy corpus's ids are its row numbers
    # Three of the nine rows in review: cc0 labelled right (c), cb0 wrongly (a, gold b), cb1 right (b).
    (tmp_path / "reviewed.csv").write_text(f"id,label\n{ids['cc0']},c\n{ids['cb0']},a\n{ids['cb1']},b\n")
    assert cli.main(["review", "import", str(out), str(tmp_path / "reviewed.csv")]) == 0
    result = await run_job(spec, engine=engine())
    table = pl.read_parquet(out / "annotations.parquet")
    assert sorted(table.filter(pl.col("source") == "human")["id"].to_list()) == sorted(
        ids[t] for t in ("cc0", "cb0", "cb1")
    )
    model = table.filter(pl.col("source") == "model")
    # The model's 19 rows: ca0-9 and cc3-5 answered right and accepted, cb2-5 answered b (right) and cc1-2
    # answered b (wrong), those six in review. So its accuracy is 17/19; counting the reviewer's three
    # labels (two right) it would be 19/22.
    assert model.height == 19 and model["accepted"].to_list() == [y != "b" for y in model["y_prime"]]
    right = (model["y_hat"] == model["gold"]).to_numpy()
    metrics = result.metrics
    assert metrics["accuracy_cm"] == pytest.approx(17 / 19) == pytest.approx(right.mean())
    assert metrics["accuracy_baseline"] == pytest.approx(17 / 19)
    assert metrics["coverage"] == pytest.approx(19 / 19)  # every model row's set holds its gold label
    assert metrics["human"] == {"n_rows": 3, "n_with_gold": 3, "agreement_with_gold": pytest.approx(2 / 3)}
    assert metrics["n_annotated"] == 22  # every row is still counted as annotated (and its calls paid)
    trust = metrics["trust"]
    assert trust["n_accepted"] == 13 and trust["n_review"] == 6 and trust["accepted_share"] == pytest.approx(13 / 19)
    assert trust["accuracy_accepted"] == 1.0 and trust["accuracy_review"] == pytest.approx(4 / 6)
    assert trust["calibration_error"] == pytest.approx(_ece(model["confidence"].to_numpy(), right))
    # The refit calibrates on the 80 random user samples only; the 3 reviewed rows joined the bank.
    assert trust["held_out_samples"] == 80
    assert orjson.loads((out / "fitted_cm.json").read_bytes())["trust"]["held_out_samples"] == 80
