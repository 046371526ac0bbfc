"""Evaluation: metrics computed from the annotations table and nothing else.

Everything in ``compute_metrics`` can be recomputed by a reader from the parquet file
alone; run facts (timings, memory) are kept apart under ``run``.
"""

from __future__ import annotations

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


def _rate(frame: pl.DataFrame, condition: pl.Expr) -> float | None:
    if frame.height == 0:
        return None
    return float(frame.select(condition.fill_null(False).mean()).item())


def compute_metrics(annotations: pl.DataFrame) -> dict[str, Any]:
    """Accuracy of y_prime (baseline) and y_hat (CM), coverage, calls and candidate-set sizes."""
    gold = annotations.filter(pl.col("gold").is_not_null())
    answered = annotations.filter(pl.col("y_prime").is_not_null())
    sizes = answered["candidates"].list.len()
    return {
        "n_annotated": annotations.height,
        "n_with_gold": gold.height,
        "accuracy_baseline": _rate(gold, pl.col("y_prime") == pl.col("gold")),
        "accuracy_cm": _rate(gold, pl.col("y_hat") == pl.col("gold")),
        "coverage": _rate(gold, pl.col("candidates").list.contains(pl.col("gold"))),
        "accuracy_neighbour_vote": (
            _rate(gold, pl.col("y_neighbour") == pl.col("gold"))
            if annotations["y_neighbour"].null_count() < annotations.height
            else None
        ),
        "calls_per_item": float(annotations["calls"].mean()) if annotations.height else None,
        "second_call_rate": _rate(annotations, pl.col("calls") >= 2),
        "candidate_set_size": {
            "mean": float(sizes.mean()) if sizes.len() else None,
            "median": float(sizes.median()) if sizes.len() else None,
            "min": int(sizes.min()) if sizes.len() else None,
            "max": int(sizes.max()) if sizes.len() else None,
        },
        "n_empty_row_fallback": annotations.filter(pl.col("fallback") == "empty_row").height,
        "n_errors": annotations.filter(pl.col("error").is_not_null()).height,
        "prompt_tokens": int(annotations["prompt_tokens"].sum()),
        "completion_tokens": int(annotations["completion_tokens"].sum()),
    }


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
        f"calls per item {metrics['calls_per_item']:.2f}, errors {metrics['n_errors']}, "
        f"empty-row fallbacks {metrics['n_empty_row_fallback']}",
    ]
    run = metrics.get("run", {})
    if run.get("items_per_second"):
        lines.append(
            f"{run['items_per_second']:.1f} items/s annotating; engine load {run.get('engine_load_seconds') or 0:.0f} s"
        )
    return lines
