"""Rows unlike the user split: a conformal novelty p-value on sentence embeddings.

The acceptance bound and the candidate sets hold for rows exchangeable with the user split; junk
(a spreadsheet formula, a URL), another language or another domain is not, and the calibrated
confidence says nothing about it (a probe extrapolates: a far row can score 0.96). Such rows are
flagged (``ood``) and sent to review whatever their confidence.

The score of a row is the cosine distance to its ``neighbours``-th nearest user sample (the
k-NN distance of Sun et al., 2022, on unit embeddings). Each user sample is scored likewise
against the others (leave-one-out). A row's p-value is ``(1 + #{user samples scoring >= it}) /
(n + 1)``, and it is flagged when the p-value is at most ``level``.

Why that is valid: take the n user samples and one row exchangeable with them. Scoring each of
the n + 1 against the other n gives the full-conformal p-value, which is at most ``level`` with
probability at most ``level``. The row's score is the same here; a user sample's leave-one-out
score lacks the row among its neighbours, so it can only be larger (a k-th nearest distance
does not grow when a point is added). The p-value here is therefore at least the full-conformal
one, and a row from the user split's distribution is flagged at most ``level`` of the time. The
smallest p-value is 1 / (n + 1): a level below it flags nothing.

Pure functions, no I/O: ``fit_novelty`` on the user split's embeddings gives a small frozen
``Novelty``; ``Novelty.flags`` on a block's embeddings gives one flag per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_BLOCK = 1024  # rows of a similarity matrix at a time: n user samples squared need not fit in memory


def _kth_distances(vectors: np.ndarray, reference: np.ndarray, k: int, *, leave_one_out: bool) -> np.ndarray:
    """Per row of ``vectors``, the cosine distance to its k-th nearest row of ``reference`` (unit rows).

    ``leave_one_out``: ``vectors`` is ``reference`` and each row's own entry is left out.
    """
    distances = np.empty(len(vectors))
    for start in range(0, len(vectors), _BLOCK):
        similarities = vectors[start : start + _BLOCK] @ reference.T
        if leave_one_out:
            rows = np.arange(len(similarities))
            similarities[rows, start + rows] = -np.inf
        # the k-th largest similarity is the k-th nearest neighbour
        kth = np.partition(similarities, -k, axis=1)[:, -k]
        distances[start : start + _BLOCK] = 1.0 - kth
    return distances


@dataclass(frozen=True)
class Novelty:
    """The user split's embeddings and their own leave-one-out scores: what a row's p-value is read from."""

    reference: np.ndarray = field(repr=False)  # the user samples' unit embeddings
    calibration: np.ndarray = field(repr=False)  # their leave-one-out scores, ascending
    neighbours: int  # k, as used (at most n - 1)
    level: float

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """Distance of each row to its k-th nearest user sample."""
        return _kth_distances(
            np.asarray(vectors, dtype=np.float32), self.reference, self.neighbours, leave_one_out=False
        )

    def p_values(self, vectors: np.ndarray) -> np.ndarray:
        """Conformal p-values: small for rows farther from the user split than its own samples are from each other."""
        scores = self.scores(vectors)
        at_least = len(self.calibration) - np.searchsorted(self.calibration, scores, side="left")
        return (1.0 + at_least) / (len(self.calibration) + 1.0)

    def flags(self, vectors: np.ndarray) -> np.ndarray:
        """True where a row is unlike the user split (p-value at most ``level``)."""
        return self.p_values(vectors) <= self.level


def fit_novelty(user_vectors: np.ndarray, neighbours: int, level: float) -> Novelty:
    """The novelty check fitted on the random user split's unit embeddings (at least two samples)."""
    reference = np.ascontiguousarray(user_vectors, dtype=np.float32)
    if len(reference) < 2:
        raise ValueError(f"cm.ood needs at least two user samples, got {len(reference)}")
    k = min(neighbours, len(reference) - 1)
    calibration = np.sort(_kth_distances(reference, reference, k, leave_one_out=True))
    return Novelty(reference=reference, calibration=calibration, neighbours=k, level=level)
