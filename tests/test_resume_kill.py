"""Real interruptions: `cm-run` in a subprocess, killed at several points, rerun, compared.

The many-kill cases run against a fast local OpenAI-compatible server (tests/fault_server.py)
whose answers are a pure function of the request, so the uninterrupted run is the reference
row for row. The embedded-vLLM case is in tests/test_e2e.py's module (it shares the model load).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import polars as pl
import pytest

from tests.fault_server import served, serving_process

pytestmark = pytest.mark.slow  # kills cm-run processes
REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET-resume"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving_process("--latency", "0.03", "--max-seconds", "900") as url:
        yield url


def write_spec(path: Path, output: Path, server: str, data_dir: Path) -> Path:
    """User split 1% of MASSIVE (117 rows), 240 corpus rows, 20-row chunks, the fast local server."""
    path.write_text(
        f"""
base: {REPO / "jobs/_base/massive-en-US.yaml"}
name: kill-test
data_dir: {data_dir}
user_split: {{fraction: 0.01, seed: 0}}
corpus: {{limit: 240, limit_seed: 0}}
engine: {{kind: openai, model: fake, base_url: "{server}", api_key_env: CM_TEST_KEY, max_concurrency: 4}}
output: {{dir: {output}, chunk_size: 20}}
"""
    )
    return path


@pytest.fixture
def job(tmp_path: Path, server: str, data_dir: Path) -> Callable[[str], tuple[Path, Path]]:
    """A spec with its own output dir, per test case."""

    def make(name: str) -> tuple[Path, Path]:
        return write_spec(tmp_path / f"{name}.yaml", tmp_path / name, server, data_dir), tmp_path / name

    return make


def start(spec: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "CM_TEST_KEY": KEY}
    return subprocess.Popen(
        [sys.executable, "-m", "runner.cli", str(spec), "--quiet"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(spec: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", str(spec), "--quiet"],
        cwd=REPO,
        env={**os.environ, "CM_TEST_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"cm-run ended before the kill point: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)


def shards(output: Path, phase_dir: str) -> int:
    return len(list((output / phase_dir).glob("part-*.parquet")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, server: str, data_dir: Path) -> pl.DataFrame:
    """The uninterrupted run every interrupted one must equal."""
    root = tmp_path_factory.mktemp("reference")
    spec = write_spec(root / "ref.yaml", root / "ref", server, data_dir)
    finish(spec)
    return pl.read_parquet(root / "ref/annotations.parquet")


def assert_same_as_reference(output: Path, reference: pl.DataFrame) -> None:
    ours = pl.read_parquet(output / "annotations.parquet")
    assert ours["id"].n_unique() == ours.height == reference.height  # no duplicates, none missing
    assert ours.drop("prompt_tokens", "completion_tokens").equals(reference.drop("prompt_tokens", "completion_tokens"))
    for path in output.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


KILL_POINTS: dict[str, Callable[[Path], bool]] = {
    "during estimate": lambda out: shards(out, "estimate") >= 1,
    "during annotate": lambda out: shards(out, "annotations") >= 3,
    "right after a shard rename": lambda out: (out / "annotations/part-00005.parquet").exists(),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_equals_an_uninterrupted_run(point, job, reference):
    spec, output = job(point.replace(" ", "-"))
    process = start(spec)
    wait_for(lambda: KILL_POINTS[point](output), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finish(spec)
    assert_same_as_reference(output, reference)


def test_killed_again_and_again_still_ends_complete(job, reference):
    spec, output = job("many-kills")
    for at_least in (1, 4, 7, 10):
        process = start(spec)
        wait_for(lambda n=at_least: shards(output, "annotations") >= n, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finish(spec)
    assert_same_as_reference(output, reference)


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_cleanly_and_say_how_to_resume(stop, code, job, reference):
    spec, output = job(f"signal-{stop.name}")
    process = start(spec)
    wait_for(lambda: shards(output, "annotations") >= 2, process)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-2000:]
    assert "Rerun the same command to resume" in stderr
    manifest = orjson.loads((output / "manifest.json").read_bytes())
    assert len(manifest["finished_shards"]["annotate"]) >= 2 and not manifest["complete"]
    finish(spec)
    assert_same_as_reference(output, reference)


def test_a_job_on_s3_sigkilled_then_rerun_equals_an_uninterrupted_run(tmp_path, server, data_dir, reference, s3_bucket):
    """Data and output on the local S3 server: the rerun takes over the killed run's lock, resumes, asks
    only for the chunks not finished when it was killed, and writes the reference's rows."""
    import boto3

    from runner._storage import ObjectPath
    from runner.checkpoint import LOCK_NAME

    s3 = boto3.client("s3", region_name=os.environ["AWS_REGION"])
    for name in ("massive/en-US/train.jsonl", "massive/en-US/test.jsonl"):
        s3.upload_file(str(data_dir / name), s3_bucket.removeprefix("s3://"), f"data/{name}")
    output = ObjectPath(f"{s3_bucket}/out")
    spec = write_spec(tmp_path / "s3.yaml", output, server, f"{s3_bucket}/data")  # data_dir on S3 too
    n_shards = lambda: sum(1 for _ in (output / "annotations").glob("part-*.parquet"))  # noqa: E731

    process = start(spec)
    wait_for(lambda: n_shards() >= 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (output / LOCK_NAME).is_file()  # a killed run cannot release its lock: the rerun sees it is dead
    finished = orjson.loads((output / "manifest.json").read_bytes())["finished_shards"]["annotate"]
    before = served(server)["requests"]
    finish(spec)
    asked = served(server)["requests"] - before
    unfinished = 240 - 20 * len(finished)
    assert asked <= 2 * unfinished  # at most a first and a second call for each row not already in a shard
    ours = pl.read_parquet(output / "annotations.parquet")
    assert ours["id"].n_unique() == ours.height == reference.height
    assert ours.drop("prompt_tokens", "completion_tokens").equals(reference.drop("prompt_tokens", "completion_tokens"))
    assert not (output / LOCK_NAME).is_file()
