"""OpenAI's Batch API behind the same ``complete(requests)`` as every engine: half the price, up to 24 h a phase.

Requests that arrive together (the pipeline puts a whole phase in flight for an engine that sets
``wants_whole_phase``) wait until none has come for a short quiet period, then go out as one or
more batch files (``POST /v1/files``, ``POST /v1/batches``) cut at ``batch_max_requests`` lines and
``batch_max_bytes``. The engine polls its batches every ``batch_poll_seconds``, logging each one's
status and request counts, downloads the output and error files of finished ones and answers the
waiting requests by custom id. Each line's body is exactly what the online engine POSTs.

Never paying twice: the record (``_batch_record``) is written before and after each API step.
A rerun polls the batches it created, adopts a batch created just before a kill (found by its
input file), and submits only lines that no live batch holds and no earlier batch answered.
Lines that failed, or that an expired or cancelled batch left unanswered, go into a new batch,
up to ``max_retries`` times, then the row gets its error as online; a batch that fails validation
stops the job (``EngineError``) with the server's reasons.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import aiohttp
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from runner.engines._batch_record import BatchEntry, BatchRecord, StoredAnswer
from runner.engines._batch_wire import (
    COLLECTED_STATUSES,
    ENDPOINT,
    LIVE_STATUSES,
    LineResult,
    custom_id,
    input_line,
    read_results,
    split_lines,
    validation_errors,
)
from runner.engines._limits import CircuitBreaker, server_refusal
from runner.engines._wire import (
    OPENAI_BASE_URL,
    FatalError,
    PermanentError,
    RetryableError,
    auth_headers,
    classify_status,
    label_text,
    request_body,
    resolve_constraint,
)
from runner.engines.base import ChoiceRequest, Completion, EngineError
from runner.engines.openai import BASE_URL_ENV, _proxy_for
from runner.spec import OpenAIEngineSpec

logger = logging.getLogger("runner.batch")

# Requests of one phase arrive within milliseconds of each other; a phase's last ones within this.
_QUIET_SECONDS = 2.0
# How far back the batch list is searched for a batch created just before a kill.
_ADOPT_SLACK_SECONDS = 600.0


class OpenAIBatchEngine:
    """Answers choice requests through the Batch API; the record lives in ``state_dir``."""

    wants_whole_phase = True

    def __init__(self, spec: OpenAIEngineSpec, state_dir: Path | None = None, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.spec = spec
        self.model_id = spec.model
        self.load_seconds: float | None = None
        self.base_url = (spec.base_url or environ.get(BASE_URL_ENV) or OPENAI_BASE_URL).rstrip("/")
        self.constraint = resolve_constraint(spec.structured_output, self.base_url)
        self.state_dir = state_dir
        self._api_key = environ.get(spec.api_key_env) or None
        self._quiet = min(_QUIET_SECONDS, spec.batch_poll_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        self._record: BatchRecord | None = None
        self._futures: dict[str, asyncio.Future[LineResult]] = {}
        self._lines: dict[str, bytes] = {}
        self._held: dict[str, str] = {}  # custom id -> key of the live batch holding it
        self._failures: Counter[str] = Counter()
        self._seen: Counter[str] = Counter()
        self._last_arrival = 0.0
        self._driver: asyncio.Task[None] | None = None
        self._fatal: EngineError | None = None
        # the online engine's breaker, fed each finished batch's lines in the order they were sent
        self._breaker = CircuitBreaker()
        self.counters: Counter[str] = Counter()
        self.line_errors: Counter[str] = Counter()
        self.row_errors: Counter[str] = Counter()
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, spec.max_retries) + 1),
            # 0.5 s doubling to 30 s, plus up to 0.5 s of jitter (wait_exponential_jitter's `initial` is
            # deprecated in tenacity 9.2 and its replacement absent before it)
            wait=wait_exponential(multiplier=0.5, max=30.0) + wait_random(0, 0.5),
            retry=retry_if_exception_type(RetryableError),
            reraise=True,
        )

    def __repr__(self) -> str:  # the key stays out of every repr, log line and traceback
        return f"OpenAIBatchEngine(model={self.model_id!r}, base_url={self.base_url!r}, state_dir={self.state_dir})"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        headers = auth_headers(self._api_key, self.spec.api_key_env, self.base_url, content_type=False)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.spec.timeout_seconds, sock_read=self.spec.timeout_seconds
        )
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        self._proxy = _proxy_for(self.base_url)
        self._record = BatchRecord(self.state_dir)
        await self._adopt()
        self._held = {line_id: entry.key for entry in self._record.live() for line_id in self._record.ids(entry)}

    async def close(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
            self._driver = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stats(self) -> dict[str, Any]:
        """Lines submitted, batches made, tokens and errors of this run; the cost at the batch price."""
        counters = self.counters
        stats: dict[str, Any] = {
            "mode": "batch",
            "requests": counters["lines_submitted"],
            "batches_created": counters["batches_created"],
            "lines_submitted": counters["lines_submitted"],
            "lines_from_earlier_runs": counters["lines_from_record"],
            "rows_answered": counters["rows_answered"],
            "rows_failed": counters["rows_failed"],
            "prompt_tokens": counters["prompt_tokens"],
            "completion_tokens": counters["completion_tokens"],
            "attempt_errors": dict(sorted(self.line_errors.items())),
            "row_errors": dict(sorted(self.row_errors.items())),
            "batch_discount": self.spec.batch_discount,
        }
        prices = self.spec.prices
        if prices is not None:
            online = (
                counters["prompt_tokens"] * prices.prompt_per_million
                + counters["completion_tokens"] * prices.completion_per_million
            ) / 1e6
            stats["estimated_cost_usd"] = round(online * self.spec.batch_discount, 6)
            stats["online_cost_usd"] = round(online, 6)
        return stats

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if self._session is None or self._record is None:
            raise EngineError("the batch engine is not started; use 'async with engine:'")
        if self._fatal is not None:
            raise self._fatal
        loop = asyncio.get_running_loop()
        results: list[LineResult | asyncio.Future[LineResult]] = []
        for request in requests:
            body = orjson.dumps(request_body(self.model_id, request, self.constraint))
            digest_id = custom_id(body, 0).rsplit("-", 1)[0]
            line_id = f"{digest_id}-{self._seen[digest_id]}"
            self._seen[digest_id] += 1
            stored = self._record.answers.get(line_id)
            if stored is not None:  # answered by a batch of this run or an earlier one: never asked again
                self.counters["lines_from_record"] += 1
                results.append(LineResult(line_id, **stored.model_dump(), retryable=stored.error is None))
                continue
            future: asyncio.Future[LineResult] = loop.create_future()
            self._futures[line_id] = future
            self._lines[line_id] = input_line(line_id, body)
            results.append(future)
        self._last_arrival = time.monotonic()
        if self._futures and (self._driver is None or self._driver.done()):
            self._driver = asyncio.ensure_future(self._drive())
        out = []
        for request, result in zip(requests, results, strict=True):
            line = await result if isinstance(result, asyncio.Future) else result
            out.append(self._completion(line, bool(request.choices)))
        return out

    def _completion(self, line: LineResult, constrained: bool) -> Completion:
        if line.text is None:
            self.counters["rows_failed"] += 1
            self.row_errors[line.kind or "unknown"] += 1
            return Completion(text=None, error=self._redact(line.error or "no answer"), retryable=line.retryable)
        self.counters["rows_answered"] += 1
        text = label_text(line.text, self.constraint, constrained)
        return Completion(text, prompt_tokens=line.prompt_tokens, completion_tokens=line.completion_tokens)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # -- the driver: submit what waits, poll what runs, collect what finished ------------------------------

    async def _drive(self) -> None:
        tick = min(0.1, self._quiet / 2)
        next_poll = 0.0
        try:
            while self._futures:
                unheld = [line_id for line_id in self._futures if line_id not in self._held]
                quiet = time.monotonic() - self._last_arrival >= self._quiet
                if unheld and (quiet or len(unheld) >= self.spec.batch_max_requests):
                    await self._submit(unheld)
                    next_poll = time.monotonic() + self.spec.batch_poll_seconds
                if self._record and self._record.live() and time.monotonic() >= next_poll:
                    await self._poll()
                    next_poll = time.monotonic() + self.spec.batch_poll_seconds
                await asyncio.sleep(tick)
        except asyncio.CancelledError:
            raise
        except EngineError as error:
            self._fail_all(error)
        except Exception as error:  # a bug or an unexpected answer: every waiting row learns of it, none hangs
            self._fail_all(EngineError(f"batch engine stopped: {type(error).__name__}: {self._redact(str(error))}"))

    def _fail_all(self, error: EngineError) -> None:
        self._fatal = error
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()

    async def _submit(self, line_ids: list[str]) -> None:
        assert self._record is not None
        try:
            files = split_lines(
                [(i, self._lines[i]) for i in line_ids], self.spec.batch_max_requests, self.spec.batch_max_bytes
            )
        except ValueError as error:
            raise EngineError(f"engine.batch_max_bytes: {error}") from None
        for lines in files:
            ids = [line_id for line_id, _ in lines]
            payload = b"".join(line for _, line in lines)
            entry = self._record.new_entry(ids, len(payload))  # saved: state uploading
            for line_id in ids:
                self._held[line_id] = entry.key
            file = await self._upload(entry.key, payload)
            entry.input_file_id, entry.state = file["id"], "uploaded"
            self._record.save()
            batch = await self._call(
                "POST",
                "/batches",
                json={
                    "input_file_id": entry.input_file_id,
                    "endpoint": ENDPOINT,
                    "completion_window": self.spec.batch_completion_window,
                    "metadata": {"cm_runner_batch": entry.key},
                },
            )
            entry.batch_id, entry.state = batch["id"], "submitted"
            self._update(entry, batch)
            self._record.save()
            self.counters["batches_created"] += 1
            self.counters["lines_submitted"] += len(ids)
            logger.info("batch %s (%s): %d lines submitted, %s", entry.key, entry.batch_id, len(ids), entry.status)

    async def _poll(self) -> None:
        assert self._record is not None
        shown = []
        for entry in self._record.live():
            batch = await self._call("GET", f"/batches/{entry.batch_id}")
            if self._update(entry, batch):
                self._record.save()
            counts = entry.request_counts
            failed = f", {counts.get('failed', 0)} failed" if counts.get("failed") else ""
            shown.append(
                f"{entry.key} {entry.status} {counts.get('completed', 0)}/{counts.get('total', entry.lines)}{failed}"
            )
            if entry.status in COLLECTED_STATUSES:
                await self._collect(entry)
            elif entry.status == "failed":
                entry.state = "failed"
                self._record.save()
                for line_id in self._record.ids(entry):
                    self._held.pop(line_id, None)
                reasons = "; ".join(validation_errors(batch)[:5])
                raise EngineError(f"batch {entry.key} ({entry.batch_id}) failed validation: {self._redact(reasons)}")
        if shown:
            logger.info("batches: %s", "; ".join(shown))

    def _update(self, entry: BatchEntry, batch: dict[str, Any]) -> bool:
        """Copy what the server says of a batch into its entry; whether anything changed."""
        before = entry.model_dump()
        entry.status = batch.get("status") or entry.status
        entry.request_counts = {k: int(v) for k, v in (batch.get("request_counts") or {}).items()}
        entry.output_file_id = batch.get("output_file_id") or entry.output_file_id
        entry.error_file_id = batch.get("error_file_id") or entry.error_file_id
        return entry.model_dump() != before

    async def _collect(self, entry: BatchEntry) -> None:
        """Read a finished batch's output and error files; keep the answers, put the rest back in line."""
        assert self._record is not None
        results: dict[str, LineResult] = {}
        for file_id in (entry.error_file_id, entry.output_file_id):  # an answer beats an error for the same id
            if file_id:
                for line in read_results(await self._call("GET", f"/files/{file_id}/content", raw=True)):
                    results[line.custom_id] = line
        keep: dict[str, StoredAnswer] = {}
        failed: dict[str, LineResult] = {}
        ids = self._record.ids(entry)
        for line_id in ids:
            line = results.get(line_id) or LineResult(
                line_id, error=f"batch {entry.status}: no answer", kind=f"batch_{entry.status}"
            )
            if line.text is not None or not line.retryable:
                keep[line_id] = StoredAnswer(
                    text=line.text,
                    prompt_tokens=line.prompt_tokens,
                    completion_tokens=line.completion_tokens,
                    error=line.error,
                    kind=line.kind,
                )
                self.counters["prompt_tokens"] += line.prompt_tokens
                self.counters["completion_tokens"] += line.completion_tokens
            else:
                failed[line_id] = line
        refused_alike = self._judge_refusals(ids, keep)
        if refused_alike is not None:  # its refusals are the server's, not the lines': a rerun asks them again
            keep = {line_id: answer for line_id, answer in keep.items() if answer.text is not None}
        self._record.add_answers(keep)  # fsynced before the batch is marked done
        entry.state = "done"
        self._record.save()
        if refused_alike is not None:
            raise refused_alike
        for line_id in ids:
            self._held.pop(line_id, None)
        for line_id, answer in keep.items():
            future = self._futures.pop(line_id, None)
            if future is not None and not future.done():
                future.set_result(LineResult(line_id, **answer.model_dump(), retryable=answer.error is None))
        for line_id, line in failed.items():
            self.line_errors[line.kind or "unknown"] += 1
            self._failures[line_id] += 1
            if self._failures[line_id] > self.spec.max_retries and line_id in self._futures:
                future = self._futures.pop(line_id)
                message = f"gave up after {self._failures[line_id]} attempt(s): {line.error}"
                future.set_result(LineResult(line_id, error=message, kind=line.kind, retryable=True))
        if failed:
            logger.info("batch %s: %d lines answered, %d to ask again", entry.key, len(keep), len(failed))

    def _judge_refusals(self, ids: Sequence[str], keep: Mapping[str, StoredAnswer]) -> EngineError | None:
        """The error that stops the job when the server refused most lines alike (a setting, not the rows).

        Otherwise (None) each refusal is that line's own, kept as its permanent answer, as online.
        """
        for line_id in ids:
            answer = keep.get(line_id)
            if answer is None:
                continue  # asked again: no verdict on it yet
            if answer.text is not None:
                self._breaker.answer()
            elif self._breaker.refused(answer.kind or "unknown"):
                message = server_refusal(answer.kind or "unknown", answer.error or "", self.constraint)
                return EngineError(f"{message} Finished chunks are kept: rerun the same command to resume")
        return None

    async def _adopt(self) -> None:
        """After a kill: a file that never finished uploading made no batch; an uploaded one may have."""
        assert self._record is not None
        changed = False
        for entry in self._record.batches:
            if entry.state == "uploading":
                entry.state, changed = "abandoned", True
            elif entry.state == "uploaded":
                found = await self._find_batch(entry)
                if found is None:
                    entry.state = "abandoned"
                else:
                    entry.batch_id, entry.state = found["id"], "submitted"
                    self._update(entry, found)
                    logger.info("batch %s: adopted %s, created before the last run stopped", entry.key, entry.batch_id)
                changed = True
        if changed:
            self._record.save()

    async def _find_batch(self, entry: BatchEntry) -> dict[str, Any] | None:
        """The batch made from ``entry``'s input file, searched newest first back to just before its upload."""
        after: str | None = None
        while True:
            page = await self._call("GET", "/batches", params={"limit": 100, **({"after": after} if after else {})})
            for batch in page.get("data") or []:
                if batch.get("input_file_id") == entry.input_file_id:
                    return batch
                if batch.get("created_at", 0) < entry.created_at - _ADOPT_SLACK_SECONDS:
                    return None
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]

    async def cancel_pending(self) -> list[str]:
        """Ask the server to cancel every batch of this job still running; a line per batch.

        Their answered lines are collected by the job's next run; the rest go into new batches then.
        """
        assert self._record is not None
        lines = []
        for entry in self._record.live():
            self._update(entry, await self._call("GET", f"/batches/{entry.batch_id}"))
            if entry.status in LIVE_STATUSES and entry.status != "cancelling":
                self._update(entry, await self._call("POST", f"/batches/{entry.batch_id}/cancel"))
            self._record.save()
            lines.append(f"batch {entry.key} ({entry.batch_id}): {entry.status}")
        return lines

    # -- HTTP ---------------------------------------------------------------------------------------------

    async def _upload(self, key: str, payload: bytes) -> dict[str, Any]:
        def form() -> aiohttp.FormData:  # a fresh form per attempt: aiohttp consumes one when it is sent
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", payload, filename=f"cm-runner-{key}.jsonl", content_type="application/jsonl")
            return data

        return await self._call("POST", "/files", form=form)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        form: Any = None,
        raw: bool = False,
    ) -> Any:
        try:
            return await self._retrying.copy()(self._once, method, path, json, params, form, raw)
        except FatalError as error:
            hint = {
                "http_401": f"the server refused the API key in ${self.spec.api_key_env}",
                "http_403": f"the key in ${self.spec.api_key_env} may not use the Batch API or model {self.model_id!r}",
                "http_404": f"{self.base_url}{path} not found (does the server offer the Batch API?)",
            }.get(error.kind, "the server refused the request")
            raise EngineError(f"{hint} ({error.kind}: {self._redact(str(error))})") from None
        except (RetryableError, PermanentError) as error:
            raise EngineError(f"{method} {self.base_url}{path}: {self._redact(str(error))}") from None

    async def _once(
        self, method: str, path: str, json: dict[str, Any] | None, params: dict[str, Any] | None, form: Any, raw: bool
    ) -> Any:
        assert self._session is not None
        data = form() if form is not None else (orjson.dumps(json) if json is not None else None)
        headers = {"Content-Type": "application/json"} if json is not None else None
        try:
            async with self._session.request(
                method, f"{self.base_url}{path}", data=data, params=params, headers=headers, proxy=self._proxy
            ) as response:
                payload = await response.read()
                status, response_headers = response.status, response.headers
        except TimeoutError:
            raise RetryableError("timeout", f"no answer within {self.spec.timeout_seconds}s") from None
        except (aiohttp.ClientError, ConnectionError) as error:
            raise RetryableError("connection", f"{type(error).__name__}: {error}") from None
        if status != 200:
            raise classify_status(status, response_headers, payload)
        if raw:
            return payload
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise RetryableError("malformed_response", f"unreadable response from {path}") from None
