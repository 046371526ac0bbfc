"""Ctrl-C while two vLLM replicas are still loading: the job ends and leaves no process behind.

A replica still loading never answers a shutdown call (vLLM's engine start blocks its actor), so
it only gets ``ray.kill``, which SIGKILLs the actor: the review feared this orphans vLLM's
engine-core process. Here it does not (vLLM's core ends with its parent; this passed before any
change, also with Ray's raylet subreaper off); the test keeps it so. Real vLLM (the embedded
SmolLM2), a real local Ray started by the cm-run process, a real SIGINT.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _engine_cores(root: psutil.Process) -> list[psutil.Process]:
    found = []
    try:
        descendants = root.children(recursive=True)
    except psutil.Error:  # the job ended
        return []
    for process in descendants:
        try:
            if "EngineCore" in process.name() or "EngineCore" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_ctrl_c_while_replicas_load_leaves_no_process(tmp_path, write):
    write("data/user.jsonl", '{"text": "wake me up at seven", "label": "alarm"}\n')
    write("data/corpus.jsonl", '{"text": "play some jazz", "label": "music"}\n')
    spec = write(
        "job.yaml",
        f"""
name: load-interrupt
data_dir: {tmp_path / "data"}
dataset: {{name: toy, labels: [alarm, music]}}
user_split: {{path: user.jsonl, fraction: null}}
corpus: {{path: corpus.jsonl}}
engine: {{kind: vllm, replicas: 2, num_cpus_per_replica: 1, gpu_memory_utilization: 0.2, max_model_len: 1024,
          ray_address: local}}
cm: {{enabled: false, accept: null}}
output: {{dir: {tmp_path / "out"}}}
""",
    )
    log = (tmp_path / "cm-run.log").open("w")
    job = subprocess.Popen([sys.executable, "-m", "runner.cli", str(spec)], cwd=REPO, stdout=log, stderr=log)
    root = psutil.Process(job.pid)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 240
        # the first engine core up: both replicas are loading (the second waits for the model on the node)
        while not _engine_cores(root) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        cores = _engine_cores(root)
        assert cores, "no vLLM engine core started: the test could not interrupt a load"
        assert job.poll() is None, "the job ended before it was interrupted"
        seen = {p.pid: p for p in root.children(recursive=True)}
        job.send_signal(signal.SIGINT)  # as Ctrl-C in a terminal
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    log.close()
    output = (tmp_path / "cm-run.log").read_text()
    assert job.returncode != 0
    assert "up on node" not in output  # no replica had finished loading
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
    survivors = [f"{p.pid} {p.name()}" for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for process in alive:  # never leave them to the next test, whatever the assertion says
        process.kill()
    assert survivors == [], output[-3000:]
