"""The Batch API engine's durable record: every batch it created and every line answered.

Laid out in the engine's state directory (the job's ``output.dir/batch/``)::

    batches.json      each batch: state, input file id, batch id, server status, output/error file ids
    b00001.ids        the custom ids of batch b00001's lines, written before its file is uploaded
    answers.jsonl     answered lines (and lines the server will refuse again), appended, fsynced

``batches.json`` is rewritten atomically (fsync, then rename) before and after each API step, so a
job killed anywhere finds, on its rerun, each batch in the state of its last finished step.
Without a directory (an evaluation grid's engine) the record lives in memory only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, Field, ValidationError

from runner.checkpoint import write_atomic
from runner.engines.base import EngineError

RECORD_FILE = "batches.json"
ANSWERS_FILE = "answers.jsonl"
_TAIL_BLOCK = 1 << 16

State = Literal["uploading", "uploaded", "submitted", "done", "failed", "abandoned"]
"""uploading: file being sent (its id unknown until it returns); uploaded: file id known, batch maybe
created (a rerun looks it up by input file); submitted: batch id known; done: output read into
answers; failed: the server refused the batch; abandoned: no batch was ever made of it."""


class BatchEntry(BaseModel):
    key: str
    state: State
    lines: int
    bytes: int
    created_at: float = Field(default_factory=time.time)
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    request_counts: dict[str, int] = Field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[str] = Field(default_factory=list)


class _RecordFile(BaseModel):
    format_version: int = 1
    batches: list[BatchEntry] = Field(default_factory=list)


class StoredAnswer(BaseModel):
    """An answered line: its raw text and usage, or the error the server will give it again."""

    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    kind: str | None = None


class BatchRecord:
    def __init__(self, directory: Path | None):
        self.directory = directory
        self.batches: list[BatchEntry] = []
        self.answers: dict[str, StoredAnswer] = {}
        self._ids: dict[str, list[str]] = {}
        if directory is not None:
            self._load(directory)

    def _load(self, directory: Path) -> None:
        record = directory / RECORD_FILE
        if record.is_file():
            try:
                self.batches = _RecordFile.model_validate(orjson.loads(record.read_bytes())).batches
            except (orjson.JSONDecodeError, ValidationError) as error:
                raise EngineError(f"{record}: unreadable batch record ({str(error).splitlines()[0]})") from None
        answers = directory / ANSWERS_FILE
        if answers.is_file():
            for raw in answers.read_bytes().splitlines():
                try:  # a kill in the middle of an append leaves a last line cut short: it was never counted
                    line = orjson.loads(raw)
                    self.answers.setdefault(line.pop("id"), StoredAnswer.model_validate(line))
                except (orjson.JSONDecodeError, KeyError, ValidationError):
                    continue

    def new_entry(self, ids: list[str], size: int) -> BatchEntry:
        """A batch about to be uploaded, its line ids on disk before any byte goes out."""
        entry = BatchEntry(key=f"b{len(self.batches) + 1:05d}", state="uploading", lines=len(ids), bytes=size)
        self._ids[entry.key] = ids
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.directory / f"{entry.key}.ids", "\n".join(ids).encode())
        self.batches.append(entry)
        self.save()
        return entry

    def ids(self, entry: BatchEntry) -> list[str]:
        if entry.key not in self._ids:
            path = self._require_dir() / f"{entry.key}.ids"
            self._ids[entry.key] = path.read_text().split("\n") if path.stat().st_size else []
        return self._ids[entry.key]

    def save(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        body = orjson.dumps(_RecordFile(batches=self.batches).model_dump(), option=orjson.OPT_INDENT_2)
        write_atomic(self.directory / RECORD_FILE, body)

    def add_answers(self, answers: dict[str, StoredAnswer]) -> None:
        """Keep these answers, on disk (flushed and fsynced) before the batch is marked done."""
        fresh = {line_id: answer for line_id, answer in answers.items() if line_id not in self.answers}
        self.answers.update(fresh)
        if self.directory is None or not fresh:
            return
        lines = b"".join(
            orjson.dumps({"id": line_id, **answer.model_dump(exclude_defaults=True)}) + b"\n"
            for line_id, answer in fresh.items()
        )
        with (self.directory / ANSWERS_FILE).open("a+b") as handle:  # a+: the tail is read back
            _end_torn_tail(handle.fileno())
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def live(self) -> list[BatchEntry]:
        return [entry for entry in self.batches if entry.state == "submitted"]

    def _require_dir(self) -> Path:
        if self.directory is None:
            raise EngineError("the batch record has no directory")
        return self.directory


def _end_torn_tail(fd: int) -> None:
    """Make the answers file end at a line's end before an append: a kill mid-append leaves a last
    line without its newline, and the next append would glue its first record onto it (and the
    reader skip both). A tail that is a whole record only lost its newline; any other tail is cut."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = size
    while start > 0:  # back to the last newline, a block at a time: the file holds a whole job's answers
        block_start = max(0, start - _TAIL_BLOCK)
        newline = os.pread(fd, start - block_start, block_start).rfind(b"\n")
        if newline >= 0:
            start = block_start + newline + 1
            break
        start = block_start
    tail = os.pread(fd, size - start, start)
    try:
        record = orjson.loads(tail)
    except orjson.JSONDecodeError:
        record = None
    if isinstance(record, dict) and "id" in record:
        os.write(fd, b"\n")  # the fd appends
    else:
        os.ftruncate(fd, start)
