"""Corpus-level estimates: each label's share of the corpus, with intervals that hold jointly over labels.

Pure functions over numpy arrays, no I/O. Prediction-powered inference (Angelopoulos et al., Science
2023) with PPI++'s power tuning (Angelopoulos, Duchi & Zrnic, 2023), computed by ``ppi_py``: the
share of label k is the corpus's mean prediction f_k(X) corrected by the mean error Y_k - f_k(X) on the
labelled user samples, the correction weighted by ``lam`` in [0, 1], chosen per label to minimise the
variance (lam = 0 is the gold-only estimate, lam = 1 plain PPI). The interval is a normal (CLT) one, as
``ppi_py`` gives it; the gold-only interval beside it is the same normal interval from the user samples
alone (``ppi_py.classical_mean_ci``, i.e. lam = 0), so the two widths compare the methods, not two
approximations.

What the labelled side is. The user samples the fit scored held out (``FittedCM.held_out_labels`` and
``held_out_confidence``: each labelled by a bank, prior and settings fitted without it, as a corpus row
is labelled), with their truths. PPI needs them to be exchangeable with the corpus rows and scored by
the same f; what that assumes here:

- the corpus rows are labelled by the fit on every user sample, the held-out samples by fits without
  each (leave-one-out counts and neighbours, the probe's 5 folds). Cross-prediction-powered inference
  (Zrnic & Candes, 2024) makes this exact by averaging the fold models on the corpus; here the full fit
  stands in for them, which errs at most by the gap between a probe fitted on all samples and on four
  fifths of them. The few settings chosen on the same samples (the calibration's two numbers, k, tau)
  are taken as fixed;
- samples whose first answer did not parse are not held out (``runner.fit``), while corpus rows with
  such answers are counted (as "no label", f uniform): with constrained answers there are none.

Weights: a stratified split. A split drawn stratified by label (``runner.data.sample_user_split``:
at least one sample a label) over-represents rare labels against the pool it was drawn from, and
unweighted its label shares bias the estimate (about 3 points on MTOP). Each labelled sample then
weighs p_pool(y) / p_split(y) (``runner.fit.split_weights``, from the pool's counts; ``ppi_py``'s ``w``),
which makes the weighted split's label shares the pool's. That is a label-shift correction: it assumes
p(x | y), and so f's behaviour on each label, is the same in split and pool, which the draw itself makes
so (uniform within each label); and it moves the labelled side to the pool, not to the corpus, so it is
the pool that must be exchangeable with the corpus (as an unweighted split must be). A split not drawn,
drawn uniformly, or a fit from before the weights were kept weighs every sample 1: the estimate is then
exactly the unweighted one (constant weights are passed as none). What ``ppi_py`` does with ``w``
(version 0.2.3, tested in tests/test_prevalence.py):

- it rescales ``w`` to mean 1 over the labelled samples, so only their ratios count;
- the interval treats the weighted samples as independent draws: for a split with fixed counts per label
  the between-label part of the correction's variance is not random, so the interval is conservative
  (the gold-only one most: its centre is the pool's share exactly, its width the i.i.d. one);
- lam is tuned with the weighted covariance Cov(w Y, w f) over the variance of f pooled with the corpus's
  (mostly the corpus's) rather than Var(w f): a lam not quite variance-optimal, the interval still valid,
  its width computed from the weighted residuals for whatever lam was chosen.

The intervals are normal ones, valid as samples grow: a label with few user samples (15 of 300 in
the simulation of tests/test_prevalence.py) gets one that holds a little less often than it says, as
does the gold-only Wald interval beside it.

The tests check the estimates against ``ppi_py``'s own on the same arrays and the joint coverage by
simulation (tests/test_prevalence.py); tests/bench/README.md measures both on the datasets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from runner.posterior import FloatArray, IntArray

DEFAULT_LEVEL = 0.95
"""The joint confidence level when the job sets none (``cm.accept.confidence_level`` otherwise)."""


def _ppi() -> ModuleType:
    # ppi_py's import calls warnings.simplefilter("ignore"), silencing every warning of the process
    # for good; importing it inside catch_warnings puts the caller's filters back.
    with warnings.catch_warnings():
        import ppi_py
    return ppi_py


def _label_shift_weights(weights: FloatArray | None, n: int) -> FloatArray | None:
    """``ppi_py``'s ``w``: None when every sample weighs the same (``ppi_py`` rescales w to mean 1, so equal
    weights are no weights; passing them would still move the result by rounding in w / sum(w) * n)."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=float)
    if w.shape != (n,):
        raise ValueError(f"{len(w)} weights for {n} held-out user samples")
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError("label-shift weights must be finite, non-negative and not all zero")
    return None if np.all(w == w[0]) else w


