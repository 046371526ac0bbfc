"""From a first answer Y' to a refined candidate set C (and, sometimes, the final answer).

One refiner per ``cm.variant``. ``prepare`` sees a chunk's texts once (to embed them, where a
variant needs neighbours); ``refine`` then decides one item from its context and its Y'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from runner import posterior as post
from runner.bank import EmptyRowPolicy, MemoryBank, Refinement, refine
from runner.probe import Probe, fit_probe
from runner.spec import CMSpec

# What the user split chooses among when the spec leaves a setting unset (see PosteriorRefiner).
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
NEIGHBOUR_GRID = (1, 3, 5, 10, 20)
TEMPERATURE_GRID = (0.01, 0.02, 0.05, 0.1, 1.0)

Embedder = Callable[[Sequence[str]], np.ndarray]
"""Texts -> one L2-normalised vector per text (rows), so a dot product is a cosine similarity."""


@dataclass(frozen=True)
class TrialItem:
    """A user sample whose held-out candidate set is ambiguous: what a second call would choose among."""

    sample: int  # index into the bank's samples
    candidates: tuple[str, ...]
    most_probable: str  # the answer without a second call


class Refiner(Protocol):
    needs_answer: bool
    """False when the first answer Y' cannot change the result: the job then skips that call."""

    trial: Sequence[TrialItem]
    """With ``cm.second_call: auto``: the user samples to ask among their sets before annotating."""

    def decide_second_calls(self, choices: Sequence[str | None]) -> None:
        """Given the model's choice for each trial item, whether the corpus gets second calls."""
        ...

    @property
    def settings(self) -> dict[str, Any]:
        """The settings in use, those the user split chose included: reported in metrics.json."""
        ...

    def prepare(self, texts: Sequence[str]) -> Sequence[Any]: ...

    def refine(self, context: Any, answer: str | None) -> Refinement: ...


@dataclass(frozen=True)
class Neighbourhood:
    """What the user split says about one item before its first answer."""

    similarities: np.ndarray  # to each user sample
    prior: np.ndarray  # p(Y | X): the neighbour prior, or the probe's
    vote: str  # the neighbour vote, recorded beside the answer whichever prior is used


class PaperRefiner:
    """The paper: C = row Y' of the binary, class-level M; an empty row falls back by policy."""

    needs_answer = True
    trial: Sequence[TrialItem] = ()

    def __init__(self, bank: MemoryBank, empty_row: EmptyRowPolicy = "keep_initial"):
        self.rows = bank.rows()
        self.empty_row = empty_row

    @property
    def settings(self) -> dict[str, Any]:
        return {"variant": "paper", "empty_row": self.empty_row}

    def decide_second_calls(self, choices: Sequence[str | None]) -> None:
        pass  # the paper always asks again among an ambiguous row

    def prepare(self, texts: Sequence[str]) -> Sequence[None]:
        return [None] * len(texts)

    def refine(self, context: None, answer: str | None) -> Refinement:
        if answer is None:
            raise ValueError("the paper's CM refines a first answer; none was given")
        return refine(self.rows[answer], answer, self.empty_row)


