"""Usage counters of an API engine and the token estimate its TPM budget is charged with."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.engines.base import Message
from runner.spec import Prices

# Characters per token of English prose in common BPE vocabularies; corrected by usage as it comes.
_CHARS_PER_TOKEN = 4.0
# Per-message overhead of chat templates (role markers and separators), in tokens.
_TOKENS_PER_MESSAGE = 4


class TokenEstimator:
    """chars/4, scaled by the prompt tokens the server reported against what was estimated.

    An exact tokenizer would not be exact here anyway: the server's model decides (gpt-4o-mini
    counts with o200k, a vLLM model with its own vocabulary). The learned ratio lands within a
    few percent after the first answers, and costs nothing per request.
    """

    def __init__(self) -> None:
        self._estimated = 0
        self._reported = 0

    def raw(self, messages: Sequence[Message]) -> int:
        chars = sum(len(m.content) for m in messages)
        return int(chars / _CHARS_PER_TOKEN) + _TOKENS_PER_MESSAGE * len(messages)

    @property
    def ratio(self) -> float:
        return self._reported / self._estimated if self._estimated >= 1000 else 1.0

    def prompt_tokens(self, messages: Sequence[Message]) -> int:
        return max(1, round(self.raw(messages) * self.ratio))

    def learn(self, raw_estimate: int, reported: int) -> None:
        if reported > 0:
            self._estimated += raw_estimate
            self._reported += reported


@dataclass
class EngineStats:
    """What the engine did: every call asked of it, every HTTP attempt, every retry, token and error by kind.

    ``calls`` counts what the job asked for (one per choice request); ``requests`` counts HTTP
    attempts, so ``requests == calls + retries``: a timed-out or refused attempt sent again is
    a retry, not another call.
    """

    calls: int = 0
    requests: int = 0
    retries: int = 0
    rows_answered: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempt_errors: Counter[str] = field(default_factory=Counter)
    row_errors: Counter[str] = field(default_factory=Counter)
    rate_limit_storms: int = 0

    def as_dict(self, prices: Prices | None, lowest_concurrency: float, estimator_ratio: float) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "calls": self.calls,
            "requests": self.requests,
            "retries": self.retries,
            "rows_answered": self.rows_answered,
            "rows_failed": self.rows_failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "attempt_errors": dict(sorted(self.attempt_errors.items())),
            "row_errors": dict(sorted(self.row_errors.items())),
            "rate_limit_storms": self.rate_limit_storms,
            "lowest_concurrency_limit": round(lowest_concurrency, 1),
            "prompt_tokens_per_estimated": round(estimator_ratio, 3),
        }
        if prices is not None:
            cost = (
                self.prompt_tokens * prices.prompt_per_million + self.completion_tokens * prices.completion_per_million
            ) / 1e6
            stats["estimated_cost_usd"] = round(cost, 6)
        return stats
