"""The Ray Data executor on a real two-node Ray cluster (`ray start` on 127.0.0.1), against the local fault server.

Every job here runs twice or more over the same files: once with ``executor.kind: local`` (chunks in
this process) and through Ray Data workers, whose rows must be the same, row for row. The fault
server answers each text with a label worked out from the text alone (``expected_answer``), so
the answers do not depend on which process asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import psutil
import pytest

from runner import load_spec, run_job
from runner.data import Corpus
from runner.ray_executor import WORKER_STAGES
from tests._ray_cluster import LocalCluster
from tests._s3_server import environment as s3_environment
from tests.fault_server import served, serving_process

pytestmark = pytest.mark.slow  # a Ray cluster, a server and cm-run subprocesses
REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "CM_TEST_RAY_KEY"
LABELS = ["alarm", "audio", "calendar", "iot", "music", "weather"]
N_CORPUS = 240
CHUNK = 16


@pytest.fixture(scope="module")
def fault_server() -> Iterator[str]:
    # 20 ms a request: a chunk of 16 rows takes long enough to be caught in flight by a kill
    with serving_process("--latency", "0.02", "--max-seconds", "600") as url:
        yield url


@pytest.fixture(scope="module")
def cluster(s3_endpoint) -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="cmrayx-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # the nodes' processes see the local S3 server as a cluster's nodes see their store (an instance role)
    cluster = LocalCluster(root, extra_env=s3_environment(s3_endpoint))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-executor-data")
    user = [{"id": f"u{i}", "text": f"user utterance {i}", "label": LABELS[i % 6]} for i in range(48)]
    corpus = [{"id": f"c{i}", "text": f"corpus utterance {i}", "label": LABELS[i % 6]} for i in range(N_CORPUS)]
    for name, rows in (("user.jsonl", user), ("corpus.jsonl", corpus)):
        (root / name).write_text("".join(orjson.dumps(row).decode() + "\n" for row in rows))
    pl.read_ndjson(root / "corpus.jsonl").write_parquet(root / "corpus.parquet", row_group_size=40)
    return root


def write_spec(
    directory: Path, data: Path, base_url: str, executor: str, corpus: str = "corpus.parquet", extra: str = ""
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    spec = directory / "job.yaml"
    spec.write_text(
        f"""
name: ray-executor
data_dir: {data}
dataset: {{name: toy, id_column: id}}
user_split: {{path: user.jsonl, fraction: null}}
corpus: {{path: {corpus}}}
engine: {{kind: openai, model: fault-model, base_url: {base_url}, api_key_env: {KEY_ENV}, max_concurrency: 32,
          structured_output: vllm_choice}}
