"""What a job would ask an engine for, per strategy: calls and tokens, worked out before any call.

Pure arithmetic on the spec and average prompt sizes, so ``cm-run --dry-run`` can price a job and
a test can check the numbers. Upper bounds where a strategy may stop early (self-refine stops when
a round keeps its answer; a second call is asked only when the candidate set has several labels).
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.spec import GenerationSpec, StrategySpec


@dataclass(frozen=True)
class Usage:
    calls: float
    prompt_tokens: float
    completion_tokens: float

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def __mul__(self, times: float) -> Usage:
        return Usage(self.calls * times, self.prompt_tokens * times, self.completion_tokens * times)


def answer_usage(strategy: StrategySpec, generation: GenerationSpec, prompt: float, example: float = 0.0) -> Usage:
    """The most one answer costs under ``strategy``, its zero-shot prompt being ``prompt`` tokens.

    ``example`` is the size of one solved example turn (few-shot). A free-text step (reasoning,
    feedback) writes up to ``strategy.reasoning_max_tokens``; a label answer up to ``generation.max_tokens``.
    """
    answer, reasoning = generation.max_tokens, strategy.reasoning_max_tokens
    if strategy.name == "zero_shot":
        return Usage(1, prompt, answer)
    if strategy.name == "few_shot":
        return Usage(1, prompt + strategy.k * example, answer)
    if strategy.name == "chain_of_thought":
        # the reasoning call, then the answer call whose prompt carries the reasoning
        return Usage(1, prompt, reasoning) + Usage(1, prompt + reasoning, answer)
    if strategy.name == "self_refine":
        # the draft, then per round a critique of the answer and an answer given the critique
        critique = Usage(1, prompt + answer, reasoning)
        revision = Usage(1, prompt + answer + reasoning, answer)
        return Usage(1, prompt, answer) + (critique + revision) * strategy.max_rounds
    if strategy.name == "self_consistency":
        sample = strategy.model_copy(update={"name": strategy.sample_with})
        return answer_usage(sample, generation, prompt, example) * strategy.n_samples
    raise ValueError(f"strategy.name {strategy.name!r} has no usage estimate")
