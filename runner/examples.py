"""The labelled examples few-shot prompts draw from: the user split, never the text being labelled.

Two selections: ``random`` (one seeded order, the same examples for every text, so prompts share
a prefix) and ``nearest`` (the user samples most similar to the text by sentence embeddings).
Either way only examples whose label is allowed in the call are shown (on CM's second call the
candidate set), and an example whose text equals the text being labelled is left out: in the
estimate phase every text is itself in the user split, and showing it with its label would leak
the answer the bank is meant to measure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import polars as pl

Embedder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Example:
    text: str
    label: str


class ExamplePool:
    """Labelled texts (raw label names) and the two ways of choosing k of them for a text."""

    def __init__(self, texts: Sequence[str], labels: Sequence[str], *, seed: int = 0, embedder: Embedder | None = None):
        if len(texts) != len(labels):
            raise ValueError("texts and labels differ in length")
        self.texts = list(texts)
        self.labels = np.asarray(labels, dtype=object)
        self._order = np.random.default_rng(seed).permutation(len(self.texts))
        self._positions: dict[str, list[int]] = {}
        for position, text in enumerate(self.texts):
            self._positions.setdefault(text, []).append(position)
        self._embedder = embedder
        self._vectors: np.ndarray | None = None
        self._query_vectors: dict[str, np.ndarray] = {}  # CM's second call asks about the same text again

    @classmethod
    def from_rows(
        cls, rows: pl.DataFrame, *, max_chars: int | None = None, seed: int = 0, embedder: Embedder | None = None
    ) -> ExamplePool:
        """From a user split table (columns text, label), texts cut as the pipeline cuts prompt texts."""
        texts = rows["text"].str.slice(0, max_chars) if max_chars else rows["text"]
        return cls(texts.to_list(), rows["label"].to_list(), seed=seed, embedder=embedder)

    def __len__(self) -> int:
        return len(self.texts)

    def _usable(self, text: str, allowed: Sequence[str]) -> np.ndarray:
        mask = np.isin(self.labels, list(allowed))
        mask[self._positions.get(text, [])] = False
        return mask

    def random(self, text: str, allowed: Sequence[str], k: int) -> list[Example]:
        """The first k usable examples of the pool's fixed seeded order."""
        usable = self._usable(text, allowed)
        chosen = [int(i) for i in self._order if usable[i]][:k]
        return [Example(self.texts[i], str(self.labels[i])) for i in chosen]

    def nearest(self, texts: Sequence[str], allowed: Sequence[Sequence[str]], k: int) -> list[list[Example]]:
        """For each text the k most similar usable examples, least similar first (the closest sits next to the text)."""
        self._embed_queries(texts)
        vectors = self._pool_vectors()
        chosen = []
        for text, labels in zip(texts, allowed, strict=True):
            similarity = vectors @ self._query_vectors[text]
            similarity[~self._usable(text, labels)] = -np.inf
            count = min(k, int(np.isfinite(similarity).sum()))
            if count == 0:
                chosen.append([])
                continue
            top = np.argpartition(-similarity, count - 1)[:count]
            # ties in similarity fall back to the pool order, so the choice never depends on argpartition
            ranked = sorted(top.tolist(), key=lambda i: (similarity[i], -i))
            chosen.append([Example(self.texts[i], str(self.labels[i])) for i in ranked])
        return chosen

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embedder is None:
            from runner.embeddings import embed

            self._embedder = embed
        return self._embedder(texts)

    def _pool_vectors(self) -> np.ndarray:
        if self._vectors is None:
            self._vectors = self._embed(self.texts)
        return self._vectors

    def _embed_queries(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(text for text in texts if text not in self._query_vectors))
        if missing:
            self._query_vectors.update(zip(missing, self._embed(missing), strict=True))


_current_pool: ContextVar[ExamplePool | None] = ContextVar("example_pool", default=None)


@contextmanager
def examples_for_jobs(pool: ExamplePool) -> Iterator[ExamplePool]:
    """Make ``pool`` the few-shot example pool of strategies built inside this block.

    ``run_job`` builds its strategy from the spec alone and does not hand it the user split, so a
    caller that runs few-shot jobs (the evaluation grid) supplies the pool here.
    """
    token = _current_pool.set(pool)
    try:
        yield pool
    finally:
        _current_pool.reset(token)


def current_pool() -> ExamplePool | None:
    return _current_pool.get()
