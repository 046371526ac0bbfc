"""Evaluation: metrics computed from the annotations table and nothing else.

Everything in ``compute_metrics`` can be recomputed by a reader from the parquet file
alone; run facts (timings, memory) are kept apart under ``run``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from runner.fit import FittedCM

ANNOTATION_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "text": pl.String(),
    "gold": pl.String(),
    "y_prime": pl.String(),
    # the model's own probability of y_prime (vLLM in this process; null from APIs): the naive confidence
    "y_prime_probability": pl.Float64(),
    "candidates": pl.List(pl.String()),
    "y_hat": pl.String(),
    # P(y_hat is right), calibrated on held-out user samples; null only without a user split (CM off, no cm.accept)
    "confidence": pl.Float64(),
    "accepted": pl.Boolean(),  # confidence reached the threshold cm.accept chose; the rest are in review.parquet
    "source": pl.String(),  # "model", or "human" for a row a reviewer labelled (cm-run review import)
    "calls": pl.Int32(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "fallback": pl.String(),
    "error": pl.String(),
    # "engine" (failed, redone on resume), "rejected" (cannot succeed), "unparsed" (fit no label)
    "error_kind": pl.String(),
    "y_neighbour": pl.String(),  # the vote of X's nearest user samples, where the CM variant computes it
    "stage": pl.String(),  # the cascade stage that answered the row (spec.MAIN_STAGE for a job without one)
    "stage_calls": pl.List(pl.Int32()),  # the calls each stage made on the row, cheapest first, up to its own
    # unlike the user split (cm.ood: novelty p-values of embeddings and character n-grams): never accepted; null: off
    "ood": pl.Boolean(),
}


_HAS_GOLD = pl.col("gold").is_not_null()
# A reviewer's row (cm-run review import): its y_hat is the reviewer's label, so it says nothing about the model.
_HUMAN = (pl.col("source") == "human").fill_null(False)
_MODEL_GOLD = _HAS_GOLD & ~_HUMAN


def _right_on_gold(condition: pl.Expr) -> pl.Expr:
    """Rows the model labelled, with gold, where ``condition`` holds."""
    return (condition.fill_null(False) & _MODEL_GOLD).sum()


# Sums over rows: a table's are the sums of its parts', so they are added up batch by batch.
_SUMS = {
    "n_annotated": pl.len(),
    "n_with_gold": _HAS_GOLD.sum(),
    "n_model_gold": _MODEL_GOLD.sum(),
    "n_human": _HUMAN.sum(),
    "n_human_gold": (_HUMAN & _HAS_GOLD).sum(),
    "human_agree": (_HUMAN & _HAS_GOLD & (pl.col("y_hat") == pl.col("gold")).fill_null(False)).sum(),
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
METRIC_COLUMNS += ["prompt_tokens", "completion_tokens", "source"]
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

    Accuracies and coverage are the model's: on rows with gold and ``source = model``. Rows a
    reviewer labelled (``source = human``) are counted apart under ``human``; calls and tokens
    count every row, as every row was paid for.
    """
    parts = [annotations.lazy().collect()] if isinstance(annotations, pl.DataFrame | pl.LazyFrame) else annotations
    totals: Counter[str] = Counter(dict.fromkeys(_SUMS, 0))
    sizes: Counter[int] = Counter()
    for part in parts:
        totals.update({k: v or 0 for k, v in part.select(**_SUMS).row(0, named=True).items()})
        set_sizes = part["candidates"].list.len()
        sizes.update(dict(set_sizes.filter(set_sizes > 0).value_counts().iter_rows()))
    n, n_gold = totals["n_annotated"], totals["n_model_gold"]

    def share(count: int, of: int) -> float | None:
        return count / of if of else None

    n_sizes = sizes.total()
    return {
        "n_annotated": n,
        "n_with_gold": totals["n_with_gold"],
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
        "human": {
            "n_rows": totals["n_human"],
            "n_with_gold": totals["n_human_gold"],
            # how often the reviewers' labels match gold: their figure, never the model's
            "agreement_with_gold": share(totals["human_agree"], totals["n_human_gold"]),
        },
    }


