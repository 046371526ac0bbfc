"""The chat completions wire format: request bodies, answers, and errors told apart.

Kept free of I/O so it is tested on plain dicts. Only ``orjson`` touches bytes: on two cores
the client's CPU per request decides the throughput against a fast server.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import orjson

from runner.engines.base import ChoiceRequest, EngineError

ConstraintMode = Literal["vllm_choice", "json_schema", "none"]

OPENAI_BASE_URL = "https://api.openai.com/v1"
# The JSON wrapper {"label": "..."} costs tokens the bare label does not.
_JSON_WRAPPER_TOKENS = 12
_MAX_RETRY_AFTER_SECONDS = 120.0
_MAX_MESSAGE_CHARS = 300

# Statuses worth another attempt: rate limited, request timeout, conflict/lock, server errors.
_RETRYABLE_STATUSES = {408, 409, 429}


class RetryableError(Exception):
    """An attempt that failed for a reason that may pass: worth another try after a wait."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.retry_after = retry_after


class PermanentError(Exception):
    """A request the server will never accept as sent: that row's error, no retry."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class FatalError(Exception):
    """A failure no row can get past (bad key, unknown model): the job stops."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def auth_headers(api_key: str | None, api_key_env: str, base_url: str, content_type: bool) -> dict[str, str]:
    """The headers of every request to ``base_url``; api.openai.com without a key is an error naming the variable."""
    if api_key is None and base_url.startswith(OPENAI_BASE_URL):
        raise EngineError(f"engine.api_key_env: ${api_key_env} is not set; {base_url} needs a key")
    headers = {"Content-Type": "application/json"} if content_type else {}
    headers["Accept"] = "application/json"
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def resolve_constraint(mode: str, base_url: str) -> ConstraintMode:
    """``auto`` means json_schema on api.openai.com and vLLM's choice constraint elsewhere."""
    if mode != "auto":
        return mode  # type: ignore[return-value]
    host = urlparse(base_url).hostname or ""
    # Azure OpenAI (*.openai.azure.com) refuses vLLM's structured_outputs with a 400 on every request
    official = host == "api.openai.com" or host.endswith((".openai.com", ".openai.azure.com"))
    return "json_schema" if official else "vllm_choice"


def request_body(model: str, request: ChoiceRequest, constraint: ConstraintMode) -> dict[str, Any]:
    """The JSON body for one choice request; the answer is constrained to its choices where the server can."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "temperature": request.temperature,
        "n": 1,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if constraint == "none" or not request.choices:
        body["max_tokens"] = request.max_tokens  # the field every compatible server knows
        return body
    if constraint == "vllm_choice":
        body["max_completion_tokens"] = request.max_tokens
        body["structured_outputs"] = {"choice": list(request.choices)}
    else:
        body["max_completion_tokens"] = request.max_tokens + _JSON_WRAPPER_TOKENS
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": "label",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {"label": {"type": "string", "enum": list(request.choices)}},
                    "required": ["label"],
                    "additionalProperties": False,
                },
            },
        }
    return body


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int


def parse_answer(payload: bytes, constraint: ConstraintMode, constrained: bool) -> Answer:
    """The raw answer text and usage from a 200 response body.

    A body that is not the JSON we expect is retryable (a proxy cut it short); a well-formed
    answer without content (a refusal, a content filter) is that row's error.
    """
    try:
        data = orjson.loads(payload)
        choice = data["choices"][0]
        content = choice["message"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise RetryableError("malformed_response", f"unreadable response body ({error!r})") from None
    if content is None:
        reason = choice.get("finish_reason") or choice["message"].get("refusal") or "unknown"
        raise PermanentError("no_content", f"the answer has no content (finish_reason {reason!r})")
    usage = data.get("usage") or {}
    return Answer(
        text=label_text(content, constraint, constrained),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def label_text(content: str, constraint: ConstraintMode, constrained: bool) -> str:
    """The answer as the label parser wants it: a json_schema answer unwrapped, any other as it came."""
    return _label_from_json(content) if constraint == "json_schema" and constrained else content


def _label_from_json(content: str) -> str:
    """{"label": "x"} -> "x"; anything else is returned as it came, for the label parser to judge."""
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        return content
    if isinstance(parsed, dict) and isinstance(parsed.get("label"), str):
        return parsed["label"]
    return content


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The server's wait hint: ``retry-after-ms``, else ``retry-after`` in seconds or as an HTTP date."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if 0 <= seconds <= _MAX_RETRY_AFTER_SECONDS:
            return seconds
    value = headers.get("retry-after")
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        seconds = when - (now if now is not None else time.time())
        return min(max(seconds, 0.0), _MAX_RETRY_AFTER_SECONDS)
    return None


def error_message(payload: bytes) -> str:
    """The server's own words, from an OpenAI-style error body or the raw text, kept short."""
    try:
        data = orjson.loads(payload)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("message") or data
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        message = payload.decode("utf-8", "replace")
    return str(message).strip()[:_MAX_MESSAGE_CHARS]


def _error_code(payload: bytes) -> str | None:
    """The ``code`` (else ``type``) of an OpenAI-style error body."""
    try:
        error = orjson.loads(payload).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return code if isinstance(code, str) else None


def classify_status(status: int, headers: Mapping[str, str], payload: bytes) -> Exception:
    """The exception a non-200 response becomes: retryable, that row's error, or fatal for the job."""
    message = error_message(payload)
    kind = f"http_{status}"
    if status == 429 and _error_code(payload) == "insufficient_quota":
        # no wait makes a spent quota come back: retrying would only burn the retries of every row
        return FatalError("insufficient_quota", message)
    if status in _RETRYABLE_STATUSES or status >= 500:
        return RetryableError(kind, message, retry_after_seconds(headers))
    if status in (401, 403):
        return FatalError(kind, message)
    if status == 404:
        return FatalError(kind, message)  # a wrong base URL or model name: every row would fail alike
    return PermanentError(kind, message)