class PosteriorRefiner:
    """C = the smallest label set whose posterior p(Y | Y', X) ∝ p(Y' | Y, X)^w p(Y | X) mass reaches tau.

    p(Y | X) is the neighbour prior, or with ``cm.prior: probe`` a logistic regression on the user
    samples' embeddings (``runner.probe``). What the spec leaves unset is chosen on the user
    split, each sample scored with itself left out (leave-one-out; the probe's held-out
    probabilities come from 5-fold cross-validation), in this order:

    1. the neighbour prior's k and temperature: the pair whose vote alone is most often right;
    2. the likelihood weight w: the one whose posterior argmax is most often right, kept only if
       it beats w = 0 (the prior alone) by more than one standard error; so a model whose
       answers add nothing gets w = 0, the neighbour vote;
    3. tau: the smallest mass threshold whose candidate sets hold the truth for ``cm.coverage``
       of the samples (posteriors from small counts are rarely calibrated);
    4. with ``cm.second_call: auto``, whether to ask again: the job asks the model among the
       held-out sets that hold several labels (``trial``), and second calls are made only if its
       choices beat the posterior's most probable label by more than one standard error.
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
        samples = bank.samples or []
        self.user_answers = np.array([index[s.answer] if s.answer else -1 for s in samples], dtype=np.int64)
        self.user_truths = np.array([index[s.truth] for s in samples], dtype=np.int64)
        if self.uses_neighbours:
            if not bank.samples:
                raise ValueError(f"cm.variant {cm.variant!r} needs a bank with its user samples (re-estimate it)")
            if embed is None:
                raise ValueError(f"cm.variant {cm.variant!r} needs an embedding model")
            self.user_vectors = embed([s.text for s in bank.samples])
        self.embed = embed
        self.probe: Probe | None = None
        if self.uses_neighbours and cm.prior == "probe":
            self.probe = fit_probe(self.user_vectors, self.user_truths, self.n_labels)
        self.neighbours = cm.neighbours or NEIGHBOUR_GRID[0]
        self.temperature = cm.neighbour_temperature or TEMPERATURE_GRID[0]
        self.weight = 1.0 if cm.likelihood_weight is None else cm.likelihood_weight
        self.tau = 1.0 if cm.tau is None else cm.tau
        # None until the trial decides (cm.second_call: auto)
        self.asks_second_call: bool | None = {"when_ambiguous": True, "never": False}.get(cm.second_call)
        self.trial: list[TrialItem] = []
        self.trial_outcome: dict[str, int] | None = None
        settings = (cm.tau, cm.likelihood_weight)
        settings += (cm.neighbours, cm.neighbour_temperature) if self.uses_neighbours else ()
        if any(setting is None for setting in settings) or self.asks_second_call is None:
            if not bank.samples:
                raise ValueError(
                    "choosing cm.tau, cm.likelihood_weight or cm.second_call needs the bank's user samples; set them"
                )
            self._choose_on_user_split()
        self.needs_answer = cm.first_call == "always" or self.weight > 0

    def _choose_on_user_split(self) -> None:
        cm = self.cm
        # held out: the user samples whose answer parsed, each seen without itself
        held = np.flatnonzero(self.user_answers >= 0)
        similarities = None
        if self.uses_neighbours:
            similarities = self.user_vectors[held] @ self.user_vectors.T
            similarities[np.arange(len(held)), held] = -np.inf
            self.neighbours, self.temperature = post.choose_neighbourhood(
                similarities,
                self.user_truths[held],
                self.user_truths,
                self.n_labels,
                (cm.neighbours,) if cm.neighbours else NEIGHBOUR_GRID,
                (cm.neighbour_temperature,) if cm.neighbour_temperature else TEMPERATURE_GRID,
            )
            priors = self.probe.held_out[held] if self.probe else self._neighbour_prior(similarities)
        else:
            priors = post.held_out_class_priors(self.counts, self.user_truths[held])
        likelihood_rows = self._held_out_likelihood_rows(held, similarities)
        truths = self.user_truths[held]
        if cm.likelihood_weight is None:
            self.weight = _earned_weight(likelihood_rows, priors, truths)
        held_out = post.posteriors(likelihood_rows, priors, self.weight)
        if cm.tau is None:
            self.tau = post.calibrate_tau(held_out, truths, cm.coverage) if len(held) else 1.0
        if self.asks_second_call is None:
            for sample, probabilities in zip(held, held_out, strict=True):
                chosen = [self.labels[i] for i in post.mass_candidates(probabilities, self.tau)]
                if len(chosen) > 1:
                    self.trial.append(TrialItem(int(sample), tuple(chosen), chosen[0]))

    def decide_second_calls(self, choices: Sequence[str | None]) -> None:
        """Second calls pay if the model's choices beat the most probable labels clearly (``_clearly_better``).

        No trial item (no ambiguous held-out set) means no second call either.
        """
        if self.asks_second_call is not None:
            return
        truths = [self.labels[self.user_truths[item.sample]] for item in self.trial]
        chosen_right = np.array([c == t for c, t in zip(choices, truths, strict=True)], dtype=bool)
        most_probable_right = np.array(
            [item.most_probable == t for item, t in zip(self.trial, truths, strict=True)], dtype=bool
        )
        self.asks_second_call, wins, losses = _clearly_better(chosen_right, most_probable_right)
        self.trial_outcome = {"asked": len(self.trial), "wins": wins, "losses": losses}

    @property
    def settings(self) -> dict[str, Any]:
        chosen: dict[str, Any] = {"variant": self.cm.variant, "likelihood_weight": self.weight, "tau": self.tau}
        chosen["second_call"] = {True: "when_ambiguous", False: "never", None: "auto"}[self.asks_second_call]
        if self.trial_outcome is not None:
            chosen["second_call_trial"] = self.trial_outcome
        if self.uses_neighbours:
            chosen |= {"prior": self.cm.prior, "neighbours": self.neighbours, "neighbour_temperature": self.temperature}
        if self.probe is not None:
            chosen["probe_strength"] = self.probe.strength
        return chosen

    def _neighbour_prior(self, similarities: np.ndarray) -> np.ndarray:
        return post.neighbour_prior(similarities, self.user_truths, self.n_labels, self.neighbours, self.temperature)

    def _instance_row(self, similarities: np.ndarray, answer: int, counts: np.ndarray) -> np.ndarray:
        return post.instance_likelihood(
            similarities,
            self.user_answers,
            self.user_truths,
            counts,
            k=self.cm.instance_neighbours,
            alpha=self.cm.alpha,
            blend=self.cm.blend,
        )[answer]

    def _held_out_likelihood_rows(self, held: np.ndarray, similarities: np.ndarray | None) -> np.ndarray:
        """Row Y' of each held-out sample's likelihood, estimated without that sample's own pair."""
        answers, truths = self.user_answers[held], self.user_truths[held]
        if self.cm.variant != "instance":
            return post.held_out_likelihood_rows(self.counts, answers, truths, self.cm.alpha)
        assert similarities is not None
        rows = []
        for row_similarities, answer, truth in zip(similarities, answers, truths, strict=True):
            counts = self.counts.copy()
            counts[answer, truth] -= 1
            rows.append(self._instance_row(row_similarities, answer, counts))
        return np.array(rows)

    def prepare(self, texts: Sequence[str]) -> Sequence[Neighbourhood | None]:
        if not self.uses_neighbours:
            return [None] * len(texts)
        assert self.embed is not None
        vectors = self.embed(texts)
        similarities = vectors @ self.user_vectors.T
        neighbour_priors = self._neighbour_prior(similarities)
        priors = self.probe.prior(vectors) if self.probe else neighbour_priors
        votes = [self.labels[i] for i in neighbour_priors.argmax(axis=1)]
        return [Neighbourhood(*item) for item in zip(similarities, priors, votes, strict=True)]

    def refine(self, context: Neighbourhood | None, answer: str | None) -> Refinement:
        """C and perhaps the answer for one item; ``answer`` None (the call was skipped) says nothing."""
        prior = self.class_prior if context is None else context.prior
        if answer is None:
            row = np.ones(self.n_labels)
        elif self.cm.variant == "instance":
            assert context is not None
            row = self._instance_row(context.similarities, self.labels.index(answer), self.counts)
        else:
            row = self.class_likelihood[self.labels.index(answer)]
        probabilities = post.posterior(row**self.weight, prior)
        chosen = tuple(self.labels[i] for i in post.mass_candidates(probabilities, self.tau))
        vote = None if context is None else context.vote
        if self.asks_second_call is None:
            raise RuntimeError("cm.second_call: auto is decided by decide_second_calls before items are refined")
        if len(chosen) == 1 or not self.asks_second_call:
            return Refinement(chosen, chosen[0], needs_second_call=False, neighbour_vote=vote)
        return Refinement(chosen, None, needs_second_call=True, neighbour_vote=vote)