def stage_metrics(annotations: Path, stages: Sequence[str]) -> list[dict[str, Any]]:
    """Per cascade stage: the rows it answered and accepted, their accuracy on gold, the calls it made.

    A stage's calls count every row it saw, the ones it escalated included (``stage_calls``); shares
    are of the whole corpus. Accuracy is on the model's rows with gold (a reviewer's are apart).
    """
    table = pl.scan_parquet(annotations)
    n = table.select(pl.len()).collect().item()
    right = (pl.col("y_hat") == pl.col("gold")).fill_null(False)
    gold = pl.col("gold").is_not_null() & ~_HUMAN
    accepted = pl.col("accepted").fill_null(False) & ~_HUMAN
    report = []
    for position, name in enumerate(stages):
        calls = pl.col("stage_calls").list.get(position, null_on_oob=True).fill_null(0)
        row = (
            table.select(
                seen=(pl.col("stage_calls").list.len() > position).sum(),
                calls=calls.sum(),
                answered=(pl.col("stage") == name).sum(),
                accepted=(accepted & (pl.col("stage") == name)).sum(),
                gold_accepted=(gold & accepted & (pl.col("stage") == name)).sum(),
                right_accepted=(right & gold & accepted & (pl.col("stage") == name)).sum(),
            )
            .collect()
            .row(0, named=True)
        )
        report.append(
            {
                "stage": name,
                "rows_seen": row["seen"],
                "answered_share": row["answered"] / n if n else None,
                "accepted_share": row["accepted"] / n if n else None,
                "accuracy_accepted": row["right_accepted"] / row["gold_accepted"] if row["gold_accepted"] else None,
                "calls": int(row["calls"]),
                "calls_per_corpus_row": int(row["calls"]) / n if n else None,
            }
        )
    return report


def trust_metrics(annotations: Path, fitted: FittedCM | None) -> dict[str, Any] | None:
    """Accepted share, the user split's estimate of their accuracy, and (with gold) what it turned out to be.

    Read from the annotations file, column by column, like every other metric; on the rows the model
    labelled (``source = model``): a reviewer's rows are accepted with confidence 1 by fiat, not by the
    threshold, and ``compute_metrics`` counts them apart.
    """
    if fitted is None:
        return None
    right = (pl.col("y_hat") == pl.col("gold")).fill_null(False)
    with_gold = pl.col("gold").is_not_null()
    bins = pl.min_horizontal((pl.col("confidence") * 10).floor(), pl.lit(9.0))
    table = pl.scan_parquet(annotations).filter(~_HUMAN).select("confidence", "accepted", "y_hat", "gold", "ood")
    totals = (
        table.select(
            n=pl.len(),
            accepted=pl.col("accepted").sum(),
            gold_accepted=(with_gold & pl.col("accepted")).sum(),
            right_accepted=(right & with_gold & pl.col("accepted")).sum(),
            gold_review=(with_gold & ~pl.col("accepted")).sum(),
            right_review=(right & with_gold & ~pl.col("accepted")).sum(),
            ood=pl.col("ood").sum(),
        )
        .collect()
        .row(0, named=True)
    )
    by_bin = (
        table.filter(with_gold)
        .group_by(bins.alias("bin"))
        .agg(n=pl.len(), gap=(right.cast(pl.Float64).sum() - pl.col("confidence").sum()).abs())
        .collect()
    )
    n_gold = int(by_bin["n"].sum()) if by_bin.height else 0

    def share(count: int, of: int) -> float | None:
        return count / of if of else None

    return {
        **fitted.trust_settings,
        "accepted_share": share(totals["accepted"], totals["n"]),
        "n_accepted": totals["accepted"],
        "n_review": totals["n"] - totals["accepted"],
        # rows unlike the user split, in review whatever their confidence (null: cm.ood off or not embedded)
        "n_ood": totals["ood"] if "ood_level" in fitted.trust_settings else None,
        "accuracy_accepted": share(totals["right_accepted"], totals["gold_accepted"]),
        "accuracy_review": share(totals["right_review"], totals["gold_review"]),
        # expected calibration error on the rows with gold labels, ten equal-width bins
        "calibration_error": share(float(by_bin["gap"].sum()), n_gold) if n_gold else None,
    }


