"""The one small async interface every engine implements.

A batch of choice requests goes in (chat messages plus the answers allowed); the same
number of completions comes out, in order, each with its token usage or its error. Engines
know nothing about CM: the pipeline decides what to ask, an engine only answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChoiceRequest:
    """Ask the model to answer ``messages`` with exactly one of ``choices``.

    An empty ``choices`` means free text (for reasoning steps of multi-call strategies).
    """

    messages: tuple[Message, ...]
    choices: tuple[str, ...]
    max_tokens: int = 32
    temperature: float = 0.0
    seed: int | None = 0


@dataclass(frozen=True)
class Completion:
    """One answer: the raw text the engine returned, usage, and an error if it failed."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    retryable: bool = True  # False when asking again cannot help (e.g. the prompt is longer than the context)
    logprob: float | None = None  # the model's log probability of the text it answered, where the engine knows it


@runtime_checkable
class Engine(Protocol):
    """An LLM G behind one call. Use as ``async with engine: await engine.complete(batch)``."""

    model_id: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        """Answer every request; the i-th completion answers the i-th request."""
        ...


class EngineError(RuntimeError):
    """An engine that cannot start or cannot go on (bad model path, out of memory, auth)."""


class EngineDied(EngineError):
    """The engine stopped mid-job (its process killed, out of memory, a step timed out); what the job
    finished is saved and a rerun resumes from it."""
