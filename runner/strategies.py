"""Prompt strategies Z: async functions of an engine that turn texts into labels.

A strategy is handed, for each text, the labels it may choose from (every label on the
first call, the refined candidate set C on CM's second call) and returns one answer per
text, mapped back to a raw label name, with the calls and tokens it spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from runner.engines.base import ChoiceRequest, Engine
from runner.labels import LabelSet
from runner.prompts import classification_messages
from runner.spec import GenerationSpec, StrategySpec


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


class Strategy(Protocol):
    name: str

    async def classify(
        self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]
    ) -> list[Answer]: ...


class ZeroShot:
    """The instruction, the allowed labels, the text; the answer constrained to those labels."""

    name = "zero_shot"

    def __init__(self, labels: LabelSet, generation: GenerationSpec, instruction: str | None = None):
        self.labels = labels
        self.generation = generation
        self.instruction = instruction

    def request(self, text: str, allowed: Sequence[str]) -> ChoiceRequest:
        shown = self.labels.shown_for(allowed)
        return ChoiceRequest(
            messages=classification_messages(text, shown, self.instruction),
            choices=tuple(shown),
            max_tokens=self.generation.max_tokens,
            temperature=self.generation.temperature,
            seed=self.generation.seed,
        )

    async def classify(self, engine: Engine, texts: Sequence[str], allowed: Sequence[Sequence[str]]) -> list[Answer]:
        requests = [self.request(text, labels) for text, labels in zip(texts, allowed, strict=True)]
        completions = await engine.complete(requests)
        answers = []
        for completion, labels in zip(completions, allowed, strict=True):
            label = self.labels.parse(completion.text, labels) if completion.error is None else None
            error, error_kind = completion.error, None
            if error is not None:
                error_kind = "engine" if completion.retryable else "rejected"
            if error is None and label is None:
                error = f"answer {completion.text!r} is not one of the {len(labels)} allowed labels"
                error_kind = "unparsed"
            answers.append(
                Answer(
                    label=label,
                    raw=completion.text,
                    calls=1,
                    prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens,
                    error=error,
                    error_kind=error_kind,
                )
            )
        return answers


def make_strategy(spec: StrategySpec, labels: LabelSet, generation: GenerationSpec) -> Strategy:
    if spec.name == "zero_shot":
        return ZeroShot(labels, generation, spec.instruction)
    raise ValueError(f"strategy.name {spec.name!r} is not supported")
