"""Fitting CM on the user split: everything chosen there, as one frozen object.

Fitting is pure: the bank, the CM settings, the user samples' embeddings (for the neighbour
variants) and the model's choices among held-out candidate sets go in; a ``FittedCM`` comes
out. Applying it to corpus items is ``runner.apply``; reading and writing it is the job's
business (``save_fitted`` / ``load_fitted``, beside the bank, so a rerun never refits).

Each user sample is scored without itself (leave-one-out counts and neighbours; the probe's
5-fold held-out probabilities); only samples of the random split are scored, a bank's corrections
(a review's rows, chosen for low confidence) being part of the bank but not exchangeable with the
corpus. In this order:

1. the neighbour prior's k and temperature: the pair whose vote alone is most often right;
2. the likelihood weight w: the one whose posterior argmax is most often right, kept only if it
   beats w = 0 (the prior alone) by more than one standard error;
3. tau: the conformal quantile of the held-out randomised conformity scores at ``cm.coverage``
   (each sample's draw a hash of its id, as a corpus row's is of its own), each weighted by its
   label's share of the pool over its share of a stratified split (``split_weights``);
4. the questions: the samples whose held-out candidate set holds several labels, which the
   model is asked to choose among, as it would be for a corpus item (``FitDraft.questions``);
5. with ``cm.second_call: auto``, whether second calls pay: the model's choices must beat the
   posterior's most probable label by more than one standard error;
6. the confidence: sigmoid (Platt) calibration of each held-out sample's score (the posterior
   probability of the label CM gives it; for the paper's CM the bank's count share of that
   label in row Y'; without CM the share of Y' among the samples that answered Y');
7. the acceptance threshold (``cm.accept``), ``accept_cascade``: one threshold for every stage of
   the job's cascade (a job without one is one stage), by fixed-sequence testing from the strictest
   down of the Clopper-Pearson lower bound of the held-out samples the cascade accepts (with
   ``cm.accept.per_label``, and of each well-sampled label's, by the label assigned).

With ``cm.ood``, the variants that embed also fit the novelty check on the random split's embeddings
(and, with ``cm.ood.lexical``, its texts' character n-grams: ``runner.novelty``): a corpus row unlike
the user split is then never accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from runner import posterior as post
from runner import trust
from runner.bank import MemoryBank
from runner.novelty import Novelty, fit_novelty
from runner.probe import Probe, fit_probe
from runner.spec import AcceptSpec, CMSpec

# What the user split chooses among when the spec leaves a setting unset.
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
NEIGHBOUR_GRID = (1, 3, 5, 10, 20)
TEMPERATURE_GRID = (0.01, 0.02, 0.05, 0.1, 1.0)

Variant = Literal["plain", "paper", "counts", "neighbour_prior", "instance"]


@dataclass(frozen=True)
class Question:
    """A user sample whose held-out candidate set is ambiguous: what a second call would choose among."""

    sample: int  # index into the bank's samples
    candidates: tuple[str, ...]  # as the second call lists them: most probable first (the paper's row: label order)
    most_probable: str  # the answer without a second call


class _KnownBeforeAsking:
    """What a draft already settles, so a job can start first calls while the model is asked among held-out sets."""

    variant: Variant
    cm: CMSpec
    weight: float

    @property
    def uses_neighbours(self) -> bool:
        return self.variant in ("neighbour_prior", "instance")

    @property
    def needs_answer(self) -> bool:
        """False when the first answer Y' cannot change the result: the job then skips that call."""
        if self.cm.first_call == "never":
            return False
        return self.variant in ("plain", "paper") or self.cm.first_call == "always" or self.weight > 0


