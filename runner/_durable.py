"""One durable write for every file a job writes: whole or not at all, and still there after a power cut.

A rename alone is atomic but not durable: after a crash the directory may hold the new name
pointing at blocks never written, or the old name again while the manifest (fsynced) already
records the new file. So: write a temp file beside the target, fsync it, rename it over the
target, fsync the directory that holds the rename.

On an object store (``_storage.ObjectPath``) one PUT is already whole or nothing and durable once
it returns: the writer writes a local temp file, uploaded on success.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runner._storage import ObjectPath

_counter = itertools.count()


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | Path | ObjectPath) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a path (polars); on success it replaces ``path``.

    On an error the temp file is removed and ``path`` is left as it was.
    """
    if isinstance(path, ObjectPath):
        with tempfile.TemporaryDirectory(prefix="cm-run-") as scratch:
            tmp = Path(scratch) / path.name  # the name kept: a writer may choose its format by the suffix
            yield tmp
            path.upload(tmp)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{next(_counter)}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def write_atomic(path: str | Path | ObjectPath, body: bytes) -> None:
    """Write a whole file or nothing: a crash leaves the old file or the new one, never half of one."""
    if isinstance(path, ObjectPath):
        path.write_bytes(body)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(body)
