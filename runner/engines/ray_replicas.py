"""vLLM replicas as Ray actors behind the one engine interface: a dispatcher that spreads requests.

Each replica is a Ray actor holding one ``VLLMEngine`` (the in-process engine, reused as is; see
``_replica_actor.py``). The pipeline calls ``complete`` for a handful of requests at a time from
many coroutines; the dispatcher queues them, groups what is waiting into small batches (one
actor call per batch instead of per request), and sends each batch to the ready replica with the
fewest requests outstanding, up to ``max_concurrency`` per replica so vLLM's continuous batching
always has work queued.

A replica that dies (crash, OOM kill, lost node) is restarted by Ray (``max_restarts``); its
in-flight requests are queued again and answered by whichever replica is ready, each request's
answer is delivered once, so no row is lost or duplicated. Decoding is greedy and seeded, so a
re-sent request gets the answer it would have got.

Which Ray: see ``_ray_cluster.py`` (the spec's cluster, $RAY_ADDRESS, or a local instance). Each
replica resolves ``engine.model`` on its own node: embedded models are prepared there (once per
node), local paths must exist on every node, hub ids are downloaded by vLLM on each node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from runner.engines._ray_cluster import connect_ray, reason, say, with_node_address
from runner.engines._replica_actor import ReplicaNotReady, VLLMReplica
from runner.engines.base import ChoiceRequest, Completion, EngineDied, EngineError
from runner.spec import VLLMEngineSpec

_WAITING_NOTE_SECONDS = 60.0


@dataclass
class _Pending:
    request: ChoiceRequest
    answer: asyncio.Future[Completion]
    losses: int = 0  # replicas that died while holding this request


@dataclass
class _Replica:
    index: int
    actor: Any
    capacity: int
    outstanding: int = 0
    ready: bool = False
    dead: bool = False
    recovering: bool = False
    losses: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class RayReplicaEngine:
    """``spec.replicas`` vLLM engines in Ray actors, answering as one engine."""

    def __init__(
        self,
        spec: VLLMEngineSpec,
        *,
        batch_size: int = 16,
        max_restarts: int = 4,
        max_losses: int = 3,
        replica_class: type = VLLMReplica,
        actors: Sequence[Any] | None = None,
    ):
        """``batch_size``: requests per actor call at most. ``max_restarts``: Ray restarts per replica.
        ``max_losses``: replica deaths a request may go through before it is answered with an error.
        ``replica_class``: the actor body (tests swap in one without vLLM).
        ``actors``: replicas another engine started (a Ray Data worker's dispatcher over its driver's
        replicas): this one sends to them and never stops them."""
        if spec.num_gpus_per_replica and spec.num_gpus_per_replica < spec.tensor_parallel_size:
            raise EngineError(
                f"engine.tensor_parallel_size {spec.tensor_parallel_size} needs at least that many GPUs per "
                f"replica; engine.num_gpus_per_replica is {spec.num_gpus_per_replica:g}"
            )
        self.spec = spec
        self.model_id = spec.model
        self.load_seconds: float | None = None
        self.resent_requests = 0
        self._batch_size = batch_size
        self._max_restarts = max_restarts
        self._max_losses = max_losses
        self._replica_class = replica_class
        self._replicas: list[_Replica] = []
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._in_hand: list[_Pending] = []  # taken from the queue, not yet sent
        self._failure: str | None = None
        self._failure_type: type[EngineError] = EngineError
        self._owns_ray = False
        self._attached = list(actors) if actors is not None else None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def replicas(self) -> list[dict[str, Any]]:
        """Where each replica runs (node id and ip, pid, load seconds) and what it holds now."""
        return [
            {**r.info, "outstanding": r.outstanding, "ready": r.ready, "dead": r.dead, "losses": r.losses}
            for r in self._replicas
        ]

    @property
    def actors(self) -> list[Any]:
        """The replicas' Ray actor handles, by replica index."""
        return [r.actor for r in self._replicas]

    async def start(self) -> None:
        import ray

        if self._attached is not None:
            self._replicas = [
                _Replica(index=index, actor=actor, capacity=self.spec.max_concurrency)
                for index, actor in enumerate(self._attached)
            ]
            # started already (and announced by their starter): this only reads their reports
            await asyncio.gather(*(self._load(replica) for replica in self._replicas))
            self._dispatcher = asyncio.create_task(self._dispatch())
            return
        self._owns_ray = connect_ray(self.spec)
        started = time.perf_counter()
        remote_replica = ray.remote(self._replica_class)
        try:
            for index in range(self.spec.replicas):
                actor = remote_replica.options(
                    num_cpus=self.spec.num_cpus_per_replica,
                    num_gpus=self.spec.num_gpus_per_replica,
                    max_restarts=self._max_restarts,
                    max_task_retries=0,  # the dispatcher re-sends, to any replica, not only to this one
                    scheduling_strategy="SPREAD",
                ).remote(self.spec, index)
                self._replicas.append(_Replica(index=index, actor=actor, capacity=self.spec.max_concurrency))
            await self._wait_for_replicas(started)
        except BaseException:
            await self.close()
            raise
        self.load_seconds = time.perf_counter() - started
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def _wait_for_replicas(self, started: float) -> None:
        from ray.exceptions import RayError

        starting = {asyncio.ensure_future(self._start_replica(r)): r for r in self._replicas}
        pending = set(starting)
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=_WAITING_NOTE_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                replica = starting[task]
                try:
                    task.result()
                except RayError as error:
                    for other in pending:
                        other.cancel()
                    raise EngineError(f"replica {replica.index} could not start: {reason(error)}") from error
            if not done:
                waiting = sorted(starting[t].index for t in pending)
                say(
                    f"still waiting for replica(s) {waiting} after {time.perf_counter() - started:.0f} s: loading "
                    f"the model, or waiting for a node with {self.spec.num_cpus_per_replica:g} CPU(s) and "
                    f"{self.spec.num_gpus_per_replica:g} GPU(s) free"
                )

    async def _start_replica(self, replica: _Replica) -> None:
        await self._load(replica)
        info = replica.info
        say(
            f"replica {replica.index} up on node {info['node_id']} ({info['node_ip']}, pid {info['pid']}) "
            f"in {info['load_seconds']:.1f} s, dtype {info.get('dtype')}"
        )

    async def _load(self, replica: _Replica) -> None:
        """Load the replica's engine, riding out Ray restarts of its actor (a crash or an OOM kill
        while loading); an engine that fails to load raises RayTaskError."""
        from ray.exceptions import RayActorError

        lost: RayActorError | None = None
        for _attempt in range(self._max_restarts + 1):
            try:
                # Ray queues the call while the actor restarts; the new actor then loads a fresh engine.
                info = await replica.actor.start.remote()
            except RayActorError as error:
                lost = error
                await asyncio.sleep(2.0)
                continue
            replica.info = with_node_address(info)
            replica.ready = True
            self._changed.set()
            return
        assert lost is not None
        raise lost

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        if self._dispatcher is None:
            raise EngineError("the Ray replicas are not started; use 'async with engine:'")
        if self._failure is not None:
            raise self._failure_type(self._failure)
        loop = asyncio.get_running_loop()
        pending = [_Pending(request, loop.create_future()) for request in requests]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.answer for item in pending)))

    async def _dispatch(self) -> None:
        try:
            await self._dispatch_forever()
        except Exception as error:  # a bug here must fail the job, not leave every caller waiting
            for item in self._in_hand:
                self._queue.put_nowait(item)
            self._fail_everything(f"the Ray dispatcher failed: {error!r}")
            raise

    async def _dispatch_forever(self) -> None:
        while True:
            first = await self._queue.get()
            self._in_hand = [first]
            replica = await self._replica_with_room()
            if replica is None:
                self._queue.put_nowait(first)
                self._fail_everything("every Ray replica died and could not be restarted", died=True)
                return
            ready = sum(1 for r in self._replicas if r.ready)
            fair_share = -(-(self._queue.qsize() + 1) // ready)  # split a burst over the ready replicas
            size = max(1, min(self._batch_size, replica.capacity - replica.outstanding, fair_share))
            batch = [first]
            while len(batch) < size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._in_hand = batch = [item for item in batch if not item.answer.done()]  # callers that gave up
            if batch:
                replica.outstanding += len(batch)
                self._spawn(self._send(replica, batch))
            self._in_hand = []

    async def _replica_with_room(self) -> _Replica | None:
        """The ready replica with the fewest outstanding requests; None once every replica is dead."""
        while True:
            if all(r.dead for r in self._replicas):
                return None
            open_replicas = [r for r in self._replicas if r.ready and r.outstanding < r.capacity]
            if open_replicas:
                return min(open_replicas, key=lambda r: (r.outstanding, r.index))
            self._changed.clear()
            await self._changed.wait()

    async def _send(self, replica: _Replica, batch: list[_Pending]) -> None:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            completions = await replica.actor.complete.remote([item.request for item in batch])
        except (RayActorError, ReplicaNotReady) as error:
            lost = isinstance(error, RayActorError)
            self._requeue(batch, count_loss=lost)
            self._start_recovery(replica, error)
        except RayTaskError as error:
            failure = EngineError(f"replica {replica.index} failed: {reason(error)}")
            for item in batch:
                if not item.answer.done():
                    item.answer.set_exception(failure)
        else:
            for item, completion in zip(batch, completions, strict=True):
                if not item.answer.done():
                    item.answer.set_result(completion)
        finally:
            replica.outstanding -= len(batch)
            self._changed.set()

    def _requeue(self, batch: list[_Pending], *, count_loss: bool) -> None:
        for item in batch:
            if item.answer.done():
                continue
            item.losses += count_loss
            if item.losses >= self._max_losses:
                # A request that takes down every replica it reaches must not take down the job.
                item.answer.set_result(
                    Completion(text=None, error=f"{item.losses} replicas died while answering this request")
                )
                continue
            self.resent_requests += 1
            self._queue.put_nowait(item)

    def _start_recovery(self, replica: _Replica, cause: BaseException) -> None:
        replica.ready = False
        if replica.recovering or replica.dead:
            return
        replica.recovering = True
        replica.losses += 1
        say(f"replica {replica.index} lost ({reason(cause)}); its requests go to the other replicas")
        self._spawn(self._recover(replica))

    async def _recover(self, replica: _Replica) -> None:
        from ray.exceptions import RayError

        try:
            await self._load(replica)
            say(f"replica {replica.index} back on node {replica.info['node_id']} (pid {replica.info['pid']})")
        except RayError as error:
            replica.dead = True
            say(f"replica {replica.index} is gone for good: {reason(error)}")
        finally:
            replica.recovering = False
            self._changed.set()

    def _fail_everything(self, why: str, *, died: bool = False) -> None:
        """Fail every queued request, and every later call, with ``why`` (``died``: the replicas are
        gone, not the dispatcher broken, so a rerun can resume)."""
        self._failure = why
        self._failure_type = EngineDied if died else EngineError
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.answer.done():
                item.answer.set_exception(self._failure_type(why))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        import ray

        running = [t for t in (self._dispatcher, *self._tasks) if t is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        self._dispatcher = None
        while not self._queue.empty():
            self._queue.get_nowait().answer.cancel()
        if self._attached is not None:  # the replicas are their starter's to stop
            self._replicas = []
            return
        if ray.is_initialized():
            # A clean vLLM shutdown stops its engine-core processes; kill alone could orphan them.
            shutdowns = [r.actor.shutdown.remote() for r in self._replicas if r.ready]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*shutdowns, return_exceptions=True), timeout=60)
            for replica in self._replicas:
                ray.kill(replica.actor, no_restart=True)
        self._replicas = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
