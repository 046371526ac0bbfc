"""The label set: readable names for prompts, and mapping whatever a model says back to a label.

Pure functions, no I/O. Raw labels are what the data holds (``card_arrival``,
``academia.stackexchange.com``, ``GET_EVENT``); readable labels are what the model sees
(``card arrival``, ``academia``, ``get event``) unless the spec gives descriptions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

_SITE_SUFFIXES = (".stackexchange.com", ".com", ".net", ".org")
_NON_WORD = re.compile(r"[^0-9a-zà-ÿ]+")
# The first quoted value of an answer, as the authors' normalize_one_to_one takes it ("{'weather'}" -> weather)
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")


def readable(label: str) -> str:
    """A label as a person would write it: separators become spaces, site suffixes go."""
    text = label
    for suffix in _SITE_SUFFIXES:
        if text.lower().endswith(suffix) and len(text) > len(suffix):
            text = text[: -len(suffix)]
            break
    text = re.sub(r"[_\-./:]+", " ", text).strip()
    return text.lower() if text.isupper() or "_" in label else text


def _normalise(text: str) -> str:
    return _NON_WORD.sub(" ", text.lower()).strip()


def free_text_key(answer: str) -> str:
    """A free-text answer as the bank keys it: its first line; the first quoted value there if the line
    opens with a bracket, brace or quote; lower-cased,
    every run of punctuation, underscores and spaces one space (``"{'Card_Arrival.'}"`` -> ``card arrival``).

    The authors' estimate (meta_memory_bank_estimation.py) keys its bank the same way: it takes the
    first quoted value, drops brackets and braces and lower-cases; we also fold punctuation and
    underscores, so ``card_arrival`` and ``Card arrival!`` are one row.
    """
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    answer = lines[0] if lines else ""
    quoted = _QUOTED.search(answer) if answer[:1] in "[{(\"'" else None  # not an apostrophe inside prose
    if quoted:
        answer = quoted.group(1) or quoted.group(2)
    return _normalise(answer)


@dataclass(frozen=True)
class LabelSet:
    """An ordered label set with the text shown to the model for each label."""

    labels: tuple[str, ...]
    shown: tuple[str, ...] = field(default=())

    @classmethod
    def build(cls, labels: Sequence[str], descriptions: Mapping[str, str] | None = None) -> LabelSet:
        descriptions = descriptions or {}
        shown = [descriptions.get(label) or readable(label) for label in labels]
        # Two labels may read alike after cleaning; fall back to the raw name so each stays unique.
        counts: dict[str, int] = {}
        for text in shown:
            counts[_normalise(text)] = counts.get(_normalise(text), 0) + 1
        shown = [text if counts[_normalise(text)] == 1 else label for text, label in zip(shown, labels, strict=True)]
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        return cls(tuple(labels), tuple(shown))

    def __len__(self) -> int:
        return len(self.labels)

    def is_label(self, answer: str | None) -> bool:
        """Whether a first answer is a label (not None, nor the normalised text of a free-text answer)."""
        return answer is not None and answer in self.labels

    def index(self, label: str) -> int:
        return self.labels.index(label)

    @cached_property
    def _shown_of(self) -> dict[str, str]:
        return dict(zip(self.labels, self.shown, strict=True))

    @cached_property
    def _exact(self) -> dict[str, str]:
        """Exact answer text -> the first label (in order) shown or named so: ``parse``'s first rule."""
        exact: dict[str, str] = {}
        for label, shown in zip(self.labels, self.shown, strict=True):
            exact.setdefault(shown, label)
            exact.setdefault(label, label)
        return exact

    def shown_for(self, labels: Sequence[str]) -> list[str]:
        # the lookup is built once: rebuilt per call, it was most of a first call's prompt and parse CPU
        lookup = self._shown_of
        return [lookup[label] for label in labels]

    def match_free_text(self, answer: str) -> str | None:
        """The label an unconstrained answer names, or None: its key (``free_text_key``) must equal a
        label's raw name or shown text (its description, where the spec gives one) normalised alike.

        Nothing looser counts, as in the authors' parsing (an exact match after lower-casing): an answer
        that merely contains a label ("the intent is alarm"), or starts one, matches none and becomes a
        row of its own in the bank, which is what CM's free-text rows are there to repair.
        """
        key = free_text_key(answer)
        if not key:
            return None
        for label, shown in zip(self.labels, self.shown, strict=True):
            if key in (_normalise(label), _normalise(shown)):
                return label
        return None

    def parse(self, answer: str | None, allowed: Sequence[str] | None = None) -> str | None:
        """The label (raw name) an answer means, restricted to ``allowed``; None if it means none.

        Tries, in order: exact shown or raw text, the same after normalising case and
        punctuation, then a unique allowed label whose text the answer contains (longest wins),
        then a unique label whose text starts with the answer.
        """
        if answer is None:
            return None
        every = allowed is None or allowed is self.labels or tuple(allowed) == self.labels
        candidates = self.labels if allowed is None else allowed
        stripped = answer.strip().strip("\"'`*.").strip()
        if every and stripped in self._exact:  # the usual answer, constrained to the labels: one lookup
            return self._exact[stripped]
        forms = {label: self._shown_of[label] for label in candidates}
        for label, shown in forms.items():
            if stripped in (shown, label):
                return label
        wanted = _normalise(stripped)
        if not wanted:
            return None
        for label, shown in forms.items():
            if wanted in (_normalise(shown), _normalise(label)):
                return label
        padded = f" {wanted} "
        contained = [
            (len(_normalise(shown)), label)
            for label, shown in forms.items()
            if f" {_normalise(shown)} " in padded or f" {_normalise(label)} " in padded
        ]
        if contained:
            contained.sort(reverse=True)
            if len(contained) == 1 or contained[0][0] > contained[1][0]:
                return contained[0][1]
        prefixed = [label for label, shown in forms.items() if _normalise(shown).startswith(wanted)]
        if len(prefixed) == 1:
            return prefixed[0]
        return None