def label_predictions(given: IntArray, confidence: FloatArray, label: int, n_labels: int) -> FloatArray:
    """f_k(X) per row for label ``label``: the probability that the row's truth is k, from what a row holds.

    An annotation keeps the label given (``y_hat``) and its calibrated probability of being right
    (``confidence``), not a distribution over labels: f_k is ``confidence`` for the label given and
    the rest, 1 - confidence, spread evenly over the other K - 1 labels; a row with no label (``given``
    -1) says nothing, 1/K each. Against the bare indicator 1[y_hat = k] a right row given k with
    confidence c adds (1 - c)^2 to the correction's variance instead of 0 and a wrong one c^2 instead of
    1: with calibrated c the rows given k add c(1 - c) against 1 - c. Rows given another label add
    about as much either way, the spread (1 - c) / (K - 1) being small.
    """
    given = np.asarray(given)
    confidence = np.asarray(confidence, dtype=float)
    elsewhere = (1.0 - confidence) / max(n_labels - 1, 1)
    return np.where(given == label, confidence, np.where(given < 0, 1.0 / n_labels, elsewhere))


@dataclass(frozen=True)
class Prevalence:
    """Each label's share of the corpus: PPI++ estimate and interval, gold-only interval, raw share."""

    labels: tuple[str, ...]
    estimate: FloatArray
    low: FloatArray
    high: FloatArray
    gold_low: FloatArray
    gold_high: FloatArray
    raw_share: FloatArray  # share of rows whose y_hat is the label (a reviewed row: its reviewer's label)
    level: float  # joint: all K intervals hold at once with this probability
    n_labelled: int
    n_model: int  # corpus rows the model labelled
    n_known: int  # corpus rows a reviewer labelled, counted as they are
    weighted: bool = False  # the user samples were weighted by label shift (a stratified split)

    def as_dict(self) -> dict[str, Any]:
        """metrics.json's ``prevalence``: labels ordered by estimate, largest first."""
        order = np.argsort(-self.estimate, kind="stable")
        labels = {
            self.labels[k]: {
                "estimate": float(self.estimate[k]),
                "low": float(self.low[k]),
                "high": float(self.high[k]),
                "gold_only": {"low": float(self.gold_low[k]), "high": float(self.gold_high[k])},
                "raw_share": float(self.raw_share[k]),
            }
            for k in order
        }
        return {
            "confidence_level": self.level,
            "joint_over_labels": "bonferroni",
            "n_user_samples": self.n_labelled,
            "n_model_rows": self.n_model,
            "n_reviewed_rows": self.n_known,
            "label_shift_weighted": self.weighted,
            "labels": labels,
        }


