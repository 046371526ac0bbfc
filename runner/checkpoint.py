"""Checkpoints: parquet shards written atomically and a manifest saying which are finished.

An output directory belongs to one job. The manifest records the spec that made it and the
content of the files it read (so a rerun of the same command resumes, and a changed spec or a
changed file at the same path is refused, naming what changed) and the finished shards (so a
rerun redoes only what is missing). While a job runs, it holds an OS lock on the directory.

The directory may be an ``s3://`` prefix (``_storage.ObjectPath``): the same files, written by one
PUT each; the lock is then an object held by a lease, taken and renewed by conditional PUTs
(``Checkpoint._locked_object``, ``_lease``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import orjson
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner._durable import atomic_path, write_atomic
from runner._lease import Lease, LockHeld
from runner._storage import ObjectPath, StorageError, fenced, location, move
from runner.spec import JobSpec

__all__ = ["atomic_path", "write_atomic"]  # re-exported: callers import the one durable write from here

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".cm-run.lock"  # holds the pid of the cm-run writing here; locked with flock while it runs
ENGINE_LOG = "engine.log"  # what the engine libraries print, kept out of the terminal (cli --verbose shows it)
TRIAL_FILE = "second_call_trial.json"  # the model's choices on user samples, for cm.second_call: auto
BATCH_DIR = "batch"  # an engine's own resumable state (the Batch API's batches and answered lines)
PHASES = ("estimate", "annotate")
STAGES_DIR = "stages"  # a cascade's stages, each a directory of its own bank, fit and manifest
SHARD_DIRS = {"estimate": "estimate", "annotate": "annotations"}
MANIFEST_FORMAT_VERSION = 2

# Every spec key decides the output unless named here: keys that change where or how fast a job
# runs, not what it produces. A key a newer cm-runner adds (or removes) is material until it is listed here.
_IMMATERIAL = {
    "name",
    "data_dir",
    "output.dir",
    "output.chunks_in_flight",
    "output.checkpoint_seconds",
    "output.lock_lease_seconds",
    "engine.max_concurrency",
    "engine.gpu_memory_utilization",
    "engine.kv_cache_gib",
    "engine.reserved_cpus",
    # Greedy answers were the same with 1 and 2 replicas and on a two-node cluster.
    "engine.replicas",
    "engine.ray_address",
    # Where rows are annotated: both executors run the same block function on the same chunks.
    "executor.kind",
    "executor.workers",
    "executor.num_cpus_per_worker",
    "executor.ray_address",
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
    # The Batch API sends the online engine's request bodies: the same answers, later and cheaper.
    "engine.batch",
    "engine.batch_completion_window",
    "engine.batch_poll_seconds",
    "engine.batch_max_requests",
    "engine.batch_max_bytes",
    "engine.batch_discount",
}


# What a run writes besides the shards; --restart removes them.
_JOB_FILES = ("memory_bank.json", "estimate.parquet", "annotations.parquet", "metrics.json")
_JOB_FILES += ("fitted_cm.pkl", "fitted_cm.json", "review.parquet", "risk_coverage.png")
# A reviewer's labels are the old run's too: its ids may name other rows of a new corpus, its first answers
# come from the old model, its labels from the old label set. --restart sets them aside, unapplied, under
# this name (re-importable with `cm-run review import` where they fit the new run), as a reviewer's hours
# are not the run's to delete.
REVIEWED_FILE = "reviewed.parquet"
SET_ASIDE_REVIEW = "reviewed.before-restart.parquet"


class CheckpointError(ValueError):
    """An output directory that cannot be resumed into; the message says why and what to do."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# The cm settings a variant does not read: changing them cannot change its output, so they do not
# stop a run from resuming. A cm setting not named here is read by every variant.
_COUNTS_ONLY = {"cm.coverage", "cm.tau", "cm.second_call", "cm.first_call", "cm.alpha", "cm.likelihood_weight"}
_NEIGHBOURS_ONLY = {"cm.neighbours", "cm.neighbour_temperature", "cm.prior", "cm.embedding_model"}
_NEIGHBOURS_ONLY |= {"cm.ood", "cm.ood.level", "cm.ood.neighbours", "cm.ood.lexical"}  # it needs the embeddings
_INSTANCE_ONLY = {"cm.instance_neighbours", "cm.blend"}
_CM_NOT_READ = {
    "paper": _COUNTS_ONLY | _NEIGHBOURS_ONLY | _INSTANCE_ONLY,
    "counts": {"cm.empty_row"} | _NEIGHBOURS_ONLY | _INSTANCE_ONLY,
    "neighbour_prior": {"cm.empty_row"} | _INSTANCE_ONLY,
    "instance": {"cm.empty_row"},
}
# With CM off only these are read: they say that it is off, and whether the user split still calibrates a confidence.
_CM_READ_WHEN_OFF = {"cm.enabled", "cm.variant", "cm.bank", "cm.accept", "cm.accept.target_accuracy"}
_CM_READ_WHEN_OFF |= {"cm.accept.confidence_level"}


