"""`cm-run` with `engine: openai` end to end against the fault server run as its own process.

Random faults (10% of requests) plus scripted ones on chosen rows; the job must finish with every
row labelled or carrying its error, no row twice, and the API key in no file it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import polars as pl
import pytest

from tests.fault_server import expected_answer, served, serving_process

pytestmark = pytest.mark.slow  # cm-run and the fault server as subprocesses
REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-SECRET123"
KEY_ENV = "CM_TEST_OPENAI_KEY"
LABELS = ["alarm", "audio", "calendar", "iot", "music", "weather"]
SCRIPTED = {
    "c-fail-a [[500]]": "engine",  # exhausts its retries
    "c-fail-b [[500]]": "engine",
    "c-too-long [[400]]": "rejected",
    "c-odd [[wrong]]": "unparsed",
}
RECOVERING = ["c-flaky [[503*1]]", "c-dropped [[drop*1]]", "c-garbled [[malformed*1]]", "c-busy [[429*1]]"]


@pytest.fixture(scope="module")
def fault_server() -> Iterator[str]:
    options = ["--api-key", KEY, "--latency", "0.002", "--fault-rate", "0.1", "--faults", "429,500,503,malformed"]
    with serving_process(*options, "--fault-retry-after", "0.05", "--seed", "3", "--max-seconds", "300") as url:
        yield url


@pytest.fixture(scope="module")
def job(tmp_path_factory, fault_server) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("openai-job")
    user = [{"id": f"u{i}", "text": f"user utterance {i}", "label": LABELS[i % len(LABELS)]} for i in range(36)]
    corpus_texts = [f"corpus utterance {i}" for i in range(40)] + list(SCRIPTED) + RECOVERING
    corpus = [{"id": f"c{i}", "text": text, "label": LABELS[i % 6]} for i, text in enumerate(corpus_texts)]
    for name, rows in (("user.jsonl", user), ("corpus.jsonl", corpus)):
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = root / "job.yaml"
    spec.write_text(
        f"""
name: openai-fault-job
dataset: {{name: toy, id_column: id}}
user_split: {{path: user.jsonl, fraction: null}}
corpus: {{path: corpus.jsonl}}
engine:
  kind: openai
  model: fault-model
  base_url: {fault_server}
  api_key_env: {KEY_ENV}
  max_concurrency: 16
  max_retries: 2
  timeout_seconds: 5
  structured_output: vllm_choice
  prices: {{prompt_per_million: 0.15, completion_per_million: 0.6}}
generation: {{max_tokens: 8}}
output: {{dir: {root / "out"}, chunk_size: 16}}
"""
    )
    return root, spec


def cm_run(*args: str, key: str = KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: key}
    command = [sys.executable, "-m", "runner.cli", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=240)


@pytest.fixture(scope="module")
def finished(job, fault_server) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root, spec = job
    done = cm_run(str(spec), "--data-dir", str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out", done


def test_dry_run_prints_a_prompt_and_the_request_count_and_calls_nothing(job, fault_server):
    root, spec = job
    before = served(fault_server)["requests"]
    done = cm_run(str(spec), "--data-dir", str(root), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "- alarm\n- audio" in done.stdout and "--- user\ncorpus utterance 0" in done.stdout
    assert "estimate 36 + annotate 48 first + up to 48 second" in done.stdout
    assert "at most 132 requests" in done.stdout and f"${KEY_ENV} is set" in done.stdout
    assert served(fault_server)["requests"] == before
    assert not (root / "out").exists() or (root / "out" / "metrics.json").exists()


def test_every_row_ends_labelled_or_with_its_error_and_none_twice(finished):
    out, _ = finished
    table = pl.read_parquet(out / "annotations.parquet")
    corpus = pl.read_ndjson(out.parent / "corpus.jsonl")
    assert table.height == corpus.height and sorted(table["id"].to_list()) == sorted(corpus["id"].to_list())
    unsettled = table.filter(pl.col("y_hat").is_null() & pl.col("error").is_null())
    assert unsettled.height == 0
    by_text = {row["text"]: row for row in table.iter_rows(named=True)}
    for text, kind in SCRIPTED.items():
        assert by_text[text]["error_kind"] == kind and by_text[text]["y_hat"] is None
    assert by_text["c-fail-a [[500]]"]["error"].startswith("gave up after 3 attempt(s)")
    for row in table.iter_rows(named=True):
        if row["text"] not in SCRIPTED:  # random faults and scripted transient ones were all retried away
            assert row["error"] is None and row["y_prime"] == expected_answer(row["text"], LABELS)


def test_usage_and_cost_land_in_metrics(finished):
    out, _ = finished
    engine = orjson.loads((out / "metrics.json").read_bytes())["run"]["engine"]
    assert engine["requests"] > 84 and engine["retries"] > 0 and engine["prompt_tokens"] > 0
    assert engine["row_errors"] == {"http_400": 1, "http_500": 2}
    assert engine["estimated_cost_usd"] > 0


def test_the_key_is_in_no_output_file_and_no_message(finished):
    out, done = finished
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {p.name for p in files} >= {"annotations.parquet", "metrics.json", "manifest.json", "memory_bank.json"}
    assert not [path for path in files if KEY.encode() in path.read_bytes()]
    assert KEY not in done.stdout + done.stderr


def test_a_refused_key_exits_3_naming_the_variable_not_the_key(job, tmp_path):
    root, spec = job
    other = tmp_path / "job.yaml"
    other.write_text(spec.read_text().replace(str(root / "out"), str(tmp_path / "out")))
    done = cm_run(str(other), "--data-dir", str(root), key="sk-test-WRONG999")
    assert done.returncode == 3
    assert f"${KEY_ENV}" in done.stderr and "WRONG999" not in done.stderr + done.stdout


def test_an_evaluation_grid_runs_over_the_api_and_pays_for_no_request_twice(job, fault_server, tmp_path):
    root, spec = job
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"""
name: api-grid
datasets: [{spec}]
strategies: [{{name: zero_shot}}, {{name: self_consistency, n_samples: 3}}]
budgets: [0.5]
seeds: [0]
engines:
  - {{kind: openai, model: fault-model, base_url: {fault_server}, api_key_env: {KEY_ENV}, max_retries: 4}}
output_dir: {tmp_path / "eval"}
"""
    )
    done = cm_run("eval", str(grid), "--data-dir", str(root), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]

    cells = pl.read_csv(tmp_path / "eval/cells.csv")
    assert cells.height == 4 and set(cells["method"]) == {"Z", "CM+Z"} and (cells["n_items"] == 48).all()
    z_cells = cells.filter(pl.col("method") == "Z").sort("strategy", descending=True)
    # Z's calls are CM+Z's first calls, answered from the cache; only the two rows that gave up after their
    # retries ([[500]]) are asked again, as a failure that may pass next time: 1 request each, 3 for 3 samples
    assert (z_cells["engine_requests"] - z_cells["cache_hits"]).to_list() == [2, 6]
    assert (cells["n_errors"] <= len(SCRIPTED)).all()
    written = [path for path in (tmp_path / "eval").rglob("*") if path.is_file()]
    assert any(path.suffix == ".png" for path in written)
    assert not [path for path in written if KEY.encode() in path.read_bytes()]
