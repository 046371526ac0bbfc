"""The review queue as Label Studio tasks, and Label Studio's JSON export back as reviewed labels.

- ``label_config``: the labeling config a project needs: the row's text, its candidate set (most
  probable first) and one single-choice ``Choices`` control over all of the job's labels, so a
  reviewer can pick a label outside the set.
- ``tasks``: one task per review row in Label Studio's JSON task format; ``data`` carries the
  row's id (``row_id``, a string), text and candidates, and one prediction pre-selects the
  model's label with ``score`` = its confidence (Label Studio sorts tasks by it) and
  ``model_version`` = the stage that answered (the annotations' ``stage``; "main" without one).
- ``read_export``: a project's JSON export (Export > JSON) as ``(task, id, label)`` rows, one per
  task with a label: its latest annotation not cancelled (skipped tasks are not reviewed).
"""

from __future__ import annotations

import datetime
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from runner.data import DataError

CONTROL = "label"  # the Choices control's name: the ``from_name`` of every result read back
TEXT = "text"


def label_config(labels: list[str]) -> str:
    """The labeling config XML (labels escaped by the XML writer, not by hand)."""
    view = ET.Element("View")
    ET.SubElement(view, "Header", value="Text")
    ET.SubElement(view, "Text", name=TEXT, value="$text")
    ET.SubElement(view, "Header", value="Candidates, most probable first")
    ET.SubElement(view, "Text", name="candidates", value="$candidates")
    ET.SubElement(view, "Header", value="Label")
    choices = ET.SubElement(
        view, "Choices", name=CONTROL, toName=TEXT, choice="single", required="true", showInline="false"
    )
    for label in labels:
        ET.SubElement(choices, "Choice", value=label)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def tasks(review: pl.DataFrame) -> list[dict[str, Any]]:
    """Label Studio tasks for review rows (columns id, text, y_hat, confidence, candidates, stage)."""
    out = []
    for row in review.iter_rows(named=True):
        prediction: dict[str, Any] = {
            "model_version": row["stage"],
            "result": [
                {"from_name": CONTROL, "to_name": TEXT, "type": "choices", "value": {"choices": [row["y_hat"]]}}
            ],
        }
        if row["confidence"] is not None:
            prediction["score"] = row["confidence"]
        data = {"row_id": row["id"], "text": row["text"], "candidates": " | ".join(row["candidates"] or [])}
        out.append({"data": data, "predictions": [prediction]})
    return out


def is_export(path: Path) -> bool:
    """A Label Studio JSON export: a ``.json`` file, or any file whose content is a JSON array."""
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() in (".csv", ".jsonl", ".parquet") or not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4096).lstrip().startswith(b"[")


def _when(annotation: dict[str, Any]) -> tuple[datetime.datetime, int]:
    stamp = annotation.get("updated_at") or annotation.get("created_at")
    try:
        moment = datetime.datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        moment = None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    ident = annotation.get("id")
    return moment or datetime.datetime.min.replace(tzinfo=datetime.UTC), ident if isinstance(ident, int) else 0


def _label(path: Path, where: str, annotation: dict[str, Any]) -> str | None:
    """The annotation's choice in the ``label`` control, or None when it has none."""
    result = annotation.get("result")
    if not isinstance(result, list):
        raise DataError(f"{path}: {where}: annotation {annotation.get('id')!r} has no 'result' list")
    chosen = [
        item.get("value", {}).get("choices")
        for item in result
        if isinstance(item, dict) and item.get("from_name") == CONTROL and item.get("type") == "choices"
    ]
    if not chosen:
        return None
    if len(chosen) > 1 or not isinstance(chosen[0], list) or len(chosen[0]) != 1:
        raise DataError(
            f"{path}: {where}: annotation {annotation.get('id')!r} chose {chosen}; the '{CONTROL}' control takes one "
            "label (use the labeling config the export wrote)"
        )
    return chosen[0][0]


def read_export(path: Path) -> pl.DataFrame:
    """``task`` (Label Studio's task id), ``id`` (the row's, a string), ``label``: one row per labelled task.

    Malformed JSON, a task without ``data.row_id`` or an annotation whose label is not one
    choice is an error naming the file and the task; the caller checks labels and ids against
    the job.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        exported = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as error:
        raise DataError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); export the project "
            "again with Export > JSON"
        ) from None
    if not isinstance(exported, list):
        raise DataError(f"{path}: a Label Studio JSON export is a list of tasks, not a {type(exported).__name__}")
    rows: list[tuple[int, str, str]] = []
    for index, task in enumerate(exported, start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise DataError(
                f"{path}: task {index} in the file is not a task with 'data' (JSON-MIN or CSV exports lack it: "
                "export with Export > JSON)"
            )
        task_id = task.get("id")
        where = f"task {task_id}" if task_id is not None else f"task {index} in the file"
        row_id = task["data"].get("row_id")
        if isinstance(row_id, bool) or not isinstance(row_id, str | int):
            raise DataError(
                f"{path}: {where}: no data.row_id (the row's id); import the tasks `cm-run review export "
                "--format label-studio` wrote"
            )
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not annotations:
            continue
        label = _label(path, where, max(annotations, key=_when))
        if label is not None:
            rows.append((task_id if isinstance(task_id, int) else index, str(row_id), label))
    schema = {"task": pl.Int64, "id": pl.String, "label": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")
