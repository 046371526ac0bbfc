"""The review queue: the rows a job did not accept, out to a labelling tool and back.

- ``write_review``: ``review.parquet`` beside the annotations, most uncertain first, each row with
  its candidate set as the reviewer's options (most probable first).
- ``export_csv``: the same rows as CSV for labelling tools, with an empty ``label`` column.
- ``export_label_studio``: the same rows as Label Studio tasks with predictions, and the labeling
  config a project needs (``runner.label_studio``).
- ``import_reviewed``: a reviewed CSV (or parquet/jsonl, or Label Studio's JSON export) back into the job directory as
  ``reviewed.parquet``. The next run of the job adds those rows to the bank as corrections (the
  bank update; the priors refit; tau, calibration and thresholds stay on the random user split:
  ``runner.fit``), re-scores the corpus with the refit CM, and marks them ``source = human``.
- ``risk_coverage_plot``: accuracy of accepted rows against the share accepted.
"""

from __future__ import annotations

import codecs
import hashlib
from pathlib import Path

import orjson
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from runner import label_studio, trust
from runner._durable import atomic_path
from runner.bank import MemoryBank, Sample, update_bank
from runner.checkpoint import REVIEWED_FILE
from runner.data import DataError, scan_table
from runner.fit import FittedCM

REVIEW_COLUMNS = ["id", "text", "y_hat", "confidence", "candidates", "y_prime", "error", "gold", "ood"]


def write_review(annotations: Path, path: Path) -> int:
    """The rows not accepted, most uncertain first; returns how many."""
    review = (
        pl.scan_parquet(annotations)
        .filter(~pl.col("accepted").fill_null(False))
        .sort("confidence", nulls_last=False, maintain_order=True)
        .select(REVIEW_COLUMNS)
        .collect()
    )
    review.write_parquet(path)
    return review.height


# A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV Injection"): the export
# writes it with a leading single quote, which makes it text. Corpus text is anyone's to choose.
_FORMULA_START = r"[=+\-@\t\r]"


def _inert(cell: pl.Expr) -> pl.Expr:
    return cell.str.replace(f"^({_FORMULA_START})", "'${1}")


def export_csv(job_dir: Path, output: Path) -> int:
    """review.parquet as CSV: options joined by ' | ', and an empty ``label`` column for the reviewer.

    A cell a spreadsheet would evaluate gets a leading single quote; the import takes it off ids
    and labels again (text is not read back: it comes from the annotations).
    """
    review = _review_rows(job_dir)
    table = review.select(
        _inert(pl.col("id")),
        _inert(pl.col("text")),
        _inert(pl.col("y_hat")).alias("suggested"),
        pl.col("confidence").round(4),
        _inert(pl.col("candidates").list.join(" | ")).alias("options"),
        # why a confident row is here: unlike the user split (a file from before cm.ood has no such column)
        pl.col("ood") if "ood" in review.columns else pl.lit(None, pl.Boolean).alias("ood"),
        pl.lit("").alias("label"),
    )
    table.write_csv(output)
    return table.height


def _review_rows(job_dir: Path) -> pl.DataFrame:
    source = job_dir / "review.parquet"
    if not source.is_file():
        raise DataError(f"{source}: no review file; run the job first (it needs a user split: cm.accept)")
    return pl.read_parquet(source)


def export_label_studio(job_dir: Path, tasks_path: Path, config_path: Path, labels: list[str]) -> int:
    """review.parquet as Label Studio tasks (JSON) and the project's labeling config (XML); returns the rows.

    ``model_version`` is the stage that answered each row: the annotations' ``stage`` column, or
    "main" for a job without one.
    """
    review = _review_rows(job_dir)
    if "stage" not in review.columns:
        annotations = job_dir / "annotations.parquet"
        if "stage" in pl.scan_parquet(annotations).collect_schema().names():
            stages = pl.read_parquet(annotations, columns=["id", "stage"])
            review = review.join(stages, on="id", how="left", maintain_order="left")
        else:
            review = review.with_columns(pl.lit(None, pl.String).alias("stage"))
    review = review.with_columns(pl.col("stage").cast(pl.String).fill_null("main"))
    tasks_path.write_bytes(orjson.dumps(label_studio.tasks(review), option=orjson.OPT_INDENT_2))
    config_path.write_text(label_studio.label_config(labels), encoding="utf-8")
    return review.height


