"""Which Ray the replicas run on: the one already initialised, a cluster the spec or $RAY_ADDRESS
names (what `ray job submit` sets for its entrypoint), or a local instance started for the job."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from runner.engines.base import EngineError
from runner.spec import VLLMEngineSpec

LOCAL_ADDRESS = "local"


def say(message: str) -> None:
    print(f"cm-run: {message}", file=sys.stderr, flush=True)


def connect_ray(spec: VLLMEngineSpec) -> bool:
    """Join or start Ray for ``spec``; True if this call did, so the caller must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    address = spec.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != LOCAL_ADDRESS:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise EngineError(f"cannot join the Ray cluster at {address!r}: {error}") from error
        resources = ray.cluster_resources()
        say(
            f"ray: joined {address} ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, "
            f"{len(ray.nodes())} nodes)"
        )
        return True
    # A local instance cannot grow: settings it can never satisfy fail now instead of waiting forever.
    cpus = os.cpu_count() or 1
    wanted_cpus = spec.replicas * spec.num_cpus_per_replica
    if wanted_cpus > cpus:
        raise EngineError(
            f"engine.replicas x engine.num_cpus_per_replica = {wanted_cpus:g} CPUs, but this machine has {cpus}: "
            "lower them, or set engine.ray_address to a cluster"
        )
    ray.init(
        address=LOCAL_ADDRESS,
        num_cpus=cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        # cm-run without --verbose: the replicas' vLLM output stays in Ray's session logs
        log_to_driver="CM_ENGINE_LOG" not in os.environ,
    )
    wanted_gpus = spec.replicas * spec.num_gpus_per_replica
    available_gpus = ray.cluster_resources().get("GPU", 0)
    if wanted_gpus > available_gpus:
        ray.shutdown()
        raise EngineError(
            f"engine.replicas x engine.num_gpus_per_replica = {wanted_gpus:g} GPUs, but this machine has "
            f"{available_gpus:g}"
        )
    say(f"ray: started a local instance ({cpus} CPUs) for {spec.replicas} replica(s)")
    return True


def with_node_address(info: dict[str, Any]) -> dict[str, Any]:
    """A replica's report plus its node's address as the cluster knows it (not as the actor guesses)."""
    import ray

    addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    return {**info, "node_ip": addresses.get(info["node_id"], "?")}


def reason(error: BaseException) -> str:
    """One line saying why: a Ray task error's own first line only names the actor method."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
