"""The Batch API's file formats: input lines, their custom ids, files cut to size, output lines read back.

No I/O: tested on plain bytes. An input line is ``{"custom_id", "method", "url", "body"}`` with the
body the online engine would POST; an output or error line is ``{"custom_id", "response":
{"status_code", "body"}, "error"}``, in any order, so answers are matched by custom_id alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import orjson

from runner.engines._wire import PermanentError, RetryableError, classify_status, parse_answer

ENDPOINT = "/v1/chat/completions"
# The states of a batch the server still works on; the others are final.
LIVE_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
# Final states whose output (possibly partial) is worth downloading; "failed" means validation failed.
COLLECTED_STATUSES = frozenset({"completed", "expired", "cancelled"})


def custom_id(body: bytes, occurrence: int) -> str:
    """The line's id: a digest of the request body and how many identical bodies this job asked before.

    Engines do not know rows, but a row's call is its body (model, prompt with the row's text,
    allowed labels, seed), so the digest names the row and the call. Identical bodies (the same
    text twice in a corpus) are told apart by the counter; being identical, they are interchangeable,
    so the counter need not follow the same rows from one run to the next.
    """
    return f"{hashlib.sha256(body).hexdigest()[:32]}-{occurrence}"


def input_line(line_id: str, body: bytes) -> bytes:
    """One line of a batch input file (newline included); ``body`` is the online request's JSON."""
    head = orjson.dumps({"custom_id": line_id, "method": "POST", "url": ENDPOINT})
    return head[:-1] + b',"body":' + body + b"}\n"


def split_lines(lines: Sequence[tuple[str, bytes]], max_requests: int, max_bytes: int) -> list[list[tuple[str, bytes]]]:
    """Cut (custom_id, input line) pairs into files of at most ``max_requests`` lines and ``max_bytes`` bytes."""
    files: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for line_id, line in lines:
        if len(line) > max_bytes:
            raise ValueError(f"one request is {len(line):,} bytes, more than engine.batch_max_bytes ({max_bytes:,})")
        if current and (len(current) >= max_requests or size + len(line) > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append((line_id, line))
        size += len(line)
    if current:
        files.append(current)
    return files


@dataclass(frozen=True)
class LineResult:
    """One line's fate: its raw answer text and usage, or an error that may or may not pass."""

    custom_id: str
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    kind: str | None = None
    retryable: bool = True


def read_results(payload: bytes) -> Iterator[LineResult]:
    """The lines of an output or error file. Blank and unreadable lines are skipped (their rows are asked again)."""
    for raw in payload.splitlines():
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
            line_id = line["custom_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        yield _result(line_id, line.get("response"), line.get("error"))


def _result(line_id: str, response: dict | None, error: dict | None) -> LineResult:
    if isinstance(response, dict) and response.get("status_code") == 200:
        try:
            # the raw content: a json_schema answer is unwrapped when its request is known
            answer = parse_answer(orjson.dumps(response.get("body")), "none", False)
        except (RetryableError, PermanentError) as failure:
            return LineResult(
                line_id, error=str(failure), kind=failure.kind, retryable=isinstance(failure, RetryableError)
            )
        return LineResult(line_id, answer.text, answer.prompt_tokens, answer.completion_tokens)
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        failure = classify_status(status, {}, orjson.dumps(response.get("body")))
        # a refused key or unknown model shows when the batch is created; on one line it is that line's error
        return LineResult(
            line_id, error=str(failure), kind=f"http_{status}", retryable=isinstance(failure, RetryableError)
        )
    code = (error or {}).get("code") or "line_error"
    message = (error or {}).get("message") or "no answer"
    return LineResult(line_id, error=f"{code}: {message}", kind=str(code), retryable=True)


def validation_errors(batch: dict) -> list[str]:
    """The server's reasons a batch failed, with the input line they name."""
    data = ((batch.get("errors") or {}).get("data")) or []
    reasons = []
    for item in data:
        where = f"line {item['line']}: " if item.get("line") is not None else ""
        reasons.append(f"{where}{item.get('code') or 'error'}: {item.get('message') or ''}".strip())
    return reasons or ["no reason given"]