@dataclass(frozen=True)
class FittedCM(_KnownBeforeAsking):
    """What the user split chose, frozen: applied to corpus chunks by ``runner.apply``."""

    variant: Variant
    labels: tuple[str, ...]
    cm: CMSpec
    counts: np.ndarray  # counts[k', k]: user samples with answer k' and truth k
    user_answers: np.ndarray  # label index, -1 when unparsed
    user_truths: np.ndarray
    user_vectors: np.ndarray | None  # the neighbour variants' embeddings of the user samples
    probe: Probe | None
    neighbours: int
    temperature: float
    weight: float
    tau: float
    asks_second_call: bool
    trial_outcome: dict[str, int] | None
    calibration: trust.Calibration
    acceptance: trust.Acceptance | None
    held_out_confidence: np.ndarray = field(repr=False)  # per held-out sample, for the risk-coverage plot
    held_out_right: np.ndarray = field(repr=False)
    held_out_ids: tuple[str, ...] = field(default=(), repr=False)  # the user sample of each held-out entry
    # plain and paper: the bank's free-text answers, rows K, K+1, ... of counts (runner.bank.MemoryBank)
    free_text: tuple[str, ...] = ()
    # per held-out sample: the label index CM gave it (-1: none) and its truth, as a corpus row's y_hat and
    # gold would be: the labelled side of the corpus-level estimates (runner.prevalence). None in a fit
    # pickled before they were kept.
    held_out_labels: np.ndarray | None = field(default=None, repr=False)
    held_out_truths: np.ndarray | None = field(default=None, repr=False)
    novelty: Novelty | None = None  # cm.ood, fitted on the random split's embeddings (variants that embed)
    # per held-out sample: its label-shift weight p_pool(y) / p_split(y) (``split_weights``), which makes a
    # stratified split's label shares the pool's in the corpus-level estimates. None in a fit pickled before
    # they were kept: every sample weighs 1, as before (a dataclass default, so such pickles still load).
    held_out_weights: np.ndarray | None = field(default=None, repr=False)

    @property
    def class_likelihood(self) -> np.ndarray:
        return post.likelihood(self.counts, self.cm.alpha)

    @property
    def class_prior(self) -> np.ndarray:
        return post.class_prior(self.counts)

    @property
    def settings(self) -> dict[str, Any]:
        """What the job used, the user split's choices included: reported in metrics.json and the summary."""
        chosen: dict[str, Any] = {"variant": self.variant}
        if self.variant == "paper":
            chosen["empty_row"] = self.cm.empty_row
        elif self.variant != "plain":
            chosen |= {"likelihood_weight": self.weight, "tau": self.tau}
            chosen["second_call"] = "when_ambiguous" if self.asks_second_call else "never"
            if self.trial_outcome is not None:
                chosen["second_call_trial"] = self.trial_outcome
            if self.uses_neighbours:
                chosen |= {"prior": self.cm.prior, "neighbours": self.neighbours}
                chosen["neighbour_temperature"] = self.temperature
            if self.probe is not None:
                chosen["probe_strength"] = self.probe.strength
        return chosen

    @property
    def trust_settings(self) -> dict[str, Any]:
        """The acceptance the user split supports, for metrics.json."""
        acceptance = self.acceptance
        report: dict[str, Any] = {"held_out_samples": len(self.held_out_right)}
        if acceptance is not None:
            report |= {
                "target_accuracy": acceptance.target_accuracy,
                "confidence_level": acceptance.confidence_level,
                "threshold": acceptance.threshold,
                "user_split_accepted_share": acceptance.accepted_share,
                "user_split_accepted_accuracy": acceptance.accuracy,
                "user_split_accepted_lower_bound": acceptance.lower_bound,
                "per_label_min_samples": acceptance.per_label_min_samples,  # null: cm.accept.per_label off
                # the labels whose accepted user samples (by the label CM assigned) fall short, worst first
                "labels_below_target": [
                    {
                        "label": self.labels[entry.label],
                        "accepted": entry.accepted,
                        "accuracy": entry.accuracy,
                        "lower_bound": entry.lower_bound,
                    }
                    for entry in acceptance.below_target()
                ],
            }
        if self.novelty is not None:
            report["ood_level"] = self.novelty.level
        return report


