"""The review round trip's edges: duplicate ids, --restart, ids and text a spreadsheet would change, encodings."""

from __future__ import annotations

import csv

import polars as pl
import pytest

from runner import cli, run_job
from runner.data import DataError
from runner.review import export_csv, import_reviewed
from tests.scripted_engine import ScriptedEngine

LABELS = ["a", "b", "c"]
# As in test_review: the model is right on a and c and answers b for half the c's, so the rows
# answered b (the corpus's 6 b's and 3 of its c's) are not accepted and go to review.
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


def _corpus_id(text: str) -> str:
    """The id the job gives a corpus row: its row number (the toy corpus has no id column)."""
    return str([t for t, _, _ in CORPUS].index(text))


async def test_an_id_twice_in_one_review_file_is_an_error_naming_both_lines_unless_both_say_the_same(job, tmp_path):
    spec, engine = job
    await run_job(spec, engine=engine())
    out = tmp_path / "out"
    cb0, cb1 = _corpus_id("cb0"), _corpus_id("cb1")
    (tmp_path / "conflict.csv").write_text(f"id,label\n{cb1},b\n{cb0},b\n{cb0},c\n")
    with pytest.raises(DataError, match=rf"conflict.csv: id '{cb0}' is on rows 3 \('b'\) and 4 \('c'\)"):
        import_reviewed(out, tmp_path / "conflict.csv", LABELS)
    assert not (out / "reviewed.parquet").exists()  # nothing half-imported

    # The same label twice (two reviewers agreeing, files concatenated) is one reviewed row.
    (tmp_path / "agree.csv").write_text(f"id,label\n{cb0},b\n{cb1},b\n{cb0},b\n")
    assert import_reviewed(out, tmp_path / "agree.csv", LABELS) == 2
    result = await run_job(spec, engine=engine())
    table = pl.read_parquet(out / "annotations.parquet")
    assert table.height == len(CORPUS) and table["id"].is_unique().all()  # never a changed row count
    assert result.metrics["n_annotated"] == len(CORPUS)
    assert sorted(table.filter(pl.col("source") == "human")["id"].to_list()) == sorted([cb0, cb1])


async def test_restart_sets_the_old_runs_review_aside_and_does_not_apply_it(job, tmp_path):
    spec, engine = job
    await run_job(spec, engine=engine())
    out = tmp_path / "out"
    cb0 = _corpus_id("cb0")
    (tmp_path / "reviewed.csv").write_text(f"id,label\n{cb0},c\n")  # a label the model never gave: visible if applied
    import_reviewed(out, tmp_path / "reviewed.csv", LABELS)
    await run_job(spec, engine=engine())
    assert pl.read_parquet(out / "annotations.parquet").filter(pl.col("source") == "human").height == 1

    result = await run_job(spec, engine=engine(), restart=True)
    table = pl.read_parquet(out / "annotations.parquet")
    assert table["source"].unique().to_list() == ["model"]  # the old run's label is not applied
    assert table.filter(pl.col("id") == cb0)["y_hat"].to_list() == ["b"]  # the model's answer, not the old review
    assert result.metrics["n_user"] == len(USER)
    assert not (out / "reviewed.parquet").exists()
    kept = pl.read_parquet(out / "reviewed.before-restart.parquet")  # set aside, not lost: importable again
    assert kept.select("id", "label").rows() == [(cb0, "c")]


def _job_dir(tmp_path, ids: list[str], texts: list[str]):
    """A job directory as a finished run leaves it, as far as export and import read it."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    n = len(ids)
    pl.DataFrame(
        {
            "id": ids,
            "text": texts,
            "y_hat": ["+pos"] * n,
            "confidence": [0.5] * n,
            "candidates": [["+pos", "neg"]] * n,
            "y_prime": ["+pos"] * n,
            "error": [None] * n,
            "gold": [None] * n,
        },
        schema_overrides={"error": pl.String, "gold": pl.String},
    ).write_parquet(job_dir / "review.parquet")
    pl.DataFrame({"id": ids, "text": texts, "y_prime": ["+pos"] * n}).write_parquet(job_dir / "annotations.parquet")
    return job_dir


def _fill(exported, reviewed, label) -> None:
    """A reviewer's work: the exported CSV with its label column filled in, every other cell as it was."""
    with exported.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with reviewed.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "label": label(row)} for row in rows)


def test_ids_with_leading_zeros_come_back_as_the_same_strings(tmp_path):
    job_dir = _job_dir(tmp_path, ["007", "7", "0.50"], ["x", "y", "z"])
    export_csv(job_dir, tmp_path / "review.csv")
    labels = {"007": "neg", "7": "+pos", "0.50": "neg"}
    _fill(tmp_path / "review.csv", tmp_path / "reviewed.csv", lambda row: labels[row["id"]])
    assert "\n007," in (tmp_path / "reviewed.csv").read_text()  # unquoted, as a spreadsheet saves it
    assert import_reviewed(job_dir, tmp_path / "reviewed.csv", ["+pos", "neg"]) == 3
    reviewed = pl.read_parquet(job_dir / "reviewed.parquet")
    assert dict(reviewed.select("id", "label").rows()) == labels


