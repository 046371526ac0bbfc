"""The lock of an ``s3://`` output directory: an object its holder keeps by renewing a lease.

On a local disk the lock is ``flock`` (``checkpoint.Checkpoint.locked``) and needs no lease: the
kernel releases it however its process ends, and a disk is reached from its own host only, whose
kernel knows. An object outlives the process that wrote it, and on a cluster the run that finds it
is often on another node (a driver resubmitted after a lost spot node, a container restarted
elsewhere), which cannot see whether the holder still runs. So the holder shows that it runs:

- *Taking the lock*: a PUT with ``If-None-Match: *`` creates it for one run only. If it is there,
  it is read with its ETag and its age by the store's clock (``Date`` minus ``Last-Modified``: no
  node's clock is compared with another's). A lease not renewed for its length (plus a second: the
  store's timestamps have whole seconds), or a holder of this host that no longer runs, is taken
  over by a PUT with ``If-Match: <the ETag read>``: S3 accepts one of two racing PUTs and answers
  412 to the other. A live lease is refused, naming the holder and its last renewal.
- *Renewing*: a thread PUTs the lock again every third of the lease, ``If-Match: <its own ETag>``,
  with a renewal count in the body (so each renewal changes the ETag a taker would match). A 412 or
  404 means another run took it over: the lease is lost.
- *Writing only while holding*: each write of this process below the directory first checks the
  lease (``_storage.fenced``, around the job in ``checkpoint``). Lost, it raises ``LockLost``. Not
  confirmed for two thirds of its length by this process's monotonic clock (the renewals failed: a
  paused process, an unreachable store), the write first renews it itself: a renewal that succeeds
  proves nobody took it over; one that fails is a lost lease. The last third is the margin for a
  write already in flight.
- *Releasing*: the thread stops; the object is deleted with ``If-Match: <its own ETag>``.

Ray Data workers write their shards from their own processes, unfenced: a driver that lost its lock
stops recording them, so at most the chunks in flight land after a take-over (the same chunks the
new holder redoes, each written whole).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import orjson

from runner._storage import ObjectPath, StorageError, holder_is_dead, holder_name, process_start

DEFAULT_LEASE_SECONDS = 60.0
_CLOCK_SECONDS = 1.0  # Last-Modified and Date have whole seconds
_TAKE_ATTEMPTS = 3


class LockLost(StorageError):
    """This run's lock was taken over (or could not be renewed): it must write nothing more."""


@dataclass(frozen=True)
class Holder:
    """What a lock object says: who holds it, since when, for how long a lease."""

    name: str  # pid@host
    started: float | None
    token: str
    lease_seconds: float | None  # None: a lock without a lease (an older cm-runner's): it never expires
    renewal: int
    age_seconds: float = 0.0  # since its last write, by the store's clock

    @property
    def expired(self) -> bool:
        return self.lease_seconds is not None and self.age_seconds > self.lease_seconds + _CLOCK_SECONDS

    @property
    def last_renewed(self) -> str:
        at = datetime.now(UTC) - timedelta(seconds=self.age_seconds)
        return f"{at:%Y-%m-%dT%H:%M:%SZ} ({self.age_seconds:.0f} s ago)"

    def body(self) -> bytes:
        fields = {"holder": self.name, "started": self.started, "token": self.token}
        return orjson.dumps(fields | {"lease_seconds": self.lease_seconds, "renewal": self.renewal})