def prevalence_metrics(annotations: Path, fitted: FittedCM | None) -> dict[str, Any] | None:
    """Each label's share of the corpus with joint intervals (``runner.prevalence``), from the annotations'
    ``y_hat``, ``confidence`` and ``source`` and the fit's held-out user samples; None without a fit or
    with a fit that kept no held-out labels (pickled before they were kept: the next refit has them)."""
    from runner.prevalence import DEFAULT_LEVEL, estimate_prevalence

    if fitted is None or fitted.held_out_labels is None or fitted.held_out_truths is None:
        return None
    if len(fitted.held_out_truths) < 2:
        return None
    index = {label: i for i, label in enumerate(fitted.labels)}
    given = pl.col("y_hat").replace_strict(index, default=-1, return_dtype=pl.Int64)
    table = pl.scan_parquet(annotations).select(given.alias("given"), "confidence", _HUMAN.alias("human")).collect()
    model, known = table.filter(~pl.col("human")), table.filter(pl.col("human"))
    accept = fitted.cm.accept
    estimated = estimate_prevalence(
        fitted.labels,
        fitted.held_out_truths,
        fitted.held_out_labels,
        fitted.held_out_confidence,
        model["given"].to_numpy(),
        model["confidence"].fill_null(0.0).to_numpy(),
        known["given"].to_numpy(),
        accept.confidence_level if accept is not None else DEFAULT_LEVEL,
        weights=fitted.held_out_weights,  # a stratified split's label-shift weights (None: a fit before them)
    )
    return estimated.as_dict()


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
    if human := metrics.get("human", {}).get("n_rows"):
        lines.insert(2, f"{human} rows labelled by reviewers (source = human): not in the model's figures")
    if settings := metrics.get("cm_settings"):
        # a cascade's settings are per stage, by name
        per_stage = settings if "stages" in metrics else {None: settings}
        for stage, chosen in per_stage.items():
            named = f"cm ({stage}) " if stage else "cm "
            lines.append(named + ", ".join(f"{key} {_setting(value)}" for key, value in chosen.items()))
    busy = metrics.get("run", {}).get("engine_seconds") or {}
    for stage in metrics.get("stages", []):
        accuracy = (
            f", {pct(stage['accuracy_accepted'])} right on gold" if stage["accuracy_accepted"] is not None else ""
        )
        # an engine two stages share is clocked once, under the first that asks it
        seconds = f", engine busy {busy[stage['stage']]:.1f} s" if stage["stage"] in busy else ""
        lines.append(
            f"stage {stage['stage']}: saw {stage['rows_seen']} rows, answered {pct(stage['answered_share'])}, "
            f"accepted {pct(stage['accepted_share'])}{accuracy}; {stage['calls']} calls{seconds}"
        )
    if trusted := metrics.get("trust"):
        lines.append(_trust_line(trusted, pct))
        if below := trusted.get("labels_below_target"):
            lines.append(_below_target_line(below, trusted["target_accuracy"], pct))
    if prevalence := metrics.get("prevalence"):
        lines.append(_prevalence_line(prevalence, pct))
    run = metrics.get("run", {})
    if run.get("items_per_second"):
        load = run.get("engine_load_seconds")  # None: no local model was loaded (nothing asked, or an API)
        loaded = f"engine load {load:.0f} s" if load is not None else "no model loaded"
        if dtype := run.get("engine_dtype"):
            loaded += f", {dtype['dtype']} ({dtype['reason']})"
        lines.append(f"{run['items_per_second']:.1f} items/s annotating; {loaded}")
    engine = run.get("engine") or {}
    if engine.get("estimated_cost_usd") is not None:
        tokens = f"{engine['prompt_tokens']:,} prompt + {engine['completion_tokens']:,} completion tokens"
        cost = f"about ${engine['estimated_cost_usd']:,.4f}"
        if engine.get("mode") == "batch":
            cost += f" at the batch price ({engine['batch_discount']:g} x; online ${engine['online_cost_usd']:,.4f})"
        lines.append(f"API: {engine['requests']:,} requests, {tokens}, {cost}")
    return lines


