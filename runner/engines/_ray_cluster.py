"""Which Ray the replicas run on: the one already initialised, a cluster the spec or $RAY_ADDRESS
names (what `ray job submit` sets for its entrypoint), or a local instance started for the job."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from runner.engines.base import EngineError
from runner.spec import VLLMEngineSpec

LOCAL_ADDRESS = "local"


def say(message: str) -> None:
    print(f"cm-run: {message}", file=sys.stderr, flush=True)


def connect_ray(spec: VLLMEngineSpec) -> bool:
    """Join or start Ray for ``spec``'s replicas; True if this call did, so the caller must shut it down."""
    return join_or_start_ray(
        spec.ray_address,
        cpus=spec.replicas * spec.num_cpus_per_replica,
        gpus=spec.replicas * spec.num_gpus_per_replica,
        what=f"{spec.replicas} replica(s)",
        setting="engine.replicas x engine.num_cpus_per_replica",
    )


def join_or_start_ray(
    address: str | None, *, cpus: float, gpus: float, what: str, setting: str, extra_cpus: float = 0.0
) -> bool:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local instance; True if this call did.

    A local instance gets this machine's cores plus ``extra_cpus`` (Ray Data workers that mostly wait on
    the engine), and settings that need more ``cpus``/``gpus`` than it has fail now instead of waiting forever.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
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
    machine_cpus = os.cpu_count() or 1
    if cpus > machine_cpus:
        raise EngineError(
            f"{setting} = {cpus:g} CPUs, but this machine has {machine_cpus}: lower them, or set a Ray address "
            "to a cluster"
        )
    ray.init(
        address=LOCAL_ADDRESS,
        num_cpus=machine_cpus + math.ceil(extra_cpus),
        include_dashboard=False,
        logging_level=logging.WARNING,
        # cm-run without --verbose: the replicas' vLLM output stays in Ray's session logs
        log_to_driver="CM_ENGINE_LOG" not in os.environ,
    )
    available_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus > available_gpus:
        ray.shutdown()
        raise EngineError(f"{setting} asks for {gpus:g} GPUs, but this machine has {available_gpus:g}")
    say(f"ray: started a local instance ({machine_cpus} CPUs) for {what}")
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
