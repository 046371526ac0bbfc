"""Corpus-level estimates (runner.prevalence): ppi_py's numbers, joint coverage by simulation, a job's metrics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import orjson
import polars as pl
import ppi_py
import pytest

from runner import run_job
from runner.prevalence import estimate_prevalence, label_predictions
from runner.report import summary_lines
from tests.scripted_engine import ScriptedEngine

SHARES = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
K = len(SHARES)
LABELS = tuple("abcde")


def _draw(rng: np.random.Generator, m: int, accuracy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m items: truth from SHARES, a predictor right with probability ``accuracy`` and honest about it."""
    truth = rng.choice(K, m, p=SHARES)
    # each item's chance of being right varies around ``accuracy``; the confidence is that chance
    chance = np.clip(accuracy + 0.1 * rng.standard_normal(m), 0.05, 0.999)
    right = rng.random(m) < chance
    wrong = (truth + rng.integers(1, K, m)) % K
    return truth, np.where(right, truth, wrong), chance


def _matrix(given: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    return np.stack([label_predictions(given, confidence, k, K) for k in range(K)], axis=1)


def test_estimates_and_intervals_are_ppi_pys_own_on_the_same_arrays():
    rng = np.random.default_rng(1)
    truth, given, confidence = _draw(rng, 400, 0.8)
    _, corpus_given, corpus_confidence = _draw(rng, 6000, 0.8)
    given[:5] = -1  # no label: f is 1/K for every label
    got = estimate_prevalence(LABELS, truth, given, confidence, corpus_given, corpus_confidence, np.zeros(0, int), 0.9)

    alpha = 0.1 / K  # Bonferroni over the K labels
    y, f, f_corpus = np.eye(K)[truth], _matrix(given, confidence), _matrix(corpus_given, corpus_confidence)
    assert np.allclose(f[:5], 1 / K) and np.allclose(f_corpus.sum(axis=1), 1)
    # ppi_py on the whole rows x labels matrix, lam tuned per label ("element"), PPI++
    low, high = ppi_py.ppi_mean_ci(y, f, f_corpus, alpha=alpha, lam_optim_mode="element")
    point = ppi_py.ppi_mean_pointestimate(y, f, f_corpus, lam_optim_mode="element")
    assert np.allclose(got.low, low) and np.allclose(got.high, high) and np.allclose(got.estimate, point)
    gold = [ppi_py.classical_mean_ci(y[:, k], alpha=alpha) for k in range(K)]
    assert np.allclose(got.gold_low, [g[0] for g in gold]) and np.allclose(got.gold_high, [g[1] for g in gold])
    assert np.allclose(got.raw_share, np.bincount(corpus_given, minlength=K) / len(corpus_given))
    assert got.level == 0.9 and (got.n_labelled, got.n_model, got.n_known) == (400, 6000, 0)


def test_reviewed_rows_count_as_they_are_and_the_rest_by_ppi_weighted_by_rows():
    rng = np.random.default_rng(2)
    truth, given, confidence = _draw(rng, 300, 0.8)
    _, corpus_given, corpus_confidence = _draw(rng, 3000, 0.8)
    known = np.array([4] * 900 + [0] * 100)  # 1,000 reviewed rows, 900 of them e
    none = np.zeros(0, int)
    model_only = estimate_prevalence(LABELS, truth, given, confidence, corpus_given, corpus_confidence, none)
    both = estimate_prevalence(LABELS, truth, given, confidence, corpus_given, corpus_confidence, known)
    counted = np.bincount(known, minlength=K) / 4000
    for name in ("estimate", "low", "high"):
        assert np.allclose(getattr(both, name), 0.75 * getattr(model_only, name) + counted)
    assert np.allclose(
        both.raw_share, (np.bincount(corpus_given, minlength=K) + np.bincount(known, minlength=K)) / 4000
    )
    everything_reviewed = estimate_prevalence(
        LABELS, truth, given, confidence, corpus_given[:0], none.astype(float), known
    )
    exact = np.bincount(known, minlength=K) / len(known)
    assert np.allclose(everything_reviewed.low, exact) and np.allclose(everything_reviewed.high, exact)


def test_joint_intervals_cover_the_true_shares_and_a_good_predictor_narrows_them():
    """1,000 seeded corpora: every label's interval holds the corpus's true share at once >= 90% of the time
    (nominal, less three Monte-Carlo standard errors), and a good predictor's intervals are narrower.

    The intervals are normal ones, valid as samples grow: with 1,000 user samples they hold (0.89 here,
    within the Monte-Carlo error); with 300 and a 5% label they held 0.87, both the PPI and the gold-only
    ones, as Wald intervals for small counts do (tests/bench/README.md measures the real datasets)."""
    rng = np.random.default_rng(3)
    runs, level = 1000, 0.9
    covered = np.zeros(runs, dtype=bool)
    widths, gold_widths = np.zeros(runs), np.zeros(runs)
    for run in range(runs):
        truth, given, confidence = _draw(rng, 1000, 0.85)
        corpus_truth, corpus_given, corpus_confidence = _draw(rng, 2000, 0.85)
        got = estimate_prevalence(
            LABELS, truth, given, confidence, corpus_given, corpus_confidence, np.zeros(0, int), level
        )
        share = np.bincount(corpus_truth, minlength=K) / len(corpus_truth)  # the corpus's own, not SHARES
        covered[run] = np.all((got.low <= share) & (share <= got.high))
        widths[run], gold_widths[run] = np.mean(got.high - got.low), np.mean(got.gold_high - got.gold_low)
    error = np.sqrt(level * (1 - level) / runs)
    assert covered.mean() >= level - 3 * error, covered.mean()
    assert widths.mean() < 0.8 * gold_widths.mean(), (widths.mean(), gold_widths.mean())


def test_importing_ppi_py_through_the_module_leaves_warning_filters_alone():
    # ppi_py's import runs warnings.simplefilter("ignore"), which would silence the whole job's warnings
    bare = "import warnings; before = list(warnings.filters); import ppi_py; assert warnings.filters != before"
    subprocess.run([sys.executable, "-c", bare], check=True)  # else _ppi's guard can go
    guarded = (
        "import warnings; from runner import prevalence; before = list(warnings.filters); prevalence._ppi(); "
        "assert warnings.filters == before"
    )
    subprocess.run([sys.executable, "-c", guarded], check=True)


# A job: the model is right on a and c, answers b for half the c's (counts CM, no second call).
USER = [(f"ua{i}", "a", "a") for i in range(40)]
USER += [(f"ub{i}", "b", "b") for i in range(20)]
USER += [(f"uc{i}", "c", "b" if i < 10 else "c") for i in range(20)]
CORPUS = [(f"ca{i}", "a", "a") for i in range(10)]
CORPUS += [(f"cb{i}", "b", "b") for i in range(6)]
CORPUS += [(f"cc{i}", "c", "b" if i < 3 else "c") for i in range(6)]


async def test_a_jobs_metrics_hold_the_shares_of_its_corpus(toy_job, tmp_path):
    accept = "{target_accuracy: 0.9, confidence_level: 0.9, min_accepted: 40}"
    spec = toy_job(
        [(t, y) for t, y, _ in USER],
        [(t, y) for t, y, _ in CORPUS],
        labels=["a", "b", "c"],
        extra=f"cm: {{variant: counts, second_call: never, accept: {accept}}}",
    )
    result = await run_job(spec, engine=ScriptedEngine({t: a for t, _, a in USER + CORPUS}, n_labels=3))
    prevalence = result.metrics["prevalence"]
    assert prevalence == orjson.loads((tmp_path / "out/metrics.json").read_bytes())["prevalence"]

    # Worked out apart from the job: with counts CM and no second call each user sample is given its own
    # answer held out (row b of the bank holds b 2 to 1 over c), so the labelled side is (answer, truth)
    # with the fit's held-out confidences; the corpus side is the annotations' y_hat and confidence.
    from runner._fitted_store import load_fitted
    from runner.checkpoint import spec_digest

    index = {"a": 0, "b": 1, "c": 2}
    truth = np.array([index[y] for _, y, _ in USER])
    answer = np.array([index[a] for _, _, a in USER])
    assert [s.truth for s in result.bank.samples] == [y for _, y, _ in USER]
    cm = load_fitted(tmp_path / "out", f"{spec_digest(spec)}:{result.bank.digest()}:none")
    assert cm is not None and (cm.held_out_labels == answer).all() and (cm.held_out_truths == truth).all()
    held_confidence = cm.held_out_confidence
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    corpus_given = np.array([index[y] for y in table["y_hat"]])
    assert (corpus_given == np.array([index[a] for _, _, a in CORPUS])).all()

    alpha = 0.1 / 3
    f = np.stack([label_predictions(answer, held_confidence, k, 3) for k in range(3)], axis=1)
    f_corpus = np.stack([label_predictions(corpus_given, table["confidence"].to_numpy(), k, 3) for k in range(3)], 1)
    low, high = ppi_py.ppi_mean_ci(np.eye(3)[truth], f, f_corpus, alpha=alpha, lam_optim_mode="element")
    for k, label in enumerate("abc"):
        entry = prevalence["labels"][label]
        assert entry["low"] == pytest.approx(max(0.0, low[k])) and entry["high"] == pytest.approx(min(1.0, high[k]))
        assert entry["raw_share"] == pytest.approx({"a": 10, "b": 9, "c": 3}[label] / 22)
        gold_low, gold_high = ppi_py.classical_mean_ci((truth == k).astype(float), alpha=alpha)
        assert entry["gold_only"] == pytest.approx({"low": gold_low, "high": gold_high})
    assert list(prevalence["labels"]) == sorted("abc", key=lambda label: -prevalence["labels"][label]["estimate"])
    assert prevalence["confidence_level"] == 0.9 and prevalence["n_user_samples"] == 80
    assert prevalence["n_model_rows"] == 22 and prevalence["n_reviewed_rows"] == 0
    assert (tmp_path / "out/prevalence.png").stat().st_size > 1000
    line = next(line for line in summary_lines(result.metrics) if line.startswith("shares of the corpus"))
    assert "90% jointly over labels" in line and line.count("[") == 3


async def test_reviewed_rows_enter_a_jobs_shares_as_known(toy_job, tmp_path):
    from runner import cli

    accept = "{target_accuracy: 0.9, confidence_level: 0.9, min_accepted: 40}"
    spec = toy_job(
        [(t, y) for t, y, _ in USER],
        [(t, y) for t, y, _ in CORPUS],
        labels=["a", "b", "c"],
        extra=f"cm: {{variant: counts, second_call: never, accept: {accept}}}",
    )
    answers = {t: a for t, _, a in USER + CORPUS}
    await run_job(spec, engine=ScriptedEngine(answers, n_labels=3))
    out = tmp_path / "out"
    gold = {t: y for t, y, _ in CORPUS}
    review = pl.read_parquet(out / "review.parquet").select("id", pl.col("text").replace_strict(gold).alias("label"))
    review.write_csv(tmp_path / "reviewed.csv")
    assert cli.main(["review", "import", str(out), str(tmp_path / "reviewed.csv")]) == 0
    result = await run_job(spec, engine=ScriptedEngine(answers, n_labels=3))

    prevalence = result.metrics["prevalence"]
    table = pl.read_parquet(out / "annotations.parquet")
    human = table.filter(pl.col("source") == "human")
    assert prevalence["n_reviewed_rows"] == human.height == 9 and prevalence["n_model_rows"] == 13
    model = table.filter(pl.col("source") == "model")
    index = {"a": 0, "b": 1, "c": 2}
    from runner._fitted_store import load_fitted
    from runner.checkpoint import spec_digest
    from runner.review import read_reviewed, reviewed_digest, with_reviewed

    reviewed = read_reviewed(out)
    key = f"{spec_digest(spec)}:{with_reviewed(result.bank, None).digest()}:{reviewed_digest(reviewed)}"
    cm = load_fitted(out, key)
    assert cm is not None
    alone = estimate_prevalence(
        cm.labels,
        cm.held_out_truths,
        cm.held_out_labels,
        cm.held_out_confidence,
        np.array([index[y] for y in model["y_hat"]]),
        model["confidence"].to_numpy(),
        np.zeros(0, int),
        0.9,
    )
    counted = {label: (human["y_hat"] == label).sum() / 22 for label in "abc"}
    for k, label in enumerate("abc"):
        entry = prevalence["labels"][label]
        assert entry["estimate"] == pytest.approx(13 / 22 * alone.estimate[k] + counted[label])
        assert entry["low"] == pytest.approx(max(0.0, 13 / 22 * alone.low[k] + counted[label]))


# A stratified split: equal samples per label from a pool whose shares are SHARES; the corpus is drawn
# like the pool. Weighted by p_pool(y) / p_split(y) the split stands for the pool (runner.prevalence).
PER_LABEL = 60


def _stratified(rng: np.random.Generator, accuracy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    truth = np.repeat(np.arange(K), PER_LABEL)
    chance = np.clip(accuracy + 0.1 * rng.standard_normal(len(truth)), 0.05, 0.999)
    right = rng.random(len(truth)) < chance
    given = np.where(right, truth, (truth + rng.integers(1, K, len(truth))) % K)
    weights = SHARES[truth] / (1 / K)  # p_pool(y) / p_split(y), worked out from the design
    return truth, given, chance, weights


def test_weighted_estimates_are_ppi_pys_own_with_w():
    rng = np.random.default_rng(4)
    truth, given, confidence, weights = _stratified(rng, 0.7)
    _, corpus_given, corpus_confidence = _draw(rng, 5000, 0.7)
    got = estimate_prevalence(
        LABELS, truth, given, confidence, corpus_given, corpus_confidence, np.zeros(0, int), 0.9, weights=weights
    )
    alpha = 0.1 / K
    y, f, f_corpus = np.eye(K)[truth], _matrix(given, confidence), _matrix(corpus_given, corpus_confidence)
    low, high = ppi_py.ppi_mean_ci(y, f, f_corpus, alpha=alpha, w=weights, lam_optim_mode="element")
    point = ppi_py.ppi_mean_pointestimate(y, f, f_corpus, w=weights, lam_optim_mode="element")
    assert np.allclose(got.low, low) and np.allclose(got.high, high) and np.allclose(got.estimate, point)
    gold = [ppi_py.classical_mean_ci(y[:, k], w=weights, alpha=alpha) for k in range(K)]
    assert np.allclose(got.gold_low, [g[0] for g in gold]) and np.allclose(got.gold_high, [g[1] for g in gold])
    # the weighted split's label shares are the pool's: the gold-only intervals are centred on SHARES exactly
    assert np.allclose((got.gold_low + got.gold_high) / 2, SHARES)
    assert got.as_dict()["label_shift_weighted"] is True
    # ppi_py's quirk: w is rescaled to mean 1, so only the weights' ratios count
    scaled = estimate_prevalence(
        LABELS, truth, given, confidence, corpus_given, corpus_confidence, np.zeros(0, int), 0.9, weights=3 * weights
    )
    assert np.allclose(scaled.low, got.low) and np.allclose(scaled.high, got.high)
    with pytest.raises(ValueError, match="weights for"):
        estimate_prevalence(
            LABELS, truth, given, confidence, corpus_given, corpus_confidence, np.zeros(0, int), weights=weights[1:]
        )


def test_no_weights_or_equal_weights_give_exactly_the_unweighted_estimate():
    rng = np.random.default_rng(5)
    truth, given, confidence = _draw(rng, 49, 0.8)  # 1/49 * 49 != 1 in floating point: ones must not reach ppi_py
    _, corpus_given, corpus_confidence = _draw(rng, 700, 0.8)
    args = (LABELS, truth, given, confidence, corpus_given, corpus_confidence, np.zeros(0, int), 0.9)
    bare, none = estimate_prevalence(*args), estimate_prevalence(*args, weights=None)
    ones = estimate_prevalence(*args, weights=np.ones(49))
    twos = estimate_prevalence(*args, weights=np.full(49, 2.0))
    for name in ("estimate", "low", "high", "gold_low", "gold_high", "raw_share"):
        for other in (none, ones, twos):
            assert np.array_equal(getattr(bare, name), getattr(other, name)), name
    assert bare.as_dict() == ones.as_dict() and bare.as_dict()["label_shift_weighted"] is False


def test_weighted_intervals_cover_a_stratified_splits_pool_shares_and_unweighted_ones_are_biased():
    """300 seeded stratified splits (60 per label, pool shares SHARES) and corpora drawn like the pool:
    weighted, the estimates are unbiased (|mean error| < 0.01 on every label) and the joint intervals hold
    the corpus's true shares at least as often as nominal less three Monte-Carlo errors (ppi_py's i.i.d.
    variance is conservative for fixed per-label counts); unweighted, the shares move towards 1/K."""
    rng = np.random.default_rng(6)
    runs, level = 300, 0.9
    covered, covered_bare = np.zeros(runs, dtype=bool), np.zeros(runs, dtype=bool)
    error, error_bare = np.zeros((runs, K)), np.zeros((runs, K))
    for run in range(runs):
        truth, given, confidence, weights = _stratified(rng, 0.75)
        corpus_truth, corpus_given, corpus_confidence = _draw(rng, 2000, 0.75)
        args = (LABELS, truth, given, confidence, corpus_given, corpus_confidence, np.zeros(0, int), level)
        weighted, bare = estimate_prevalence(*args, weights=weights), estimate_prevalence(*args)
        share = np.bincount(corpus_truth, minlength=K) / len(corpus_truth)
        covered[run] = np.all((weighted.low <= share) & (share <= weighted.high))
        covered_bare[run] = np.all((bare.low <= share) & (share <= bare.high))
        error[run], error_bare[run] = weighted.estimate - share, bare.estimate - share
    mc = np.sqrt(level * (1 - level) / runs)
    assert np.abs(error.mean(axis=0)).max() < 0.01, error.mean(axis=0)
    assert covered.mean() >= level - 3 * mc, covered.mean()
    # unweighted: the common label under-estimated, the rare one over-estimated, far outside the MC error
    assert error_bare.mean(axis=0)[0] < -0.02 and error_bare.mean(axis=0)[-1] > 0.02, error_bare.mean(axis=0)
    assert covered_bare.mean() < covered.mean(), (covered_bare.mean(), covered.mean())
