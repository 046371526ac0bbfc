"""Prompt strategies Z: async functions of an engine that turn texts into labels.

A strategy is handed, for each text, the labels it may choose from (every label on the
first call, the refined candidate set C on CM's second call) and returns one answer per
text, mapped back to a raw label name, with the calls and tokens it spent. A strategy that
makes several calls runs them all under the same allowed labels, so CM's second pass applies
to its final answer.

Strategies step through a batch together (all first steps, then all second steps, ...) so an
engine sees each step's requests at once.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from runner.engines.base import ChoiceRequest, Completion, Engine, Message
from runner.examples import ExamplePool, current_pool
from runner.labels import LabelSet, free_text_key
from runner.prompts import (
    answer_after_reasoning_messages,
    classification_messages,
    feedback_messages,
    few_shot_messages,
    reasoning_messages,
    refine_messages,
)
from runner.spec import GenerationSpec, SpecError, StrategySpec


@dataclass(frozen=True)
class Answer:
    """A strategy's answer for one text: a raw label, or None with the reason in ``error``."""

    label: str | None
    raw: str | None
    calls: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # "engine": the call failed and may succeed later; "rejected": it cannot (e.g. too long for the
    # context); "unparsed": the model's answer fit no allowed label
    error_kind: str | None = None
    probability: float | None = None  # the model's own probability of its final answer, where the engine says


class Strategy(Protocol):
    name: str

    async def classify(
        self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]
    ) -> list[Answer]: ...


def _with_cost(answer: Answer, spent: Sequence[Completion]) -> Answer:
    """``answer`` charged with every call in ``spent`` (the final call included)."""
    return replace(
        answer,
        calls=len(spent),
        prompt_tokens=sum(c.prompt_tokens for c in spent),
        completion_tokens=sum(c.completion_tokens for c in spent),
    )


def _failed_call(completion: Completion, spent: Sequence[Completion]) -> Answer:
    kind = "engine" if completion.retryable else "rejected"
    return _with_cost(Answer(label=None, raw=completion.text, calls=0, error=completion.error, error_kind=kind), spent)


def _parse(labels: LabelSet, completion: Completion, allowed: Sequence[str], spent: Sequence[Completion]) -> Answer:
    """The label a constrained answer call means, or the reason it means none."""
    if completion.error is not None:
        return _failed_call(completion, spent)
    label = labels.parse(completion.text, allowed)
    if label is None:
        error = f"answer {completion.text!r} is not one of the {len(allowed)} allowed labels"
        return _with_cost(Answer(None, completion.text, 0, error=error, error_kind="unparsed"), spent)
    probability = math.exp(completion.logprob) if completion.logprob is not None else None
    return _with_cost(Answer(label, completion.text, 0, probability=probability), spent)


class _Prompting:
    """What every strategy shares: the label set, decoding settings, and the constrained request."""

    def __init__(self, labels: LabelSet, generation: GenerationSpec, instruction: str | None = None):
        self.labels = labels
        self.generation = generation
        self.instruction = instruction

    def _choice(self, messages: tuple[Message, ...], shown: Sequence[str]) -> ChoiceRequest:
        return ChoiceRequest(
            messages=messages,
            choices=tuple(shown),
            max_tokens=self.generation.max_tokens,
            temperature=self.generation.temperature,
            seed=self.generation.seed,
        )

    def _free_text(self, messages: tuple[Message, ...], max_tokens: int) -> ChoiceRequest:
        return ChoiceRequest(
            messages=messages,
            choices=(),
            max_tokens=max_tokens,
            temperature=self.generation.temperature,
            seed=self.generation.seed,
        )