def test_a_latin1_review_file_is_an_error_naming_the_file_the_line_and_the_encoding(tmp_path):
    job_dir = _job_dir(tmp_path, ["1", "2"], ["café", "thé"])
    (tmp_path / "reviewed.csv").write_bytes("id,text,label\n1,café,neg\n2,thé,+pos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"reviewed\.csv: line 2 is not UTF-8 .*Latin-1.*save it as .*UTF-8"):
        import_reviewed(job_dir, tmp_path / "reviewed.csv", ["+pos", "neg"])
    # Excel's "CSV UTF-8" starts the file with a byte order mark: read as any UTF-8 file.
    (tmp_path / "excel.csv").write_bytes("id,text,label\n1,café,neg\n2,thé,+pos\n".encode("utf-8-sig"))
    assert import_reviewed(job_dir, tmp_path / "excel.csv", ["+pos", "neg"]) == 2


FORMULAS = ['=HYPERLINK("http://evil.example","click")', "+1+2", "-3+4", "@SUM(A1)", "\tTAB", "\rCR"]


def test_cells_a_spreadsheet_would_evaluate_are_exported_inert_and_import_undoes_nothing_wrongly(tmp_path):
    harmless = ["a = b", "'=quoted by its author", "plain"]
    ids = ["=1+1", "'@x", *(str(i) for i in range(len(FORMULAS) + len(harmless) - 2))]
    texts = FORMULAS + harmless
    job_dir = _job_dir(tmp_path, ids, texts)
    export_csv(job_dir, tmp_path / "review.csv")
    with (tmp_path / "review.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # OWASP's CSV injection advice: a cell starting with = + - @ tab or CR gets a leading single quote.
    assert [row["text"] for row in rows] == [f"'{text}" for text in FORMULAS] + harmless
    assert [row["id"] for row in rows] == ["'=1+1", *ids[1:]]  # "'@x" starts with a quote already: as it is
    assert {row["suggested"] for row in rows} == {"'+pos"} and {row["options"] for row in rows} == {"'+pos | neg"}

    # The reviewer accepts the suggestion on every row: id and label cells quoted as exported.
    _fill(tmp_path / "review.csv", tmp_path / "reviewed.csv", lambda row: row["suggested"])
    assert import_reviewed(job_dir, tmp_path / "reviewed.csv", ["+pos", "neg"]) == len(ids)
    reviewed = pl.read_parquet(job_dir / "reviewed.parquet")
    assert dict(reviewed.select("id", "label").rows()) == dict.fromkeys(ids, "+pos")  # each the job's own id
    assert dict(reviewed.select("id", "text").rows()) == dict(zip(ids, texts, strict=True))  # text from the job
    # A spreadsheet that took the quote as its own text marker saves the cells without it: the same rows.
    (tmp_path / "saved.csv").write_text("id,label\n=1+1,neg\n'@x,neg\n")
    import_reviewed(job_dir, tmp_path / "saved.csv", ["+pos", "neg"])
    assert pl.read_parquet(job_dir / "reviewed.parquet").filter(pl.col("label") == "neg")["id"].sort().to_list() == [
        "'@x",
        "=1+1",
    ]


def test_a_quoted_id_that_could_be_two_of_the_jobs_rows_is_an_error_naming_its_row(tmp_path):
    job_dir = _job_dir(tmp_path, ["=1+1", "'=1+1"], ["x", "y"])
    export_csv(job_dir, tmp_path / "review.csv")
    with (tmp_path / "review.csv").open(newline="", encoding="utf-8") as handle:
        assert [row["id"] for row in csv.DictReader(handle)] == ["'=1+1", "'=1+1"]  # the export cannot tell them apart
    (tmp_path / "reviewed.csv").write_text("id,label\n'=1+1,neg\n")
    with pytest.raises(DataError, match=r"reviewed\.csv: row 2: id \"'=1\+1\" could be \"'=1\+1\" or '=1\+1'"):
        import_reviewed(job_dir, tmp_path / "reviewed.csv", ["+pos", "neg"])


def test_review_import_from_the_command_line_reports_a_latin1_file_as_an_input_error(job, tmp_path, capsys):
    import asyncio

    spec, engine = job
    asyncio.run(run_job(spec, engine=engine()))
    (tmp_path / "reviewed.csv").write_bytes(f"id,text,label\n{_corpus_id('cb0')},naïve,b\n".encode("latin-1"))
    assert cli.main(["review", "import", str(tmp_path / "out"), str(tmp_path / "reviewed.csv")]) == cli.EXIT_INPUT
    assert "reviewed.csv: line 2 is not UTF-8" in capsys.readouterr().err
