"""How far to trust each label: calibrated confidence, an acceptance threshold, conformal candidate sets.

Pure functions over numpy arrays, no I/O. Everything here is fitted on held-out user samples:
each sample scored by a bank, prior and settings that did not see it, so its score behaves as a
new corpus item's would.

- ``fit_calibration``: Platt scaling (scikit-learn's logistic regression) from a raw score (the
  posterior probability of the chosen label, or the bank's count share) to the probability of
  being right.
- ``choose_threshold``: the lowest confidence reached by fixed-sequence testing (strictest first,
  stop at the first failure) of the Clopper-Pearson lower bound (scipy) against the target.
- ``conformal_tau``: the split-conformal quantile of held-out scores, for candidate sets that hold
  the truth with probability at least ``coverage`` on items exchangeable with the user split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runner.posterior import FloatArray, IntArray, randomised_mass

BoolArray = np.ndarray


@dataclass(frozen=True)
class Calibration:
    """P(right) = sigmoid(slope * logit(score) + intercept): Platt scaling of a raw score.

    Fitted by scikit-learn's logistic regression; applying it is the same formula its
    ``predict_proba`` computes, kept as two numbers in a JSON file instead of a pickled estimator.
    Sigmoid rather than isotonic calibration: isotonic regression's plateaus give many rows one
    confidence, so the acceptance threshold could only move plateau by plateau (on Banking77 the
    highest plateau alone fell short of a 95% target, and nothing was accepted).
    """

    slope: float
    intercept: float

    def apply(self, scores: FloatArray) -> FloatArray:
        return 1.0 / (1.0 + np.exp(-(self.slope * _logit(scores) + self.intercept)))


def _logit(scores: FloatArray) -> FloatArray:
    clipped = np.clip(np.asarray(scores, dtype=float), _EDGE, 1 - _EDGE)  # a score of 0 or 1 stays finite
    return np.log(clipped / (1 - clipped))


_EDGE = 1e-6


def fit_calibration(scores: FloatArray, right: BoolArray) -> Calibration:
    """Logistic regression of ``right`` on logit(score); with one outcome only, its rate (0 with no samples)."""
    from sklearn.linear_model import LogisticRegression

    right = np.asarray(right, dtype=bool)
    if len(right) == 0 or right.all() or not right.any():
        rate = float(right.mean()) if len(right) else 0.0
        return Calibration(0.0, float(_logit(np.array([rate]))[0]))
    features = _logit(scores).reshape(-1, 1)
    fitted = LogisticRegression(C=1e6, max_iter=1000).fit(features, right)  # C large: no shrinkage of a and b
    return Calibration(float(fitted.coef_[0, 0]), float(fitted.intercept_[0]))


@dataclass(frozen=True)
class Acceptance:
    """The threshold a job accepts rows at, and what the user split says about the accepted ones."""

    target_accuracy: float
    confidence_level: float
    threshold: float | None  # None: no threshold reaches the target, nothing is accepted
    accepted_share: float  # of the held-out user samples
    accuracy: float | None  # of the accepted held-out samples
    lower_bound: float | None  # one-sided Clopper-Pearson, at confidence_level
    n: int  # held-out samples the threshold was chosen on


def clopper_pearson(right: IntArray | FloatArray, n: IntArray | FloatArray, level: float) -> FloatArray:
    """The exact one-sided lower confidence bound on a binomial proportion, for many (right, n) at once.

    One-sided, as the claim is: the accepted rows are right at least this often, with probability
    ``level``. It is the beta quantile scipy's binomtest reports (tests/test_trust.py), computed for
    every tested threshold in one call; 0 where none is right.
    """
    from scipy.stats import beta

    right, n = np.asarray(right, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        bounds = beta.ppf(1 - level, right, n - right + 1)
    return np.where(right > 0, bounds, 0.0)


def choose_threshold(
    confidences: FloatArray,
    right: BoolArray,
    target_accuracy: float,
    confidence_level: float,
    min_accepted: int,
) -> Acceptance:
    """The threshold by fixed-sequence testing (Learn-then-Test, Angelopoulos et al., 2021).

    ``confidences`` and ``right`` are per held-out sample, or per stage and sample (shape S x n) for
    a cascade: a sample is accepted at threshold t by the first stage whose confidence reaches t,
    and is right if that stage is (a stage that could not answer it holds -inf). One threshold for
    every stage is one scalar path, fixed by the confidences alone before any test.

    Thresholds are the held-out confidences from the highest down; the first tested is the highest
    that accepts at least ``min_accepted`` samples (half of them when there are fewer than twice
    that: a rule fixed by n alone, so the level holds). Each is tested by the one-sided Clopper-
    Pearson lower bound at ``confidence_level`` on its accepted samples' accuracy; testing stops at
    the first that fails and the last one passing is chosen. Stopping there is what keeps the level
    with no correction: the chance of passing a threshold whose accepted rows are right less than
    ``target_accuracy`` of the time is at most 1 - confidence_level (scanning on past a failure, as
    this did before, passed such thresholds in 11-21% of runs at 0.95). The path depends on the
    confidences alone, so this holds given them, for the accepted rows of all stages pooled.

    Power rests on the first test: a failure there accepts nothing, so it must see enough samples to
    survive a few errors (tests/bench/README.md, "Acceptance threshold", measures the trade-off).
    """
    confidences = np.atleast_2d(np.asarray(confidences, dtype=float))
    right = np.atleast_2d(np.asarray(right, dtype=bool))
    n = confidences.shape[1]
    nothing = Acceptance(target_accuracy, confidence_level, None, 0.0, None, None, n)
    if n == 0:
        return nothing
    # Each (stage, sample) confidence is an event: lowering t past it lets that stage accept the sample.
    # Per sample, in its own order of events, the answering stage is the lowest stage reached so far;
    # an event adds the sample (its first) or changes which stage's answer counts (a lower stage's).
    per_sample = np.argsort(-confidences, axis=0, kind="stable")
    reached = np.take_along_axis(confidences, per_sample, axis=0)
    answering = np.minimum.accumulate(per_sample, axis=0)
    right_after = np.take_along_axis(right, answering, axis=0).astype(np.int64)
    right_change = np.diff(right_after, axis=0, prepend=0)
    accepted_change = np.zeros_like(right_change)
    accepted_change[0] = 1
    events = np.isfinite(reached).ravel()
    thresholds = reached.ravel()[events]
    order = np.argsort(-thresholds, kind="stable")
    ranked = thresholds[order]
    n_right = np.cumsum(right_change.ravel()[events][order])
    n_accepted = np.cumsum(accepted_change.ravel()[events][order])
    # one test per distinct threshold: the last event of each run of equal confidences
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    ends = ends[n_accepted[ends] >= min(min_accepted, (n + 1) // 2)]  # too few accepted: not tested yet
    bounds = clopper_pearson(n_right[ends], n_accepted[ends], confidence_level)
    failed = np.flatnonzero(bounds < target_accuracy)
    last = (failed[0] if len(failed) else len(ends)) - 1
    if last < 0:
        return nothing
    end = int(ends[last])
    accepted, k = int(n_accepted[end]), int(n_right[end])
    low = float(bounds[last])
    return Acceptance(target_accuracy, confidence_level, float(ranked[end]), accepted / n, k / accepted, low, n)


def expected_calibration_error(confidences: FloatArray, right: BoolArray, bins: int = 10) -> float | None:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their rows."""
    confidences = np.asarray(confidences, dtype=float)
    right = np.asarray(right, dtype=float)
    if len(confidences) == 0:
        return None
    which = np.minimum((confidences * bins).astype(int), bins - 1)
    error = 0.0
    for b in np.unique(which):
        members = which == b
        error += members.sum() * abs(right[members].mean() - confidences[members].mean())
    return float(error / len(confidences))


