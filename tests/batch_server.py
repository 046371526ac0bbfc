"""A local OpenAI Batch API: files and batches endpoints, with the fault server's deterministic answers.

``POST /v1/files`` (multipart, purpose=batch) stores an input file; ``POST /v1/batches`` validates it
and starts a batch that goes validating -> in_progress -> finalizing -> completed over
``--completion-seconds``; ``GET /v1/batches[/{id}]``, ``POST /v1/batches/{id}/cancel`` and
``GET /v1/files/{id}/content`` behave as OpenAI documents. Each line is answered exactly as the
fault server answers the same body online (``/v1/chat/completions`` is served too), and output
lines come in shuffled order.

Faults ride in the user text: ``[[fail]]`` puts that line in the error file with a 500 every time,
``[[fail*1]]`` only the first time its text is submitted; ``[[reject]]`` answers 400 (the row's own
error); ``[[invalid]]`` fails the whole batch's validation. ``--expire-first N`` lets the first N
batches expire with every other line answered. ``--reject-field KEY`` answers 400 to every line whose
body has KEY, as the fault server does online (a server refusing a setting). ``POST /hooks {"point": "upload"|"create"|
"download", "seconds": S, "skip": K}`` holds the (K+1)-th such request S seconds (an upload before
the file exists, a create after the batch exists, a download before its bytes), once; kill tests
land there. ``{"point": "completion", "seconds": S}`` sets how long batches created later take.
``GET /stats`` counts files, batches, submitted lines and what is in progress.

    python -m tests.batch_server --completion-seconds 1 --max-seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fault_server import FaultServer, _error, chat_completion

_SCRIPTED = re.compile(r"\[\[(fail|reject|invalid)(?:\*(\d+))?\]\]")
_FINALIZING_SECONDS = 0.05
_CANCELLING_SECONDS = 0.2


@dataclass
class BatchConfig:
    completion_seconds: float = 1.0
    """From create to completed."""
    validating_seconds: float = 0.1
    expire_first: int = 0
    """The first N batches expire, with every other line answered."""
    reject_field: str | None = None
    """When set, every line whose body has this key is answered 400 naming it."""
    seed: int = 0


@dataclass
class _Batch:
    number: int
    id: str
    input_file_id: str
    lines: list[dict[str, Any]]
    started: float
    created_at: int
    metadata: dict[str, Any]
    invalid: list[dict[str, Any]]
    expires: bool
    completion_seconds: float
    status: str = "validating"
    cancel_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    failed: int = 0

    @property
    def final(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled")


def _user_text(body: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


class BatchServer(FaultServer):
    def __init__(self, config: BatchConfig | None = None, port: int = 0):
        super().__init__(port=port)
        self.batch_config = config or BatchConfig()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.hooks: dict[str, dict[str, float]] = {}
        self.stats: Counter[str] = Counter()
        self.submitted_ids: Counter[str] = Counter()
        self.answered_ids: Counter[str] = Counter()
        self._text_attempts: Counter[str] = Counter()
        self._random = random.Random(self.batch_config.seed)

    def _add_routes(self, app: web.Application) -> None:
        super()._add_routes(app)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        app.router.add_post("/hooks", self._arm)

    async def _stats(self, request: web.Request) -> web.Response:
        stats = {
            **self.counters.as_dict(),
            **self.stats,
            "custom_ids_submitted_more_than_once": sum(1 for n in self.submitted_ids.values() if n > 1),
            "custom_ids_answered_more_than_once": sum(1 for n in self.answered_ids.values() if n > 1),
            "batch_statuses": {batch.id: batch.status for batch in self.batches.values()},
        }
        return web.Response(body=orjson.dumps(stats), content_type="application/json")

    async def _arm(self, request: web.Request) -> web.Response:
        hook = orjson.loads(await request.read())
        if hook["point"] == "completion":  # batches created from now on take this long
            self.batch_config.completion_seconds = float(hook["seconds"])
            return web.Response(body=b"{}", content_type="application/json")
        self.hooks[hook["point"]] = {"seconds": float(hook["seconds"]), "skip": int(hook.get("skip", 0))}
        return web.Response(body=b"{}", content_type="application/json")

    async def _hold(self, point: str) -> None:
        self.stats[f"{point}s_in_progress"] += 1
        try:
            hook = self.hooks.get(point)
            if hook is None:
                return
            if hook["skip"] > 0:
                hook["skip"] -= 1
                return
            del self.hooks[point]
            await asyncio.sleep(hook["seconds"])
        finally:
            self.stats[f"{point}s_in_progress"] -= 1

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not isinstance(upload, web.FileField):
            return _error(400, "expected purpose=batch and a file", "invalid_request_error")
        payload = upload.file.read()
        await self._hold("upload")
        file_id = f"file-{len(self.files) + 1:04d}"
        self.files[file_id] = payload
        self.stats["files_uploaded"] += 1
        file = {"id": file_id, "object": "file", "bytes": len(payload), "created_at": int(time.time())}
        return web.json_response({**file, "filename": upload.filename, "purpose": "batch"})

    async def _content(self, request: web.Request) -> web.Response:
        file_id = request.match_info["id"]
        if file_id not in self.files:
            return _error(404, f"No such File object: {file_id}", "invalid_request_error")
        await self._hold("download")
        self.stats["downloads"] += 1
        return web.Response(body=self.files[file_id], content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        payload = self.files.get(body.get("input_file_id", ""))
        if payload is None:
            return _error(400, f"No such File object: {body.get('input_file_id')}", "invalid_request_error")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions, completion_window 24h", "invalid_request_error")
        lines, invalid, seen = [], [], set()
        for number, raw in enumerate(payload.splitlines(), start=1):
            try:
                line = orjson.loads(raw)
                text = _user_text(line["body"])
            except (orjson.JSONDecodeError, KeyError, StopIteration, TypeError):
                invalid.append({"code": "invalid_json_line", "message": "not a request line", "line": number})
                continue
            if line.get("custom_id") in seen:
                invalid.append({"code": "duplicate_custom_id", "message": "custom_id repeated", "line": number})
            if "[[invalid]]" in text:
                invalid.append(
                    {"code": "invalid_request", "message": "the body is not valid (injected)", "line": number}
                )
            seen.add(line.get("custom_id"))
            lines.append(line)
        number = len(self.batches) + 1
        batch = _Batch(
            number=number,
            id=f"batch_{number:04d}",
            input_file_id=body["input_file_id"],
            lines=lines,
            started=time.monotonic(),
            created_at=int(time.time()),
            metadata=body.get("metadata") or {},
            invalid=invalid,
            expires=number <= self.batch_config.expire_first,
            completion_seconds=self.batch_config.completion_seconds,
        )
        self.batches[batch.id] = batch
        self.stats["batches_created"] += 1
        self.stats["lines_submitted"] += len(lines)
        self.submitted_ids.update(line["custom_id"] for line in lines)
        await self._hold("create")  # the batch exists; the client has not heard of it yet
        return web.json_response(self._object(batch))

    async def _list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 20))
        newest = sorted(self.batches.values(), key=lambda b: -b.number)
        after = request.query.get("after")
        if after is not None:
            newest = [b for b in newest if b.number < int(after.split("_")[-1])]
        page = newest[:limit]
        data = [self._object(b) for b in page]
        return web.json_response({"object": "list", "data": data, "has_more": len(newest) > limit})

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "No such batch", "invalid_request_error")
        self.stats["retrieves"] += 1
        return web.json_response(self._object(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "No such batch", "invalid_request_error")
        self._advance(batch)
        if not batch.final and batch.cancel_at is None:
            batch.cancel_at = time.monotonic()
            batch.status = "cancelling"
            self.stats["cancels"] += 1
        return web.json_response(self._object(batch))

    def _object(self, batch: _Batch) -> dict[str, Any]:
        self._advance(batch)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": batch.created_at,
            "request_counts": {"total": len(batch.lines), "completed": batch.completed, "failed": batch.failed},
            "metadata": batch.metadata,
        }

    def _advance(self, batch: _Batch) -> None:
        """The batch's state now, by the clock: the server works on its own, polled or not."""
        if batch.final:
            return
        config = self.batch_config
        elapsed = time.monotonic() - batch.started
        done = len(batch.lines)
        if batch.invalid and elapsed >= config.validating_seconds:
            batch.status, batch.errors = "failed", batch.invalid
            return
        if batch.cancel_at is not None:
            if time.monotonic() - batch.cancel_at >= _CANCELLING_SECONDS:
                share = (batch.cancel_at - batch.started - config.validating_seconds) / batch.completion_seconds
                self._finish(batch, "cancelled", set(range(int(done * min(max(share, 0.0), 1.0)))))
            return
        if elapsed < config.validating_seconds:
            batch.status = "validating"
        elif elapsed < batch.completion_seconds:
            batch.status = "in_progress"
            share = (elapsed - config.validating_seconds) / max(
                batch.completion_seconds - config.validating_seconds, 1e-9
            )
            batch.completed = int(done * share)
        elif batch.expires:
            self._finish(batch, "expired", set(range(0, done, 2)))
        elif elapsed < batch.completion_seconds + _FINALIZING_SECONDS:
            batch.status, batch.completed = "finalizing", done
        else:
            self._finish(batch, "completed", set(range(done)))

    def _finish(self, batch: _Batch, status: str, answered: set[int]) -> None:
        outputs, errors = [], []
        for index, line in enumerate(batch.lines):
            line_id = line["custom_id"]
            request_id = f"req_{batch.number}_{index}"
            if index not in answered:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                error = {"code": code, "message": f"This request could not be executed before the batch was {status}."}
                errors.append({"id": request_id, "custom_id": line_id, "response": None, "error": error})
                continue
            text = _user_text(line["body"])
            scripted = _SCRIPTED.search(text)
            fault = None
            if scripted and scripted.group(1) in ("fail", "reject"):
                self._text_attempts[text] += 1
                times = scripted.group(2)
                if times is None or self._text_attempts[text] <= int(times):
                    fault = scripted.group(1)
            if self.batch_config.reject_field in line["body"]:
                fault = "refuse"
            if fault is not None:
                status_code = 500 if fault == "fail" else 400
                message = {
                    "fail": "The server had an error (injected).",
                    "reject": "Invalid request (injected).",
                    "refuse": f"Unrecognized request argument supplied: {self.batch_config.reject_field}",
                }[fault]
                response = {
                    "status_code": status_code,
                    "request_id": request_id,
                    "body": {"error": {"message": message}},
                }
                errors.append({"id": request_id, "custom_id": line_id, "response": response, "error": None})
                continue
            self.answered_ids[line_id] += 1
            self.stats["lines_answered"] += 1
            body = chat_completion(line["body"], f"chatcmpl-{request_id}")
            response = {"status_code": 200, "request_id": request_id, "body": body}
            outputs.append({"id": request_id, "custom_id": line_id, "response": response, "error": None})
        self._random.shuffle(outputs)  # matched by custom_id, never by order
        batch.completed, batch.failed = len(outputs), len(errors)
        if outputs:
            batch.output_file_id = self._store(outputs, f"out-{batch.number:04d}")
        if errors:
            batch.error_file_id = self._store(errors, f"err-{batch.number:04d}")
        batch.status = status

    def _store(self, lines: list[dict[str, Any]], name: str) -> str:
        file_id = f"file-{name}"
        self.files[file_id] = b"".join(orjson.dumps(line) + b"\n" for line in lines)
        return file_id


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.batch_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--completion-seconds", type=float, default=1.0)
    parser.add_argument("--validating-seconds", type=float, default=0.1)
    parser.add_argument("--expire-first", type=int, default=0)
    parser.add_argument("--reject-field", default=None, help="answer 400 to every line whose body has this key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after this long")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    config = BatchConfig(
        completion_seconds=args.completion_seconds,
        validating_seconds=args.validating_seconds,
        expire_first=args.expire_first,
        reject_field=args.reject_field,
        seed=args.seed,
    )
    async with BatchServer(config, port=args.port) as server:
        print(f"listening on {server.base_url}", flush=True)
        await asyncio.sleep(args.max_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(_serve(_parser().parse_args(argv)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