cm: {{variant: counts, accept: {{target_accuracy: 0.5}}}}
generation: {{max_tokens: 8}}
output: {{dir: {directory / "out"}, chunk_size: {CHUNK}, checkpoint_seconds: 0.2}}
executor: {executor}
{extra}
"""
    )
    return spec


def annotations(spec: Path) -> pl.DataFrame:
    return pl.read_parquet(Path(load_spec(spec).output.dir) / "annotations.parquet")


def metrics(spec: Path) -> dict[str, Any]:
    return orjson.loads((Path(load_spec(spec).output.dir) / "metrics.json").read_bytes())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data, fault_server) -> tuple[Path, int]:
    """The one-machine run every Ray run is compared with, and the requests it made."""
    spec = write_spec(tmp_path_factory.mktemp("local"), data, fault_server, "{kind: local}")
    before = served(fault_server)["requests"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, "x")
        asyncio.run(run_job(load_spec(spec)))
    return spec, served(fault_server)["requests"] - before


def ray_executor(cluster: LocalCluster, workers: int = 2) -> str:
    return f"{{kind: ray, workers: {workers}, ray_address: {cluster.gcs_address}}}"


def test_the_ray_executor_writes_the_one_machine_rows_and_its_driver_reads_no_corpus_row(
    tmp_path, data, fault_server, cluster, local_run, monkeypatch
):
    spec = write_spec(tmp_path, data, fault_server, ray_executor(cluster))

    def no_rows_here(*args: object) -> None:
        raise AssertionError("the driver read corpus rows")

    # the driver may check and count the corpus, never read its chunks; the workers are other processes
    monkeypatch.setattr(Corpus, "chunks", no_rows_here)
    monkeypatch.setattr(Corpus, "chunk", no_rows_here)
    monkeypatch.setenv(KEY_ENV, "x")
    cluster.join_from_this_process(monkeypatch)
    result = asyncio.run(run_job(load_spec(spec)))
    assert annotations(spec).equals(annotations(local_run[0]))
    ours, theirs = metrics(spec), metrics(local_run[0])
    assert {k: v for k, v in ours.items() if k != "run"} == {k: v for k, v in theirs.items() if k != "run"}
    # the user split's answers came from the workers too: the same answers, none asked by the driver's engine
    out, local_out = (Path(load_spec(s).output.dir) for s in (spec, local_run[0]))
    assert pl.read_parquet(out / "estimate.parquet").equals(pl.read_parquet(local_out / "estimate.parquet"))
    corpus_calls = int(annotations(local_run[0])["calls"].sum())
    n_user = 48
    driver_calls = theirs["run"]["engine"]["calls"] - n_user - corpus_calls  # the trial's questions, if any
    assert ours["run"]["engine"]["calls"] == driver_calls
    executor = result.metrics["run"]["executor"]
    assert executor["kind"] == "ray" and executor["worker_processes"] == 2
    stages = executor["worker_cpu_ms_per_row"]
    assert list(stages) == [*WORKER_STAGES, "total"]
    assert stages["engine_client"] > 0 and min(stages.values()) >= 0  # the workers' HTTP client is seen working
    assert sum(stages[stage] for stage in WORKER_STAGES) == pytest.approx(stages["total"], abs=1e-3)
    assert executor["driver_cpu_ms_per_row"] > 0


def rescored_after_review(tmp_path: Path, data: Path, base_url: str, finished: Path, executor: str) -> Path:
    """A copy of a finished job's output, a review of its first 48 rows imported (their gold labels: the bank and
    so the fit change), and the job run again with ``executor``: every shard rescored."""
    from runner.review import import_reviewed

    spec = write_spec(tmp_path, data, base_url, executor)
    out = Path(load_spec(spec).output.dir)
    shutil.copytree(Path(load_spec(finished).output.dir), out)
    ids = pl.read_parquet(out / "annotations.parquet")["id"][:48]
    gold = {row["id"]: row["label"] for row in pl.read_ndjson(data / "corpus.jsonl").iter_rows(named=True)}
    (tmp_path / "reviewed.csv").write_text("id,label\n" + "".join(f"{i},{gold[i]}\n" for i in ids))
    import_reviewed(out, tmp_path / "reviewed.csv", LABELS)
    return spec


def test_a_rescore_after_a_review_runs_on_the_workers_and_writes_the_one_machine_rows(
    tmp_path, data, fault_server, cluster, local_run, monkeypatch
):
    """A finished job, a review imported, the job rerun: on Ray the workers score every shard again (the driver
    reads no corpus row), asking what the one-machine rescore asks and writing its rows."""
    monkeypatch.setenv(KEY_ENV, "x")
    local = rescored_after_review(tmp_path / "local", data, fault_server, local_run[0], "{kind: local}")
    before = served(fault_server)["requests"]
    local_result = asyncio.run(run_job(load_spec(local)))
    local_asked = served(fault_server)["requests"] - before

    on_ray = rescored_after_review(tmp_path / "ray", data, fault_server, local_run[0], ray_executor(cluster))

    def no_rows_here(*args: object) -> None:
        raise AssertionError("the driver read corpus rows")

    monkeypatch.setattr(Corpus, "chunks", no_rows_here)
    monkeypatch.setattr(Corpus, "chunk", no_rows_here)
    cluster.join_from_this_process(monkeypatch)
    before = served(fault_server)["requests"]
    result = asyncio.run(run_job(load_spec(on_ray)))
    asked = served(fault_server)["requests"] - before

    assert result.metrics["run"]["rows_rescored"] == local_result.metrics["run"]["rows_rescored"] == N_CORPUS
    rows, first = annotations(on_ray), annotations(local_run[0])
    assert rows.equals(annotations(local))
    assert (rows["source"] == "human").sum() == 48
    # the review changed the fit: rows nobody reviewed scored anew, second calls within the new sets asked
    machine = rows["source"] != "human"
    assert not rows.filter(machine)["confidence"].equals(first.filter(machine)["confidence"])
    assert asked == local_asked > 0
    ours, theirs = metrics(on_ray), metrics(local)
    assert {k: v for k, v in ours.items() if k != "run"} == {k: v for k, v in theirs.items() if k != "run"}


def test_a_cascade_runs_on_ray_as_on_one_machine(tmp_path, data, fault_server, cluster, monkeypatch):
    """Two stages, the second over its own API engine (a model of the same server): the workers build both."""
    second = (
        f"{{kind: openai, model: fault-model-b, base_url: {fault_server}, api_key_env: {KEY_ENV}, "
        "structured_output: vllm_choice}"
    )
    cascade = f"cascade:\n  - {{name: counts}}\n  - {{name: paper, engine: {second}, cm: {{variant: paper}}}}"
    local = write_spec(tmp_path / "local", data, fault_server, "{kind: local}", extra=cascade)
    on_ray = write_spec(tmp_path / "ray", data, fault_server, ray_executor(cluster), extra=cascade)
    monkeypatch.setenv(KEY_ENV, "x")
    asyncio.run(run_job(load_spec(local)))
    cluster.join_from_this_process(monkeypatch)
    result = asyncio.run(run_job(load_spec(on_ray)))
    assert result.metrics["run"]["executor"]["kind"] == "ray"
    rows = annotations(on_ray)
    assert rows.equals(annotations(local))
    escalated = rows.filter(pl.col("stage") == "paper")
    assert escalated.height and (escalated["stage_calls"].list.len() == 2).all()
    assert rows.filter(pl.col("stage") == "counts")["accepted"].all()  # a first-stage row kept is accepted
    ours, theirs = metrics(on_ray), metrics(local)
    assert {k: v for k, v in ours.items() if k != "run"} == {k: v for k, v in theirs.items() if k != "run"}


def test_a_job_reading_from_and_writing_to_s3_runs_on_ray_and_writes_the_one_machine_rows(
    tmp_path, data, fault_server, cluster, local_run, s3_bucket
):
    """Workers read their chunks of the corpus from S3 and write their shards there; the driver records them.

    ``cm-run`` as a subprocess, with the cluster's environment (the S3 server's credentials included).
    """
    import boto3

    from runner._storage import ObjectPath

    s3 = boto3.client("s3", region_name="us-east-1")
    for name in ("user.jsonl", "corpus.parquet"):
        s3.upload_file(str(data / name), s3_bucket.removeprefix("s3://"), f"data/{name}")
    spec = write_spec(tmp_path, data, fault_server, ray_executor(cluster))
    text = spec.read_text().replace(f"data_dir: {data}", f"data_dir: {s3_bucket}/data")
    spec.write_text(text.replace(f"dir: {tmp_path / 'out'}", f"dir: {s3_bucket}/out"))
    process = cm_run(spec, cluster)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    out = ObjectPath(f"{s3_bucket}/out")
    assert pl.read_parquet(out / "annotations.parquet").equals(annotations(local_run[0]))
    ours = orjson.loads((out / "metrics.json").read_bytes())
    assert ours["run"]["executor"]["worker_processes"] == 2
    theirs = metrics(local_run[0])
    assert {k: v for k, v in ours.items() if k != "run"} == {k: v for k, v in theirs.items() if k != "run"}
    assert len(list((out / "annotations").glob("part-*.parquet"))) == -(-N_CORPUS // CHUNK)
    assert not (tmp_path / "out").exists()  # nothing went to a local directory


def cm_run(spec: Path, cluster: LocalCluster) -> subprocess.Popen[str]:
    env = {**cluster.env, KEY_ENV: "x"}
    command = [sys.executable, "-m", "runner.cli", str(spec), "--quiet"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished_shards(spec: Path) -> int:
    manifest = Path(load_spec(spec).output.dir) / "manifest.json"
    with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):
        return len(orjson.loads(manifest.read_bytes())["finished_shards"]["annotate"])
    return 0


def chunk_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any("_ChunkWorker" in part for part in process.info["cmdline"] or ()):
                found.append(process)
    return found


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_worker_killed_mid_block_and_then_the_driver_killed_lose_and_duplicate_no_row(
    tmp_path, data, fault_server, cluster, local_run
):
    """A worker SIGKILLed mid-chunk (Ray restarts it and gives the chunk again), then the driver SIGKILLed:
    the rerun finishes with every row once, equal to the one-machine run, asking again only what was in flight."""
    spec = write_spec(tmp_path, data, fault_server, ray_executor(cluster), corpus="corpus.jsonl")
    before = served(fault_server)["requests"]
    job = cm_run(spec, cluster)
    try:
        wait_for(lambda: finished_shards(spec) >= 2 or job.poll() is not None, 120, "two shards")
        assert job.poll() is None, job.stdout.read() if job.stdout else ""
        victim = chunk_workers()[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        wait_for(lambda: finished_shards(spec) >= 7 or job.poll() is not None, 180, "shards after the kill")
        assert job.poll() is None, "the job ended before its driver could be killed"
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert finished_shards(spec) < N_CORPUS // CHUNK
    wait_for(lambda: not chunk_workers(), 60, "the killed driver's workers to go")

    rerun = cm_run(spec, cluster)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output[-3000:]
    table = annotations(spec)
    assert table["id"].n_unique() == table.height == N_CORPUS
    local_spec, local_asked = local_run
    assert table.equals(annotations(local_spec))
    # the two runs together asked what the one-machine run asked, plus what was in flight at the two kills:
    # at most a chunk per worker each time, two calls a row
    asked = served(fault_server)["requests"] - before
    assert local_asked <= asked <= local_asked + 2 * (2 * CHUNK * 2), (asked, local_asked)
    wait_for(lambda: not chunk_workers(), 60, "the rerun's workers to go")
