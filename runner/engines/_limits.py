"""What keeps the OpenAI-compatible dispatcher under the server's limits.

- ``AdaptiveLimiter``: requests in flight, at most ``engine.max_concurrency``; a storm of 429s
  cuts the limit multiplicatively and successes grow it back additively (AIMD, as TCP does),
  so a server that is over its limit sees the whole dispatcher slow down.
- ``RequestPacer``: requests per minute, through ``asyncio-throttle``.
- ``TokenBudget``: tokens per minute, a bucket debited with an estimate before each call and
  corrected with the usage the server returns.
- ``RateLimitPressure``: tells a 429 storm from the odd 429 (which only delays its own row).
- ``CircuitBreaker``: tells a server that refuses every request from one that refuses some rows.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Literal

from asyncio_throttle import Throttler

# Limits are enforced over a window of this many seconds. One second keeps the flow smooth
# (OpenAI documents that it may enforce 60,000 RPM as 1,000 requests per second).
_WINDOW_SECONDS = 1.0


class AdaptiveLimiter:
    """A semaphore whose size moves between 1 and ``maximum``; waiters are served first come,
    first served, except that a retry goes to the head of the queue.

    Retries first because a chunk of rows is finished only when its last row is: a retry
    queued behind the next chunks' first attempts would hold its whole chunk open.
    """

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.limit = float(maximum)
        self.lowest_limit = float(maximum)
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def _room(self) -> bool:
        return self.in_flight < max(1, int(self.limit))

    async def acquire(self, first: bool = False) -> None:
        """Wait for a slot; ``first`` jumps the queue (for retries)."""
        if self._room() and not self._waiters:
            self.in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            await waiter  # release() hands the slot over: in_flight already counts us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us: pass it on
            elif waiter in self._waiters:  # else _wake already popped it, saw it cancelled, and moved on
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def shrink(self, factor: float = 0.7) -> None:
        self.limit = max(1.0, self.limit * factor)
        self.lowest_limit = min(self.lowest_limit, self.limit)

    def cap(self, limit: float) -> None:
        """Lower the limit to ``limit`` (never raise it; successes grow it back)."""
        self.limit = max(1.0, min(self.limit, limit))
        self.lowest_limit = min(self.lowest_limit, self.limit)

    def grow(self) -> None:
        if self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
            self._wake()


class RequestPacer:
    """At most ``per_minute`` request starts per minute, spread evenly over one-second windows."""

    def __init__(self, per_minute: float):
        per_second = per_minute / 60
        slots = max(1, int(per_second * _WINDOW_SECONDS))
        # Only the head of the queue polls the throttler (it sleeps in short steps); the rest
        # wait on the lock, so a thousand queued requests cost one wake-up per step, not a thousand.
        self._throttler = Throttler(rate_limit=slots, period=slots / per_second, retry_interval=0.002)
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            await self._throttler.acquire()


class TokenBudget:
    """Tokens per minute as a bucket refilled continuously; a debit may overdraw it (a request
    bigger than a window's worth still goes when the bucket is full), later requests then wait."""

    def __init__(self, per_minute: float):
        self.per_second = per_minute / 60
        self.capacity = self.per_second * _WINDOW_SECONDS
        self.tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.per_second)
        self._stamp = now

    async def spend(self, estimate: int) -> None:
        async with self._lock:
            self._refill()
            needed = min(float(estimate), self.capacity)
            while self.tokens < needed:
                await asyncio.sleep((needed - self.tokens) / self.per_second)
                self._refill()
            self.tokens -= estimate

    def correct(self, estimated: int, actual: int) -> None:
        """Give back what the estimate overcharged, or charge what it missed."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + estimated - actual)


class RateLimitPressure:
    """The share of recent responses that were 429s (an exponential moving average).

    A storm is when that share passes ``threshold``; then the dispatcher slows as a whole,
    at most once per ``cooldown`` seconds. A lone 429 among successes delays only its own row.
    """

    def __init__(self, alpha: float = 0.05, threshold: float = 0.25, cooldown: float = 1.0):
        self.alpha = alpha
        self.threshold = threshold
        self.cooldown = cooldown
        self.share = 0.0
        self._last_storm = -float("inf")

    def observe(self, rate_limited: bool) -> bool:
        """Record one response; True when it makes a storm the dispatcher should react to."""
        self.share += self.alpha * (float(rate_limited) - self.share)
        if not rate_limited or self.share < self.threshold:
            return False
        now = time.monotonic()
        if now - self._last_storm < self.cooldown:
            return False
        self._last_storm = now
        return True


class PauseGate:
    """A dispatcher-wide pause: nothing new is sent before ``resume_at`` (a monotonic time)."""

    def __init__(self) -> None:
        self.resume_at = 0.0

    def pause(self, seconds: float) -> None:
        self.resume_at = max(self.resume_at, time.monotonic() + seconds)

    async def wait(self) -> None:
        while (delay := self.resume_at - time.monotonic()) > 0:
            await asyncio.sleep(delay)


Verdict = Literal["row", "rerun", "server"]


def server_refusal(kind: str, message: str, constraint: str) -> str:
    """What a job stopped by a tripped ``CircuitBreaker`` says: the server's own words and what to change."""
    hint = ""
    if kind == "http_400" and constraint != "none":
        hint = (
            f" If the server does not support answers constrained by {constraint}, set "
            "engine.structured_output (json_schema, or none)."
        )
    return f"the server refused every request alike: {message}; none was recorded.{hint}"


