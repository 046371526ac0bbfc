"""A deterministic stand-in for an LLM, for testing the pipeline's bookkeeping quickly.

It answers from a table (text -> answer for the first call; text -> answer for a second call
restricted to fewer labels) and records every request. The real engines are tested against
real models in tests/engines and tests/test_e2e.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Self

from runner.engines.base import ChoiceRequest, Completion


class ScriptedEngine:
    model_id = "scripted"

    def __init__(
        self,
        first: dict[str, str],
        second: dict[str, str] | None = None,
        n_labels: int | None = None,
        *,
        crash_after: int | None = None,
        failing: set[str] = frozenset(),
        free_text: dict[str, str] | None = None,
        failing_within: dict[str, int] | None = None,
        seconds_per_request: float = 0.0,
    ):
        self.first = first
        self.second = second or {}
        self.n_labels = n_labels
        self.crash_after = crash_after  # raise after this many requests: a process dying mid-job
        self.failing = failing  # texts whose calls fail as a timed-out request would
        self.free_text = free_text  # text -> reply to an unconstrained request (no choices), if given
        # text -> how many of its second calls (fewer choices than n_labels) time out before one is answered
        self.failing_within = dict(failing_within or {})
        self.requests: list[ChoiceRequest] = []
        self.started = False
        # answer one request at a time, each taking this long: a local model on one device
        self.seconds_per_request = seconds_per_request
        self._device = asyncio.Lock()

    async def __aenter__(self) -> Self:
        self.started = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if self.seconds_per_request:
            async with self._device:
                await asyncio.sleep(self.seconds_per_request * len(requests))
        self.requests.extend(requests)
        completions = []
        for request in requests:
            if self.crash_after is not None and len(self.requests) > self.crash_after:
                raise RuntimeError("engine died")
            text = request.messages[-1].content
            if text in self.failing:
                completions.append(Completion(text=None, error="timed out after 3 retries"))
                continue
            is_first = self.n_labels is None or len(request.choices) == self.n_labels
            if not is_first and self.failing_within.get(text, 0) > 0:
                self.failing_within[text] -= 1
                completions.append(Completion(text=None, error="timed out after 3 retries"))
                continue
            table = self.free_text if self.free_text is not None and not request.choices else None
            if table is None:
                table = self.first if is_first else self.second
            answer = table.get(text, "no such label")
            completions.append(Completion(text=answer, prompt_tokens=10, completion_tokens=2))
        return completions
