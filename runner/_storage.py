"""Where a job's files live: a local path, or an object in S3 (or an S3-compatible store).

``location(text)`` gives a ``pathlib.Path`` for a local path and an ``ObjectPath`` for an
``s3://bucket/key`` URL. An ``ObjectPath`` answers the part of the ``Path`` API the job uses
(``/``, ``name``, ``suffix``, ``is_file``, ``read_bytes``, ``write_bytes``, ``iterdir``, ``glob``,
``unlink``, ``stat``, ``open``), so checkpoints, the manifest, banks and shards are written by one
code path whichever the place; only what cannot be the same differs, here and in ``_durable``
(an atomic write is a rename on a disk and one PUT on a store) and in the checkpoint's lock
(``flock`` on a disk; on a store an object taken and renewed by conditional PUTs, ``ObjectPath.put_if``,
held as a lease: ``_lease``).

Why boto3 for the store and polars for reading tables: an ``ObjectPath`` is a ``str`` (its URL),
so polars reads ``s3://`` tables natively (streamed, row groups on demand), as it reads a local
file. Everything else goes through boto3, the AWS SDK: it reads credentials and the endpoint from
the environment as every AWS tool does (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile,
an instance role; ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for MinIO, R2, Ceph or a local
server; ``AWS_REGION``), and it sends conditional writes (``If-None-Match: *``, ``If-Match``), which pyarrow's
and fsspec's filesystems do not expose and which the lock needs. (pyarrow 26's S3 filesystem also
failed its multipart uploads against moto's server.) So only ``s3://`` is served: a store with an
S3 API (most have one, GCS included through its interoperability endpoint) is reached with
``AWS_ENDPOINT_URL_S3``. Credentials are never part of a URL, a spec, a manifest or a metric.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import fnmatch
import functools
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

SCHEME = "s3://"


class StorageError(ValueError):
    """An object store that cannot be used: the message names the URL and what to do."""


def is_url(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names a place by URL (``scheme://...``) rather than a local path."""
    return isinstance(text, str) and "://" in text


def location(text: str | os.PathLike[str]) -> Path | ObjectPath:
    """A local path as a ``Path``, an ``s3://`` URL as an ``ObjectPath``; other schemes are refused."""
    if isinstance(text, ObjectPath | Path):
        return text
    text = os.fspath(text)
    if not is_url(text):
        return Path(text).expanduser()
    if not text.startswith(SCHEME):
        scheme = text.split("://", 1)[0]
        raise StorageError(f"{text}: the '{scheme}://' scheme is not supported; use a local path or s3://bucket/key")
    return ObjectPath(text)


def on_object_store(path: object) -> bool:
    return isinstance(path, ObjectPath)


