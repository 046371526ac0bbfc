"""Reading the user split and the corpus with polars: formats, columns, sampling, chunks.

Every row gets a string ``id`` (the id column, or the row number in the file) and a
``text``; labelled rows get a ``label``. Problems are reported with the file, column and
row they were found in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from runner.spec import CorpusSpec, DatasetSpec, UserSplitSpec


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, column or row."""


_READERS = {
    ".jsonl": pl.scan_ndjson,
    ".ndjson": pl.scan_ndjson,
    ".json": pl.scan_ndjson,
    ".csv": pl.scan_csv,
    ".parquet": pl.scan_parquet,
}


def scan_table(path: Path) -> pl.LazyFrame:
    """A lazy frame over a jsonl, csv or parquet file, chosen by its suffix."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .csv or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return reader(path)


def _standard_columns(path: Path, frame: pl.LazyFrame, dataset: DatasetSpec, *, need_label: bool) -> pl.LazyFrame:
    """Rename the spec's columns to id/text/label and check they exist."""
    try:
        available = frame.collect_schema().names()
    except pl.exceptions.PolarsError as error:
        raise DataError(f"{path}: cannot be read as a table ({error})") from None
    wanted = {"text": dataset.text_column}
    if need_label or dataset.label_column in available:
        wanted["label"] = dataset.label_column
    if dataset.id_column is not None:
        wanted["id"] = dataset.id_column
    for role, column in wanted.items():
        if column not in available:
            raise DataError(f"{path}: no column '{column}' (dataset.{role}_column); columns are {available}")
    columns = [pl.col(column).alias(role) for role, column in wanted.items()]
    if dataset.id_column is None:
        columns.insert(0, pl.int_range(pl.len()).cast(pl.String).alias("id"))
    frame = frame.select(columns).with_columns(pl.col("id").cast(pl.String), pl.col("text").cast(pl.String))
    if "label" in wanted:
        frame = frame.with_columns(pl.col("label").cast(pl.String))
    return frame


def _check_rows(path: Path, table: pl.DataFrame, labels: Sequence[str] | None) -> None:
    """Empty texts, duplicate ids and unknown labels, each named by row id."""
    blank = table.filter(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == ""))
    if blank.height:
        ids = blank["id"].head(5).to_list()
        raise DataError(f"{path}: {blank.height} row(s) with an empty or null text, e.g. id {ids}")
    duplicated = table.filter(pl.col("id").is_duplicated())["id"].unique(maintain_order=True)
    if duplicated.len():
        raise DataError(f"{path}: duplicate ids, e.g. {duplicated.head(5).to_list()}")
    if labels is not None and "label" in table.columns:
        unknown = table.filter(pl.col("label").is_not_null() & ~pl.col("label").is_in(list(labels)))
        if unknown.height:
            first = unknown.row(0, named=True)
            raise DataError(
                f"{path}: row id {first['id']} has label {first['label']!r}, not in the label set "
                f"({unknown.height} such row(s))"
            )


@dataclass(frozen=True)
class UserSplit:
    """D_user: labelled rows (id, text, label) and the label set they define."""

    path: Path
    rows: pl.DataFrame
    labels: tuple[str, ...]


def load_user_split(path: Path, dataset: DatasetSpec, split: UserSplitSpec) -> UserSplit:
    """Read the labelled pool and draw the user split (stratified: at least one row per label)."""
    pool = _standard_columns(path, scan_table(path), dataset, need_label=True).collect()
    null_labels = pool.filter(pl.col("label").is_null())
    if null_labels.height:
        raise DataError(f"{path}: row id {null_labels['id'][0]} has no label (column '{dataset.label_column}')")
    labels = tuple(dataset.labels) if dataset.labels else tuple(sorted(pool["label"].unique().to_list()))
    _check_rows(path, pool, labels)
    rows = sample_user_split(pool, split.fraction, seed=split.seed, stratified=split.stratified)
    return UserSplit(path=path, rows=rows, labels=labels)


def sample_user_split(pool: pl.DataFrame, fraction: float | None, *, seed: int, stratified: bool) -> pl.DataFrame:
    """A seeded sample of ``fraction`` of the pool, in file order.

    Stratified sampling takes round(fraction * n_k) rows of each label k, at least one,
    so every label present in the pool is present in the split.
    """
    if fraction is None or fraction >= 1:
        return pool
    numbered = pool.with_row_index("_row")
    shuffled = numbered.sample(fraction=1.0, shuffle=True, seed=seed)
    if stratified:
        quota = (pl.len().over("label") * fraction).round().clip(lower_bound=1)
        picked = shuffled.filter(pl.int_range(pl.len()).over("label") < quota)
    else:
        picked = shuffled.head(max(1, round(pool.height * fraction)))
    return picked.sort("_row").drop("_row")


class Corpus:
    """D_large: the rows to annotate, read in bounded chunks."""

    def __init__(self, path: Path, dataset: DatasetSpec, spec: CorpusSpec, labels: Sequence[str]):
        self.path = path
        frame = _standard_columns(path, scan_table(path), dataset, need_label=False)
        table = frame.collect()
        _check_rows(path, table, labels)
        if spec.limit is not None and spec.limit < table.height:
            table = table.with_row_index("_row").sample(n=spec.limit, seed=spec.limit_seed).sort("_row").drop("_row")
        if "label" not in table.columns:
            table = table.with_columns(pl.lit(None, dtype=pl.String).alias("label"))
        self._table = table

    @property
    def height(self) -> int:
        return self._table.height

    @property
    def has_gold(self) -> bool:
        return self._table["label"].null_count() < self._table.height

    def chunks(self, size: int) -> Iterator[tuple[int, pl.DataFrame]]:
        """(chunk number, rows) pairs of at most ``size`` rows, in corpus order."""
        for number, start in enumerate(range(0, self._table.height, size)):
            yield number, self._table.slice(start, size)