def _parse(body: bytes, age_seconds: float) -> Holder:
    try:
        data = orjson.loads(body)
        return Holder(
            name=str(data["holder"]),
            started=data.get("started"),
            token=str(data["token"]),
            lease_seconds=data.get("lease_seconds"),
            renewal=int(data.get("renewal", 0)),
            age_seconds=age_seconds,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        # an older cm-runner's "pid@host\nstart time": a lock without a lease
        name, _, started = body.decode(errors="replace").strip().partition("\n")
        try:
            start = float(started) if started else None
        except ValueError:
            start = None
        return Holder(name or "unknown", start, "", None, 0, age_seconds)


class LockHeld(StorageError):
    """Another run holds the lock: ``holder`` says who, and how recently it renewed its lease."""

    def __init__(self, holder: Holder):
        super().__init__(holder.name)
        self.holder = holder


class Lease:
    """This process's hold on one lock object (``take``, then ``check`` before each write, ``release``)."""

    def __init__(self, lock: ObjectPath, seconds: float = DEFAULT_LEASE_SECONDS):
        self.lock = lock
        self.seconds = seconds
        self._mine = Holder(holder_name(), process_start(), uuid.uuid4().hex, seconds, 0)
        self._etag = ""
        self._confirmed = 0.0  # monotonic time the last renewal that succeeded was sent
        self._lost: str | None = None
        self._renewing = threading.Lock()  # one conditional PUT on our ETag at a time: two would fail each other
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return self._mine.name

    def take(self) -> None:
        """Create the lock, or take over an expired one; raise ``LockHeld`` naming a live holder."""
        sent = time.monotonic()
        etag = self.lock.put_if(self._mine.body())
        seen: Holder | None = None
        for _ in range(_TAKE_ATTEMPTS):
            if etag is not None:
                self._held(etag, sent)
                return
            try:
                found = self.lock.read_versioned()
            except FileNotFoundError:  # released since: create it again
                sent = time.monotonic()
                etag = self.lock.put_if(self._mine.body())
                continue
            seen = _parse(found.body, found.age_seconds)
            if seen.token == self._mine.token:  # our PUT landed, and the SDK's retry of it found it
                etag = found.etag
                continue
            if not (seen.expired or holder_is_dead(seen.name, seen.started)):
                raise LockHeld(seen)
            sent = time.monotonic()
            etag = self.lock.put_if(self._mine.body(), match=found.etag)  # a racing taker may win: look again
        if etag is not None:
            self._held(etag, sent)
            return
        raise LockHeld(seen or self._mine)

    def _held(self, etag: str, sent: float) -> None:
        self._etag, self._confirmed = etag, sent
        self._thread = threading.Thread(target=self._keep, name=f"cm-run lease {self.lock}", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        """Renew every third of the lease; sooner again after a renewal that could not reach the store."""
        wait = self.seconds / 3
        while not self._stop.wait(wait):
            try:
                self._renew()
                wait = self.seconds / 3
            except StorageError:
                wait = min(1.0, self.seconds / 6)  # the store unreachable: the write deadline guards meanwhile
            if self._lost is not None:
                return

    def _renew(self) -> None:
        with self._renewing:
            if self._lost is not None:
                return
            renewed = replace(self._mine, renewal=self._mine.renewal + 1)
            sent = time.monotonic()
            etag = self.lock.put_if(renewed.body(), match=self._etag)
            if etag is None:
                try:
                    found = self.lock.read_versioned()
                    now = _parse(found.body, found.age_seconds)
                except FileNotFoundError:
                    self._lost = "its lock object was deleted"
                    return
                if (now.token, now.renewal) != (renewed.token, renewed.renewal):
                    self._lost = (
                        f"its lock was taken over by {now.name} (its lease of {self.seconds:g} s had run out "
                        "unrenewed: this process was paused, or the store unreachable)"
                    )
                    return
                etag = found.etag  # our PUT landed and the SDK's retry of it found it
            self._mine, self._etag, self._confirmed = renewed, etag, sent

    def check(self) -> None:
        """Raise ``LockLost`` unless this process still holds the lock (called before each write)."""
        if self._lost is None and time.monotonic() > self._confirmed + self.seconds * 2 / 3:
            unconfirmed = time.monotonic() - self._confirmed
            try:
                self._renew()
            except StorageError as error:
                self._lost = f"its lease could not be renewed for {unconfirmed:.0f} s ({error})"
        if self._lost is not None:
            raise LockLost(
                f"{self.lock.parent}: this run ({self.holder}) no longer holds the output directory: "
                f"{self._lost}. It stops and writes nothing more there."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._renewing:
            if self._lost is None and self._etag:
                with contextlib.suppress(StorageError, FileNotFoundError):
                    self.lock.delete_if(self._etag)  # not another run's lock that replaced ours
