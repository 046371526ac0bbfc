"""The README's path for real: `cm-run` on a real dataset slice with the real embedded vLLM engine."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import polars as pl
import psutil
import pytest

from runner import load_bank
from tests._compare import assert_same_annotations

pytestmark = [pytest.mark.engine, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def write_spec(directory, output):
    spec = directory / f"{output.name}.yaml"
    spec.write_text(
        f"""
base: {REPO / "jobs/_base/massive-en-US.yaml"}
name: e2e-massive
user_split: {{fraction: 0.01, seed: 0}}
corpus: {{limit: 40, limit_seed: 1}}
engine: {{dtype: float32}}  # bfloat16's greedy near-ties flip with batch composition, which a rerun changes
output: {{dir: {output}, chunk_size: 16}}
"""
    )
    return spec


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("e2e")
    spec = write_spec(out, out / "out")
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", str(spec), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "out", done.stdout


def test_outputs_are_written(finished_job):
    out, stdout = finished_job
    assert {p.name for p in out.iterdir()} >= {
        "memory_bank.json",
        "annotations.parquet",
        "metrics.json",
        "manifest.json",
    }
    assert "accuracy  baseline (y'):" in stdout and "CM (y_hat):" in stdout


def test_bank_is_estimated_on_the_user_split(finished_job):
    out, _ = finished_job
    bank = load_bank(out / "memory_bank.json")
    assert len(bank.labels) == 18 and bank.n_samples == 117 and bank.model == "smollm2-135m-instruct"
    assert sum(c.count for c in bank.confusions) + bank.n_unparsed == 117
    estimate = pl.read_parquet(out / "estimate.parquet")
    assert estimate.height == 117 and estimate["y_prime"].is_in(bank.labels).all()


def test_annotations_follow_the_cm_rules(finished_job):
    out, _ = finished_job
    table = pl.read_parquet(out / "annotations.parquet")
    bank = load_bank(out / "memory_bank.json")
    rows = bank.rows()
    assert table.height == 40 and table["id"].n_unique() == 40 and table["error"].null_count() == 40
    for row in table.iter_rows(named=True):
        expected = list(rows[row["y_prime"]]) or [row["y_prime"]]  # empty row: keep the answer
        assert sorted(row["candidates"]) == sorted(expected)
        # listed for a reviewer most probable first: by how often each truth stood behind this answer
        shares = [bank.counts[(row["y_prime"], truth)] for truth in row["candidates"]]
        assert shares == sorted(shares, reverse=True)
        assert row["y_hat"] in row["candidates"]
        assert row["calls"] == (2 if len(expected) > 1 else 1)  # one candidate: no second call


def test_metrics_match_the_parquet(finished_job):
    out, _ = finished_job
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    table = pl.read_parquet(out / "annotations.parquet")
    assert metrics["n_user"] == 117 and metrics["n_annotated"] == 40
    scored = table.filter(pl.col("gold").is_not_null())  # a null answer (an error) counts as wrong
    assert (
        metrics["accuracy_baseline"]
        == scored.select((pl.col("y_prime") == pl.col("gold")).fill_null(False).mean()).item()
    )
    assert metrics["accuracy_cm"] == scored.select((pl.col("y_hat") == pl.col("gold")).fill_null(False).mean()).item()
    assert metrics["calls_per_item"] == table["calls"].mean()
    assert metrics["run"]["engine_load_seconds"] > 0 and metrics["run"]["items_per_second"] > 0


def test_sigkill_mid_annotate_then_rerun_equals_the_uninterrupted_run(finished_job, tmp_path, data_dir):
    """The real engine, killed (with its engine-core process) after the first shard, then rerun."""
    reference, _ = finished_job
    output = tmp_path / "killed"
    spec = write_spec(tmp_path, output)
    command = [sys.executable, "-m", "runner.cli", str(spec), "--data-dir", str(data_dir), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (output / "annotations/part-00000.parquet").exists():
        assert process.poll() is None and time.monotonic() < deadline, "cm-run ended before the kill point"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: vLLM's engine core is a child process
    process.wait()
    assert not (output / "annotations.parquet").exists()

    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_bank(output / "memory_bank.json").digest() == load_bank(reference / "memory_bank.json").digest()
    ours = pl.read_parquet(output / "annotations.parquet")
    assert_same_annotations(ours, pl.read_parquet(reference / "annotations.parquet"))


def _alive(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {process.name()}")
        except psutil.NoSuchProcess:
            pass
    return alive


def write_small_spec(directory: Path, output: Path) -> Path:
    """48 MASSIVE rows, CM off and no confidence (so no estimate), 16-row chunks one at a time; float32,
    where batch composition flips greedy near-ties far more rarely than bfloat16 (a resumed run batches
    its rows differently)."""
    spec = directory / f"{output.name}.yaml"
    spec.write_text(
        f"""
base: {REPO / "jobs/_base/massive-en-US.yaml"}
name: e2e-engine-death
user_split: {{fraction: 0.01, seed: 0}}
corpus: {{limit: 48, limit_seed: 2}}
engine: {{dtype: float32}}
cm: {{enabled: false, accept: null}}
output: {{dir: {output}, chunk_size: 16, chunks_in_flight: 1}}
"""
    )
    return spec


@pytest.mark.slow
def test_a_killed_engine_core_ends_the_job_cleanly_and_a_rerun_resumes(tmp_path, data_dir):
    """vLLM's engine core SIGKILLed mid-annotate (as the OOM killer does): exit 3, one short message,
    the finished shards kept, no process of the job left, and a rerun finishes the same rows."""
    output = tmp_path / "core-killed"
    spec = write_small_spec(tmp_path, output)
    command = [sys.executable, "-m", "runner.cli", str(spec), "--data-dir", str(data_dir), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while not (output / "annotations/part-00000.parquet").exists():
            assert process.poll() is None and time.monotonic() < deadline, "cm-run ended before the kill point"
            time.sleep(0.01)
        job = psutil.Process(process.pid).children(recursive=True)
        core = [p for p in job if "VLLM::EngineCore" in " ".join(p.cmdline())]
        assert len(core) == 1, [p.cmdline() for p in job]
        core[0].send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("cm-run: e2e-engine-death:"), stderr[-3000:]  # header, then why
    assert lines[1].startswith("cm-run: engine died: vLLM's engine core for 'smollm2-135m-instruct' died")
    assert "(EngineCore killed by SIGKILL)" in lines[1] and "rerun the same command to resume" in lines[1]
    assert "Traceback" in (output / "engine.log").read_text()  # vLLM's own account is kept, off the terminal
    time.sleep(1.0)
    assert not _alive(job)  # engine core, its worker, anything else the job started

    manifest = orjson.loads((output / "manifest.json").read_bytes())
    finished = manifest["finished_shards"]["annotate"]
    assert 0 in finished and len(finished) < 3 and not manifest["complete"]
    kept = pl.concat([pl.read_parquet(output / f"annotations/part-{n:05d}.parquet") for n in finished])

    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = pl.read_parquet(output / "annotations.parquet")
    assert resumed.join(kept, on="id", how="semi").equals(kept)  # what was saved is what the rerun kept

    reference_output = tmp_path / "uninterrupted"
    command[3] = str(write_small_spec(tmp_path, reference_output))
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = pl.read_parquet(reference_output / "annotations.parquet")
    assert resumed["id"].to_list() == reference["id"].to_list()  # every row once, in corpus order
    assert resumed["error"].null_count() == resumed.height
    assert_same_annotations(resumed, reference, ignore=("prompt_tokens", "completion_tokens"))