@dataclass(frozen=True)
class FitDraft(_KnownBeforeAsking):
    """Everything fitted before the model is asked among held-out sets (``questions``)."""

    variant: Variant
    labels: tuple[str, ...]
    cm: CMSpec
    counts: np.ndarray
    user_answers: np.ndarray
    user_truths: np.ndarray
    user_vectors: np.ndarray | None
    probe: Probe | None
    neighbours: int
    temperature: float
    weight: float
    tau: float
    held: np.ndarray  # the user samples scored held out (their answer parsed)
    held_ids: tuple[str, ...]  # their ids, for aligning the stages of a cascade
    held_out_sets: tuple[tuple[int, ...], ...]  # per held sample: its candidate labels, most probable first
    held_out_scores: np.ndarray  # per held sample and label: the score a label would get (posterior or share)
    asks_second_call: bool | None  # None: cm.second_call auto, decided by the questions
    questions: tuple[Question, ...]
    free_text: tuple[str, ...] = ()
    novelty: Novelty | None = None
    held_weights: np.ndarray | None = None  # per held sample, split_weights (None: every sample weighs 1)


def _variant(cm: CMSpec) -> Variant:
    return cm.variant if cm.enabled else "plain"


def prepare_fit(bank: MemoryBank, cm: CMSpec, user_vectors: np.ndarray | None = None) -> FitDraft:
    """Steps 1-4 of the module docstring: settings, held-out candidate sets, and what to ask the model."""
    variant = _variant(cm)
    labels = tuple(bank.labels)
    index = {label: i for i, label in enumerate(labels)}
    n_labels = len(labels)
    # Free-text answers are rows of M beyond the labels for the paper's CM; the posterior variants'
    # p(Y'|Y) is over labels, so there they count as unparsed.
    free_text = tuple(bank.free_text_answers) if variant in ("plain", "paper") else ()
    rows_of = index | {answer: n_labels + i for i, answer in enumerate(free_text)}
    counts = np.zeros((n_labels + len(free_text), n_labels))
    for entry in bank.confusions:
        if entry.answer in rows_of:
            counts[rows_of[entry.answer], index[entry.truth]] = entry.count
    samples = bank.samples or []
    answers = np.array([rows_of.get(s.answer, -1) if s.answer else -1 for s in samples], dtype=np.int64)
    truths = np.array([index[s.truth] for s in samples], dtype=np.int64)
    uses_neighbours = variant in ("neighbour_prior", "instance")
    if uses_neighbours:
        if not samples:
            raise ValueError(f"cm.variant {cm.variant!r} needs a bank with its user samples (re-estimate it)")
        if user_vectors is None:
            raise ValueError(f"cm.variant {cm.variant!r} needs the user samples' embeddings")
    probe = fit_probe(user_vectors, truths, n_labels) if uses_neighbours and cm.prior == "probe" else None
    # Held out, and so the ground of every choice below, are the random split's samples only: a review's
    # rows (or any correction) were picked, e.g. for low confidence, and are not exchangeable with the corpus.
    # They stay in the counts, the neighbours and the probe.
    drawn = np.array([s.source == "user_split" for s in samples], dtype=bool)
    asks_nothing = cm.first_call == "never"  # the prior alone: every drawn sample is scored, none answered
    held = np.flatnonzero(((answers >= 0) | asks_nothing) & drawn)
    asks = None if cm.second_call == "auto" else cm.second_call == "when_ambiguous"
    neighbours = cm.neighbours or NEIGHBOUR_GRID[0]
    temperature = cm.neighbour_temperature or TEMPERATURE_GRID[0]
    weight = 0.0 if asks_nothing else 1.0 if cm.likelihood_weight is None else cm.likelihood_weight
    tau = 1.0 if cm.tau is None else cm.tau
    common = dict(variant=variant, labels=labels, cm=cm, counts=counts, user_answers=answers, user_truths=truths)
    common |= dict(free_text=free_text, held_weights=split_weights(bank, truths, drawn)[held])
    common |= dict(user_vectors=user_vectors, probe=probe, held=held, held_ids=tuple(samples[i].id for i in held))
    if uses_neighbours and cm.ood is not None:  # distances among the random split only: they are exchangeable
        assert user_vectors is not None
        texts = [s.text for s, d in zip(samples, drawn, strict=True) if d] if cm.ood.lexical else None
        common["novelty"] = fit_novelty(user_vectors[drawn], cm.ood.neighbours, cm.ood.level, texts)

    if variant in ("plain", "paper"):
        # held-out rows of the bank: counts without the sample's own (answer, truth) pair
        rows = counts[answers[held]].copy()
        rows[np.arange(len(held)), truths[held]] -= 1
        totals = rows.sum(axis=1, keepdims=True)
        scores = np.divide(rows, totals, out=np.zeros_like(rows), where=totals > 0)
        if variant == "plain":  # a free-text answer names no label: no candidate
            sets, asks = tuple((int(a),) if a < n_labels else () for a in answers[held]), False
        else:  # the paper's CM asks again among every ambiguous row
            sets = tuple(_paper_row(row, int(a), cm.empty_row) for row, a in zip(rows, answers[held], strict=True))
            asks = True
    else:
        similarities = None
        if uses_neighbours:
            assert user_vectors is not None
            similarities = user_vectors[held] @ user_vectors.T
            similarities[np.arange(len(held)), held] = -np.inf
            neighbours, temperature = post.choose_neighbourhood(
                similarities,
                truths[held],
                truths,
                n_labels,
                (cm.neighbours,) if cm.neighbours else NEIGHBOUR_GRID,
                (cm.neighbour_temperature,) if cm.neighbour_temperature else TEMPERATURE_GRID,
            )
            priors = (
                probe.held_out[held]
                if probe
                else post.neighbour_prior(similarities, truths, n_labels, neighbours, temperature)
            )
        else:
            priors = post.held_out_class_priors(counts, truths[held])
        if asks_nothing:  # no answer, so a flat likelihood: the posterior is the prior
            likelihood_rows = np.ones((len(held), n_labels))
        else:
            likelihood_rows = _held_out_likelihood_rows(variant, cm, counts, answers, truths, held, similarities)
        if cm.likelihood_weight is None and not asks_nothing:
            weight = _earned_weight(likelihood_rows, priors, truths[held])
        scores = post.posteriors(likelihood_rows, priors, weight)
        draws = np.array([post.row_uniform(samples[i].id) for i in held])  # as a corpus row's, from its id
        if cm.tau is None:
            weights = common["held_weights"]
            tau = trust.conformal_tau(trust.conformity_scores(scores, truths[held], draws), cm.coverage, weights)
        sets = tuple(
            tuple(int(i) for i in post.mass_candidates(row, tau, u)) for row, u in zip(scores, draws, strict=True)
        )
    questions = ()
    if asks is not False:  # the label a set's answer would be without a second call: its highest-scoring one
        questions = tuple(
            Question(int(sample), tuple(labels[i] for i in chosen), labels[max(chosen, key=lambda i: row[i])])
            for sample, chosen, row in zip(held, sets, scores, strict=True)
            if len(chosen) > 1
        )
    return FitDraft(
        **common,
        neighbours=neighbours,
        temperature=temperature,
        weight=weight,
        tau=tau,
        held_out_sets=sets,
        held_out_scores=scores,
        asks_second_call=asks,
        questions=questions,
    )


