"""Any OpenAI-compatible chat completions API: OpenAI itself, `vllm serve`, llama.cpp, Ollama.

One request per choice request, fanned out with asyncio over one aiohttp session (the
transport is aiohttp + orjson rather than the openai SDK: on two cores the SDK's per-request
CPU cost capped throughput at about a third of what the server allowed). On the way out each
attempt passes a dispatcher-wide pause gate, an adaptive concurrency limit, the
requests-per-minute pacer and the tokens-per-minute budget; failed attempts are retried by
tenacity with exponential backoff and jitter, honouring Retry-After. A row whose retries run
out comes back as ``Completion(error=...)``; only a failure no row can get past (a refused
key, a spent quota, an unknown model, a server never reached, a server refusing every request
alike: see ``CircuitBreaker``) stops the job, as ``EngineError``; finished chunks are kept.

The API key is read from the environment variable the spec names and goes only into the
Authorization header: never into a spec, an error message, a log or an output file.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Self
from urllib.parse import urlparse

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from runner.engines._limits import (
    AdaptiveLimiter,
    CircuitBreaker,
    PauseGate,
    RateLimitPressure,
    RequestPacer,
    TokenBudget,
    server_refusal,
)
from runner.engines._usage import EngineStats, TokenEstimator
from runner.engines._wire import (
    OPENAI_BASE_URL,
    FatalError,
    PermanentError,
    RetryableError,
    auth_headers,
    classify_status,
    parse_answer,
    request_body,
    resolve_constraint,
    retry_after_seconds,
)
from runner.engines.base import ChoiceRequest, Completion, EngineError
from runner.spec import OpenAIEngineSpec

BASE_URL_ENV = "OPENAI_BASE_URL"
# A storm pauses the whole dispatcher for the server's Retry-After, kept within these bounds.
_STORM_PAUSE_BOUNDS = (0.1, 10.0)


class OpenAIEngine:
    """Answers choice requests through an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, spec: OpenAIEngineSpec, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.spec = spec
        self.model_id = spec.model
        self.load_seconds: float | None = None
        self.base_url = (spec.base_url or environ.get(BASE_URL_ENV) or OPENAI_BASE_URL).rstrip("/")
        self.constraint = resolve_constraint(spec.structured_output, self.base_url)
        self._url = f"{self.base_url}/chat/completions"
        self._api_key = environ.get(spec.api_key_env) or None
        self.stats_counters = EngineStats()
        self._estimator = TokenEstimator()
        self._limiter = AdaptiveLimiter(spec.max_concurrency)
        self._pacer = RequestPacer(spec.requests_per_minute) if spec.requests_per_minute else None
        self._budget = TokenBudget(spec.tokens_per_minute) if spec.tokens_per_minute else None
        self._pressure = RateLimitPressure()
        self._gate = PauseGate()
        self._breaker = CircuitBreaker()
        self._retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, spec.max_retries)),
            wait=self._wait,
            retry=retry_if_exception_type(RetryableError),
            before_sleep=self._count_retry,
            reraise=True,
        )
        # 0.25 s, 0.5 s, 1 s ... (+ up to 0.25 s jitter), at most 30 s. Half the openai SDK's first step:
        # with random faults the rows retried last set the job's end, and a sustained outage still
        # reaches long waits within a few attempts (429s wait at least their Retry-After anyway).
        self._backoff = wait_exponential_jitter(multiplier=0.25, max=30.0, jitter=0.25)
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None
        self._fatal: EngineError | None = None
        self._answered_once = False
        self._answer_times: deque[float] = deque()  # when answers arrived, for the limit a timeout sets

    def __repr__(self) -> str:  # the key stays out of every repr, log line and traceback
        return f"OpenAIEngine(model={self.model_id!r}, base_url={self.base_url!r}, constraint={self.constraint!r})"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        headers = auth_headers(self._api_key, self.spec.api_key_env, self.base_url, content_type=True)
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=self.spec.max_concurrency, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=self.spec.timeout_seconds),
        )
        self._proxy = _proxy_for(self.base_url)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stats(self) -> dict[str, Any]:
        """Requests, retries, tokens, errors by kind and, with prices set, the estimated cost."""
        return self.stats_counters.as_dict(self.spec.prices, self._limiter.lowest_limit, self._estimator.ratio)

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if self._session is None:
            raise EngineError("the OpenAI engine is not started; use 'async with engine:'")
        if len(requests) == 1:
            return [await self._row(requests[0])]
        return list(await asyncio.gather(*(self._row(request) for request in requests)))

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _stop(self, error: FatalError) -> EngineError:
        if self._fatal is None:
            hint = {
                "http_401": f"the server refused the API key in ${self.spec.api_key_env}",
                "http_403": f"the key in ${self.spec.api_key_env} may not use model {self.model_id!r}",
                "insufficient_quota": "the account's quota is spent (add credit, then rerun the same command)",
                "http_404": f"no model {self.model_id!r} at {self.base_url} (check engine.model and engine.base_url)",
                "connection": "the server never answered (check engine.base_url and that it is running)",
            }.get(error.kind, "the job stops")
            self._fatal = EngineError(
                f"{hint} ({error.kind}: {self._redact(str(error))}); finished chunks are kept: "
                "rerun the same command to resume"
            )
        return self._fatal

    def _refused_by_server(self, error: PermanentError) -> EngineError:
        return self._stop(FatalError(error.kind, server_refusal(error.kind, str(error), self.constraint)))

    async def _row(self, request: ChoiceRequest) -> Completion:
        self._breaker.enter()
        try:
            return await self._judged_row(request)
        finally:
            self._breaker.leave()

    async def _judged_row(self, request: ChoiceRequest) -> Completion:
        body = orjson.dumps(request_body(self.model_id, request, self.constraint))
        self.stats_counters.calls += 1
        attempts = 1
        try:
            try:
                # Most rows succeed at once: the first attempt skips the retry machinery, whose
                # per-call bookkeeping costs about as much CPU as the HTTP request itself.
                return await self._attempt(request, body, retry=False)
            except RetryableError as error:
                if self.spec.max_retries == 0:
                    raise
                self.stats_counters.retries += 1
                await asyncio.sleep(self._delay(error, failed_attempts=1))
            retrying = self._retrying.copy()  # a copy per row: tenacity keeps its state on the object
            try:
                return await retrying(self._attempt, request, body, retry=True)
            finally:
                attempts += retrying.statistics.get("attempt_number", 0)
        except FatalError as error:
            raise self._stop(error) from None
        except PermanentError as error:
            verdict = await self._breaker.refusal(error.kind)
            if verdict == "server":
                raise self._refused_by_server(error) from None
            message = str(error)
            kind = error.kind
            # "row": the server will refuse this row the same way next run; "rerun": nothing was answered to
            # tell the row's fault from the server's, so a rerun asks again
            retryable = verdict == "rerun"
        except RetryableError as error:
            if error.kind == "connection" and not self._answered_once:
                raise self._stop(FatalError("connection", f"cannot reach {self.base_url}: {error}")) from None
            message = f"gave up after {attempts} attempt(s): {error}"
            kind = error.kind
            retryable = True  # a rerun of the job asks again
        self.stats_counters.rows_failed += 1
        self.stats_counters.row_errors[kind] += 1
        return Completion(text=None, error=self._redact(message), retryable=retryable)

    async def _attempt(self, request: ChoiceRequest, body: bytes, retry: bool) -> Completion:
        if self._fatal is not None:
            raise self._fatal
        await self._gate.wait()
        await self._limiter.acquire(first=retry)
        try:
            return await self._send(request, body)
        finally:
            self._limiter.release()

    async def _send(self, request: ChoiceRequest, body: bytes) -> Completion:
        raw_estimate = self._estimator.raw(request.messages)
        estimate = round(raw_estimate * self._estimator.ratio) + request.max_tokens
        if self._pacer is not None:
            await self._pacer.wait()
        if self._budget is not None:
            await self._budget.spend(estimate)
        if self._fatal is not None:
            raise self._fatal
        stats = self.stats_counters
        stats.requests += 1
        assert self._session is not None
        try:
            async with self._session.post(self._url, data=body, proxy=self._proxy) as response:
                payload = await response.read()
                status = response.status
                headers = response.headers
        except TimeoutError:
            # On a model server (vLLM on a CPU, say) an answer is late because too many requests wait
            # there: sending it again alone would add to that queue, so fewer go out at once.
            self._congested()
            timeout = RetryableError("timeout", f"no answer within {self.spec.timeout_seconds}s")
            raise self._failed(estimate, timeout) from None
        except (aiohttp.ClientError, ConnectionError) as error:
            lost = RetryableError("connection", f"{type(error).__name__}: {error}")
            raise self._failed(estimate, lost) from None
        if self._pressure.observe(status == 429):
            self._slow_down(headers)
        if status != 200:
            raise self._failed(estimate, classify_status(status, headers, payload))
        try:
            answer = parse_answer(payload, self.constraint, bool(request.choices))
        except (RetryableError, PermanentError) as error:
            raise self._failed(estimate, error) from None
        self._answered_once = True
        self._answer_times.append(time.monotonic())
        self._answered_lately()
        self._breaker.answer()
        self._limiter.grow()
        self._estimator.learn(raw_estimate, answer.prompt_tokens)
        if self._budget is not None and answer.prompt_tokens:
            self._budget.correct(estimate, answer.prompt_tokens + answer.completion_tokens)
        stats.prompt_tokens += answer.prompt_tokens
        stats.completion_tokens += answer.completion_tokens
        stats.rows_answered += 1
        return Completion(answer.text, prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens)

    def _failed(self, estimate: int, error: Exception) -> Exception:
        """Count a failed attempt and refund its token estimate (a refused request used no tokens)."""
        self.stats_counters.attempt_errors[getattr(error, "kind", type(error).__name__)] += 1
        if self._budget is not None:
            self._budget.correct(estimate, 0)
        return error

    def _congested(self) -> None:
        """A timeout: keep no more requests in flight than the server answered in the last timeout period.

        That many can be answered within the timeout however slow the server is (what a CPU serves in a
        minute), while a halving per timeout would collapse the limit to 1 after one slow batch.
        """
        self._limiter.cap(max(1, int(0.9 * self._answered_lately())))

    def _answered_lately(self) -> int:
        """Answers in the last timeout period (older arrival times are dropped as they age)."""
        answers, since = self._answer_times, time.monotonic() - self.spec.timeout_seconds
        while answers and answers[0] < since:
            answers.popleft()
        return len(answers)

    def _slow_down(self, headers: Mapping[str, str]) -> None:
        """A 429 storm: fewer requests in flight, and nothing new sent until the server's Retry-After."""
        low, high = _STORM_PAUSE_BOUNDS
        pause = min(max(retry_after_seconds(headers) or 1.0, low), high)
        self._limiter.shrink()
        self._gate.pause(pause)
        self.stats_counters.rate_limit_storms += 1

    def _delay(self, error: BaseException | None, failed_attempts: int) -> float:
        """Exponential backoff with jitter, but never sooner than the server's Retry-After.

        Many requests refused at once get the same Retry-After; honouring it alone would send
        them back together (only the first would pass). The backoff spreads them out.
        """
        backoff = self._backoff(_AttemptCount(failed_attempts))  # type: ignore[arg-type]
        hint = getattr(error, "retry_after", None)
        if hint is not None and hint > backoff:
            return hint + random.uniform(0, 0.1 * hint)
        return backoff

    def _wait(self, state: RetryCallState) -> float:
        # tenacity's attempt 1 is the row's attempt 2: the first one ran before tenacity took over
        error = state.outcome.exception() if state.outcome else None
        return self._delay(error, failed_attempts=state.attempt_number + 1)

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats_counters.retries += 1


def _proxy_for(url: str) -> str | None:
    """$HTTPS_PROXY / $HTTP_PROXY unless $NO_PROXY exempts the host, as the openai SDK does.

    Resolved once: aiohttp's trust_env looks it up (and reads ~/.netrc) in a thread on every request.
    """
    host = urlparse(url).hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(urlparse(url).scheme)


class _AttemptCount(NamedTuple):
    """What tenacity's wait strategies read from a retry state."""

    attempt_number: int