def conformity_scores(posteriors: FloatArray, truths: np.ndarray, u: FloatArray) -> FloatArray:
    """Each row's ``posterior.randomised_mass`` of its truth, with the row's draw ``u``.

    ``posterior.mass_candidates(row, tau, u)`` holds the truth exactly when this score is <= tau,
    so with the draws uniform and independent of the rows, the conformal quantile of these scores
    is a tau whose sets hold the truth with probability between ``coverage`` and coverage + 1/(n+1)
    (randomised APS; Romano, Sesia & Candes, 2020), or as often as the most probable label is right
    when that is more (it is always kept). Without the draw (each row's whole mass down to its truth),
    the sets of such a tau held the truth in 97% of MASSIVE items at a coverage of 0.8.
    """
    scores = randomised_mass(posteriors, np.asarray(u, dtype=float))
    return scores[np.arange(len(posteriors)), np.asarray(truths)]


def conformal_tau(scores: FloatArray, coverage: float) -> float:
    """The ceil((n+1) * coverage)-th smallest of n held-out conformity scores; 1 when that exceeds n.

    Split-conformal prediction: a new item exchangeable with the n scored ones has its truth in
    the set of mass tau with probability >= coverage (Vovk et al.; Angelopoulos & Bates, 2021).
    """
    n = len(scores)
    rank = math.ceil((n + 1) * coverage)
    if n == 0 or rank > n:
        return 1.0
    return float(min(1.0, np.sort(scores)[rank - 1]))


def risk_coverage(confidences: FloatArray, right: BoolArray) -> tuple[FloatArray, FloatArray]:
    """Share accepted and accuracy of the accepted rows, at every threshold (most confident first)."""
    confidences = np.asarray(confidences, dtype=float)
    if len(confidences) == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-confidences, kind="stable")
    correct = np.cumsum(np.asarray(right, dtype=float)[order])
    accepted = np.arange(1, len(confidences) + 1)
    return accepted / len(confidences), correct / accepted
