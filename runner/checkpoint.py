"""Checkpoints: parquet shards written atomically and a manifest saying which are finished.

An output directory belongs to one job. The manifest records the spec that made it (so a
rerun of the same command resumes and a changed spec is refused, naming what changed) and
the finished shards (so a rerun redoes only what is missing).
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.spec import JobSpec

MANIFEST_NAME = "manifest.json"
ENGINE_LOG = "engine.log"  # what the engine libraries print, kept out of the terminal (cli --verbose shows it)
TRIAL_FILE = "second_call_trial.json"  # the model's choices on user samples, for cm.second_call: auto
PHASES = ("estimate", "annotate")
SHARD_DIRS = {"estimate": "estimate", "annotate": "annotations"}
MANIFEST_FORMAT_VERSION = 2

# Keys that change where or how fast a job runs, not what it produces.
_NOT_MATERIAL = {
    "name",
    "data_dir",
    "output.dir",
    "output.chunks_in_flight",
    "output.checkpoint_seconds",
    "engine.max_concurrency",
    "engine.gpu_memory_utilization",
    # Greedy answers were the same with 1 and 2 replicas and on a two-node cluster.
    "engine.replicas",
    "engine.ray_address",
    "engine.num_cpus_per_replica",
    "engine.num_gpus_per_replica",
    # How fast and how patiently an API is asked, and what it costs, not what it answers.
    "engine.requests_per_minute",
    "engine.tokens_per_minute",
    "engine.timeout_seconds",
    "engine.max_retries",
    "engine.api_key_env",
    "engine.prices.prompt_per_million",
    "engine.prices.completion_per_million",
    "engine.prices",
}


class CheckpointError(ValueError):
    """An output directory that cannot be resumed into; the message says why and what to do."""


def write_atomic(path: Path, body: bytes) -> None:
    """Write a whole file or nothing: a crash leaves the old file or none, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _write_parquet_atomic(path: Path, rows: pl.DataFrame) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    rows.write_parquet(tmp)
    tmp.replace(path)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# The cm settings each variant reads; the others cannot change its output, so changing them (or
# their defaults, in a newer cm-runner) does not stop a run from resuming.
_COUNTS_SETTINGS = {"cm.coverage", "cm.tau", "cm.second_call", "cm.first_call", "cm.alpha", "cm.likelihood_weight"}
_NEIGHBOUR_SETTINGS = _COUNTS_SETTINGS | {"cm.neighbours", "cm.neighbour_temperature", "cm.prior"}
_CM_SETTINGS_READ = {
    "paper": {"cm.empty_row"},
    "counts": _COUNTS_SETTINGS,
    "neighbour_prior": _NEIGHBOUR_SETTINGS,
    "instance": _NEIGHBOUR_SETTINGS | {"cm.instance_neighbours", "cm.blend"},
}
_CM_ALWAYS_READ = {"cm.enabled", "cm.variant", "cm.bank"}


def material_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec's keys that decide the output, flattened ('engine.model': ...)."""
    flat = _flatten(spec.model_dump(mode="json"))
    read = _CM_ALWAYS_READ | (_CM_SETTINGS_READ[spec.cm.variant] if spec.cm.enabled else set())
    return {
        key: value
        for key, value in sorted(flat.items())
        if key not in _NOT_MATERIAL and (not key.startswith("cm.") or key in read)
    }


def _default_of(key: str) -> Any:
    """The default of a flattened spec key ('cm.variant'), or _NO_DEFAULT for required/unknown keys."""
    model: type[BaseModel] = JobSpec
    parts = key.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None or field.is_required():
            return _NO_DEFAULT
        default = field.get_default(call_default_factory=True)
        if depth == len(parts) - 1:
            return default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        if not isinstance(default, BaseModel):
            return _NO_DEFAULT
        model = type(default)
    return _NO_DEFAULT


_NO_DEFAULT = object()


