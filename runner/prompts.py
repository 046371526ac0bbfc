"""Rendering prompts. One template serves both CM calls: the first lists every label, the
second (Y_hat = G(X, C)) lists only the refined candidate set C."""

from __future__ import annotations

from collections.abc import Sequence

from runner.engines.base import Message

DEFAULT_INSTRUCTION = (
    "Classify the text into exactly one of the labels below. Answer with the label only, written exactly as listed."
)


def classification_messages(
    text: str, shown_labels: Sequence[str], instruction: str | None = None
) -> tuple[Message, ...]:
    """A system message with the instruction and the allowed labels, then the text as the user.

    The label list comes first so requests sharing a label list share a prompt prefix,
    which vLLM's prefix cache computes once.
    """
    listing = "\n".join(f"- {label}" for label in shown_labels)
    system = f"{instruction or DEFAULT_INSTRUCTION}\n\nLabels:\n{listing}"
    return (Message("system", system), Message("user", text))
