"""Review in Label Studio: the export's tasks and labeling config, the import of Label Studio's JSON export,
and (marked slow) the round trip through a real Label Studio server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import time
import xml.etree.ElementTree as ET

import httpx
import orjson
import polars as pl
import pytest

from runner import cli, run_job
from tests.scripted_engine import ScriptedEngine
from tests.test_review import CM, CORPUS, LABELS, USER

IDS = {t: str(i) for i, (t, _, _) in enumerate(CORPUS)}  # the toy corpus's ids are its row numbers


@pytest.fixture
def job(toy_job, tmp_path):
    """The trust toy job of tests/test_review.py, run once: 9 of its 22 corpus rows in review."""
    spec = toy_job([(t, y) for t, y, _ in USER], [(t, y) for t, y, _ in CORPUS], labels=LABELS, extra=CM)
    answers = {t: a for t, _, a in USER + CORPUS}
    asyncio.run(run_job(spec, engine=ScriptedEngine(answers, n_labels=3)))
    return spec, lambda: ScriptedEngine(answers, n_labels=3), tmp_path / "out"


def _export(out, tmp_path) -> tuple[list[dict], ET.Element]:
    tasks = tmp_path / "tasks.json"
    assert cli.main(["review", "export", str(out), "--format", "label-studio", "-o", str(tasks)]) == 0
    return orjson.loads(tasks.read_bytes()), ET.fromstring((tmp_path / "tasks.xml").read_text())


def test_the_export_is_one_task_per_review_row_with_the_models_label_preselected_and_a_config_over_the_labels(
    job, tmp_path
):
    _, _, out = job
    tasks, config = _export(out, tmp_path)
    review = pl.read_parquet(out / "review.parquet")
    assert len(tasks) == review.height == 9
    # The 9 rows the model answered b (cb0-5, cc0-2): b is its label and {b, c} the set, b first.
    assert sorted(task["data"]["row_id"] for task in tasks) == sorted(IDS[t] for t, _, a in CORPUS if a == "b")
    texts = {IDS[t]: t for t, _, _ in CORPUS}
    for task, row in zip(tasks, review.iter_rows(named=True), strict=True):
        assert task["data"] == {"row_id": row["id"], "text": texts[row["id"]], "candidates": "b | c"}
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "main"  # no stage column: a one-stage job
        assert prediction["score"] == row["confidence"]
        assert prediction["result"] == [
            {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["b"]}}
        ]
    choices = config.find("Choices")
    assert choices.get("name") == "label" and choices.get("toName") == "text" and choices.get("choice") == "single"
    assert [choice.get("value") for choice in choices] == LABELS
    assert {text.get("value") for text in config.iter("Text")} == {"$text", "$candidates"}


def test_the_prediction_names_the_stage_that_answered_the_row(job, tmp_path):
    _, _, out = job
    annotations = pl.read_parquet(out / "annotations.parquet")
    # a cascade's annotations say which stage answered; here the model's c's stage "qwen", the rest "probe"
    staged = annotations.with_columns(
        pl.when(pl.col("gold") == "c").then(pl.lit("qwen")).otherwise(pl.lit("probe")).alias("stage")
    )
    staged.write_parquet(out / "annotations.parquet")
    tasks, _ = _export(out, tmp_path)
    gold = {IDS[t]: y for t, y, _ in CORPUS}
    assert [task["predictions"][0]["model_version"] for task in tasks] == [
        "qwen" if gold[task["data"]["row_id"]] == "c" else "probe" for task in tasks
    ]


def test_a_label_config_escapes_labels_the_xml_way():
    from runner.label_studio import label_config

    labels = ["a&b", "<c>", 'say "hi"']
    assert [c.get("value") for c in ET.fromstring(label_config(labels)).find("Choices")] == labels


def _annotation(ident: int, label: str | None, updated: str, *, cancelled: bool = False) -> dict:
    result = (
        []
        if label is None
        else [{"id": "x", "from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
    )
    return {"id": ident, "result": result, "was_cancelled": cancelled, "created_at": updated, "updated_at": updated}


def _exported_task(ident: int, row_id, annotations: list[dict]) -> dict:
    """A task as Label Studio's Export > JSON writes it (docs: guide/task_format, "JSON format of annotated tasks")."""
    return {
        "id": ident,
        "data": {"row_id": row_id, "text": "whatever", "candidates": "b | c"},
        "annotations": annotations,
        "predictions": [{"id": ident, "model_version": "main", "score": 0.5, "result": []}],
        "project": 1,
    }