def changed_keys(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The current material keys whose value differs from the previous run's.

    A key only the previous run recorded no longer counts (an older cm-runner's, or a setting
    this variant does not read); a key a newer cm-runner added counts only away from its default.
    """
    changed = []
    for key in sorted(current):
        if key not in previous and current[key] == _default_of(key):
            continue
        if previous.get(key) != current[key]:
            changed.append(key)
    return changed


def spec_digest(spec: JobSpec) -> str:
    return hashlib.sha256(orjson.dumps(material_spec(spec), option=orjson.OPT_SORT_KEYS)).hexdigest()


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = MANIFEST_FORMAT_VERSION
    job: str
    spec_digest: str
    spec: dict[str, Any] = Field(description="The material spec keys, flattened.")
    model: str
    bank_digest: str | None = None
    finished_shards: dict[str, list[int]] = Field(
        default_factory=lambda: {phase: [] for phase in PHASES},
        description="Per phase, the chunk numbers whose parquet shard is complete on disk.",
    )
    complete: bool = False
    updated_at: str = ""


class Checkpoint:
    """The output directory of one job: manifest, bank, shards."""

    def __init__(self, directory: Path, spec: JobSpec):
        self.directory = directory
        self.spec = spec
        self.manifest_path = directory / MANIFEST_NAME

    def open(self, *, restart: bool = False) -> Manifest:
        """Create the directory, or check it holds this job's earlier run and resume it."""
        try:
            for name in SHARD_DIRS.values():
                (self.directory / name).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(f"{self.directory}: output directory cannot be created ({error})") from None
        if not os.access(self.directory, os.W_OK):
            raise CheckpointError(f"{self.directory}: output directory is not writable")
        fresh = Manifest(
            job=self.spec.name,
            spec_digest=spec_digest(self.spec),
            spec=material_spec(self.spec),
            model=self.spec.engine.model,
        )
        if restart or not self.manifest_path.exists():
            if not restart and any(self.directory.iterdir()) and not self._only_our_layout():
                raise CheckpointError(
                    f"{self.directory}: holds files but no {MANIFEST_NAME}; it is not a cm-run output "
                    "directory. Choose another output.dir."
                )
            self._clear()
            self.save(fresh)
            return fresh
        previous = self.load()
        if previous.spec_digest != fresh.spec_digest:
            changed = changed_keys(previous.spec, fresh.spec)
            if not changed:  # only new keys at their defaults: the same job, recorded as it reads now
                previous.spec, previous.spec_digest = fresh.spec, fresh.spec_digest
                self.save(previous)
                return previous
            details = "; ".join(f"{key}: {previous.spec.get(key)!r} -> {fresh.spec.get(key)!r}" for key in changed[:8])
            raise CheckpointError(
                f"{self.directory}: holds a run of a different spec ({details}). "
                "Rerun with --restart to discard it, or choose another output.dir."
            )
        return previous

    def _only_our_layout(self) -> bool:
        return all(p.name in (*SHARD_DIRS.values(), ENGINE_LOG) for p in self.directory.iterdir())

    def _clear(self) -> None:
        for name in SHARD_DIRS.values():
            for shard in (self.directory / name).glob("*.parquet"):
                shard.unlink()
        for name in ("memory_bank.json", "estimate.parquet", "annotations.parquet", "metrics.json", TRIAL_FILE):
            (self.directory / name).unlink(missing_ok=True)

    def load(self) -> Manifest:
        try:
            return Manifest.model_validate(orjson.loads(self.manifest_path.read_bytes()))
        except (orjson.JSONDecodeError, ValidationError) as error:
            raise CheckpointError(
                f"{self.manifest_path}: corrupt manifest ({str(error).splitlines()[0]}). "
                "Rerun with --restart to start this output directory over."
            ) from None

    def save(self, manifest: Manifest) -> None:
        manifest.updated_at = datetime.now(UTC).isoformat(timespec="seconds")
        write_atomic(self.manifest_path, orjson.dumps(manifest.model_dump(), option=orjson.OPT_INDENT_2))

    def shard_path(self, phase: str, number: int) -> Path:
        return self.directory / SHARD_DIRS[phase] / f"part-{number:05d}.parquet"

    def partial_path(self, phase: str, number: int) -> Path:
        return self.directory / SHARD_DIRS[phase] / f"partial-{number:05d}.parquet"

    def write_shard(self, manifest: Manifest, phase: str, number: int, rows: pl.DataFrame) -> None:
        """Write one finished chunk, then record it: a shard on disk but not in the manifest is redone."""
        _write_parquet_atomic(self.shard_path(phase, number), rows)
        manifest.finished_shards[phase] = sorted({*manifest.finished_shards.get(phase, []), number})
        self.save(manifest)
        self.partial_path(phase, number).unlink(missing_ok=True)

    def write_partial(self, phase: str, number: int, rows: pl.DataFrame) -> None:
        """Save the finished rows of an unfinished chunk; every row in the file is a whole answer."""
        _write_parquet_atomic(self.partial_path(phase, number), rows)

    def read_partial(self, phase: str, number: int) -> pl.DataFrame | None:
        """The rows an interrupted run saved of chunk ``number``, or None."""
        path = self.partial_path(phase, number)
        return pl.read_parquet(path) if path.is_file() else None

    def finished(self, manifest: Manifest, phase: str) -> set[int]:
        """Shards the manifest records that are also on disk."""
        return {n for n in manifest.finished_shards.get(phase, []) if self.shard_path(phase, n).is_file()}
