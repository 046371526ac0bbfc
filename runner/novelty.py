"""Rows unlike the user split: conformal novelty p-values on sentence embeddings and on character n-grams.

The acceptance bound and the candidate sets hold for rows exchangeable with the user split; junk
(a spreadsheet formula, a URL), another language or another domain is not, and the calibrated
confidence says nothing about it (a probe extrapolates: a far row can score 0.96). Such rows are
flagged (``ood``) and sent to review whatever their confidence.

The score of a row is the cosine distance to its ``neighbours``-th nearest user sample (the
k-NN distance of Sun et al., 2022, on unit vectors). Each user sample is scored likewise
against the others (leave-one-out). A row's p-value is ``(1 + #{user samples scoring >= it}) /
(n + 1)``.

Why that is valid: take the n user samples and one row exchangeable with them. Scoring each of
the n + 1 against the other n gives the full-conformal p-value, which is at most ``t`` with
probability at most ``t`` for any t. The row's score is the same here; a user sample's leave-one-out
score lacks the row among its neighbours, so it can only be larger (a k-th nearest distance
does not grow when a point is added). The p-value here is therefore at least the full-conformal
one. The argument needs the map from text to vector to be fixed beforehand, not fitted on the
user split: the sentence model is, and so is the lexical one (hashed character n-grams).

Two such p-values are read per row, because each space misses what the other sees:

- the embedding's (all-MiniLM-L6-v2): another domain or language. It misses junk where the user
  split is spread out: MASSIVE's short, varied utterances sit as far from each other as
  ``=HYPERLINK("http://x")`` sits from them, so 0% of formulas, URLs and numbers were flagged there;
- the lexical one (``lexical``): the set of character 2- to 4-grams within words, hashed, binary,
  L2-normalised, so cosine similarity is the overlap of two texts' n-gram sets. Formulas, URLs,
  random strings and numbers share few n-grams with any utterance: ~100% of junk is flagged on
  MASSIVE, Banking77 and CLINC150 alike (tests/bench/README.md).

A row is flagged when either p-value is at most ``level / 2`` (Bonferroni): for an exchangeable
row, P(p_embed <= level/2 or p_lex <= level/2) <= level/2 + level/2 = level, whatever the two
p-values' dependence (they are strongly dependent: both rank distances to the same samples).
Equivalently the row's combined p-value ``min(1, 2 min(p_embed, p_lex))`` is at most ``level``.
The smallest p-value is 1 / (n + 1): with both checks a level below 2 / (n + 1) flags nothing
(n >= 199 user samples at the default 0.01), with the embedding's alone below 1 / (n + 1).

Why hashing rather than TF-IDF fitted on the user split: a fitted vocabulary and IDF make the map
depend on the user samples (each sample's own n-grams are in the vocabulary, a row's unseen ones
are dropped), which the argument above does not cover; and measured on the three datasets,
fitted TF-IDF caught about half the junk on MASSIVE against ~100% for the fixed map (it down-weights
the common n-grams junk lacks).

Pure functions, no I/O: ``fit_novelty`` on the user split's embeddings (and texts, for the lexical
check) gives a small frozen ``Novelty``; ``Novelty.flags`` on a block's embeddings and texts gives
one flag per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer

_BLOCK = 1024  # rows of a similarity matrix at a time: n user samples squared need not fit in memory

# Fixed, not fitted (see the module docstring): the same text always gets the same vector. 2**20
# buckets: a user split's n-grams (a few thousand distinct) collide in well under 1% of pairs.
_NGRAMS = HashingVectorizer(
    analyzer="char_wb", ngram_range=(2, 4), n_features=2**20, alternate_sign=False, binary=True, norm="l2"
)


def char_ngrams(texts: Sequence[str]) -> sparse.csr_matrix:
    """Each text's hashed character 2- to 4-gram set (within words, lowercased), a unit row (empty text: zeros)."""
    return _NGRAMS.transform(list(texts)).astype(np.float32).tocsr()


def _kth_distances(
    vectors: np.ndarray | sparse.csr_matrix, reference: np.ndarray | sparse.csr_matrix, k: int, *, leave_one_out: bool
) -> np.ndarray:
    """Per row of ``vectors``, the cosine distance to its k-th nearest row of ``reference`` (unit rows,
    dense arrays or sparse matrices alike).

    ``leave_one_out``: ``vectors`` is ``reference`` and each row's own entry is left out.
    """
    distances = np.empty(vectors.shape[0])
    for start in range(0, vectors.shape[0], _BLOCK):
        similarities = vectors[start : start + _BLOCK] @ reference.T
        if sparse.issparse(similarities):
            similarities = similarities.toarray()
        if leave_one_out:
            rows = np.arange(len(similarities))
            similarities[rows, start + rows] = -np.inf
        # the k-th largest similarity is the k-th nearest neighbour
        kth = np.partition(similarities, -k, axis=1)[:, -k]
        distances[start : start + _BLOCK] = 1.0 - kth
    return distances