def estimate_prevalence(
    labels: tuple[str, ...],
    truths: IntArray,
    labelled_given: IntArray,
    labelled_confidence: FloatArray,
    corpus_given: IntArray,
    corpus_confidence: FloatArray,
    known: IntArray,
    level: float = DEFAULT_LEVEL,
    weights: FloatArray | None = None,
) -> Prevalence:
    """Each label's share of the corpus, its PPI++ interval and the gold-only one, all K at ``level`` jointly.

    ``truths``, ``labelled_given``, ``labelled_confidence``: per labelled user sample, its truth and the
    label (-1: none) and confidence it was given held out. ``corpus_given``, ``corpus_confidence``: the
    same for the corpus rows the model labelled. ``known``: the label of each row a reviewer labelled.
    ``weights``: per labelled user sample, its label-shift weight p_pool(y) / p_split(y) (module
    docstring); None or all equal: unweighted, exactly as without.

    Joint over labels by Bonferroni: each interval at 1 - (1 - level) / K, so by the union bound the
    chance that any of the K misses is at most 1 - level whatever their dependence (the shares are
    dependent: they sum to one). A reader looks at all the labels at once, the top ones first, which
    is a selection that per-label intervals would not survive.

    Reviewed rows are known: the share is (N_model * PPI share of the model's rows + that label's
    count among the reviewed rows) / N, and the interval the model rows' scaled the same way. That is
    valid as is when nothing was reviewed, the default. After a review it assumes the model's rows are
    still exchangeable with the user split, which a review bends: it took the least confident rows, so
    the split's correction, learnt on all kinds of rows, is applied to the surer rest; the bias is at most
    the reviewed share times the gap in f's error between reviewed and other rows. Dropping the reviews
    instead would need the model's labels the review overwrote.

    Intervals (and estimates) are clipped to [0, 1], where every share lies: no coverage is lost.
    """
    ppi = _ppi()
    n_labels = len(labels)
    truths = np.asarray(truths)
    known = np.asarray(known, dtype=np.int64)
    corpus_given = np.asarray(corpus_given)
    n, n_model, n_known = len(truths), len(corpus_given), len(known)
    if n < 2:
        raise ValueError(f"corpus-level estimates need at least 2 held-out user samples, got {n}")
    w = _label_shift_weights(weights, n)
    alpha = (1.0 - level) / n_labels
    total = n_model + n_known
    model_weight = n_model / total if total else 0.0
    known_share = np.bincount(known, minlength=n_labels) / total if total else np.zeros(n_labels)
    estimate, low, high = np.empty(n_labels), np.empty(n_labels), np.empty(n_labels)
    gold_low, gold_high = np.empty(n_labels), np.empty(n_labels)
    for k in range(n_labels):
        y = (truths == k).astype(float)
        gold_low[k], gold_high[k] = ppi.classical_mean_ci(y, w=w, alpha=alpha)
        if n_model == 0:  # every row was reviewed: the shares are known
            estimate[k] = low[k] = high[k] = 0.0
            continue
        f = label_predictions(labelled_given, labelled_confidence, k, n_labels)
        f_corpus = label_predictions(corpus_given, corpus_confidence, k, n_labels)
        # one label at a time (d = 1): lam tuned for each label's own variance, as ppi_py's
        # lam_optim_mode="element" does for all at once, without a rows x labels matrix of the corpus
        lo, hi = ppi.ppi_mean_ci(y, f, f_corpus, alpha=alpha, w=w)
        lo, hi = float(np.squeeze(lo)), float(np.squeeze(hi))
        if not (np.isfinite(lo) and np.isfinite(hi)):  # f constant on every row: lam is 0/0, no prediction helps
            lo, hi = float(gold_low[k]), float(gold_high[k])
        estimate[k], low[k], high[k] = (lo + hi) / 2, lo, hi  # the z interval is centred on ppi_py's estimate
    estimate = model_weight * estimate + known_share
    low, high = model_weight * low + known_share, model_weight * high + known_share
    raw = np.bincount(corpus_given[corpus_given >= 0], minlength=n_labels) / total if total else np.zeros(n_labels)
    return Prevalence(
        labels=tuple(labels),
        estimate=np.clip(estimate, 0, 1),
        low=np.clip(low, 0, 1),
        high=np.clip(high, 0, 1),
        gold_low=np.clip(gold_low, 0, 1),
        gold_high=np.clip(gold_high, 0, 1),
        raw_share=raw + known_share,
        level=level,
        n_labelled=n,
        n_model=n_model,
        n_known=n_known,
        weighted=w is not None,
    )
