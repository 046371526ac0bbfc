"""The review queue: the rows a job did not accept, out to a labelling tool and back.

- ``write_review``: ``review.parquet`` beside the annotations, most uncertain first, each row with
  its candidate set as the reviewer's options (most probable first).
- ``export_csv``: the same rows as CSV for labelling tools, with an empty ``label`` column.
- ``import_reviewed``: a reviewed CSV (or parquet/jsonl) back into the job directory as
  ``reviewed.parquet``. The next run of the job adds those rows to the user split (the bank
  update; the priors refit), re-scores the corpus with the refit CM, and marks them
  ``source = human``.
- ``risk_coverage_plot``: accuracy of accepted rows against the share accepted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from runner import trust
from runner._durable import atomic_path
from runner.bank import MemoryBank, Sample, update_bank
from runner.data import DataError, scan_table
from runner.fit import FittedCM

REVIEWED_FILE = "reviewed.parquet"
REVIEW_COLUMNS = ["id", "text", "y_hat", "confidence", "candidates", "y_prime", "error", "gold"]


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


def export_csv(job_dir: Path, output: Path) -> int:
    """review.parquet as CSV: options joined by ' | ', and an empty ``label`` column for the reviewer."""
    source = job_dir / "review.parquet"
    if not source.is_file():
        raise DataError(f"{source}: no review file; run the job first (it needs a user split: cm.accept)")
    review = pl.read_parquet(source)
    table = review.select(
        "id",
        "text",
        pl.col("y_hat").alias("suggested"),
        pl.col("confidence").round(4),
        pl.col("candidates").list.join(" | ").alias("options"),
        pl.lit("").alias("label"),
    )
    table.write_csv(output)
    return table.height


def import_reviewed(job_dir: Path, reviewed: Path, labels: list[str]) -> int:
    """Keep the rows of ``reviewed`` whose ``label`` is filled in, as ``job_dir/reviewed.parquet``.

    Rows are matched to annotations by ``id``; an id the job never annotated or a label outside
    the label set is an error naming the row. Earlier imports are kept; a row reviewed twice
    keeps its latest label. Returns the number of reviewed rows now on file.
    """
    table = scan_table(reviewed).collect()
    for column in ("id", "label"):
        if column not in table.columns:
            raise DataError(f"{reviewed}: no column '{column}'; columns are {table.columns}")
    table = table.with_row_index("row", offset=2 if reviewed.suffix == ".csv" else 1)
    table = table.with_columns(pl.col("id").cast(pl.String), pl.col("label").cast(pl.String).str.strip_chars())
    table = table.filter(pl.col("label").is_not_null() & (pl.col("label") != ""))
    unknown = table.filter(~pl.col("label").is_in(labels))
    if unknown.height:
        row = unknown.row(0, named=True)
        raise DataError(f"{reviewed}: row {row['row']}: label {row['label']!r} is not one of the job's labels")
    annotations = pl.read_parquet(job_dir / "annotations.parquet", columns=["id", "text", "y_prime"])
    matched = table.select("row", "id", "label").join(annotations, on="id", how="left")
    missing = matched.filter(pl.col("text").is_null())
    if missing.height:
        row = missing.row(0, named=True)
        raise DataError(f"{reviewed}: row {row['row']}: id {row['id']!r} is not a row of {job_dir}/annotations.parquet")
    fresh = matched.select("id", "text", "label", "y_prime")
    target = job_dir / REVIEWED_FILE
    if target.is_file():
        earlier = pl.read_parquet(target).filter(~pl.col("id").is_in(fresh["id"].implode()))
        fresh = pl.concat([earlier, fresh])
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