def test_the_import_takes_each_tasks_latest_annotation_not_cancelled(job, tmp_path):
    _, engine, out = job
    exported = [
        # relabelled: the later annotation (c) is the label, whatever the list's order
        _exported_task(
            11, IDS["cc0"], [_annotation(2, "c", "2026-01-02T10:00:00Z"), _annotation(1, "b", "2026-01-01T10:00:00Z")]
        ),
        # the later annotation was cancelled (skipped): the earlier one stands
        _exported_task(
            12,
            IDS["cb0"],
            [_annotation(3, "a", "2026-01-01T10:00:00Z"), _annotation(4, "c", "2026-01-03T10:00:00Z", cancelled=True)],
        ),
        _exported_task(
            13, int(IDS["cb1"]), [_annotation(5, "b", "2026-01-01T10:00:00.5+00:00")]
        ),  # an int id: a string
        _exported_task(14, IDS["cb2"], [_annotation(6, "b", "2026-01-01T10:00:00Z", cancelled=True)]),  # only skipped
        _exported_task(15, IDS["cb3"], []),  # not annotated
    ]
    (tmp_path / "project-1-at-2026.json").write_bytes(orjson.dumps(exported))
    assert cli.main(["review", "import", str(out), str(tmp_path / "project-1-at-2026.json")]) == 0
    reviewed = pl.read_parquet(out / "reviewed.parquet")
    assert dict(zip(reviewed["id"], reviewed["label"], strict=True)) == {
        IDS["cc0"]: "c",
        IDS["cb0"]: "a",
        IDS["cb1"]: "b",
    }

    asyncio.run(run_job(job[0], engine=engine()))
    table = pl.read_parquet(out / "annotations.parquet")
    human = table.filter(pl.col("source") == "human")
    assert dict(zip(human["id"], human["y_hat"], strict=True)) == {IDS["cc0"]: "c", IDS["cb0"]: "a", IDS["cb1"]: "b"}


def test_a_label_studio_export_is_known_by_its_content_whatever_its_name(job, tmp_path):
    _, _, out = job
    (tmp_path / "export.txt").write_bytes(
        b"\n  " + orjson.dumps([_exported_task(11, IDS["cc0"], [_annotation(2, "c", "2026-01-02T10:00:00Z")])])
    )
    assert cli.main(["review", "import", str(out), str(tmp_path / "export.txt")]) == 0
    assert pl.read_parquet(out / "reviewed.parquet")["label"].to_list() == ["c"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            [
                _exported_task(11, "0", [_annotation(1, "a", "2026-01-01T00:00:00Z")]),
                _exported_task(12, "1", [_annotation(2, "z", "2026-01-01T00:00:00Z")]),
            ],
            "bad.json: task 12: label 'z' is not one of the job's labels (id '1')",
        ),
        (
            [_exported_task(11, "0", [_annotation(1, "a", "2026-01-01T00:00:00Z")]), {"id": 12, "data": {"text": "x"}}],
            "bad.json: task 12: no data.row_id (the row's id)",
        ),
        (
            [{"id": 3, "text": "x", "label": "a"}],  # Export > JSON-MIN: no data
            "bad.json: task 1 in the file is not a task with 'data'",
        ),
        (
            [_exported_task(11, "nope", [_annotation(1, "a", "2026-01-01T00:00:00Z")])],
            "bad.json: task 11: id 'nope' is not a row of",
        ),
        (
            [
                _exported_task(11, "0", [_annotation(1, "a", "2026-01-01T00:00:00Z")]),
                _exported_task(12, "0", [_annotation(2, "b", "2026-01-01T00:00:00Z")]),
            ],
            "bad.json: id '0' is on tasks 11 ('a') and 12 ('b')",
        ),
        (b'[{"id": 1, "data": {"row_id": "0"}, "annotations": [}]', "bad.json: not valid JSON (line 1, column"),
    ],
    ids=["label-outside-the-set", "no-row-id", "json-min", "unknown-id", "two-labels", "malformed"],
)
def test_bad_label_studio_input_names_the_file_and_the_task_and_writes_nothing(job, tmp_path, capsys, content, message):
    _, _, out = job
    bad = tmp_path / "bad.json"
    bad.write_bytes(content if isinstance(content, bytes) else orjson.dumps(content))
    assert cli.main(["review", "import", str(out), str(bad)]) == cli.EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not (out / "reviewed.parquet").exists()


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """One real Label Studio server for the module: its start migrates a fresh SQLite, 63-106 s measured on the
    shared 2-core machine; the round trip itself takes ~8 s."""
    from tests._label_studio_server import binary, label_studio_server

    executable = binary()
    if executable is None or not executable.is_file():
        reason = "needs the Label Studio server: `make label-studio` (a virtualenv of its own), or set $CM_LABEL_STUDIO"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; `make test` installs it")
        pytest.skip(reason)
    with label_studio_server(executable, tmp_path_factory.mktemp("label-studio")) as server:
        yield server


