"""From a first answer Y' to a refined candidate set C (and, sometimes, the final answer).

One refiner per ``cm.variant``. ``prepare`` sees a chunk's texts once (to embed them, where a
variant needs neighbours); ``refine`` then decides one item from its context and its Y'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from runner import posterior as post
from runner.bank import EmptyRowPolicy, MemoryBank, Refinement, refine
from runner.spec import CMSpec

WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)

Embedder = Callable[[Sequence[str]], np.ndarray]
"""Texts -> one L2-normalised vector per text (rows), so a dot product is a cosine similarity."""


class Refiner(Protocol):
    def prepare(self, texts: Sequence[str]) -> Sequence[Any]: ...

    def refine(self, context: Any, answer: str) -> Refinement: ...


class PaperRefiner:
    """The paper: C = row Y' of the binary, class-level M; an empty row falls back by policy."""

    def __init__(self, bank: MemoryBank, empty_row: EmptyRowPolicy = "keep_initial"):
        self.rows = bank.rows()
        self.empty_row = empty_row

    def prepare(self, texts: Sequence[str]) -> Sequence[None]:
        return [None] * len(texts)

    def refine(self, context: None, answer: str) -> Refinement:
        return refine(self.rows[answer], answer, self.empty_row)


class PosteriorRefiner:
    """C = the smallest label set whose posterior p(Y | Y', X) mass reaches tau.

    ``tau`` is fixed in the spec or calibrated on the user split: each user sample's posterior
    is computed without that sample (leave-one-out), and tau is the smallest threshold whose
    candidate sets hold the truth for ``cm.coverage`` of them.
    """

    def __init__(self, bank: MemoryBank, cm: CMSpec, embed: Embedder | None = None):
        self.cm = cm
        self.labels = list(bank.labels)
        index = {label: i for i, label in enumerate(self.labels)}
        self.n_labels = len(self.labels)
        self.counts = np.zeros((self.n_labels, self.n_labels))
        for entry in bank.confusions:
            self.counts[index[entry.answer], index[entry.truth]] = entry.count
        self.class_likelihood = post.likelihood(self.counts, cm.alpha)
        self.class_prior = post.class_prior(self.counts)
        self.uses_neighbours = cm.variant in ("neighbour_prior", "instance")
        self.embed = embed
        samples = bank.samples or []
        self.user_answers = np.array([index[s.answer] if s.answer else -1 for s in samples], dtype=np.int64)
        self.user_truths = np.array([index[s.truth] for s in samples], dtype=np.int64)
        if self.uses_neighbours:
            if not bank.samples:
                raise ValueError(f"cm.variant {cm.variant!r} needs a bank with its user samples (re-estimate it)")
            if embed is None:
                raise ValueError(f"cm.variant {cm.variant!r} needs an embedding model")
            self.user_vectors = embed([s.text for s in bank.samples])
        self.weight = 1.0 if cm.likelihood_weight is None else cm.likelihood_weight
        needs_held_out = cm.tau is None or cm.likelihood_weight is None
        held_out = self._held_out(bank) if needs_held_out else None
        if cm.likelihood_weight is None and held_out is not None:
            self.weight = self._best_weight(held_out)
        self.tau = cm.tau if cm.tau is not None else self._calibrate(held_out)

    def _posterior(
        self, answer: int, sims: np.ndarray | None, exclude: int | None = None, weight: float | None = None
    ) -> np.ndarray:
        weight = self.weight if weight is None else weight
        counts = self.counts
        if exclude is not None:  # leave the sample's own pair out of the counts
            counts = counts.copy()
            counts[self.user_answers[exclude], self.user_truths[exclude]] -= 1
        if self.cm.variant == "counts":
            row = (
                post.likelihood(counts, self.cm.alpha)[answer] if exclude is not None else self.class_likelihood[answer]
            )
            return post.posterior(row**weight, post.class_prior(counts) if exclude is not None else self.class_prior)
        assert sims is not None
        prior = post.neighbour_prior(sims, self.user_truths, self.n_labels, self.cm.neighbours, exclude=exclude)
        if self.cm.variant == "neighbour_prior":
            row = (
                post.likelihood(counts, self.cm.alpha)[answer] if exclude is not None else self.class_likelihood[answer]
            )
        else:
            row = post.instance_likelihood(
                sims,
                self.user_answers,
                self.user_truths,
                counts,
                k=self.cm.instance_neighbours,
                alpha=self.cm.alpha,
                blend=self.cm.blend,
                exclude=exclude,
            )[answer]
        return post.posterior(row**weight, prior)

    def _held_out(self, bank: MemoryBank) -> list[tuple[int, np.ndarray | None, int]]:
        """(answer, similarities, index) for each parsed user sample, to score it with itself left out."""
        if not bank.samples:
            raise ValueError("calibrating cm.tau or cm.likelihood_weight needs the bank's user samples; set both")
        similarities = self.user_vectors @ self.user_vectors.T if self.uses_neighbours else None
        return [
            (int(a), similarities[i] if similarities is not None else None, i)
            for i, a in enumerate(self.user_answers)
            if a >= 0
        ]

    def _best_weight(self, held_out: list[tuple[int, np.ndarray | None, int]]) -> float:
        """The likelihood weight whose leave-one-out argmax is most often right (ties: the smaller weight)."""
        scores = {}
        for weight in WEIGHT_GRID:
            hits = [
                self._posterior(a, sims, exclude=i, weight=weight).argmax() == self.user_truths[i]
                for a, sims, i in held_out
            ]
            scores[weight] = float(np.mean(hits)) if hits else 0.0
        return max(WEIGHT_GRID, key=lambda weight: (scores[weight], -weight))

    def _calibrate(self, held_out: list[tuple[int, np.ndarray | None, int]] | None) -> float:
        if not held_out:
            return 1.0
        rows = np.array([self._posterior(a, sims, exclude=i) for a, sims, i in held_out])
        truths = np.array([self.user_truths[i] for _, _, i in held_out])
        return post.calibrate_tau(rows, truths, self.cm.coverage)

    def prepare(self, texts: Sequence[str]) -> Sequence[np.ndarray | None]:
        if not self.uses_neighbours:
            return [None] * len(texts)
        assert self.embed is not None
        return list(self.embed(texts) @ self.user_vectors.T)

    def refine(self, context: np.ndarray | None, answer: str) -> Refinement:
        probabilities = self._posterior(self.labels.index(answer), context)
        chosen = tuple(self.labels[i] for i in post.mass_candidates(probabilities, self.tau))
        vote = None
        if context is not None:
            prior = post.neighbour_prior(context, self.user_truths, self.n_labels, self.cm.neighbours)
            vote = self.labels[int(prior.argmax())]
        if len(chosen) == 1 or self.cm.second_call == "never":
            return Refinement(chosen, chosen[0], needs_second_call=False, neighbour_vote=vote)
        return Refinement(chosen, None, needs_second_call=True, neighbour_vote=vote)


def make_refiner(bank: MemoryBank, cm: CMSpec, embed: Embedder | None = None) -> Refiner:
    if cm.variant == "paper":
        return PaperRefiner(bank, cm.empty_row)
    return PosteriorRefiner(bank, cm, embed)