class CircuitBreaker:
    """Tells a server that refuses every request from one that refuses a few rows.

    A permanent error (a 400) is normally that row's own: recorded, never asked again. But a server
    that refuses a setting refuses every row alike, and recording that would write the whole corpus
    as rejected, which no rerun redoes. So a refusal is held until there is a verdict (in a healthy
    job the next answer, milliseconds later):

    - ``row``: an answer came after it, so the server answers others: the refusal was the row's;
    - ``server``: the same kind of refusal made up the first ``first`` responses, or ``share`` of a
      full window of recent ones: the job stops;
    - ``rerun``: every open row is held, so no answer is coming to judge by: the row is kept as a
      failure a rerun asks again.
    """

    def __init__(self, first: int = 5, window: int = 20, share: float = 0.9):
        self.first = first
        self.share = share
        self.answered = False
        self.tripped = False
        self.open_rows = 0
        self._before_answer: Counter[str] = Counter()
        self._recent: deque[str | None] = deque(maxlen=window)
        self._held: list[asyncio.Future[Verdict]] = []

    def enter(self) -> None:
        self.open_rows += 1

    def leave(self) -> None:
        self.open_rows -= 1
        self._settle_if_idle()

    def answer(self) -> None:
        self.answered = True
        self._recent.append(None)
        self._settle("row")

    def refused(self, kind: str) -> bool:
        """Count one refusal of ``kind`` (``http_400``); True once the server refuses every request alike.

        The Batch API engine feeds a finished batch's lines through this and ``answer`` in the order
        they were sent, as the online engine sees its responses arrive."""
        self._recent.append(kind)
        if not self.answered:
            self._before_answer[kind] += 1
        window_full = len(self._recent) == self._recent.maxlen
        if (not self.answered and self._before_answer[kind] >= self.first) or (
            window_full and self._recent.count(kind) >= self.share * len(self._recent)
        ):
            self.tripped = True
        return self.tripped

    async def refusal(self, kind: str) -> Verdict:
        """The verdict on a row the server refused with ``kind`` (``http_400``), once there is one."""
        if self.refused(kind):
            self._settle("server")
            return "server"
        held: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._held.append(held)
        self._settle_if_idle()
        return await held

    def _settle(self, verdict: Verdict) -> None:
        held, self._held = self._held, []
        for future in held:
            if not future.done():
                future.set_result(verdict)

    def _settle_if_idle(self) -> None:
        waiting = sum(1 for future in self._held if not future.done())
        if waiting and waiting >= self.open_rows:
            self._settle("rerun")
