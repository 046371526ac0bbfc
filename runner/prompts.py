"""Rendering prompts. One template serves both CM calls: the first lists every label, the
second (Y_hat = G(X, C)) lists only the refined candidate set C.

Every strategy starts from the same system message (instruction + allowed labels), so requests
sharing a label list share a prompt prefix, which vLLM's prefix cache computes once. Multi-call
strategies continue the conversation: each later call's prompt begins with the earlier one's.
"""

from __future__ import annotations

from collections.abc import Sequence

from runner.engines.base import Message

DEFAULT_INSTRUCTION = (
    "Classify the text into exactly one of the labels below. Answer with the label only, written exactly as listed."
)
REASONING_REQUEST = (
    "Before answering, think step by step: what is this text about, and which of the labels fits it best? "
    "Reply in at most three short sentences."
)
ANSWER_AFTER_REASONING = "So which label is it? Answer with the label only."
FEEDBACK_REQUEST = (
    "Review your answer {label!r}. Is it the best of the listed labels for this text? In one or two sentences, "
    "say what is wrong with it, if anything, and which listed label would fit better."
)
ANSWER_AFTER_FEEDBACK = "Taking that feedback into account, answer again with the label only."


def system_message(shown_labels: Sequence[str], instruction: str | None = None) -> Message:
    listing = "\n".join(f"- {label}" for label in shown_labels)
    return Message("system", f"{instruction or DEFAULT_INSTRUCTION}\n\nLabels:\n{listing}")


def classification_messages(
    text: str, shown_labels: Sequence[str], instruction: str | None = None
) -> tuple[Message, ...]:
    """A system message with the instruction and the allowed labels, then the text as the user."""
    return (system_message(shown_labels, instruction), Message("user", text))


def few_shot_messages(
    text: str,
    shown_labels: Sequence[str],
    examples: Sequence[tuple[str, str]],
    instruction: str | None = None,
) -> tuple[Message, ...]:
    """The zero-shot prompt with solved examples as earlier turns: (example text, its shown label) pairs."""
    turns = [
        message for example, label in examples for message in (Message("user", example), Message("assistant", label))
    ]
    return (system_message(shown_labels, instruction), *turns, Message("user", text))


def reasoning_messages(text: str, shown_labels: Sequence[str], instruction: str | None = None) -> tuple[Message, ...]:
    """Chain of thought, step one: free-text reasoning about the text and the allowed labels."""
    return (system_message(shown_labels, instruction), Message("user", f"{text}\n\n{REASONING_REQUEST}"))


def answer_after_reasoning_messages(
    text: str, shown_labels: Sequence[str], reasoning: str, instruction: str | None = None
) -> tuple[Message, ...]:
    """Chain of thought, step two: the reasoning stays in context and the label is asked for alone."""
    return (
        *reasoning_messages(text, shown_labels, instruction),
        Message("assistant", reasoning.strip()),
        Message("user", ANSWER_AFTER_REASONING),
    )


def feedback_messages(history: Sequence[Message], answer: str) -> tuple[Message, ...]:
    """Self-refine: after the model's answer, ask it to critique that answer."""
    return (*history, Message("assistant", answer), Message("user", FEEDBACK_REQUEST.format(label=answer)))


def refine_messages(history: Sequence[Message], answer: str, feedback: str) -> tuple[Message, ...]:
    """Self-refine: the critique stays in context and a revised label is asked for."""
    return (
        *feedback_messages(history, answer),
        Message("assistant", feedback.strip()),
        Message("user", ANSWER_AFTER_FEEDBACK),
    )
