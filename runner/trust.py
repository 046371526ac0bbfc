"""How far to trust each label: calibrated confidence, an acceptance threshold, conformal candidate sets.

Pure functions over numpy arrays, no I/O. Everything here is fitted on held-out user samples:
each sample scored by a bank, prior and settings that did not see it, so its score behaves as a
new corpus item's would.

- ``fit_calibration``: Platt scaling (scikit-learn's logistic regression) from a raw score (the
  posterior probability of the chosen label, or the bank's count share) to the probability of
  being right.
- ``choose_threshold``: the lowest confidence reached by fixed-sequence testing (strictest first,
  stop at the first failure) of the Clopper-Pearson lower bound (scipy) against the target; with
  per-label testing, of every well-sampled label's bound too. Either way it reports how each
  assigned label's accepted samples fared (``Acceptance.below_target``).
- ``conformal_tau``: the split-conformal quantile of held-out scores, for candidate sets that hold
  the truth with probability at least ``coverage`` on items exchangeable with the user split; with
  ``label_shift_weights``, the weighted quantile for a stratified split, whose label shares are not
  the pool's (weighted conformal prediction under label shift).
"""

from __future__ import annotations

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
class LabelAcceptance:
    """The accepted held-out samples CM assigned one label, at the chosen threshold."""

    label: int  # index into the job's labels
    accepted: int
    right: int
    lower_bound: float  # one-sided Clopper-Pearson, at the acceptance's confidence_level

    @property
    def accuracy(self) -> float:
        return self.right / self.accepted


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
    # per assigned label with accepted samples, at the threshold (none without labels or threshold)
    by_label: tuple[LabelAcceptance, ...] = ()
    per_label_min_samples: int | None = None  # None: the pooled test alone (cm.accept.per_label off)

    def below_target(self) -> tuple[LabelAcceptance, ...]:
        """The labels whose accepted samples were right less often than the target, worst first."""
        below = [entry for entry in self.by_label if entry.accuracy < self.target_accuracy]
        return tuple(sorted(below, key=lambda entry: (entry.accuracy, -entry.accepted, entry.label)))


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
    labels: IntArray | None = None,
    per_label_min_samples: int | None = None,
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

    ``labels`` (the shape of ``confidences``; -1: none) is the label each stage assigns each sample,
    and an accepted sample counts under the label of the stage that accepted it: the assigned label,
    not the truth, because at corpus time that is what a user filters on ("rows labelled billing are
    right 95% of the time"), and because it is fixed by the model's answers, not by whether they are
    right, so each label's accepted samples are a binomial count like the pooled ones. The result's
    ``by_label`` holds each label's accepted samples, right ones and bound at the chosen threshold.

    With ``per_label_min_samples``, a threshold passes only if the pooled bound does and so does the
    bound of every label with at least that many accepted samples there; the smaller labels count in
    the pooled test alone. This is an intersection-union test: its null (the pooled rows or one of
    those labels' rows below the target) holds when any one part's does, and then passing needs that
    part's own level-alpha test to pass, so the level needs no correction. Which labels are tested
    is fixed by the confidences and labels alone, as the path is, so fixed-sequence testing keeps the
    level jointly: with probability ``confidence_level`` the pooled rows and each tested label's rows
    at the chosen threshold are all right at least ``target_accuracy`` of the time.

    Power rests on the first test: a failure there accepts nothing, so it must see enough samples to
    survive a few errors (tests/bench/README.md, "Acceptance threshold", measures the trade-off).
    """
    confidences = np.atleast_2d(np.asarray(confidences, dtype=float))
    right = np.atleast_2d(np.asarray(right, dtype=bool))
    labels = np.full(confidences.shape, -1) if labels is None else np.atleast_2d(np.asarray(labels))
    n = confidences.shape[1]
    nothing = Acceptance(target_accuracy, confidence_level, None, 0.0, None, None, n, (), per_label_min_samples)
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
    # the same events by label: each moves its sample from the label it had (-1: none yet) to its new one
    label_after = np.take_along_axis(labels, answering, axis=0)
    label_before = np.vstack([np.full((1, n), -1), label_after[:-1]])
    right_before = np.vstack([np.zeros((1, n), dtype=np.int64), right_after[:-1]])
    states = _LabelStates.of(
        *(column.ravel()[events][order] for column in (label_after, label_before, right_after, right_before))
    )
    failing = bounds < target_accuracy
    if per_label_min_samples is not None:
        failing |= states.failing(per_label_min_samples, target_accuracy, confidence_level)[ends]
    failed = np.flatnonzero(failing)
    last = (failed[0] if len(failed) else len(ends)) - 1
    if last < 0:
        return nothing
    end = int(ends[last])
    accepted, k = int(n_accepted[end]), int(n_right[end])
    low = float(bounds[last])
    return Acceptance(
        target_accuracy,
        confidence_level,
        float(ranked[end]),
        accepted / n,
        k / accepted,
        low,
        n,
        states.at(end, confidence_level),
        per_label_min_samples,
    )


@dataclass(frozen=True)
class _LabelStates:
    """Each label's accepted and right samples after each event that changes them, held until its next one.

    An event at position p of the ranked events gives its label the state it holds for positions
    p..stop-1: a label's counts at any tested threshold are one state's, found without a table of
    every label at every threshold, and the bounds are computed once per state.
    """

    label: IntArray
    start: IntArray
    stop: IntArray
    accepted: IntArray
    right: IntArray
    events: int

    @classmethod
    def of(cls, new: IntArray, old: IntArray, right_new: IntArray, right_old: IntArray) -> _LabelStates:
        positions = np.arange(len(new))
        gains, losses = new >= 0, old >= 0
        label = np.concatenate([new[gains], old[losses]])
        start = np.concatenate([positions[gains], positions[losses]])
        accepted_change = np.concatenate([np.ones(gains.sum(), np.int64), -np.ones(losses.sum(), np.int64)])
        right_change = np.concatenate([right_new[gains], -right_old[losses]])
        by = np.lexsort((start, label))
        label, start, accepted_change, right_change = label[by], start[by], accepted_change[by], right_change[by]
        first = np.append(True, label[1:] != label[:-1])[: len(label)]
        last = np.append(first[1:], True)[: len(label)]
        group = np.cumsum(first) - 1

        def running(change: IntArray) -> IntArray:  # cumulative within each label
            total = np.cumsum(change)
            return total - (total - change)[first][group]

        stop = np.where(last, len(new), np.append(start[1:], len(new)))
        return cls(label, start, stop, running(accepted_change), running(right_change), len(new))

    def failing(self, min_samples: int, target: float, level: float) -> BoolArray:
        """Per ranked event: whether some label with at least ``min_samples`` accepted falls short there."""
        tested = np.flatnonzero(self.accepted >= min_samples)
        short = tested[clopper_pearson(self.right[tested], self.accepted[tested], level) < target]
        cover = np.zeros(self.events + 1, dtype=np.int64)
        np.add.at(cover, self.start[short], 1)
        np.add.at(cover, self.stop[short], -1)
        return np.cumsum(cover)[:-1] > 0

    def at(self, position: int, level: float) -> tuple[LabelAcceptance, ...]:
        """Each label's accepted samples at a ranked event (those with none left out), by label."""
        held = np.flatnonzero((self.start <= position) & (position < self.stop) & (self.accepted > 0))
        bounds = clopper_pearson(self.right[held], self.accepted[held], level)
        return tuple(
            LabelAcceptance(int(self.label[i]), int(self.accepted[i]), int(self.right[i]), float(bound))
            for i, bound in zip(held, bounds, strict=True)
        )


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


def conformal_tau(scores: FloatArray, coverage: float, weights: FloatArray | None = None) -> float:
    """The weighted split-conformal quantile of n held-out conformity scores at ``coverage``; 1 where none.

    Each score carries its ``weights`` entry (all 1 by default) and the new item a point mass at
    infinity; tau is the smallest score whose cumulative weight reaches ``coverage`` of the total.
    With unit weights that is the ceil((n+1) * coverage)-th smallest score, split-conformal prediction:
    a new item exchangeable with the n scored ones has its truth in the set of mass tau with probability
    >= coverage (Vovk et al.; Angelopoulos & Bates, 2021). With label-shift weights (p_pool(y) /
    p_split(y), ``label_shift_weights``) the scores stand for the pool rather than the split (Tibshirani
    et al., 2019; Podkopaev & Ramdas, 2021). The new item's own weight depends on its unknown label:
    it gets the largest, which can only raise tau (one tau for every label; conservative by at most
    max(w) / (sum(w) + max(w)), about 1/(n+1)).
    """
    scores = np.asarray(scores, dtype=float)
    if len(scores) == 0:
        return 1.0
    weights = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=float)
    if weights.shape != scores.shape or np.any(weights < 0):
        raise ValueError("conformal_tau: one non-negative weight per score")
    order = np.argsort(scores, kind="stable")
    cumulative = np.cumsum(weights[order])
    # the product in this order, so unit weights give exactly the rank ceil((n+1) * coverage)
    first = int(np.searchsorted(cumulative, (cumulative[-1] + weights.max()) * coverage, side="left"))
    if first >= len(scores):
        return 1.0
    return float(min(1.0, scores[order][first]))


def label_shift_weights(truths: IntArray, pool_counts: FloatArray) -> FloatArray:
    """Per user sample of label y, how many pool items it stands for relative to the rest: p_pool(y) / p_split(y).

    ``truths`` are the drawn samples' label indices, ``pool_counts`` the pool's rows per label index. A
    stratified split keeps at least one sample of every label, so a label with a single pool row in a
    hundred has a share of the split many times its share of the pool; weighting its samples down makes
    the weighted split's label shares the pool's (the weights' mean is 1).
    """
    truths = np.asarray(truths, dtype=np.int64)
    pool = np.asarray(pool_counts, dtype=float)
    split = np.bincount(truths, minlength=len(pool)).astype(float)
    if np.any((split > 0) & (pool <= 0)):
        raise ValueError("a user sample's label has no row in the pool it was drawn from")
    ratio = np.divide(pool / pool.sum(), split / len(truths), out=np.zeros_like(pool), where=split > 0)
    return ratio[truths]


def risk_coverage(confidences: FloatArray, right: BoolArray) -> tuple[FloatArray, FloatArray]:
    """Share accepted and accuracy of the accepted rows, at every threshold (most confident first)."""
    confidences = np.asarray(confidences, dtype=float)
    if len(confidences) == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-confidences, kind="stable")
    correct = np.cumsum(np.asarray(right, dtype=float)[order])
    accepted = np.arange(1, len(confidences) + 1)
    return accepted / len(confidences), correct / accepted