def _earned_weight(likelihood_rows: np.ndarray, priors: np.ndarray, truths: np.ndarray) -> float:
    """The likelihood weight with the best held-out accuracy, if the model's answer earns it.

    Against the prior alone (w = 0) a weight wins the samples it gets right and the prior gets
    wrong, and loses the reverse. It is kept only when wins exceed losses by more than one
    standard error, sqrt(wins + losses): on a few hundred samples a gain of two or three is
    noise, and a noisy weight costs accuracy on new items more often than it pays.
    """
    best = max(WEIGHT_GRID, key=lambda w: (post.accuracy(post.posteriors(likelihood_rows, priors, w), truths), -w))
    if best == 0:
        return 0.0
    with_answer = post.posteriors(likelihood_rows, priors, best).argmax(axis=1) == truths
    earned, _, _ = _clearly_better(with_answer, priors.argmax(axis=1) == truths)
    return best if earned else 0.0


def _clearly_better(right: np.ndarray, baseline_right: np.ndarray) -> tuple[bool, int, int]:
    """Whether ``right`` beats ``baseline_right`` on the same samples by more than one standard error.

    A win is a sample right where the baseline is wrong, a loss the reverse; sqrt(wins + losses)
    is the noise on their difference. Returns the verdict, the wins and the losses.
    """
    wins, losses = int(np.sum(right & ~baseline_right)), int(np.sum(~right & baseline_right))
    return bool(wins - losses > np.sqrt(wins + losses)), wins, losses


def make_refiner(bank: MemoryBank, cm: CMSpec, embed: Embedder | None = None) -> Refiner:
    if cm.variant == "paper":
        return PaperRefiner(bank, cm.empty_row)
    return PosteriorRefiner(bank, cm, embed)
