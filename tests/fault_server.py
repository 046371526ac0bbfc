"""A local OpenAI-compatible chat completions server that misbehaves on purpose.

It answers ``POST /v1/chat/completions`` with a label chosen deterministically from the
request (so tests can check every output), after a fixed latency, and injects the faults a
real API shows: 429 with Retry-After from a server-enforced requests-per-minute limit, random
or scripted 500/503/429, responses slower than the client's timeout, malformed JSON, dropped
connections, wrong labels, 400, 401, 403 and 429 ``insufficient_quota``; and a server that
rejects every request carrying a field it does not support (``reject_field``), as Azure does
vLLM's ``structured_outputs``.

Scripted faults ride in the user text, so they hit exactly the rows a test chooses whatever
the order of dispatch: ``[[503*2]]`` fails the first two attempts for that text with a 503
and then answers; ``[[500]]`` fails every attempt. Kinds: 400, 401, 429, 500, 503, slow,
drop, malformed, wrong, 403, quota.

In process (tests)::

    async with FaultServer(FaultConfig(latency=0.01)) as server:
        server.base_url  # http://127.0.0.1:PORT/v1

As a process (benchmarks, kill/resume tests); prints ``listening on URL`` once ready::

    python -m tests.fault_server --latency 0.1 --rpm 6000 --fault-rate 0.1 --max-seconds 600

or from Python, ``with serving_process("--latency", "0.1") as base_url: ...``.

Binds 127.0.0.1 only. ``GET /stats`` returns the counters; ``POST /stats/reset`` zeroes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.request import urlopen

import orjson
from aiohttp import web

FAULT_KINDS = ("400", "401", "403", "429", "quota", "500", "503", "slow", "drop", "malformed", "wrong")
_SCRIPTED = re.compile(r"\[\[(\w+)(?:\*(\d+))?\]\]")
_LABEL_LINE = re.compile(r"^- (.+)$", re.MULTILINE)
WRONG_LABEL = "certainly-not-a-label"


def expected_answer(user_text: str, allowed: Sequence[str]) -> str:
    """The label the server answers for this text and label list: the same on every call."""
    return allowed[zlib.crc32(user_text.encode()) % len(allowed)]


@dataclass
class FaultConfig:
    latency: float = 0.0
    """Seconds before every answer (and before injected 5xx; 429s and 401s come at once, as from a gateway)."""
    rpm: float | None = None
    """Server-enforced requests per minute: a token bucket refilled continuously."""
    burst_seconds: float = 1.0
    """The RPM bucket holds this many seconds' worth of requests."""
    fault_rate: float = 0.0
    """Share of requests that get a random fault from ``random_faults``."""
    random_faults: tuple[str, ...] = ("429", "500", "503", "drop", "malformed")
    fault_retry_after: float = 0.5
    """Retry-After (seconds) sent with injected 429s."""
    slow_seconds: float = 5.0
    capacity: int | None = None
    """Requests worked on at once, as a CPU-bound model server: the rest queue, so latency grows with load."""
    api_key: str | None = None
    """When set, requests without ``Authorization: Bearer <api_key>`` get a 401."""
    seed: int = 0
    reject_field: str | None = None
    """When set, every request whose body has this key gets a 400 naming it (may be changed while serving)."""


@dataclass
class _Counters:
    requests: int = 0
    answered: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    answered_texts: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        twice = sum(1 for count in self.answered_texts.values() if count > 1)
        return {
            "requests": self.requests,
            "answered": self.answered,
            "statuses": dict(self.statuses),
            "faults": dict(self.faults),
            "distinct_texts_answered": len(self.answered_texts),
            "texts_answered_more_than_once": twice,
        }


class _TokenBucket:
    def __init__(self, per_second: float, capacity: float):
        self.per_second = per_second
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a request may pass now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": None}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _allowed_labels(body: dict[str, Any]) -> list[str]:
    """The answers the request allows: its vLLM choice list, its json_schema enum, or the prompt's list."""
    structured = body.get("structured_outputs") or {}
    if structured.get("choice"):
        return list(structured["choice"])
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return list(response_format["json_schema"]["schema"]["properties"]["label"]["enum"])
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    return _LABEL_LINE.findall(system) or ["unknown"]