def _trust_line(trusted: dict[str, Any], pct: Any) -> str:
    if trusted.get("threshold") is None:
        if "target_accuracy" not in trusted:
            return "trust: confidence per row; no acceptance asked for (cm.accept: null)"
        return (
            f"trust: no threshold reaches {pct(trusted['target_accuracy'])} on the user split "
            f"({trusted['held_out_samples']} held-out samples): nothing accepted, every row is in review.parquet"
        )
    # What fixed-sequence testing guarantees (runner/trust.py), said as such: pooled, not per row;
    # with cm.accept.per_label, jointly for each label tested on its own too.
    pooled = "pooled,"
    if (least := trusted.get("per_label_min_samples")) is not None:
        pooled = f"pooled and of each label with at least {least} accepted user samples,"
    line = (
        f"trust: accepted {pct(trusted['accepted_share'])} ({trusted['n_accepted']} rows) at confidence >= "
        f"{trusted['threshold']:.3f}: with {100 * trusted['confidence_level']:.0f}% confidence the accepted rows, "
        f"{pooled} are right at least {pct(trusted['target_accuracy'])} of the time, for items exchangeable with "
        f"the user split (user split: {pct(trusted['user_split_accepted_accuracy'])} right, lower bound "
        f"{pct(trusted['user_split_accepted_lower_bound'])}); {trusted['n_review']} rows to review"
    )
    if trusted.get("n_ood"):
        line += f" ({trusted['n_ood']} unlike the user split, whatever their confidence: ood)"
    if trusted.get("accuracy_accepted") is not None:
        line += f"; gold: accepted {pct(trusted['accuracy_accepted'])}, review {pct(trusted['accuracy_review'])}"
    return line


SUMMARY_TOP_LABELS = 5


def _below_target_line(below: list[dict[str, Any]], target: float, pct: Any) -> str:
    """The worst labels on the accepted user samples (all of them are in metrics.json)."""
    worst = [
        f"{entry['label']} {pct(entry['accuracy'])} (n {entry['accepted']}, bound {pct(entry['lower_bound'])})"
        for entry in below[:SUMMARY_TOP_LABELS]
    ]
    more = ", ..." if len(below) > SUMMARY_TOP_LABELS else ""
    labels = "label" if len(below) == 1 else "labels"
    return f"{len(below)} {labels} below {pct(target)} on the accepted user samples: " + ", ".join(worst) + more


def _prevalence_line(prevalence: dict[str, Any], pct: Any) -> str:
    """The largest labels' estimated shares with their intervals (all labels' are in metrics.json)."""
    labels = prevalence["labels"]
    top = [
        f"{label} {pct(entry['estimate'])} [{pct(entry['low'])}, {pct(entry['high'])}]"
        for label, entry in list(labels.items())[:SUMMARY_TOP_LABELS]
    ]
    more = f", ... ({len(labels)} labels)" if len(labels) > SUMMARY_TOP_LABELS else ""
    return (
        f"shares of the corpus (PPI++, {100 * prevalence['confidence_level']:.0f}% jointly over labels): "
        + ", ".join(top)
        + more
    )