def _immaterial(key: str, cm_enabled: bool, cm_variant: str) -> bool:
    """Whether a job with these cm settings leaves ``key`` unread (or reads it only for speed or cost)."""
    if key in _IMMATERIAL:
        return True
    if not key.startswith("cm."):
        return False
    if not cm_enabled:  # the user split still chooses the threshold: every cm.accept setting is read
        return key not in _CM_READ_WHEN_OFF and not key.startswith("cm.accept.")
    return key in _CM_NOT_READ[cm_variant]


def material_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec's keys that decide the output, flattened ('engine.model': ...)."""
    flat = _flatten(spec.model_dump(mode="json"))
    return {key: value for key, value in sorted(flat.items()) if not _immaterial(key, spec.cm.enabled, spec.cm.variant)}


class _NotSet:
    """A key a spec does not have: below a section set to null, a mapping entry absent, a setting unknown."""

    def __repr__(self) -> str:
        return "(not set)"


_NO_DEFAULT: Any = _NotSet()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models_in(argument)]


def _default_of(key: str, recorded: dict[str, Any] | None = None) -> Any:
    """The default of a flattened spec key ('cm.variant'), or _NO_DEFAULT where it has none.

    A required key has none, nor has an entry of a mapping the default does not hold, a key below a
    section whose default is null, or a key the spec does not know. A section that is one of several
    models (the engine) is the one ``recorded``'s ``kind`` names, else the section's default.
    """
    model: type[BaseModel] = JobSpec
    parts = key.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return _NO_DEFAULT
        default = _NO_DEFAULT if field.is_required() else field.get_default(call_default_factory=True)
        if depth == len(parts) - 1:
            return default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        if default is None:
            return _NO_DEFAULT
        models = _models_in(field.annotation)
        if not models:  # a mapping (dataset.label_descriptions): its entries are the default's
            value = default
            for entry in parts[depth + 1 :]:
                if not isinstance(value, dict) or entry not in value:
                    return _NO_DEFAULT
                value = value[entry]
            return value
        kind = (recorded or {}).get(".".join([*parts[: depth + 1], "kind"]))
        named = [m for m in models if "kind" in m.model_fields and m.model_fields["kind"].default == kind]
        model = named[0] if named else type(default) if isinstance(default, BaseModel) else models[0]
    return _NO_DEFAULT


def _effective(recorded: dict[str, Any], key: str) -> Any:
    """``key``'s value in a flattened spec, as the job reads it.

    Recorded: that value; a section whose keys are recorded: those, as a mapping; below a recorded
    value (a section set to null, an empty mapping): not set; else it was not recorded (an older
    cm-runner's manifest, which records only what was material then): the default.
    """
    if key in recorded:
        return recorded[key]
    below = {name[len(key) + 1 :]: value for name, value in recorded.items() if name.startswith(f"{key}.")}
    if below:
        return _unflatten(below)
    parts = key.split(".")
    if any(".".join(parts[:depth]) in recorded for depth in range(1, len(parts))):
        return _NO_DEFAULT
    return _default_of(key, recorded)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return nested