def _read_review_file(path: Path) -> pl.DataFrame:
    """The reviewed table; a CSV's cells as the strings written (an id 007 stays 007), UTF-8 only."""
    if path.suffix.lower() != ".csv":
        try:
            return scan_table(path).collect()
        except pl.exceptions.PolarsError as error:
            raise DataError(f"{path}: cannot be read as a table ({str(error).splitlines()[0]})") from None
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[error.start]:02x}); the file is likely Latin-1 or "
            "Windows-1252, as spreadsheets save 'CSV': save it as 'CSV UTF-8' and import it again"
        ) from None
    try:
        return pl.read_csv(raw.removeprefix(codecs.BOM_UTF8), infer_schema=False)
    except pl.exceptions.PolarsError as error:
        raise DataError(f"{path}: cannot be read as CSV ({str(error).splitlines()[0]})") from None


def _unquoted(path: Path, table: pl.DataFrame, column: str, known: list[str]) -> pl.DataFrame:
    """``column`` with the export's leading quote taken off where it can only be the export's.

    That is where the value without its quote is one of ``known`` (the job's ids, or its labels)
    and would have been quoted; a value that is known both ways is ambiguous, an error naming its
    row. A spreadsheet that dropped the quote itself left a value known as it is.
    """
    value, bare = pl.col(column), pl.col(column).str.strip_prefix("'")
    quoted = value.str.starts_with("'") & bare.str.contains(f"^{_FORMULA_START}") & bare.is_in(known)
    ambiguous = table.filter(quoted & value.is_in(known))
    if ambiguous.height:
        row = ambiguous.row(0, named=True)
        raise DataError(
            f"{path}: row {row['row']}: {column} {row[column]!r} could be {row[column]!r} or {row[column][1:]!r}, "
            "both of the job's: the export writes the second as the first, so that a spreadsheet does not evaluate it"
        )
    return table.with_columns(pl.when(quoted).then(bare).otherwise(value).alias(column))


def _has(path: Path, column: str) -> bool:
    return column in pl.read_parquet_schema(path)


