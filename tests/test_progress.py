"""Progress when stderr is a log, not a terminal; the engine libraries' output kept out of it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from runner._progress import ProgressLog
from runner._quiet import EngineLog
from tests.fault_server import serving_process

REPO = Path(__file__).resolve().parents[1]


def test_a_line_every_interval_with_rate_and_eta_and_one_at_the_end():
    now = [100.0]
    lines: list[str] = []
    log = ProgressLog(lines.append, interval=30, clock=lambda: now[0])
    log("annotate", 200, 1200)  # resumed: 200 rows an earlier run finished
    for done, at in ((210, 105), (260, 125), (300, 130), (1200, 400)):
        now[0] = at
        log("annotate", done, 1200)
    log("annotate", 1200, 1200)  # the end is said once
    # 100 rows worked in 30 s: 3.33/s, 900 left: 270 s; the whole 1000 rows in 300 s: took 5m 00s
    assert lines == [
        "annotate 200/1,200 (17%)",
        "annotate 300/1,200 (25%), 3.33 items/s, ETA 4m 30s",
        "annotate 1,200/1,200 (100%), 3.33 items/s, took 5m 00s",
    ]


def test_cm_run_logs_progress_per_row_not_per_chunk(tmp_path, data_dir):
    with serving_process("--latency", "0.02", "--max-seconds", "300") as server:
        spec = tmp_path / "job.yaml"
        spec.write_text(
            f"""
base: {REPO / "jobs/_base/massive-en-US.yaml"}
name: progress
data_dir: {data_dir}
user_split: {{fraction: 0.01, seed: 0}}
corpus: {{limit: 120, limit_seed: 0}}
engine: {{kind: openai, model: fake, base_url: "{server}", api_key_env: CM_TEST_KEY, max_concurrency: 2}}
output: {{dir: {tmp_path / "out"}, chunk_size: 60}}
"""
        )
        done = subprocess.run(
            [sys.executable, "-m", "runner.cli", str(spec)],
            cwd=REPO,
            env={**os.environ, "CM_TEST_KEY": "sk-test", "CM_PROGRESS_SECONDS": "0.3"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    annotate = [
        (int(m[1]), m[2])
        for m in re.finditer(r"^cm-run: annotate (\d+)/120 \(\d+%\)(.*)$", done.stderr.replace(",", ""), re.M)
    ]
    counts = [n for n, _ in annotate]
    assert counts == sorted(counts) and counts[-1] == 120 and "took" in annotate[-1][1]
    assert any(n % 60 for n in counts)  # a line between chunk boundaries: progress moves per row
    assert any(re.search(r"items/s ETA \d", rest) for _, rest in annotate[:-1])
    assert re.search(r"^cm-run: estimate \d+/117", done.stderr.replace(",", ""), re.M)


def test_engine_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path):
    log = tmp_path / "out/engine.log"
    script = f"""
import logging, os, subprocess, sys, warnings
from pathlib import Path
from runner._quiet import engine_output_to
logging.basicConfig(level=logging.WARNING, format="cm-run: %(levelname)s: %(message)s", stream=sys.stderr)
with engine_output_to(Path({str(log)!r})):
    logging.getLogger("vllm.platforms").warning("Triton is not installed")
    warnings.warn("reduce_op is deprecated", FutureWarning)
    os.write(2, b"[W utils.cpp:68] NUMA binding\\n")
    subprocess.run([sys.executable, "-c", "import sys; print('a child process line', file=sys.stderr)"])
    logging.getLogger("runner").warning("a label has no user sample")
    print("cm-run: annotate 1/2", file=sys.stderr)
print("cm-run: after", file=sys.stderr)
os.write(2, b"fd 2 is back\\n")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "cm-run: WARNING: a label has no user sample",
        "cm-run: annotate 1/2",
        "cm-run: after",
        "fd 2 is back",
    ]
    kept = log.read_text()
    for line in ("Triton is not installed", "reduce_op is deprecated", "NUMA binding", "a child process line"):
        assert line in kept


def test_the_root_cause_is_read_from_this_runs_part_of_the_engine_log(tmp_path):
    path = tmp_path / "engine.log"
    path.write_text("ValueError: an earlier run's cause\n")
    log = EngineLog(path)
    assert log.cause() is None
    with path.open("a") as handle:
        handle.write(
            "Traceback (most recent call last):\n    raise ValueError(\n"
            "ValueError: Available memory on node 0 (5.18/23.54 GiB) is less than desired\n"
            "2026-12-03 08:21:51 vllm.v1.engine.core ERROR: EngineCore failed to start.\n"
            "RuntimeError: Engine core initialization failed. See root cause above.\n"
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n"
        )
    assert log.cause() == "ValueError: Available memory on node 0 (5.18/23.54 GiB) is less than desired"