class FaultServer:
    """The server on 127.0.0.1 (port 0: any free port), in the running event loop."""

    def __init__(self, config: FaultConfig | None = None, port: int = 0):
        self.config = config or FaultConfig()
        self.port = port
        self.counters = _Counters()
        self._random = random.Random(self.config.seed)
        self._bucket = (
            _TokenBucket(self.config.rpm / 60, max(1.0, self.config.rpm / 60 * self.config.burst_seconds))
            if self.config.rpm
            else None
        )
        self._attempts: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(self.config.capacity) if self.config.capacity else contextlib.nullcontext()
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/stats/reset", self._reset)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fault-model", "object": "model"}]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.counters.as_dict()), content_type="application/json")

    async def _reset(self, request: web.Request) -> web.Response:
        self.counters = _Counters()
        self._attempts.clear()
        return web.Response(body=b"{}", content_type="application/json")

    def _fault_for(self, user_text: str) -> str | None:
        scripted = _SCRIPTED.search(user_text)
        if scripted:
            self._attempts[user_text] += 1
            times = scripted.group(2)
            if times is None or self._attempts[user_text] <= int(times):
                return scripted.group(1)
            return None
        if self.config.fault_rate and self._random.random() < self.config.fault_rate:
            return self._random.choice(self.config.random_faults)
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        counters = self.counters
        counters.requests += 1
        config = self.config
        if config.api_key is not None and request.headers.get("Authorization") != f"Bearer {config.api_key}":
            counters.statuses["401"] += 1
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        if self._bucket is not None:
            wait = self._bucket.take()
            if wait:
                counters.statuses["429"] += 1
                headers = {"retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(math.ceil(wait))}
                return _error(429, "Rate limit reached for requests per minute.", "requests", headers)
        try:
            body = orjson.loads(await request.read())
            user_text = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
            _allowed_labels(body)  # a request whose labels cannot be read is a 400 here, as before
        except (orjson.JSONDecodeError, KeyError, StopIteration, TypeError) as error:
            counters.statuses["400"] += 1
            return _error(400, f"bad request: {error!r}", "invalid_request_error")
        if config.reject_field is not None and config.reject_field in body:
            counters.statuses["400"] += 1
            message = f"Unrecognized request argument supplied: {config.reject_field}"
            return _error(400, message, "invalid_request_error")
        fault = self._fault_for(user_text)
        if fault is not None:
            counters.faults[fault] += 1
        if fault == "401":
            counters.statuses["401"] += 1
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        if fault == "403":
            counters.statuses["403"] += 1
            return _error(403, "You are not allowed to sample from this model.", "invalid_request_error")
        if fault == "quota":
            counters.statuses["429"] += 1
            message = "You exceeded your current quota, please check your plan and billing details."
            body = orjson.dumps(
                {"error": {"message": message, "type": "insufficient_quota", "code": "insufficient_quota"}}
            )
            return web.Response(status=429, body=body, content_type="application/json")
        if fault == "429":
            counters.statuses["429"] += 1
            retry_after = config.fault_retry_after
            headers = {"retry-after-ms": str(round(retry_after * 1000)), "retry-after": str(math.ceil(retry_after))}
            return _error(429, "Rate limit reached (injected).", "requests", headers)
        if fault == "400":
            counters.statuses["400"] += 1
            return _error(400, "This model's maximum context length is exceeded (injected).", "invalid_request_error")
        async with self._slots:
            await asyncio.sleep(config.slow_seconds if fault == "slow" else config.latency)
        if fault in ("500", "503"):
            counters.statuses[fault] += 1
            return _error(int(fault), "The server had an error (injected).", "server_error")
        if fault == "drop":
            counters.statuses["drop"] += 1
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never reaches the client: the connection is gone
        if fault == "malformed":
            counters.statuses["malformed"] += 1
            return web.Response(status=200, body=b'{"id": "x", "choices": [{"mess', content_type="application/json")
        counters.statuses["200"] += 1
        counters.answered += 1
        counters.answered_texts[user_text] += 1
        payload = chat_completion(body, f"chatcmpl-{counters.requests}", wrong=fault == "wrong")
        return web.Response(body=orjson.dumps(payload), content_type="application/json")


def chat_completion(body: dict[str, Any], completion_id: str, wrong: bool = False) -> dict[str, Any]:
    """The deterministic answer to a chat completions request body, with its usage (chars/4)."""
    user_text = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    answer = WRONG_LABEL if wrong else expected_answer(user_text, _allowed_labels(body))
    is_json = (body.get("response_format") or {}).get("type") == "json_schema"
    content = orjson.dumps({"label": answer}).decode() if is_json else answer
    prompt_chars = sum(len(m.get("content") or "") for m in body["messages"])
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fault-model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_chars // 4 + 1,
            "completion_tokens": len(content) // 4 + 1,
            "total_tokens": prompt_chars // 4 + len(content) // 4 + 2,
        },
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--rpm", type=float, default=None)
    parser.add_argument("--burst-seconds", type=float, default=1.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default="429,500,503,drop,malformed", help=f"comma list of {FAULT_KINDS}")
    parser.add_argument("--fault-retry-after", type=float, default=0.5)
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--capacity", type=int, default=None, help="requests worked on at once; the rest queue")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reject-field", default=None, help="answer 400 to every request with this body key")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after this long")
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop (if installed)")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    faults = tuple(kind for kind in args.faults.split(",") if kind)
    unknown = set(faults) - set(FAULT_KINDS)
    if unknown:
        raise SystemExit(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
    config = FaultConfig(
        latency=args.latency,
        rpm=args.rpm,
        burst_seconds=args.burst_seconds,
        fault_rate=args.fault_rate,
        random_faults=faults,
        fault_retry_after=args.fault_retry_after,
        slow_seconds=args.slow_seconds,
        capacity=args.capacity,
        api_key=args.api_key,
        seed=args.seed,
        reject_field=args.reject_field,
    )
    async with FaultServer(config, port=args.port) as server:
        print(f"listening on {server.base_url}", flush=True)
        await asyncio.sleep(args.max_seconds)


@contextlib.contextmanager
def serving_process(*options: str, module: str = "tests.fault_server") -> Iterator[str]:
    """The server as its own process, started with these command-line options; yields its base URL."""
    command = [sys.executable, "-m", module, *options]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on http://127.0.0.1:"):
            raise RuntimeError(f"fault server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=10)


def served(base_url: str) -> dict[str, Any]:
    """The counters of a running server (``GET /stats``)."""
    with urlopen(base_url.removesuffix("/v1") + "/stats", timeout=10) as response:
        return orjson.loads(response.read())


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
