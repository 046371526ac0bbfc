"""Metrics from an annotations table: the same whether read whole or shard by shard."""

import polars as pl

from runner.report import ANNOTATION_SCHEMA, compute_metrics, summary_lines


def annotations(rows: list[tuple[str | None, str | None, str | None, list[str], int]]) -> pl.DataFrame:
    """(gold, y_prime, y_hat, candidates, calls) rows, the other columns filled in as a job would."""
    return pl.DataFrame(
        [
            {
                "id": str(i),
                "text": f"text {i}",
                "gold": gold,
                "y_prime": y_prime,
                "candidates": candidates,
                "y_hat": y_hat,
                "calls": calls,
                "prompt_tokens": 10 * calls,
                "completion_tokens": 2 * calls,
                "fallback": "empty_row" if y_prime == "news" else None,
                "error": None if y_prime is not None else "timed out",
                "error_kind": None if y_prime is not None else "engine",
                "y_neighbour": None,
            }
            for i, (gold, y_prime, y_hat, candidates, calls) in enumerate(rows)
        ],
        schema=ANNOTATION_SCHEMA,
    )


TABLE = annotations(
    [
        ("iot", "alarm", "iot", ["alarm", "iot"], 2),  # fixed by CM
        ("music", "iot", "music", ["music"], 1),  # a single candidate: no second call
        ("news", "news", "news", ["news"], 1),  # empty row, kept
        ("alarm", "alarm", "iot", ["alarm", "iot", "music"], 2),  # broken by CM
        ("alarm", None, None, [], 1),  # the engine failed: counted, never dropped
        (None, "iot", "music", ["iot", "music"], 2),  # no gold: annotated, not scored
    ]
)


def test_metrics_of_a_small_table():
    metrics = compute_metrics(TABLE)
    assert metrics["n_annotated"] == 6 and metrics["n_with_gold"] == 5
    assert metrics["accuracy_baseline"] == 2 / 5 and metrics["accuracy_cm"] == 3 / 5
    assert metrics["coverage"] == 4 / 5 and metrics["accuracy_neighbour_vote"] is None
    assert metrics["calls_per_item"] == 9 / 6 and metrics["second_call_rate"] == 3 / 6
    # sizes of answered rows: 2, 1, 1, 3, 2 -> median 2
    assert metrics["candidate_set_size"] == {"mean": 9 / 5, "median": 2.0, "min": 1, "max": 3}
    assert metrics["n_empty_row_fallback"] == 1 and metrics["n_errors"] == 1
    assert metrics["prompt_tokens"] == 90 and metrics["completion_tokens"] == 18


def test_shard_by_shard_equals_whole_even_with_an_even_median():
    whole = TABLE.head(4)  # sizes 2, 1, 1, 3: an even count, the median is the mean of the middle two
    parts = [whole.slice(0, 1), whole.slice(1, 2), whole.slice(3, 1)]
    assert compute_metrics(iter(parts)) == compute_metrics(whole) == compute_metrics(whole.lazy())
    assert compute_metrics(whole)["candidate_set_size"]["median"] == 1.5


def test_an_empty_table_has_no_rates():
    metrics = compute_metrics(annotations([]))
    assert metrics["n_annotated"] == 0 and metrics["accuracy_cm"] is None and metrics["calls_per_item"] is None
    assert metrics["candidate_set_size"] == {"mean": None, "median": None, "min": None, "max": None}


def test_summary_names_both_accuracies():
    lines = summary_lines({**compute_metrics(TABLE), "n_user": 4})
    assert "baseline (y'): 40.0%" in lines[1] and "CM (y_hat): 60.0%" in lines[1]


def test_summary_says_when_no_model_was_loaded():
    metrics = {**compute_metrics(TABLE), "n_user": 4}
    loaded = summary_lines({**metrics, "run": {"items_per_second": 50.0, "engine_load_seconds": 12.4}})
    assert loaded[-1] == "50.0 items/s annotating; engine load 12 s"
    never = summary_lines({**metrics, "run": {"items_per_second": 50.0, "engine_load_seconds": None}})
    assert never[-1] == "50.0 items/s annotating; no model loaded"


def test_summary_shows_the_cm_settings_the_user_split_chose():
    settings = {"variant": "neighbour_prior", "likelihood_weight": 0.0, "tau": 0.67512, "prior": "probe"}
    lines = summary_lines({**compute_metrics(TABLE), "n_user": 4, "cm_settings": settings})
    assert "cm variant neighbour_prior, likelihood_weight 0, tau 0.675, prior probe" in lines


def test_summary_of_an_empty_corpus_says_so_instead_of_failing():
    metrics = {**compute_metrics(annotations([])), "n_user": 4}
    assert summary_lines(metrics)[:4] == [
        "annotated 0 items (0 with gold labels), memory bank from 4 user samples",
        "accuracy  baseline (y'): n/a   CM (y_hat): n/a",
        "no candidate sets",
        "calls per item n/a, errors 0, empty-row fallbacks 0",
    ]


def test_a_reviewers_rows_are_counted_apart_from_the_models_accuracy():
    # TABLE's rows (the model's) plus three a reviewer labelled: two as gold says, one not, one without gold.
    human = annotations(
        [
            ("iot", "alarm", "iot", ["alarm", "iot"], 2),
            ("music", "music", "alarm", ["music"], 1),
            (None, "iot", "iot", ["iot"], 1),
        ]
    ).with_columns(source=pl.lit("human"))
    table = pl.concat([TABLE.with_columns(source=pl.lit("model")), human])
    metrics = compute_metrics(table)
    # As test_metrics_of_a_small_table: the model's 5 rows with gold, 2 right first answers, 3 right labels.
    assert metrics["accuracy_baseline"] == 2 / 5 and metrics["accuracy_cm"] == 3 / 5 and metrics["coverage"] == 4 / 5
    assert metrics["human"] == {"n_rows": 3, "n_with_gold": 2, "agreement_with_gold": 1 / 2}
    assert metrics["n_annotated"] == 9 and metrics["n_with_gold"] == 7 and metrics["calls_per_item"] == 13 / 9
    assert compute_metrics(iter([table.slice(0, 7), table.slice(7, 2)])) == metrics
    assert compute_metrics(TABLE)["human"] == {"n_rows": 0, "n_with_gold": 0, "agreement_with_gold": None}
    lines = summary_lines({**metrics, "n_user": 4})
    assert lines[2] == "3 rows labelled by reviewers (source = human): not in the model's figures"
