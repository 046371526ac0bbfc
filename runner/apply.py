"""Applying a fitted CM to corpus items: pure functions, no fitting and no I/O.

``neighbourhoods`` turns a chunk's embeddings into what the user split says about each item
before its first answer; ``refine`` turns one item's first answer into a candidate set (and the
label, when no second call is needed); ``score`` is the raw score of the label finally given,
and ``FittedCM.calibration`` maps it to the ``confidence`` column; ``accepted`` says whether a row
is accepted (never one flagged unlike the user split: ``runner.novelty``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runner import posterior as post
from runner.bank import Refinement
from runner.fit import FitDraft, FittedCM, instance_row, paper_candidates


@dataclass(frozen=True)
class Neighbourhood:
    """What the user split says about one item before its first answer."""

    similarities: np.ndarray  # to each user sample
    prior: np.ndarray  # p(Y | X): the neighbour prior, or the probe's
    vote: str  # the neighbour vote, recorded beside the answer whichever prior is used
    ood: bool | None  # unlike the user split (runner.novelty); None: cm.ood is off


@dataclass(frozen=True)
class Refined:
    """A refinement plus the per-label scores the confidence of the final label is read from."""

    refinement: Refinement
    scores: np.ndarray  # per label: posterior probability, or the bank row's share (paper, plain)


def neighbourhoods(
    fitted: FittedCM | FitDraft, vectors: np.ndarray, texts: Sequence[str] | None = None
) -> list[Neighbourhood | None]:
    """One neighbourhood per embedded item (None for variants that do not look at X).

    A draft suffices: the neighbourhood and the probe are chosen before the model is asked anything.
    ``texts``, the items' texts as embedded, are needed by cm.ood's lexical check (``runner.novelty``).
    """
    if not fitted.uses_neighbours:
        return [None] * len(vectors)
    assert fitted.user_vectors is not None
    similarities = vectors @ fitted.user_vectors.T
    vote_priors = post.neighbour_prior(
        similarities, fitted.user_truths, len(fitted.labels), fitted.neighbours, fitted.temperature
    )
    priors = fitted.probe.prior(vectors) if fitted.probe else vote_priors
    votes = [fitted.labels[i] for i in vote_priors.argmax(axis=1)]
    flags = [bool(f) for f in fitted.novelty.flags(vectors, texts)] if fitted.novelty else [None] * len(vectors)
    return [Neighbourhood(*item) for item in zip(similarities, priors, votes, flags, strict=True)]


def refine(fitted: FittedCM, context: Neighbourhood | None, answer: str | None, *, row_id: str) -> Refined:
    """C and perhaps the label for one item; ``answer`` None (the first call was skipped) says nothing.

    The posterior variants' set is randomised by a draw fixed by ``row_id`` (``posterior.row_uniform``),
    so a row gets the same set on every run.
    """
    labels = fitted.labels
    if fitted.variant in ("plain", "paper"):
        if answer is None:
            raise ValueError(f"{fitted.variant}: needs a first answer; none was given")
        # a label's row, a free-text answer's row beyond the labels, or none (a free-text answer never seen)
        rows = {answer: i for i, answer in enumerate((*labels, *fitted.free_text))}
        index = rows.get(answer)
        row = fitted.counts[index] if index is not None else np.zeros(len(labels))
        total = row.sum()
        shares = row / total if total > 0 else np.zeros(len(labels))
        is_label = index is not None and index < len(labels)
        if fitted.variant == "plain":
            kept = (answer,) if is_label else ()
            return Refined(Refinement(kept, answer if is_label else None, needs_second_call=False), shares)
        chosen = tuple(labels[i] for i in paper_candidates(fitted.counts, index, fitted.cm.empty_row))
        if total == 0:  # keep_initial keeps a label; a free-text answer names none to keep
            decided = answer if fitted.cm.empty_row == "keep_initial" and is_label else None
            return Refined(Refinement(chosen, decided, needs_second_call=False, fallback="empty_row"), shares)
        return Refined(Refinement(chosen, chosen[0] if len(chosen) == 1 else None, len(chosen) > 1), shares)
    prior = fitted.class_prior if context is None else context.prior
    if answer is None or answer not in labels:  # skipped, or a free-text answer: p(Y'|Y) is over labels
        row = np.ones(len(labels))
    elif fitted.variant == "instance":
        assert context is not None
        row = instance_row(
            fitted.cm,
            context.similarities,
            fitted.user_answers,
            fitted.user_truths,
            labels.index(answer),
            fitted.counts,
        )
    else:
        row = fitted.class_likelihood[labels.index(answer)]
    probabilities = post.posterior(row**fitted.weight, prior)
    chosen = tuple(labels[i] for i in post.mass_candidates(probabilities, fitted.tau, post.row_uniform(row_id)))
    vote = None if context is None else context.vote
    if len(chosen) == 1 or not fitted.asks_second_call:
        return Refined(Refinement(chosen, chosen[0], needs_second_call=False, neighbour_vote=vote), probabilities)
    return Refined(Refinement(chosen, None, needs_second_call=True, neighbour_vote=vote), probabilities)


def score(fitted: FittedCM, refined: Refined, label: str | None) -> float:
    """The raw score of the label given (0 for none): what the confidence is calibrated from."""
    if label is None:
        return 0.0
    return float(refined.scores[fitted.labels.index(label)])


def confidence(fitted: FittedCM, raw: float) -> float:
    return float(fitted.calibration.apply(np.array([raw]))[0])


def accepted(fitted: FittedCM, value: float, label: str | None, ood: bool | None = None) -> bool:
    """Whether a row is accepted: a label whose confidence reaches the threshold, on a row not unlike the user split.

    A row flagged ``ood`` goes to review whatever its confidence: the bound behind the threshold
    holds for rows exchangeable with the user split, which it is not.
    """
    threshold = fitted.acceptance.threshold if fitted.acceptance is not None else None
    return label is not None and threshold is not None and value >= threshold and not ood