def import_reviewed(job_dir: Path, reviewed: Path, labels: list[str]) -> int:
    """Keep the rows of ``reviewed`` whose ``label`` is filled in, as ``job_dir/reviewed.parquet``.

    ``reviewed`` is a table with columns ``id`` and ``label``, or Label Studio's JSON export of a
    project made from ``export_label_studio`` (a ``.json`` file, or content that is a JSON array):
    each task's latest annotation not cancelled, errors naming the task.

    Rows are matched to annotations by ``id``; an id the job never annotated or a label outside
    the label set is an error naming the row. An id twice in the file with two labels is an error
    naming both rows: a file's order does not say which label is meant (sorting a spreadsheet
    reorders it); the same label twice counts once. Earlier imports are kept; a row reviewed again
    in a later import keeps that import's label. Returns the number of reviewed rows now on file.
    """
    annotated = job_dir / "annotations.parquet"
    # the stage whose model gave y_prime: a cascade's corrections teach each stage only its own answers
    annotations = pl.read_parquet(annotated, columns=["id", "text", "y_prime"] + ["stage"] * _has(annotated, "stage"))
    if "stage" not in annotations.columns:  # annotated before cascades
        annotations = annotations.with_columns(pl.lit(None, dtype=pl.String).alias("stage"))
    if label_studio.is_export(reviewed):
        # Label Studio's own export: nothing in it went through a spreadsheet, so nothing is unquoted
        unit = "task"
        table = label_studio.read_export(reviewed).rename({"task": "row"})
        table = table.with_columns(pl.col("label").str.strip_chars())
    else:
        unit = "row"
        table = _read_review_file(reviewed)
        for column in ("id", "label"):
            if column not in table.columns:
                raise DataError(f"{reviewed}: no column '{column}'; columns are {table.columns}")
        table = table.with_row_index("row", offset=2 if reviewed.suffix.lower() == ".csv" else 1)
        table = table.with_columns(pl.col("id").cast(pl.String), pl.col("label").cast(pl.String).str.strip_chars())
        table = table.filter(pl.col("label").is_not_null() & (pl.col("label") != ""))
        table = _unquoted(reviewed, table, "label", labels)
        table = _unquoted(reviewed, table, "id", annotations["id"].to_list())
    unknown = table.filter(~pl.col("label").is_in(labels))
    if unknown.height:
        row = unknown.row(0, named=True)
        raise DataError(
            f"{reviewed}: {unit} {row['row']}: label {row['label']!r} is not one of the job's labels"
            + (f" (id {row['id']!r})" if unit == "task" else "")
        )
    conflicts = (
        table.group_by("id", maintain_order=True).agg("row", "label").filter(pl.col("label").list.n_unique() > 1)
    )
    if conflicts.height:
        id_, rows, given = conflicts.row(0)
        other = next(i for i, label in enumerate(given) if label != given[0])
        raise DataError(
            f"{reviewed}: id {id_!r} is on {unit}s {rows[0]} ({given[0]!r}) and {rows[other]} ({given[other]!r}); "
            "a file's order does not say which label is meant: keep one and import again"
        )
    table = table.unique("id", keep="first", maintain_order=True)
    matched = table.select("row", "id", "label").join(annotations, on="id", how="left")
    missing = matched.filter(pl.col("text").is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise DataError(
            f"{reviewed}: {unit} {row['row']}: id {row['id']!r} is not a row of {job_dir}/annotations.parquet"
        )
    fresh = matched.select("id", "text", "label", "y_prime", "stage")
    target = job_dir / REVIEWED_FILE
    if target.is_file():
        earlier = pl.read_parquet(target).filter(~pl.col("id").is_in(fresh["id"].implode()))
        fresh = pl.concat([earlier, fresh], how="diagonal_relaxed")
    with atomic_path(target) as tmp:
        fresh.write_parquet(tmp)
    return fresh.height


def read_reviewed(job_dir: Path) -> pl.DataFrame | None:
    path = job_dir / REVIEWED_FILE
    return pl.read_parquet(path) if path.is_file() else None


def reviewed_digest(reviewed: pl.DataFrame | None) -> str:
    """Content hash of the reviewed rows: part of the fitted CM's key, so an import refits."""
    if reviewed is None or reviewed.height == 0:
        return "none"
    body = reviewed.sort("id").select("id", "label").write_csv().encode()
    return hashlib.sha256(body).hexdigest()[:16]


def with_reviewed(bank: MemoryBank, reviewed: pl.DataFrame | None) -> MemoryBank:
    """The bank plus the reviewed rows as user samples (the model's first answer, the reviewer's label)."""
    if reviewed is None or reviewed.height == 0:
        return bank
    samples = [
        Sample(id=f"review:{row['id']}", text=row["text"], answer=row["y_prime"], truth=row["label"])
        for row in reviewed.iter_rows(named=True)
    ]
    return update_bank(bank, samples)


def mark_reviewed(rows: pl.DataFrame, reviewed: pl.DataFrame | None) -> pl.DataFrame:
    """Rows a reviewer labelled: that label, confidence 1, accepted, ``source = human``."""
    if reviewed is None or reviewed.height == 0:
        return rows
    labelled = rows.join(reviewed.select("id", pl.col("label").alias("_reviewed")), on="id", how="left")
    human = pl.col("_reviewed").is_not_null()
    return labelled.with_columns(
        pl.when(human).then(pl.col("_reviewed")).otherwise(pl.col("y_hat")).alias("y_hat"),
        pl.when(human).then(1.0).otherwise(pl.col("confidence")).alias("confidence"),
        pl.when(human).then(True).otherwise(pl.col("accepted")).alias("accepted"),
        pl.when(human).then(pl.lit("human")).otherwise(pl.col("source")).alias("source"),
    ).drop("_reviewed")


def risk_coverage_plot(annotations: Path, fitted: FittedCM, path: Path) -> Path:
    """Accuracy of the accepted rows against the share accepted: the user split's estimate, and gold where known."""
    figure = Figure(figsize=(6, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    share, accuracy = trust.risk_coverage(fitted.held_out_confidence, fitted.held_out_right)
    axes.plot(share, accuracy, label=f"user split, held out (n={len(share)})", color="#08519c")
    gold = (
        pl.scan_parquet(annotations)
        .filter(pl.col("gold").is_not_null() & (pl.col("source") == "model"))
        .select("confidence", (pl.col("y_hat") == pl.col("gold")).fill_null(False).alias("right"))
        .collect()
    )
    if gold.height:
        share, accuracy = trust.risk_coverage(gold["confidence"].to_numpy(), gold["right"].to_numpy())
        axes.plot(share, accuracy, label=f"corpus, gold labels (n={gold.height})", color="#e6550d")
    acceptance = fitted.acceptance
    if acceptance is not None:
        axes.axhline(acceptance.target_accuracy, color="grey", linestyle="--", linewidth=1, label="target accuracy")
        if acceptance.threshold is not None:
            axes.axvline(acceptance.accepted_share, color="grey", linestyle=":", linewidth=1, label="accepted share")
    axes.set_xlabel("share of rows accepted (most confident first)")
    axes.set_ylabel("accuracy of accepted rows")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    return path
