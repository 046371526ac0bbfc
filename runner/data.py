"""Reading the user split and the corpus with polars: formats, columns, sampling, chunks.

Every row gets a string ``id`` (the id column, or the row number in the file) and a
``text``; labelled rows get a ``label``. Problems are reported with the file, column and
row they were found in. A path may be an ``s3://`` URL (``_storage.ObjectPath``): polars reads it
natively, streamed as a local file is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from runner._storage import ObjectPath
from runner.spec import CorpusSpec, DatasetSpec, UserSplitSpec

DataPath = Path | ObjectPath  # a local file or an s3:// object


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, column or row."""


_READERS = {
    ".jsonl": pl.scan_ndjson,
    ".ndjson": pl.scan_ndjson,
    ".json": pl.scan_ndjson,
    ".csv": pl.scan_csv,
    ".parquet": pl.scan_parquet,
}


def scan_table(path: DataPath) -> pl.LazyFrame:
    """A lazy frame over a jsonl, csv or parquet file, chosen by its suffix."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .csv or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return reader(path)


def _standard_columns(path: DataPath, frame: pl.LazyFrame, dataset: DatasetSpec, *, need_label: bool) -> pl.LazyFrame:
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
    if dataset.id_column is None:  # a row index, not int_range(len()): it streams without knowing the length
        frame = frame.with_row_index("_row")
        columns.insert(0, pl.col("_row").cast(pl.String).alias("id"))
    frame = frame.select(columns).with_columns(pl.col("id").cast(pl.String), pl.col("text").cast(pl.String))
    if "label" in wanted:
        frame = frame.with_columns(pl.col("label").cast(pl.String))
    return frame


def _check_rows(path: DataPath, rows: pl.DataFrame | pl.LazyFrame, labels: Sequence[str] | None) -> int:
    """Empty texts, duplicate ids and unknown labels, each named by row id; the number of rows.

    Works on a lazy frame in a few streaming passes, so a corpus is checked without being held
    in memory; the examples in an error message are looked up only when there is an error.
    """
    frame = rows.lazy()
    has_labels = labels is not None and "label" in frame.collect_schema().names()
    blank = pl.col("text").is_null() | (pl.col("text").str.strip_chars() == "")
    unknown = pl.lit(False)
    if has_labels:
        unknown = pl.col("label").is_not_null() & ~pl.col("label").is_in(list(labels or ()))
    counts = frame.select(pl.len().alias("rows"), blank.sum().alias("blank"), unknown.sum().alias("unknown")).collect()
    n_rows, n_blank, n_unknown = counts.row(0)
    if n_blank:
        ids = frame.filter(blank).select("id").head(5).collect()["id"].to_list()
        raise DataError(f"{path}: {n_blank} row(s) with an empty or null text, e.g. id {ids}")
    # Duplicates among 64-bit hashes first (8 bytes a row), then the exact ids of the few suspects.
    hashes = frame.select(pl.col("id").hash(seed=0)).collect().to_series().sort()
    suspects = hashes.filter(hashes == hashes.shift(1))  # sorted: a repeat sits next to its twin
    if suspects.len():
        candidates = frame.filter(pl.col("id").hash(seed=0).is_in(suspects.implode())).select("id").collect()
        duplicated = candidates.filter(pl.col("id").is_duplicated())["id"].unique(maintain_order=True)
        if duplicated.len():
            raise DataError(f"{path}: duplicate ids, e.g. {duplicated.head(5).to_list()}")
    if n_unknown:
        first = frame.filter(unknown).head(1).collect().row(0, named=True)
        raise DataError(
            f"{path}: row id {first['id']} has label {first['label']!r}, not in the label set ({n_unknown} such row(s))"
        )
    return n_rows


@dataclass(frozen=True)
class UserSplit:
    """D_user: labelled rows (id, text, label) and the label set they define."""

    path: DataPath
    rows: pl.DataFrame
    labels: tuple[str, ...]
    # rows per label of the file the split was drawn from; None when the whole file is the split
    pool_label_counts: dict[str, int] | None = None


def load_user_split(path: DataPath, dataset: DatasetSpec, split: UserSplitSpec) -> UserSplit:
    """Read the labelled pool and draw the user split (stratified: at least one row per label)."""
    pool = _standard_columns(path, scan_table(path), dataset, need_label=True).collect()
    null_labels = pool.filter(pl.col("label").is_null())
    if null_labels.height:
        raise DataError(f"{path}: row id {null_labels['id'][0]} has no label (column '{dataset.label_column}')")
    labels = tuple(dataset.labels) if dataset.labels else tuple(sorted(pool["label"].unique().to_list()))
    _check_rows(path, pool, labels)
    rows = sample_user_split(pool, split.fraction, seed=split.seed, stratified=split.stratified)
    drawn = split.fraction is not None and split.fraction < 1
    counts = dict(sorted(pool.group_by("label").len().iter_rows())) if drawn else None
    return UserSplit(path=path, rows=rows, labels=labels, pool_label_counts=counts)


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
    """D_large: the rows to annotate, streamed from the file in bounded chunks.

    Only a ``limit`` sample is held in memory; a whole corpus is read chunk by chunk, so memory
    stays flat however many rows it has.
    """

    def __init__(
        self,
        path: DataPath,
        dataset: DatasetSpec,
        spec: CorpusSpec,
        labels: Sequence[str] | None,
        *,
        checked: bool = True,
    ):
        """``checked=False``: the rows were checked already (by the driver of a Ray job, for its workers)."""
        self.path = path
        frame = _standard_columns(path, scan_table(path), dataset, need_label=False)
        if "label" not in frame.collect_schema().names():
            frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("label"))
        height = _check_rows(path, frame, labels) if checked else frame.select(pl.len()).collect().item()
        self._table: pl.DataFrame | None = None
        if spec.limit is not None and spec.limit < height:
            # The same draw as sampling the whole table with this seed, without loading it.
            picked = pl.int_range(height, eager=True, dtype=pl.UInt32).sample(n=spec.limit, seed=spec.limit_seed)
            numbered = frame.with_row_index("_row").filter(pl.col("_row").is_in(picked.implode()))
            self._table = numbered.collect().sort("_row").drop("_row")
            height = spec.limit
        self._frame = frame
        self._height = height
        self._n_gold: int | None = None

    @property
    def height(self) -> int:
        return self._height

    @property
    def has_gold(self) -> bool:
        if self._n_gold is None:
            source = self._table.lazy() if self._table is not None else self._frame
            self._n_gold = source.select(pl.col("label").is_not_null().sum()).collect().item()
        return self._n_gold > 0

    def chunk(self, number: int, size: int) -> pl.DataFrame:
        """Chunk ``number`` of ``chunks(size)``, read on its own (parquet reads only its row groups)."""
        if self._table is not None:
            return self._table.slice(number * size, size)
        return self._frame.slice(number * size, size).collect()

    def chunks(self, size: int) -> Iterator[tuple[int, pl.DataFrame]]:
        """(chunk number, rows) pairs of exactly ``size`` rows (the last may have fewer), in corpus order."""
        if self._table is not None:
            for number, start in enumerate(range(0, self._table.height, size)):
                yield number, self._table.slice(start, size)
            return
        # Streamed with backpressure: polars reads ahead only a few batches; an abandoned reader is
        # cancelled when the iterator is dropped.
        pending: list[pl.DataFrame] = []
        buffered = number = 0
        for batch in self._frame.collect_batches(chunk_size=size, lazy=True):
            pending.append(batch)
            buffered += batch.height
            while buffered >= size:  # batches need not be chunk-sized: re-cut them, numbering must not move
                joined = pl.concat(pending, rechunk=False)
                yield number, joined.slice(0, size)
                number += 1
                rest = joined.slice(size)
                pending, buffered = [rest], rest.height
        if buffered:
            yield number, pl.concat(pending)