class ZeroShot(_Prompting):
    """The instruction, the allowed labels, the text; the answer constrained to those labels."""

    name = "zero_shot"

    def request(self, text: str, allowed: Sequence[str]) -> ChoiceRequest:
        shown = self.labels.shown_for(allowed)
        return self._choice(classification_messages(text, shown, self.instruction), shown)

    async def classify(self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[Answer]:
        requests = [self.request(text, labels) for text, labels in zip(texts, allowed, strict=True)]
        completions = await engine.complete(requests)
        return [_parse(self.labels, c, labels, [c]) for c, labels in zip(completions, allowed, strict=True)]


class FreeTextFirst:
    """Zero-shot whose first answer is free text, as the paper's authors asked it; later calls constrained.

    ``first`` asks the zero-shot prompt unconstrained and maps the reply to a label with
    ``LabelSet.match_free_text``; a reply that names none keeps its normalised text as the answer
    (``free_text_key``), which the memory bank keys a row of its own by. ``classify`` (CM's second
    call, among a candidate set) is the constrained zero-shot call.
    """

    name = "zero_shot"

    def __init__(self, inner: ZeroShot):
        self.inner = inner
        self.labels = inner.labels

    async def first(self, engine: Engine, texts: Sequence[str]) -> list[Answer]:
        shown = list(self.labels.shown)
        completions = await engine.complete(
            [
                self.inner._free_text(
                    classification_messages(text, shown, self.inner.instruction), self.inner.generation.max_tokens
                )
                for text in texts
            ]
        )
        return [self._matched(c) for c in completions]

    def _matched(self, completion: Completion) -> Answer:
        if completion.error is not None:
            return _failed_call(completion, [completion])
        text = completion.text or ""
        answer = self.labels.match_free_text(text) or free_text_key(text)
        if not answer:
            error = f"answer {text!r} is empty"
            return _with_cost(Answer(None, text, 0, error=error, error_kind="unparsed"), [completion])
        return _with_cost(Answer(answer, text, 0), [completion])

    async def classify(self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[Answer]:
        return await self.inner.classify(engine, texts, allowed)


async def first_answers(strategy: Strategy, engine: Engine, texts: Sequence[str], labels: LabelSet) -> list[Answer]:
    """Y' for each text: the strategy's answer among every label, or its free-text first answer.

    A free-text answer that matched no label comes back with ``label`` set to its normalised text
    (``labels.is_label`` tells the two apart): the bank's rows beyond the labels are keyed by it.
    """
    if isinstance(strategy, FreeTextFirst):
        return await strategy.first(engine, texts)
    return await strategy.classify(engine, texts, [labels.labels] * len(texts))


class FewShot(_Prompting):
    """Zero-shot with k solved user samples as earlier chat turns (Brown et al., 2020)."""

    name = "few_shot"

    def __init__(
        self,
        labels: LabelSet,
        generation: GenerationSpec,
        pool: ExamplePool,
        k: int,
        selection: str = "nearest",
        instruction: str | None = None,
    ):
        super().__init__(labels, generation, instruction)
        self.pool, self.k, self.selection = pool, k, selection

    def _examples(self, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[list[tuple[str, str]]]:
        if self.selection == "nearest":
            chosen = self.pool.nearest(texts, allowed, self.k)
        else:
            chosen = [self.pool.random(text, labels, self.k) for text, labels in zip(texts, allowed, strict=True)]
        return [[(e.text, self.labels.shown_for([e.label])[0]) for e in examples] for examples in chosen]

    async def classify(self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[Answer]:
        requests = []
        for text, labels, examples in zip(texts, allowed, self._examples(texts, allowed), strict=True):
            shown = self.labels.shown_for(labels)
            requests.append(self._choice(few_shot_messages(text, shown, examples, self.instruction), shown))
        completions = await engine.complete(requests)
        return [_parse(self.labels, c, labels, [c]) for c, labels in zip(completions, allowed, strict=True)]


class ChainOfThought(_Prompting):
    """Reasoning first (free text), then the label alone, constrained to the allowed labels (Wei et al., 2022).

    Two calls rather than one constrained "reasoning then label" pattern: the engine interface asks
    for a label set or free text, which every engine can honour, and the answer call's prompt is the
    reasoning call's prompt plus its output, so a prefix-caching engine does not compute it twice.
    """

    name = "chain_of_thought"

    def __init__(
        self, labels: LabelSet, generation: GenerationSpec, reasoning_max_tokens: int, instruction: str | None = None
    ):
        super().__init__(labels, generation, instruction)
        self.reasoning_max_tokens = reasoning_max_tokens

    async def classify(self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[Answer]:
        shown = [self.labels.shown_for(labels) for labels in allowed]
        thoughts = await engine.complete(
            [
                self._free_text(reasoning_messages(text, labels, self.instruction), self.reasoning_max_tokens)
                for text, labels in zip(texts, shown, strict=True)
            ]
        )
        answers = [_failed_call(t, [t]) if t.error is not None else None for t in thoughts]
        asked = [i for i, answer in enumerate(answers) if answer is None]
        replies = await engine.complete(
            [
                self._choice(
                    answer_after_reasoning_messages(texts[i], shown[i], thoughts[i].text or "", self.instruction),
                    shown[i],
                )
                for i in asked
            ]
        )
        for i, reply in zip(asked, replies, strict=True):
            answers[i] = _parse(self.labels, reply, allowed[i], [thoughts[i], reply])
        return [answer for answer in answers if answer is not None]  # every slot is filled by now


class SelfConsistency:
    """n answers sampled at temperature > 0 with distinct seeds; the majority label wins (Wang et al., 2023).

    Ties go to the label listed first among the allowed labels, so the same samples always give the
    same answer. A sample whose call failed makes the whole answer an engine error (redone on
    resume) rather than a vote over fewer samples; unparsed samples do not vote.
    """

    name = "self_consistency"

    def __init__(self, sampler: Callable[[int], Strategy], n_samples: int):
        self.sampler = sampler  # sample i -> the strategy that draws it (its own seed)
        self.n_samples = n_samples

    async def classify(self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[Answer]:
        samples = await asyncio.gather(
            *(self.sampler(i).classify(engine, texts, allowed) for i in range(self.n_samples))
        )
        return [self._vote([s[item] for s in samples], allowed[item]) for item in range(len(texts))]

    @staticmethod
    def _vote(samples: Sequence[Answer], allowed: Sequence[str]) -> Answer:
        calls = sum(s.calls for s in samples)
        tokens = {
            "prompt_tokens": sum(s.prompt_tokens for s in samples),
            "completion_tokens": sum(s.completion_tokens for s in samples),
        }
        failed = [s for s in samples if s.error_kind in ("engine", "rejected")]
        if failed:
            return replace(failed[0], calls=calls, **tokens)
        votes = Counter(s.label for s in samples if s.label is not None)
        if not votes:
            return replace(samples[0], calls=calls, **tokens)
        order = {label: position for position, label in enumerate(allowed)}
        winner = min(votes, key=lambda label: (-votes[label], order.get(label, len(order))))
        tally = ", ".join(f"{label}: {count}" for label, count in votes.most_common())
        return Answer(label=winner, raw=tally, calls=calls, **tokens)


class SelfRefine(_Prompting):
    """Draft, feedback, refined answer, for at most ``max_rounds`` rounds (Madaan et al., 2023).

    The draft is the zero-shot request (so it is shared with zero-shot runs through a request
    cache); a round asks the model to critique its current answer, then to answer again with that
    critique in context. A text stops early when a round keeps its answer.
    """

    name = "self_refine"

    def __init__(
        self,
        labels: LabelSet,
        generation: GenerationSpec,
        max_rounds: int,
        feedback_max_tokens: int,
        instruction: str | None = None,
    ):
        super().__init__(labels, generation, instruction)
        self.max_rounds = max_rounds
        self.feedback_max_tokens = feedback_max_tokens

    async def classify(self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[Answer]:
        shown = [self.labels.shown_for(labels) for labels in allowed]
        history = [classification_messages(text, s, self.instruction) for text, s in zip(texts, shown, strict=True)]
        drafts = await engine.complete([self._choice(h, s) for h, s in zip(history, shown, strict=True)])
        spent: list[list[Completion]] = [[draft] for draft in drafts]
        answers = [_parse(self.labels, d, a, [d]) for d, a in zip(drafts, allowed, strict=True)]
        active = [i for i, answer in enumerate(answers) if answer.label is not None]
        for _ in range(self.max_rounds):
            if not active:
                break
            current = {i: self.labels.shown_for([str(answers[i].label)])[0] for i in active}
            critiques = await engine.complete(
                [self._free_text(feedback_messages(history[i], current[i]), self.feedback_max_tokens) for i in active]
            )
            critique_of = dict(zip(active, critiques, strict=True))
            for i, critique in critique_of.items():
                spent[i].append(critique)
                if critique.error is not None:
                    answers[i] = _failed_call(critique, spent[i])
            asked = [i for i in active if critique_of[i].error is None]
            conversations = {i: refine_messages(history[i], current[i], critique_of[i].text or "") for i in asked}
            revisions = await engine.complete([self._choice(conversations[i], shown[i]) for i in asked])
            still_changing = []
            for i, revision in zip(asked, revisions, strict=True):
                spent[i].append(revision)
                revised = _parse(self.labels, revision, allowed[i], spent[i])
                if revised.label is not None and revised.label != answers[i].label:
                    history[i] = conversations[i]
                    still_changing.append(i)
                answers[i] = revised  # a failed revision fails the answer rather than silently keeping the draft
            active = still_changing
        return [_with_cost(answer, calls) for answer, calls in zip(answers, spent, strict=True)]


def make_strategy(
    spec: StrategySpec,
    labels: LabelSet,
    generation: GenerationSpec,
    examples: ExamplePool | None = None,
) -> Strategy:
    """The strategy a spec names; ``few_shot`` draws from ``examples`` (default: the pool of ``examples_for_jobs``)."""
    if spec.name == "zero_shot":
        zero_shot = ZeroShot(labels, generation, spec.instruction)
        return FreeTextFirst(zero_shot) if spec.first_answer == "free_text" else zero_shot
    if spec.name == "few_shot":
        pool = examples if examples is not None else current_pool()
        if pool is None:
            raise SpecError(
                "strategy.name few_shot needs the user split as its example pool, which a plain job does not "
                "hand its strategy yet: run it through `cm-run eval` (see the README), or from Python pass "
                "examples= to make_strategy or run the job inside runner.examples.examples_for_jobs(pool)"
            )
        return FewShot(labels, generation, pool, spec.k, spec.selection, spec.instruction)
    if spec.name == "chain_of_thought":
        return ChainOfThought(labels, generation, spec.reasoning_max_tokens, spec.instruction)
    if spec.name == "self_consistency":
        inner = spec.model_copy(update={"name": spec.sample_with})

        def sampler(i: int) -> Strategy:
            sampling = generation.model_copy(update={"temperature": spec.temperature, "seed": generation.seed + i})
            return make_strategy(inner, labels, sampling, examples)

        return SelfConsistency(sampler, spec.n_samples)
    if spec.name == "self_refine":
        return SelfRefine(labels, generation, spec.max_rounds, spec.reasoning_max_tokens, spec.instruction)
    raise ValueError(f"strategy.name {spec.name!r} is not supported")