def _p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(1 + #{calibration scores >= score}) / (n + 1), calibration ascending."""
    at_least = len(calibration) - np.searchsorted(calibration, scores, side="left")
    return (1.0 + at_least) / (len(calibration) + 1.0)


def either_p_value(p_embed: np.ndarray, p_lex: np.ndarray) -> np.ndarray:
    """The Bonferroni p-value of two checks read together, ``min(1, 2 min(p_embed, p_lex))`` (module docstring)."""
    return np.minimum(1.0, 2.0 * np.minimum(p_embed, p_lex))


@dataclass(frozen=True)
class LexicalNovelty:
    """The user samples' character n-gram vectors and their own leave-one-out scores."""

    reference: sparse.csr_matrix = field(repr=False)
    calibration: np.ndarray = field(repr=False)  # ascending
    neighbours: int

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """Distance of each text's n-gram set to its k-th nearest user sample's."""
        return _kth_distances(char_ngrams(texts), self.reference, self.neighbours, leave_one_out=False)

    def p_values(self, texts: Sequence[str]) -> np.ndarray:
        return _p_values(self.calibration, self.scores(texts))


@dataclass(frozen=True)
class Novelty:
    """The user split's embeddings and their own leave-one-out scores: what a row's p-value is read from;
    with ``lexical``, the same for character n-grams, and a row is flagged by either (module docstring)."""

    reference: np.ndarray = field(repr=False)  # the user samples' unit embeddings
    calibration: np.ndarray = field(repr=False)  # their leave-one-out scores, ascending
    neighbours: int  # k, as used (at most n - 1)
    level: float
    # None: the embedding's check alone (cm.ood.lexical false, or a fit pickled before the lexical check,
    # which reads back as it was fitted: a dataclass default is the class attribute an old pickle falls back on)
    lexical: LexicalNovelty | None = None

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """Distance of each row's embedding to its k-th nearest user sample's."""
        return _kth_distances(
            np.asarray(vectors, dtype=np.float32), self.reference, self.neighbours, leave_one_out=False
        )

    def p_values(self, vectors: np.ndarray) -> np.ndarray:
        """The embedding's conformal p-values: small for rows farther from the user split than its own
        samples are from each other."""
        return _p_values(self.calibration, self.scores(vectors))

    def combined_p_values(self, vectors: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """The p-value a row is flagged by: the embedding's, or with ``lexical`` the Bonferroni
        ``min(1, 2 min(p_embed, p_lex))``, valid however the two depend on each other."""
        p = self.p_values(vectors)
        if self.lexical is None:
            return p
        if texts is None or len(texts) != len(p):
            raise ValueError("cm.ood's lexical check needs the rows' texts, one per embedding")
        return either_p_value(p, self.lexical.p_values(texts))

    def flags(self, vectors: np.ndarray, texts: Sequence[str] | None = None) -> np.ndarray:
        """True where a row is unlike the user split (its combined p-value at most ``level``)."""
        return self.combined_p_values(vectors, texts) <= self.level


def fit_novelty(user_vectors: np.ndarray, neighbours: int, level: float, texts: Sequence[str] | None = None) -> Novelty:
    """The novelty check fitted on the random user split's unit embeddings (at least two samples); with
    their ``texts``, the lexical check too."""
    reference = np.ascontiguousarray(user_vectors, dtype=np.float32)
    if len(reference) < 2:
        raise ValueError(f"cm.ood needs at least two user samples, got {len(reference)}")
    k = min(neighbours, len(reference) - 1)
    calibration = np.sort(_kth_distances(reference, reference, k, leave_one_out=True))
    lexical = None
    if texts is not None:
        if len(texts) != len(reference):
            raise ValueError(f"{len(texts)} texts for {len(reference)} user embeddings")
        ngrams = char_ngrams(texts)
        lexical = LexicalNovelty(
            reference=ngrams,
            calibration=np.sort(_kth_distances(ngrams, ngrams, k, leave_one_out=True)),
            neighbours=k,
        )
    return Novelty(reference=reference, calibration=calibration, neighbours=k, level=level, lexical=lexical)