@functools.cache
def _client() -> Any:
    """One S3 client a process (thread-safe), configured from the environment only."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError("s3:// paths need boto3: pip install 'cm-runner[s3]'") from None
    # boto3 reads AWS_DEFAULT_REGION; AWS_REGION is what the other SDKs (and polars) read
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    # a session of its own: boto3's default one keeps the credentials it first found
    session = boto3.session.Session()
    return session.client("s3", region_name=region, config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _problem(url: str, error: Exception) -> StorageError:
    """A boto3 failure as one line a user can act on."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"{url}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, in the environment)"
        )
    if isinstance(error, EndpointConnectionError):
        return StorageError(f"{url}: cannot reach the S3 endpoint ({error}); check AWS_ENDPOINT_URL(_S3)")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        bucket = url[len(SCHEME) :].split("/", 1)[0]
        if code in ("NoSuchBucket", "InvalidBucketName"):
            return StorageError(f"{url}: bucket '{bucket}' does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{url}: access denied ({code}); check the credentials in the environment")
        return StorageError(f"{url}: S3 refused the request ({code or error})")
    return StorageError(f"{url}: {error}")


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class ObjectPath(str):
    """An ``s3://bucket/key`` URL with the ``Path`` methods a job uses; "directories" are key prefixes."""

    def __new__(cls, url: str) -> ObjectPath:
        body = url[len(SCHEME) :].strip("/")
        bucket = body.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{url}: no bucket in the URL (s3://bucket/key)")
        return super().__new__(cls, f"{SCHEME}{body}")

    @property
    def bucket(self) -> str:
        return self[len(SCHEME) :].split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self[len(SCHEME) :].split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1] if self.key else ""

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.rsplit("/", 1)[0]) if self.key else self

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def __truediv__(self, other: str | os.PathLike[str]) -> ObjectPath:  # type: ignore[override]
        return ObjectPath(f"{self}/{os.fspath(other).strip('/')}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled for Ray workers as its URL
        return (ObjectPath, (str(self),))

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(_client(), method)(Bucket=self.bucket, **kwargs)
        except Exception as error:
            if _code(error) in ("NoSuchKey", "404") and method in ("get_object", "head_object"):
                if method == "head_object":  # a HEAD says 404 for a missing bucket too: tell them apart
                    self.check_bucket()
                raise FileNotFoundError(str(self)) from None
            raise _problem(str(self), error) from None

    def check_bucket(self) -> None:
        """Fail, naming the URL, unless the bucket exists and the credentials reach it."""
        try:
            _client().head_bucket(Bucket=self.bucket)
        except Exception as error:
            if _code(error) in ("404", "NoSuchBucket"):
                raise StorageError(f"{self}: bucket '{self.bucket}' does not exist") from None
            raise _problem(str(self), error) from None

    def stat(self) -> SimpleNamespace:
        head = self._call("head_object", Key=self.key)
        mtime_ns = int(head["LastModified"].timestamp() * 1e9)
        return SimpleNamespace(st_size=head["ContentLength"], st_mtime_ns=mtime_ns, etag=head.get("ETag"))

    def is_file(self) -> bool:
        if not self.key:
            return False
        try:
            self.stat()
        except FileNotFoundError:
            return False
        return True

    def is_dir(self) -> bool:
        listed = self._call("list_objects_v2", Prefix=f"{self.key}/" if self.key else "", MaxKeys=1)
        return bool(listed.get("KeyCount"))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make on a store (a prefix exists once a key has it): check the bucket instead."""
        self.check_bucket()

    def iterdir(self) -> Iterator[ObjectPath]:
        prefix = f"{self.key}/" if self.key else ""
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        try:
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    yield self / common["Prefix"][len(prefix) :]
                for item in page.get("Contents", []):
                    if item["Key"] != prefix:
                        yield self / item["Key"][len(prefix) :]
        except Exception as error:
            raise _problem(str(self), error) from None

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))

    def read_bytes(self) -> bytes:
        return self._call("get_object", Key=self.key)["Body"].read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb") -> BinaryIO:
        """A streamed read (hashing a large corpus does not hold it in memory); only reading is offered."""
        if mode != "rb":
            raise ValueError(f"{self}: an object is written whole (write_bytes), not through a handle")
        return self._call("get_object", Key=self.key)["Body"]

    def write_bytes(self, body: bytes) -> None:
        """One PUT: readers see the old object or the new one, whole (S3 is strongly consistent)."""
        self._before_write()
        self._call("put_object", Key=self.key, Body=body)

    def upload(self, local: Path) -> None:
        self._before_write()
        try:
            _client().upload_file(str(local), self.bucket, self.key)
        except Exception as error:
            raise _problem(str(self), error) from None

    def unlink(self, missing_ok: bool = False) -> None:
        self._before_write()
        if not missing_ok and not self.is_file():
            raise FileNotFoundError(str(self))
        self._call("delete_object", Key=self.key)

    def move_to(self, target: ObjectPath) -> None:
        """Copy then delete (a store has no rename); a crash in between leaves both, never neither."""
        self._before_write()
        self._call("copy_object", Key=target.key, CopySource={"Bucket": self.bucket, "Key": self.key})
        self.unlink(missing_ok=True)

    def read_versioned(self) -> Versioned:
        """The object with what a conditional write needs: its ETag, and its age by the store's clock."""
        got = self._call("get_object", Key=self.key)
        body = got["Body"].read()
        date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        # the store's Date header and Last-Modified alike: no clock of this node is compared with the store's
        now = email.utils.parsedate_to_datetime(date) if date else datetime.now(UTC)
        return Versioned(body=body, etag=got["ETag"], age_seconds=(now - got["LastModified"]).total_seconds())

    def put_if(self, body: bytes, *, match: str | None = None) -> str | None:
        """A conditional PUT: with ``match``, only over the object whose ETag it is (``If-Match``); without,
        only if no object is there (``If-None-Match: *``). The new ETag, or None where the condition failed.

        S3 evaluates the condition and the write as one step: of two writers racing, one gets None.
        Not fenced (``fenced``): the lock object's own writes are how a lease is held.
        """
        condition = {"IfMatch": match} if match is not None else {"IfNoneMatch": "*"}
        try:
            return _client().put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except Exception as error:
            if _code(error) in _CONDITION_FAILED:
                return None
            raise _problem(str(self), error) from None

    def delete_if(self, etag: str) -> bool:
        """Delete the object only if its ETag is ``etag`` (``If-Match``); whether it was."""
        try:
            _client().delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except Exception as error:
            if _code(error) in _CONDITION_FAILED:
                return False
            raise _problem(str(self), error) from None
        return True

    def _before_write(self) -> None:
        for prefix, check in list(_fences.items()):
            if self.startswith(prefix):
                check()


# 412: the condition failed; 409: a concurrent conditional write to the key (S3: retry after reading it
# again); 404 NoSuchKey: If-Match on an object that is gone
_CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")


@dataclasses.dataclass(frozen=True)
class Versioned:
    body: bytes
    etag: str
    age_seconds: float  # since its last write, by the store's clock


_fences: dict[str, Callable[[], None]] = {}


@contextlib.contextmanager
def fenced(directory: ObjectPath, check: Callable[[], None]) -> Iterator[None]:
    """While inside, each write of this process below ``directory`` first calls ``check``, which raises if
    this process may no longer write there (the lease of the directory's lock is lost: ``_lease``)."""
    prefix = f"{directory}/"
    _fences[prefix] = check
    try:
        yield
    finally:
        _fences.pop(prefix, None)


def move(source: Path | ObjectPath, target: Path | ObjectPath) -> None:
    """Rename ``source`` over ``target`` on the same storage."""
    if isinstance(source, ObjectPath) and isinstance(target, ObjectPath):
        source.move_to(target)
    else:
        Path(source).replace(target)


def local_side(directory: str | os.PathLike[str]) -> Path:
    """Where a job keeps what only a local file can hold (the engine log, appended to by other
    processes): the output directory itself, or for an ``s3://`` one a folder of the temp dir
    named after its URL."""
    place = location(directory)
    if isinstance(place, Path):
        return place
    return Path(tempfile.gettempdir()) / "cm-run" / place.bucket / place.key


def holder_name() -> str:
    """Who holds a lock: ``pid@host``."""
    return f"{os.getpid()}@{socket.gethostname()}"


def process_start() -> float:
    """This process's start time: with ``pid@host``, tells a live holder from a dead one whose pid was
    reused (a restarted container)."""
    import psutil

    return round(psutil.Process().create_time(), 3)


def holder_is_dead(holder: str, started: float | None) -> bool:
    """A lock left by a process of this host that no longer runs (a SIGKILLed cm-run); other hosts: unknown."""
    import psutil

    pid, _, host = holder.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        if started is not None and abs(process.create_time() - started) > 1:
            return True  # that pid is another process now
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
    return False