def changed_keys(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys a job with the ``current`` material spec reads whose effective value the two runs differ in.

    One comparison: every key either run recorded that the current spec reads, each side's value as
    its job reads it (``_effective``: defaults filled in where a manifest did not record a key). Keys
    listed immaterial, and cm settings the current variant does not read, are not compared. A file's
    content is compared where both runs recorded it (an older cm-runner did not: it is taken as it is
    now). A key whose section changed as a whole is named once, as the section.
    """
    enabled, variant = _effective(current, "cm.enabled"), _effective(current, "cm.variant")
    keys = {key for key in previous | current if not key.startswith(CONTENT_PREFIX) or key in previous.keys() & current}
    changed = [
        key
        for key in sorted(keys)
        if not _immaterial(key, enabled, variant) and _effective(previous, key) != _effective(current, key)
    ]
    return [key for key in changed if not any(key.startswith(f"{section}.") for section in changed)]


def spec_digest(spec: JobSpec) -> str:
    return _digest(material_spec(spec))


def _digest(material: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


CONTENT_PREFIX = "content of "


class FileStamp(BaseModel):
    """A file the job read, identified by content; size and mtime only say when to hash it again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int
    mtime_ns: int
    sha256: str

    @property
    def content(self) -> str:
        return f"{self.size} bytes, sha256 {self.sha256[:16]}"


def file_stamp(path: Path | ObjectPath, known: FileStamp | None = None) -> FileStamp:
    """``path``'s size and sha256, streamed; ``known`` is reused when path, size and mtime are unchanged."""
    stat = path.stat()
    if known is not None and (known.path, known.size, known.mtime_ns) == (str(path), stat.st_size, stat.st_mtime_ns):
        return known
    digest = hashlib.sha256()
    with path.open("rb") as handle:  # a local file or an object's streamed body alike
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    sha256 = digest.hexdigest()
    return FileStamp(path=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=sha256)


def job_files(spec: JobSpec, data_dir: str | Path | None = None) -> dict[str, Path | ObjectPath]:
    """The files whose content decides the output, by the spec key that names them."""
    files = {
        "user_split.path": spec.resolve_data_path(spec.user_split.path, data_dir),
        "corpus.path": spec.resolve_data_path(spec.corpus.path, data_dir),
    }
    if spec.cm.enabled and spec.cm.bank is not None:
        files["cm.bank"] = location(spec.cm.bank)
    return files


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = MANIFEST_FORMAT_VERSION
    job: str
    spec_digest: str
    spec: dict[str, Any] = Field(description="The material spec keys, flattened.")
    model: str
    bank_digest: str | None = None
    fit_key: str | None = Field(
        default=None, description="The fitted CM the annotation shards were scored with (spec, bank, reviewed rows)."
    )
    files: dict[str, FileStamp] = Field(
        default_factory=dict, description="The files the job read, by the spec key naming them."
    )
    finished_shards: dict[str, list[int]] = Field(
        default_factory=lambda: {phase: [] for phase in PHASES},
        description="Per phase, the chunk numbers whose parquet shard is complete on disk.",
    )
    complete: bool = False
    updated_at: str = ""


class Checkpoint:
    """The output directory of one job: manifest, bank, shards."""

    def __init__(self, directory: Path | ObjectPath, spec: JobSpec, files: dict[str, Path | ObjectPath] | None = None):
        self.directory = location(directory)
        self.spec = spec
        self.files = files or {}
        self.manifest_path = directory / MANIFEST_NAME
        self.created = False  # open() started it afresh: nothing below it (a cascade's stages) is kept

    def _make_directory(self) -> None:
        if isinstance(self.directory, ObjectPath):
            try:
                self.directory.mkdir()
            except StorageError as error:
                raise CheckpointError(f"output.dir: {error}") from None
            return
        try:
            for name in SHARD_DIRS.values():
                (self.directory / name).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(f"{self.directory}: output directory cannot be created ({error})") from None
        if not os.access(self.directory, os.W_OK):
            raise CheckpointError(f"{self.directory}: output directory is not writable")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory for this process: a second cm-run on it fails at once, naming this one.

        An OS lock (flock), so it is released however the process ends; the file stays. On an object
        store, ``_locked_object``.
        """
        self._make_directory()
        if isinstance(self.directory, ObjectPath):
            with self._locked_object(self.directory / LOCK_NAME):
                yield
            return
        handle = (self.directory / LOCK_NAME).open("a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise CheckpointError(
                    f"{self.directory}: another cm-run (pid {holder}) is writing to this output directory; "
                    "wait for it to end, or choose another output.dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock

    @contextlib.contextmanager
    def _locked_object(self, lock: ObjectPath) -> Iterator[None]:
        """The lock on a store: an object held by a lease this run renews (``_lease``), deleted at the end.

        A second run finds it and fails, naming the holder and its last renewal; a lease left unrenewed
        (its run killed, on any node) is taken over by the next run once it has run out, and a dead
        holder of this host at once. While held, every write of this process below the directory
        checks the lease first: a run whose lock was taken over stops there, writing nothing more.
        """
        lease = Lease(lock, self.spec.output.lock_lease_seconds)
        try:
            lease.take()
        except LockHeld as held:
            holder = held.holder
            if holder.lease_seconds is None:
                gone = "If that run is gone (killed on another machine), delete the lock object and rerun."
            else:
                left = max(0.0, holder.lease_seconds + 1 - holder.age_seconds)
                gone = (
                    f"It renews a lease of {holder.lease_seconds:g} s while it runs: if it was killed, "
                    f"a rerun takes over once that runs out (in {left:.0f} s)."
                )
            raise CheckpointError(
                f"{self.directory}: another cm-run ({holder.name}, lock last renewed {holder.last_renewed}) "
                f"is writing to this output directory (lock object {lock}); wait for it to end, or choose "
                f"another output.dir. {gone}"
            ) from None
        except StorageError as error:
            raise CheckpointError(f"output.dir: {error}") from None
        try:
            with fenced(self.directory, lease.check):
                yield
        finally:
            lease.release()

    def open(self, *, restart: bool = False) -> Manifest:
        """Create the directory, or check it holds this job's earlier run and resume it."""
        self._make_directory()
        previous = self.load() if not restart and self.manifest_path.exists() else None
        known = previous.files if previous is not None else {}
        files = {key: file_stamp(path, known.get(key)) for key, path in self.files.items() if path.is_file()}
        material = material_spec(self.spec) | {f"{CONTENT_PREFIX}{key}": stamp.content for key, stamp in files.items()}
        fresh = Manifest(
            job=self.spec.name,
            spec_digest=_digest(material),
            spec=material,
            model=self.spec.engine.model,
            files=files,
        )
        if previous is None:
            if not restart and any(self.directory.iterdir()) and not self._only_our_layout():
                raise CheckpointError(
                    f"{self.directory}: holds files but no {MANIFEST_NAME}; it is not a cm-run output "
                    "directory. Choose another output.dir."
                )
            self._clear()
            self.save(fresh)
            self.created = True
            return fresh
        if previous.spec_digest != fresh.spec_digest or previous.files != fresh.files:
            changed = changed_keys(previous.spec, fresh.spec)
            if not changed:  # new keys at their defaults, files touched: the same job, recorded as it reads now
                previous.spec, previous.spec_digest, previous.files = fresh.spec, fresh.spec_digest, fresh.files
                self.save(previous)
                return previous
            details = "; ".join(
                f"{key}: {_effective(previous.spec, key)!r} -> {_effective(fresh.spec, key)!r}" for key in changed[:8]
            )
            raise CheckpointError(
                f"{self.directory}: holds a run of a different spec ({details}). "
                "Rerun with --restart to discard it, or choose another output.dir."
            )
        return previous

    def _only_our_layout(self) -> bool:
        layout = (*SHARD_DIRS.values(), BATCH_DIR, LOCK_NAME, ENGINE_LOG, STAGES_DIR)
        return all(p.name in layout for p in self.directory.iterdir())

    def _clear(self) -> None:
        for name in SHARD_DIRS.values():
            for shard in (self.directory / name).glob("*.parquet"):
                shard.unlink()
        for name in (*_JOB_FILES, TRIAL_FILE):
            (self.directory / name).unlink(missing_ok=True)
        reviewed = self.directory / REVIEWED_FILE
        if reviewed.is_file():  # made durable by the manifest's write, which syncs this directory
            move(reviewed, self.directory / SET_ASIDE_REVIEW)
        if isinstance(self.directory, Path):  # the Batch API's state is local (refused with an s3:// output.dir)
            shutil.rmtree(self.directory / BATCH_DIR, ignore_errors=True)

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

    def shard_path(self, phase: str, number: int) -> Path | ObjectPath:
        return self.directory / SHARD_DIRS[phase] / f"part-{number:05d}.parquet"

    def partial_path(self, phase: str, number: int) -> Path | ObjectPath:
        return self.directory / SHARD_DIRS[phase] / f"partial-{number:05d}.parquet"

    def write_shard(self, manifest: Manifest, phase: str, number: int, rows: pl.DataFrame) -> None:
        """Write one finished chunk, then record it."""
        self.write_shard_file(phase, number, rows)
        self.record_shard(manifest, phase, number)

    def write_shard_file(self, phase: str, number: int, rows: pl.DataFrame) -> None:
        """Write one finished chunk's shard (a Ray worker does; its driver records it)."""
        with atomic_path(self.shard_path(phase, number)) as tmp:
            rows.write_parquet(tmp)

    def record_shard(self, manifest: Manifest, phase: str, number: int) -> None:
        """Record a written shard as finished: a shard on disk but not in the manifest is redone.

        Its partial shard goes only after: a run stopped in between resumes from it, asking nothing again.
        """
        manifest.finished_shards[phase] = sorted({*manifest.finished_shards.get(phase, []), number})
        self.save(manifest)
        self.partial_path(phase, number).unlink(missing_ok=True)

    def write_partial(self, phase: str, number: int, rows: pl.DataFrame) -> None:
        """Save the finished rows of an unfinished chunk; every row in the file is a whole answer."""
        with atomic_path(self.partial_path(phase, number)) as tmp:
            rows.write_parquet(tmp)

    def read_partial(self, phase: str, number: int) -> pl.DataFrame | None:
        """The rows an interrupted run saved of chunk ``number``, or None."""
        path = self.partial_path(phase, number)
        return pl.read_parquet(path) if path.is_file() else None

    def finished(self, manifest: Manifest, phase: str) -> set[int]:
        """Shards the manifest records that are also on disk (one listing: on a store, one request, not one a shard)."""
        present = {path.name for path in (self.directory / SHARD_DIRS[phase]).glob("part-*.parquet")}
        return {n for n in manifest.finished_shards.get(phase, []) if self.shard_path(phase, n).name in present}
