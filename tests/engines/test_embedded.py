import hashlib

import orjson
import pytest

from runner.engines.base import EngineError
from runner.engines.embedded import EMBEDDED_MODELS, _folder_is_intact, prepare_embedded_model, resolve_model


def _folder(tmp_path, source="abc"):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    files = {"model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    (folder / "cm-runner-model.json").write_bytes(orjson.dumps({"gguf_sha256": source, "files": files}))
    return folder


def test_a_cached_folder_is_reused_only_while_its_checksums_hold(tmp_path):
    folder = _folder(tmp_path)
    assert _folder_is_intact(folder, "abc")
    assert not _folder_is_intact(folder, "another-source")
    (folder / "model.safetensors").write_bytes(b"tampered")
    assert not _folder_is_intact(folder, "abc")


def test_unknown_names_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(EngineError, match="unknown embedded model 'tiny'"):
        prepare_embedded_model("tiny")
    with pytest.raises(EngineError, match="is not a model folder"):
        resolve_model(str(tmp_path))
    assert resolve_model("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"


@pytest.mark.engine
def test_default_model_is_prepared_from_its_pinned_gguf():
    folder = prepare_embedded_model("smollm2-135m-instruct")
    manifest = orjson.loads((folder / "cm-runner-model.json").read_bytes())
    assert manifest["gguf_sha256"] == EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_sha256
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert resolve_model("smollm2-135m-instruct") == str(folder)