def split_weights(bank: MemoryBank, truths: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Per bank sample, what its held-out score weighs in tau: p_pool(y) / p_split(y) for a stratified draw.

    A stratified draw keeps at least one sample of every label, so rare labels are over-represented
    (6.8% of MTOP's 5% split are the only sample of their label; those labels are 3.5% of its pool); their held-out
    scores sit near 1 and pulled tau up to sets of 106 of 113 labels. The draw's weights are known
    exactly from the pool's counts (``UserSplitInfo.pool_label_counts``). Every sample weighs 1 where the
    split is a uniform draw or the whole file (exchangeable with it as it is), or the counts were not kept.
    Only the drawn samples (``drawn``) are the split; corrections weigh nothing here, being never held out.
    """
    split = bank.user_split
    weights = np.ones(len(truths))
    if not split.stratified or split.pool_label_counts is None or not drawn.any():
        return weights
    pool = np.array([split.pool_label_counts.get(label, 0) for label in bank.labels], dtype=float)
    weights[drawn] = trust.label_shift_weights(truths[drawn], pool)
    return weights


def finish_fit(draft: FitDraft, choices: Sequence[str | None] = ()) -> FittedCM:
    """Steps 5-7: given the model's choice for each of ``draft.questions``, the second-call verdict,
    the confidence calibration and the acceptance threshold.

    A choice is the model's final answer: None where it named no allowed label (an unparsed answer,
    a request refused for good) is scored wrong, as that corpus item would go unlabelled. An engine
    failure (a timeout) is no choice and must not be passed: the job asks again, or stops.
    """
    labels, cm = draft.labels, draft.cm
    if len(choices) != len(draft.questions):
        raise ValueError(f"{len(draft.questions)} questions, {len(choices)} choices")
    chosen_for = {q.sample: c for q, c in zip(draft.questions, choices, strict=True)}
    truths = draft.user_truths
    asks, outcome = draft.asks_second_call, None
    if asks is None:  # cm.second_call: auto
        questioned_truths = [labels[truths[q.sample]] for q in draft.questions]
        chosen_right = np.array([c == t for c, t in zip(choices, questioned_truths, strict=True)], dtype=bool)
        probable_right = np.array(
            [q.most_probable == t for q, t in zip(draft.questions, questioned_truths, strict=True)], dtype=bool
        )
        asks, wins, losses = _clearly_better(chosen_right, probable_right)
        outcome = {"asked": len(draft.questions), "wins": wins, "losses": losses}
    index = {label: i for i, label in enumerate(labels)}
    scores, right = np.zeros(len(draft.held)), np.zeros(len(draft.held), dtype=bool)
    given = np.full(len(draft.held), -1, dtype=np.int64)
    for n, (sample, candidates) in enumerate(zip(draft.held, draft.held_out_sets, strict=True)):
        y_hat = _held_out_answer(draft, int(sample), candidates, asks, chosen_for)
        if y_hat is not None:
            given[n] = index[y_hat]
            scores[n] = draft.held_out_scores[n, given[n]]
            right[n] = given[n] == truths[sample]
    calibration = trust.fit_calibration(scores, right)
    confidence = calibration.apply(scores)
    return FittedCM(
        variant=draft.variant,
        labels=labels,
        cm=cm,
        counts=draft.counts,
        user_answers=draft.user_answers,
        user_truths=truths,
        user_vectors=draft.user_vectors,
        probe=draft.probe,
        neighbours=draft.neighbours,
        temperature=draft.temperature,
        weight=draft.weight,
        tau=draft.tau,
        asks_second_call=bool(asks),
        trial_outcome=outcome,
        calibration=calibration,
        acceptance=None,  # accept_cascade: the threshold is the cascade's, over all its stages
        held_out_confidence=confidence,
        held_out_right=right,
        held_out_ids=draft.held_ids,
        free_text=draft.free_text,
        held_out_labels=given,
        held_out_truths=truths[draft.held],
        novelty=draft.novelty,
        held_out_weights=draft.held_weights,
    )


def fit_cm(
    bank: MemoryBank, cm: CMSpec, user_vectors: np.ndarray | None = None, choices: Sequence[str | None] = ()
) -> FittedCM:
    """``prepare_fit``, ``finish_fit`` and ``accept_cascade`` for one stage, for callers that know the choices."""
    return accept_cascade([finish_fit(prepare_fit(bank, cm, user_vectors), choices)], cm.accept)[0]


def through_cascade(stages: Sequence[FittedCM]) -> FittedCM:
    """The held-out user samples as the whole cascade labels them, in the first stage's frame.

    A sample goes to the first stage whose held-out confidence reaches the cascade's threshold, else
    to the last stage that scored it, as a corpus row goes: what corpus-level estimates (PPI) compare
    the corpus's labels with. One stage is itself.
    """
    if len(stages) == 1:
        return stages[0]
    if any(f.held_out_labels is None or f.held_out_truths is None for f in stages):
        return replace(stages[0], held_out_labels=None, held_out_truths=None, held_out_weights=None)
    acceptance = stages[0].acceptance
    threshold = acceptance.threshold if acceptance is not None and acceptance.threshold is not None else np.inf
    # A sample's weight is its label's (the same split in every stage); a stage fitted before weights were
    # kept weighs every sample 1, so weighting the others alone would mix two frames: then none is weighted.
    weighted = all(f.held_out_weights is not None for f in stages)
    chosen: dict[str, tuple[int, int, float, bool, float]] = {}
    for fitted in stages:
        weights = fitted.held_out_weights if fitted.held_out_weights is not None else np.ones(len(fitted.held_out_ids))
        rows = zip(
            fitted.held_out_ids,
            fitted.held_out_labels,
            fitted.held_out_truths,
            fitted.held_out_confidence,
            fitted.held_out_right,
            weights,
            strict=True,
        )
        for sample, label, truth, confidence, right, weight in rows:
            settled = sample in chosen and chosen[sample][2] >= threshold
            if not settled:  # not yet accepted: this later stage's answer stands
                chosen[sample] = (int(label), int(truth), float(confidence), bool(right), float(weight))
    ids = tuple(chosen)
    labels, truths, confidences, right, weights = (np.array(column) for column in zip(*chosen.values(), strict=True))
    return replace(
        stages[0],
        held_out_ids=ids,
        held_out_labels=labels,
        held_out_truths=truths,
        held_out_confidence=confidences,
        held_out_right=right.astype(bool),
        held_out_weights=weights if weighted else None,
    )


@dataclass(frozen=True)
class StageShare:
    """What a stage is expected to see and keep of a corpus exchangeable with the user split."""

    reached: float  # share of held-out user samples no earlier stage accepted
    accepted: float  # share this stage accepts


def stage_shares(stages: Sequence[FittedCM]) -> tuple[StageShare, ...]:
    """Per stage (as ``accept_cascade`` returns them), the share of held-out user samples that reach it and
    the share it accepts at the cascade's threshold; what the last stage leaves goes to review.

    A corpus row reaches a stage as a held-out sample does, so these are the expected shares of the
    corpus a dry run prices each stage by. A stage that scored no answer for a sample cannot accept it.
    """
    ids = list(dict.fromkeys(i for fitted in stages for i in fitted.held_out_ids))
    if not ids:
        return tuple(StageShare(1.0 if n == 0 else 0.0, 0.0) for n in range(len(stages)))
    acceptance = stages[0].acceptance
    threshold = acceptance.threshold if acceptance is not None else None
    waiting = set(ids)
    shares = []
    for fitted in stages:
        reached = len(waiting) / len(ids)
        if threshold is not None:
            scored = zip(fitted.held_out_ids, fitted.held_out_confidence, strict=True)
            waiting -= {sample for sample, confidence in scored if confidence >= threshold}
        shares.append(StageShare(reached, reached - len(waiting) / len(ids)))
    return tuple(shares)


def accept_cascade(stages: Sequence[FittedCM], accept: AcceptSpec | None) -> tuple[FittedCM, ...]:
    """The stages with the cascade's one acceptance: a threshold every stage's confidence is held to.

    The user split runs through the whole cascade: a held-out sample is accepted by the first stage
    whose held-out confidence reaches the threshold, and right if that stage's answer is. Samples
    are aligned by id; a stage that scored no answer for one (its answer unparsed) cannot accept it.
    """
    if accept is None:
        return tuple(replace(fitted, acceptance=None) for fitted in stages)
    ids = list(dict.fromkeys(i for fitted in stages for i in fitted.held_out_ids))
    column = {sample: n for n, sample in enumerate(ids)}
    confidences = np.full((len(stages), len(ids)), -np.inf)
    right = np.zeros((len(stages), len(ids)), dtype=bool)
    given = np.full((len(stages), len(ids)), -1, dtype=np.int64)
    for s, fitted in enumerate(stages):
        where = [column[sample] for sample in fitted.held_out_ids]
        confidences[s, where] = fitted.held_out_confidence
        right[s, where] = fitted.held_out_right
        if fitted.held_out_labels is not None:  # None: pickled before they were kept, no label counted
            given[s, where] = fitted.held_out_labels
    acceptance = trust.choose_threshold(
        confidences,
        right,
        accept.target_accuracy,
        accept.confidence_level,
        accept.min_accepted,
        given,
        accept.per_label_min_samples if accept.per_label else None,
    )
    return tuple(replace(fitted, acceptance=acceptance) for fitted in stages)


def _held_out_answer(
    draft: FitDraft,
    sample: int,
    candidates: tuple[int, ...],
    asks: bool,
    chosen_for: dict[int, str | None],
) -> str | None:
    """The label CM gives a held-out sample, as it would give it to a corpus item."""
    labels = draft.labels
    if not candidates:  # the paper's empty row with cm.empty_row: abstain
        return None
    if len(candidates) > 1 and asks:
        choice = chosen_for.get(sample)
        return choice if choice in {labels[i] for i in candidates} else None
    return labels[candidates[0]]


def _paper_row(row: np.ndarray, answer: int, empty_row: str) -> tuple[int, ...]:
    """Row Y' of the binary M in label order (the order the second call's prompt lists them in).

    An empty row falls back by policy: the first answer kept, or no label. A free-text answer (a row
    beyond the labels) names no label to keep.
    """
    seen = np.flatnonzero(row > 0)
    if len(seen) == 0:
        return (answer,) if empty_row == "keep_initial" and answer < len(row) else ()
    return tuple(int(i) for i in seen)


def paper_candidates(counts: np.ndarray, answer: int | None, empty_row: str) -> tuple[int, ...]:
    """The paper's candidate set for a corpus item the model answered ``answer`` (full bank): a row of
    ``counts``, or None for a free-text answer the bank never saw (an empty row)."""
    if answer is None:
        return ()
    return _paper_row(counts[answer], answer, empty_row)


def _held_out_likelihood_rows(
    variant: str,
    cm: CMSpec,
    counts: np.ndarray,
    user_answers: np.ndarray,
    user_truths: np.ndarray,
    held: np.ndarray,
    similarities: np.ndarray | None,
) -> np.ndarray:
    """Row Y' of each held-out sample's likelihood, estimated without that sample's own pair."""
    answers, truths = user_answers[held], user_truths[held]
    if variant != "instance":
        return post.held_out_likelihood_rows(counts, answers, truths, cm.alpha)
    assert similarities is not None
    rows = []
    for row_similarities, answer, truth in zip(similarities, answers, truths, strict=True):
        without = counts.copy()
        without[answer, truth] -= 1
        rows.append(instance_row(cm, row_similarities, user_answers, user_truths, answer, without))
    return np.array(rows)


def instance_row(
    cm: CMSpec,
    similarities: np.ndarray,
    user_answers: np.ndarray,
    user_truths: np.ndarray,
    answer: int,
    counts: np.ndarray,
) -> np.ndarray:
    """Row ``answer`` of the instance-dependent likelihood M(X)."""
    return post.instance_likelihood(
        similarities,
        user_answers,
        user_truths,
        counts,
        k=cm.instance_neighbours,
        alpha=cm.alpha,
        blend=cm.blend,
    )[answer]


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
