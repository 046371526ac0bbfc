"""Evaluation: metrics computed from the annotations table and nothing else.

Everything in ``compute_metrics`` can be recomputed by a reader from the parquet file
alone; run facts (timings, memory) are kept apart under ``run``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import polars as pl

ANNOTATION_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "text": pl.String(),
    "gold": pl.String(),
    "y_prime": pl.String(),
    "candidates": pl.List(pl.String()),
    "y_hat": pl.String(),
    "calls": pl.Int32(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "fallback": pl.String(),
    "error": pl.String(),
    # "engine" (failed, redone on resume), "rejected" (cannot succeed), "unparsed" (fit no label)
    "error_kind": pl.String(),
    "y_neighbour": pl.String(),  # the vote of X's nearest user samples, where the CM variant computes it
}


_HAS_GOLD = pl.col("gold").is_not_null()


def _right_on_gold(condition: pl.Expr) -> pl.Expr:
    return (condition.fill_null(False) & _HAS_GOLD).sum()


# Sums over rows: a table's are the sums of its parts', so they are added up batch by batch.
_SUMS = {
    "n_annotated": pl.len(),
    "n_with_gold": _HAS_GOLD.sum(),
    "right_baseline": _right_on_gold(pl.col("y_prime") == pl.col("gold")),
    "right_cm": _right_on_gold(pl.col("y_hat") == pl.col("gold")),
    "covered": _right_on_gold(pl.col("candidates").list.contains(pl.col("gold"))),
    "right_neighbour": _right_on_gold(pl.col("y_neighbour") == pl.col("gold")),
    "n_neighbour_votes": pl.col("y_neighbour").is_not_null().sum(),
    "calls": pl.col("calls").sum(),
    "first_answers": pl.col("y_prime").is_not_null().sum(),
    # a row whose first call was skipped (cm.first_call: no y_prime, no error) and whose set was asked about
    "second_calls": (
        (pl.col("calls") >= 2) | (pl.col("y_prime").is_null() & pl.col("error").is_null() & (pl.col("calls") >= 1))
    ).sum(),
    "n_empty_row_fallback": (pl.col("fallback") == "empty_row").sum(),
    "n_errors": pl.col("error").is_not_null().sum(),
    "prompt_tokens": pl.col("prompt_tokens").sum(),
    "completion_tokens": pl.col("completion_tokens").sum(),
}
METRIC_COLUMNS = ["gold", "y_prime", "y_hat", "candidates", "y_neighbour", "calls", "fallback", "error"]
METRIC_COLUMNS += ["prompt_tokens", "completion_tokens"]
"""The columns ``compute_metrics`` reads."""


def _median(histogram: Counter[int]) -> float | None:
    values = sorted(histogram.elements())  # candidate-set sizes are at most K: a few distinct values
    if not values:
        return None
    middle = len(values) // 2
    return float(values[middle]) if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def compute_metrics(annotations: pl.DataFrame | pl.LazyFrame | Iterable[pl.DataFrame]) -> dict[str, Any]:
    """Accuracy of y_prime (baseline) and y_hat (CM), coverage, calls and candidate-set sizes.

    ``annotations`` is a table, or its parts one after another (sums, and a histogram of
    candidate-set sizes for their median, are added up part by part): a job passes its
    shards, so memory holds one shard, not a million-row table.
    """
    parts = [annotations.lazy().collect()] if isinstance(annotations, pl.DataFrame | pl.LazyFrame) else annotations
    totals: Counter[str] = Counter(dict.fromkeys(_SUMS, 0))
    sizes: Counter[int] = Counter()
    for part in parts:
        totals.update({k: v or 0 for k, v in part.select(**_SUMS).row(0, named=True).items()})
        set_sizes = part["candidates"].list.len()
        sizes.update(dict(set_sizes.filter(set_sizes > 0).value_counts().iter_rows()))
    n, n_gold = totals["n_annotated"], totals["n_with_gold"]

    def share(count: int, of: int) -> float | None:
        return count / of if of else None

    n_sizes = sizes.total()
    return {
        "n_annotated": n,
        "n_with_gold": n_gold,
        # None when no first answer was asked for (cm.first_call skipped them all)
        "accuracy_baseline": share(totals["right_baseline"], n_gold) if totals["first_answers"] else None,
        "accuracy_cm": share(totals["right_cm"], n_gold),
        "coverage": share(totals["covered"], n_gold),
        "accuracy_neighbour_vote": share(totals["right_neighbour"], n_gold) if totals["n_neighbour_votes"] else None,
        "calls_per_item": share(totals["calls"], n),
        "second_call_rate": share(totals["second_calls"], n),
        "candidate_set_size": {
            "mean": share(sum(size * count for size, count in sizes.items()), n_sizes),
            "median": _median(sizes),
            "min": min(sizes) if sizes else None,
            "max": max(sizes) if sizes else None,
        },
        "n_empty_row_fallback": totals["n_empty_row_fallback"],
        "n_errors": totals["n_errors"],
        "prompt_tokens": totals["prompt_tokens"],
        "completion_tokens": totals["completion_tokens"],
    }


def _setting(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # None: no item to divide by (an empty corpus)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The few lines ``cm-run`` prints at the end of a job."""

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    sizes = metrics["candidate_set_size"]
    lines = [
        f"annotated {metrics['n_annotated']} items ({metrics['n_with_gold']} with gold labels), "
        f"memory bank from {metrics['n_user']} user samples",
        f"accuracy  baseline (y'): {pct(metrics['accuracy_baseline'])}   CM (y_hat): {pct(metrics['accuracy_cm'])}",
        f"coverage {pct(metrics['coverage'])}, candidate set mean size {sizes['mean']:.1f}"
        if sizes["mean"] is not None
        else "no candidate sets",
        f"calls per item {_fixed(metrics['calls_per_item'])}, errors {metrics['n_errors']}, "
        f"empty-row fallbacks {metrics['n_empty_row_fallback']}",
    ]
    if settings := metrics.get("cm_settings"):
        lines.append("cm " + ", ".join(f"{key} {_setting(value)}" for key, value in settings.items()))
    run = metrics.get("run", {})
    if run.get("items_per_second"):
        load = run.get("engine_load_seconds")  # None: no local model was loaded (nothing asked, or an API)
        loaded = f"engine load {load:.0f} s" if load is not None else "no model loaded"
        lines.append(f"{run['items_per_second']:.1f} items/s annotating; {loaded}")
    return lines