def _items(answer: httpx.Response) -> list[dict]:
    answer.raise_for_status()
    body = answer.json()
    return body["tasks"] if isinstance(body, dict) else body


@pytest.mark.slow
def test_a_review_goes_through_a_real_label_studio_server_and_back(job, label_studio, tmp_path):
    spec, engine, out = job
    tasks, _ = _export(out, tmp_path)
    before = pl.read_parquet(out / "annotations.parquet")
    with label_studio.client() as client:
        project = client.post(
            "/api/projects", json={"title": "cm-runner review", "label_config": (tmp_path / "tasks.xml").read_text()}
        )
        project.raise_for_status()
        project_id = project.json()["id"]
        client.post(f"/api/projects/{project_id}/import", json=tasks).raise_for_status()
        stored = _items(client.get("/api/tasks", params={"project": project_id, "page_size": 100, "fields": "all"}))
        assert len(stored) == 9
        by_row = {task["data"]["row_id"]: task for task in stored}
        confidence = dict(zip(before["id"], before["confidence"], strict=True))
        for row_id, task in by_row.items():  # Label Studio kept each prediction's score and stage
            (prediction,) = task["predictions"]
            assert prediction["score"] == pytest.approx(confidence[row_id]) and prediction["model_version"] == "main"

        def annotate(row_id: str, label: str | None, *, cancelled: bool = False) -> None:
            result = (
                []
                if label is None
                else [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
            )
            body = {"result": result, "was_cancelled": cancelled}
            client.post(f"/api/tasks/{by_row[row_id]['id']}/annotations", json=body).raise_for_status()

        # The reviewer: cc0 is a c (the model said b), cb0 a b as predicted; cb1 first labelled a, then
        # relabelled b in a later annotation (the latest counts); cb2 skipped (a cancelled annotation).
        annotate(IDS["cc0"], "c")
        annotate(IDS["cb0"], "b")
        annotate(IDS["cb1"], "a")
        time.sleep(0.05)  # a later updated_at
        annotate(IDS["cb1"], "b")
        annotate(IDS["cb2"], None, cancelled=True)
        export = client.get(f"/api/projects/{project_id}/export", params={"exportType": "JSON"})
        export.raise_for_status()
    (tmp_path / "exported.json").write_bytes(export.content)
    assert cli.main(["review", "import", str(out), str(tmp_path / "exported.json")]) == 0
    human_labels = {IDS["cc0"]: "c", IDS["cb0"]: "b", IDS["cb1"]: "b"}

    asyncio.run(run_job(spec, engine=engine()))
    after = pl.read_parquet(out / "annotations.parquet")
    human = after.filter(pl.col("source") == "human")
    assert dict(zip(human["id"], human["y_hat"], strict=True)) == human_labels
    assert human["accepted"].all() and (human["confidence"] == 1.0).all()
    # Nothing else changed: the other rows are the model's, with its first answers and texts ...
    rest = ["id", "text", "y_prime", "gold"]
    assert (
        after.filter(pl.col("source") != "human")
        .select(rest)
        .equals(before.filter(~pl.col("id").is_in(list(human_labels))).select(rest))
    )
    assert (after.filter(pl.col("source") != "human")["source"] == "model").all()
    # ... and the whole table is what the same three labels give through the CSV import.
    (out / "reviewed.parquet").unlink()
    (tmp_path / "reviewed.csv").write_text("id,label\n" + "".join(f"{i},{y}\n" for i, y in human_labels.items()))
    assert cli.main(["review", "import", str(out), str(tmp_path / "reviewed.csv")]) == 0
    asyncio.run(run_job(spec, engine=engine()))
    assert pl.read_parquet(out / "annotations.parquet").equals(after)
