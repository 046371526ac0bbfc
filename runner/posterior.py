"""Probabilistic memory banks: the counts the binary M throws away, and priors that know X.

Pure functions over numpy arrays, no I/O. Labels are indices 0..K-1. ``counts[k', k]`` is
how many user samples had answer Y' = k' and truth Y = k (the bank's confusions).

The paper marginalises over Y' with a class-level, binary M. Written as Bayes' rule,

    p(Y = k | Y' = k', X)  ∝  p(Y' = k' | Y = k, X) · p(Y = k | X)

the binary M keeps only whether the likelihood is non-zero and drops the prior. Here:

- ``likelihood``: p(Y' | Y) from counts, Dirichlet-smoothed (class level);
- ``instance_likelihood``: p(Y' | Y, X) from the counts of the user samples nearest to X,
  blended with the class-level counts when few neighbours are close (the paper's M(X));
- ``class_prior`` / ``neighbour_prior``: p(Y) from the user split, or p(Y | X) from the
  labels of X's nearest user samples (closer samples weigh more);
- ``posterior`` combines one likelihood row with one prior; ``mass_candidates`` keeps the most
  probable labels up to a randomised mass tau (``randomised_mass``, one draw per row by
  ``row_uniform``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def count_matrix(answers: Sequence[int], truths: Sequence[int], n_labels: int) -> FloatArray:
    """counts[k', k] from parallel index sequences (an answer of -1, unparsed, is left out)."""
    counts = np.zeros((n_labels, n_labels))
    for answer, truth in zip(answers, truths, strict=True):
        if answer >= 0:
            counts[answer, truth] += 1
    return counts


def likelihood(counts: FloatArray, alpha: float = 0.1) -> FloatArray:
    """p(Y' = k' | Y = k) as L[k', k]: each truth's column of counts plus alpha, normalised over k'."""
    smoothed = counts + alpha
    return smoothed / smoothed.sum(axis=0, keepdims=True)


def class_prior(counts: FloatArray, beta: float = 1.0) -> FloatArray:
    """p(Y = k) from how often each truth occurs on the user split, plus beta."""
    truths = counts.sum(axis=0) + beta
    return truths / truths.sum()


def nearest(similarities: FloatArray, k: int) -> IntArray:
    """Indices of the k most similar user samples, most similar first; a -inf one (left out) never."""
    sims = similarities.astype(float, copy=False)
    k = min(k, int(np.isfinite(sims).sum()))
    top = np.argpartition(-sims, k - 1)[:k] if k else np.array([], dtype=np.int64)
    return top[np.argsort(-sims[top], kind="stable")]


def neighbour_prior(
    similarities: FloatArray,
    user_truths: IntArray,
    n_labels: int,
    k: int = 10,
    temperature: float = 0.05,
    beta: float = 0.05,
) -> FloatArray:
    """p(Y | X) from the labels of X's k nearest user samples, each voting with weight exp(similarity / T).

    A small temperature T trusts the closest sample (T -> 0 is the 1-NN label); a large one counts
    the k votes alike. ``similarities`` is one row per X (a 1-D array is one X); a sample with
    similarity -inf (one left out) never votes. A share ``beta`` of the mass is spread over all
    labels, so a label no neighbour has is unlikely, not impossible, whatever the number of labels.
    """
    rows = np.atleast_2d(similarities)
    k = min(k, rows.shape[1])
    top = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    top_similarities = np.take_along_axis(rows, top, axis=1)
    # relative to the closest sample, so the weights neither overflow nor vanish at small T
    with np.errstate(invalid="ignore"):  # a row whose samples are all left out: -inf - -inf
        weights = np.exp((top_similarities - top_similarities.max(axis=1, keepdims=True)) / temperature)
    weights[~np.isfinite(top_similarities)] = 0.0
    votes = np.zeros((len(rows), n_labels))
    np.add.at(votes, (np.repeat(np.arange(len(rows)), k), user_truths[top].ravel()), weights.ravel())
    priors = smoothed_shares(votes, beta)
    return priors[0] if np.ndim(similarities) == 1 else priors


def smoothed_shares(weights: FloatArray, beta: float) -> FloatArray:
    """Each row's weights as shares of their sum, a share ``beta`` of the mass spread over all labels.

    A row with no weight at all is uniform.
    """
    n_labels = weights.shape[1]
    totals = weights.sum(axis=1, keepdims=True)
    shares = np.divide(weights, totals, out=np.full_like(weights, 1.0 / n_labels), where=totals > 0)
    return (1 - beta) * shares + beta / n_labels


def accuracy(probabilities: FloatArray, truths: IntArray) -> float:
    """How often each row's most probable label is its truth (0 for no rows)."""
    return float(np.mean(probabilities.argmax(axis=1) == truths)) if len(truths) else 0.0


def choose_neighbourhood(
    similarities: FloatArray,
    truths: IntArray,
    user_truths: IntArray,
    n_labels: int,
    neighbours: Sequence[int],
    temperatures: Sequence[float],
) -> tuple[int, float]:
    """The (k, temperature) whose neighbour vote is most often right (first in grid order on ties).

    ``similarities`` has one row per held-out sample, its own entry -inf, and ``truths`` are
    those samples' labels: the choice is made on samples the vote did not see.
    """
    return max(
        ((k, t) for k in neighbours for t in temperatures),
        key=lambda k_and_t: accuracy(neighbour_prior(similarities, user_truths, n_labels, *k_and_t), truths),
    )


def instance_likelihood(
    similarities: FloatArray,
    user_answers: IntArray,
    user_truths: IntArray,
    class_counts: FloatArray,
    k: int = 20,
    alpha: float = 0.1,
    blend: float = 5.0,
) -> FloatArray:
    """p(Y' | Y, X): counts of X's k nearest user samples plus the class-level counts.

    The class-level counts are scaled to a pseudo-count of ``blend`` samples per truth, so a
    truth with several close neighbours is described by them, and one with none falls back
    to how the model errs on that class overall.
    """
    top = nearest(similarities, k)
    weights = np.clip(similarities[top], 0.0, None)
    local = np.zeros_like(class_counts)
    parsed = user_answers[top] >= 0
    np.add.at(local, (user_answers[top][parsed], user_truths[top][parsed]), weights[parsed])
    column_totals = class_counts.sum(axis=0, keepdims=True)
    shrunk = np.divide(class_counts, column_totals, out=np.zeros_like(class_counts), where=column_totals > 0)
    return likelihood(local + blend * shrunk, alpha)


def held_out_likelihood_rows(counts: FloatArray, answers: IntArray, truths: IntArray, alpha: float = 0.1) -> FloatArray:
    """For each user sample i, row answers[i] of ``likelihood`` estimated without sample i's own pair."""
    rows = counts[answers].copy()
    totals = np.tile(counts.sum(axis=0), (len(answers), 1))
    index = np.arange(len(answers))
    rows[index, truths] -= 1
    totals[index, truths] -= 1
    return (rows + alpha) / (totals + len(counts) * alpha)


def held_out_class_priors(counts: FloatArray, truths: IntArray, beta: float = 1.0) -> FloatArray:
    """For each user sample i, ``class_prior`` estimated without sample i."""
    totals = np.tile(counts.sum(axis=0) + beta, (len(truths), 1))
    totals[np.arange(len(truths)), truths] -= 1
    return totals / totals.sum(axis=1, keepdims=True)


def posteriors(likelihood_rows: FloatArray, priors: FloatArray, weight: float = 1.0) -> FloatArray:
    """Row-wise ``posterior`` with the likelihood raised to ``weight`` (w = 0: the prior alone)."""
    joint = likelihood_rows**weight * priors
    return joint / joint.sum(axis=1, keepdims=True)


def posterior(likelihood_row: FloatArray, prior: FloatArray) -> FloatArray:
    """p(Y | Y' = k', X) ∝ p(Y' = k' | Y, X) p(Y | X): one row of a likelihood times a prior."""
    joint = likelihood_row * prior
    total = joint.sum()
    return joint / total if total > 0 else np.full_like(prior, 1.0 / len(prior))


def row_uniform(row_id: str) -> float:
    """A uniform draw in [0, 1) fixed by a row's id: the randomisation of its candidate set.

    A hash, not a generator's state, so a row's set is the same on resume, on re-scoring and in
    any order or chunking of the corpus; over many ids the draws are uniform and independent of the
    rows' texts, which is what the conformal guarantee asks of them.
    """
    digest = hashlib.blake2b(f"cm-runner/candidate-set/{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def randomised_mass(probabilities: FloatArray, u: FloatArray | float) -> FloatArray:
    """Per label, the mass of the labels ranked above it plus ``u`` times its own; 0 for the most probable.

    The randomised adaptive prediction set score (APS; Romano, Sesia & Candes, 2020), with the most
    probable label always kept (score 0), so no set is empty. One draw ``u`` per row (a 1-D row
    takes a scalar). Labels are ranked most probable first, ties in label order.
    """
    rows = np.atleast_2d(probabilities)
    order = np.argsort(-rows, axis=1, kind="stable")
    ranked = np.take_along_axis(rows, order, axis=1)
    ranked_scores = np.cumsum(ranked, axis=1) - ranked + np.reshape(u, (-1, 1)) * ranked
    ranked_scores[:, 0] = 0.0
    scores = np.empty_like(rows)
    np.put_along_axis(scores, order, ranked_scores, axis=1)
    return scores[0] if np.ndim(probabilities) == 1 else scores


def mass_candidates(probabilities: FloatArray, tau: float, u: float) -> IntArray:
    """The labels whose ``randomised_mass`` (with the row's draw ``u``) is at most tau, most probable first.

    Along the ranking the scores only grow, so this is the most probable labels up to one whose mass
    would pass tau, that one kept with the chance of the share of its mass still under tau. Without
    the draw (the whole crossing label kept, as before) sets held the truth far more often than tau
    promised: 97% at a coverage of 0.8 to 0.95 on MASSIVE (tests/bench/README.md).
    """
    order = np.argsort(-probabilities, kind="stable")
    scores = randomised_mass(probabilities, u)[order]
    # a prefix even where rounding makes a later score a hair smaller; tau = 1 keeps every label
    return order[np.logical_and.accumulate(scores <= tau + 1e-12)]
