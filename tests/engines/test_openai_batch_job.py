"""`cm-run` with `engine: {kind: openai, batch: true}` against the local batch server, run as its own process.

The server answers each line as the fault server answers the same body online, so an uninterrupted
batch run, an online run and every killed-and-rerun batch run must agree row for row; the server's
count of submitted lines says whether a rerun paid for any line twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.request import Request, urlopen

import orjson
import polars as pl
import pytest

from tests._compare import held_out_questions
from tests.fault_server import expected_answer, served, serving_process

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
KEY_ENV = "CM_TEST_BATCH_KEY"
LABELS = ["alarm", "audio", "calendar", "iot", "music", "weather"]
COMPARED = ["id", "y_prime", "candidates", "y_hat", "error", "error_kind"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch-data")
    user = [{"id": f"u{i}", "text": f"user utterance {i}", "label": LABELS[i % 6]} for i in range(36)]
    corpus = [{"id": f"c{i}", "text": f"corpus utterance {i}", "label": LABELS[i % 6]} for i in range(48)]
    faulty = [*corpus[:20], *({"id": f"f{i}", "text": t, "label": "iot"} for i, t in enumerate(FAULTY))]
    for name, rows in (("user.jsonl", user), ("corpus.jsonl", corpus), ("faulty.jsonl", faulty)):
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


FAULTY = ["flaky line [[fail*1]]", "broken line [[fail]]", "refused line [[reject]]"]


def write_spec(path: Path, url: str, *, batch: bool = True, corpus: str = "corpus.jsonl", poll: float = 0.2) -> Path:
    path.write_text(
        f"""
name: batch-job
dataset: {{name: toy, id_column: id}}
user_split: {{path: user.jsonl, fraction: null}}
corpus: {{path: {corpus}}}
engine:
  kind: openai
  model: fault-model
  base_url: {url}
  api_key_env: {KEY_ENV}
  max_retries: 2
  structured_output: json_schema
  prices: {{prompt_per_million: 0.15, completion_per_million: 0.6}}
  batch: {str(batch).lower()}
  batch_poll_seconds: {poll}
generation: {{max_tokens: 8}}
output: {{dir: {path.with_suffix("")}, chunk_size: 16}}
"""
    )
    return path


def command(spec: Path, data: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "runner.cli", *more, str(spec), "--data-dir", str(data)]


def cm_run(spec: Path, data: Path, *more: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: "sk-test-batch"}
    return subprocess.run(command(spec, data, *more), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def start(spec: Path, data: Path) -> subprocess.Popen[bytes]:
    """``cm_run`` in the background, to be killed or stopped mid-job."""
    env = {**os.environ, KEY_ENV: "sk-test-batch"}
    return subprocess.Popen(
        command(spec, data, "--quiet"), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def batch_server(*options: str):
    return serving_process("--completion-seconds", "0.6", "--max-seconds", "600", *options, module="tests.batch_server")


def hook(url: str, point: str, seconds: float, skip: int = 0) -> None:
    body = orjson.dumps({"point": point, "seconds": seconds, "skip": skip})
    request = Request(url.removesuffix("/v1") + "/hooks", data=body, method="POST")
    with urlopen(request, timeout=10):
        pass


def rows(spec: Path) -> pl.DataFrame:
    return pl.read_parquet(spec.with_suffix("") / "annotations.parquet").select(COMPARED).sort("id")


def engine_stats(spec: Path) -> dict:
    return orjson.loads((spec.with_suffix("") / "metrics.json").read_bytes())["run"]["engine"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Iterator[tuple[Path, dict, subprocess.CompletedProcess[str]]]:
    """An uninterrupted batch run: its spec, the server's counters, the process."""
    with batch_server() as url:
        spec = write_spec(tmp_path_factory.mktemp("reference") / "job.yaml", url)
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        yield spec, served(url), done


@pytest.fixture(scope="module")
def online(tmp_path_factory, data) -> Iterator[tuple[Path, dict]]:
    with serving_process("--max-seconds", "600") as url:
        spec = write_spec(tmp_path_factory.mktemp("online") / "job.yaml", url, batch=False)
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        yield spec, served(url)


def test_a_batch_run_labels_every_row_as_the_online_engine_does_at_half_the_price(reference, online):
    spec, counts, done = reference
    online_spec, online_counts = online
    assert rows(spec).equals(rows(online_spec))
    corpus = rows(spec)
    assert corpus.height == 48 and corpus["error"].null_count() == 48
    for row in pl.read_parquet(spec.with_suffix("") / "annotations.parquet").iter_rows(named=True):
        assert row["y_prime"] == expected_answer(row["text"], LABELS)
    # the same calls: the estimate's 36; a question per user sample whose row of M, without that sample, still
    # holds several truths (what paper CM would ask among; the confidence is calibrated on the answers); 48 first
    # calls; a second call per row whose candidate set has several labels
    second = int((corpus["candidates"].list.len() > 1).sum())
    needed = 36 + held_out_questions(spec.with_suffix("")) + 48 + second
    assert counts["lines_submitted"] == online_counts["answered"] == needed
    assert counts["batches_created"] == 3 and counts["custom_ids_submitted_more_than_once"] == 0
    batch, direct = engine_stats(spec), engine_stats(online_spec)
    assert (batch["prompt_tokens"], batch["completion_tokens"]) == (
        direct["prompt_tokens"],
        direct["completion_tokens"],
    )
    assert batch["estimated_cost_usd"] == pytest.approx(direct["estimated_cost_usd"] / 2, abs=2e-6)
    assert batch["online_cost_usd"] == pytest.approx(direct["estimated_cost_usd"], abs=2e-6)
    assert "at the batch price (0.5 x" in done.stdout
    assert "batches: b00002 in_progress" in done.stderr  # a progress line per poll
    print(
        f"\ncost on the test server: batch ${batch['estimated_cost_usd']:.6f}, "
        f"online ${direct['estimated_cost_usd']:.6f}"
    )


def test_a_finished_batch_job_rerun_submits_nothing(reference, data):
    spec, _, _ = reference
    url = orjson.loads((spec.with_suffix("") / "manifest.json").read_bytes())["spec"]["engine.base_url"]
    before = served(url)["lines_submitted"]
    done = cm_run(spec, data)
    assert done.returncode == 0, done.stderr[-2000:]
    assert served(url)["lines_submitted"] == before


KILL_POINTS = {
    # name: (server hook point or None, skip, counter to wait for)
    "upload of the estimate": ("upload", 0, "uploads_in_progress"),
    "right after creating the estimate batch": ("create", 0, "creates_in_progress"),
    "polling the estimate batch": (None, 0, "retrieves"),
    "download of the estimate output": ("download", 0, "downloads_in_progress"),
    "right after creating the first-call batch": ("create", 1, "creates_in_progress"),
    "download of the first-call output": ("download", 1, "downloads_in_progress"),
}


def wait_for(url: str, counter: str, at_least: int, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        counts = served(url)
        if counts.get(counter, 0) >= at_least:
            return counts
        time.sleep(0.02)
    raise AssertionError(f"{counter} never reached {at_least}: {served(url)}")


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_sigkill_then_rerun_pays_for_no_line_twice(where, reference, online, data, tmp_path):
    point, skip, counter = KILL_POINTS[where]
    reference_spec, reference_counts, _ = reference
    with batch_server() as url:
        spec = write_spec(tmp_path / "job.yaml", url)
        if point is not None:
            hook(url, point, seconds=60, skip=skip)
        process = start(spec, data)
        try:
            at_kill = wait_for(url, counter, 2 if point is None else 1)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        after = served(url)
    assert rows(spec).equals(rows(reference_spec)) and rows(spec).equals(rows(online[0]))
    assert after["lines_submitted"] == reference_counts["lines_submitted"]
    assert after["batches_created"] == reference_counts["batches_created"]
    assert after["custom_ids_submitted_more_than_once"] == 0 and after["custom_ids_answered_more_than_once"] == 0
    if point == "create":  # killed before it heard the batch's id: the rerun found it by its input file
        assert f"adopted batch_000{skip + 1}" in done.stderr
    print(
        f"\nKILL | {where} | batches {at_kill.get('batches_created', 0)} at kill, {after['batches_created']} in all "
        f"| lines {at_kill.get('lines_submitted', 0)} at kill, {after['lines_submitted']} in all "
        f"(needed {reference_counts['lines_submitted']}) | rows equal"
    )


def test_failed_lines_go_into_new_batches_until_max_retries(data, tmp_path):
    with batch_server() as url:
        spec = write_spec(tmp_path / "job.yaml", url, corpus="faulty.jsonl")
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        counts = served(url)
    table = pl.read_parquet(spec.with_suffix("") / "annotations.parquet")
    by_text = {row["text"]: row for row in table.iter_rows(named=True)}
    assert by_text[FAULTY[0]]["y_prime"] == expected_answer(FAULTY[0], LABELS)  # failed once, answered the next time
    assert by_text[FAULTY[1]]["error_kind"] == "engine"
    assert by_text[FAULTY[1]]["error"].startswith("gave up after 3 attempt(s): http_500")  # max_retries 2
    assert by_text[FAULTY[2]]["error_kind"] == "rejected" and "http_400" in by_text[FAULTY[2]]["error"]
    stats = engine_stats(spec)
    assert stats["row_errors"] == {"http_400": 1, "http_500": 1}
    assert stats["attempt_errors"] == {"http_500": 4}  # the flaky line once, the broken one three times
    # every line once (the held-out questions among them), plus the flaky line again and the broken one twice more
    second = int((table["candidates"].list.len() > 1).sum())
    assert (
        counts["lines_submitted"]
        == stats["lines_submitted"]
        == 36 + held_out_questions(spec.with_suffix("")) + 23 + second + 1 + 2
    )


def test_an_expired_batch_keeps_its_answered_lines_and_resubmits_only_the_rest(reference, data, tmp_path):
    reference_spec, reference_counts, _ = reference
    with batch_server("--expire-first", "1") as url:
        spec = write_spec(tmp_path / "job.yaml", url)
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        counts = served(url)
    assert rows(spec).equals(rows(reference_spec))
    assert counts["batch_statuses"]["batch_0001"] == "expired"
    # the estimate's 36 lines: every other one answered before the batch expired, the other 18 sent again
    assert counts["lines_submitted"] == reference_counts["lines_submitted"] + 18
    assert counts["custom_ids_answered_more_than_once"] == 0


def test_a_batch_failing_validation_stops_the_job_with_the_servers_reason(data, tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("user.jsonl", "corpus.jsonl"):
        (tmp_path / "data" / name).write_text((data / name).read_text())
    with (tmp_path / "data" / "corpus.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "bad", "text": "odd [[invalid]]", "label": "iot"}) + "\n")
    with batch_server() as url:
        done = cm_run(write_spec(tmp_path / "job.yaml", url), tmp_path / "data")
    assert done.returncode == 3
    assert "failed validation: line" in done.stderr and "invalid_request: the body is not valid" in done.stderr


def test_cancel_stops_the_running_batches_and_a_rerun_finishes_the_job(reference, data, tmp_path):
    reference_spec, _, _ = reference
    with batch_server() as url:
        hook(url, "completion", 120)
        spec = write_spec(tmp_path / "job.yaml", url)
        process = start(spec, data)
        try:
            wait_for(url, "retrieves", 1)
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 143
        cancelled = subprocess.run(
            [sys.executable, "-m", "runner.cli", "cancel", str(spec)],
            cwd=REPO,
            env={**os.environ, KEY_ENV: "sk-test-batch"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cancelled.returncode == 0, cancelled.stderr
        assert "batch b00001 (batch_0001): cancelling" in cancelled.stdout
        hook(url, "completion", 0.6)
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        counts = served(url)
    assert counts["batch_statuses"]["batch_0001"] == "cancelled" and counts["cancels"] == 1
    assert rows(spec).equals(rows(reference_spec))


def test_dry_run_shows_the_batch_price_next_to_the_online_one(data, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", "http://127.0.0.1:9/v1")
    done = cm_run(spec, data, "--dry-run")
    assert done.returncode == 0, done.stderr
    online = float(done.stdout.split("at most about $")[1].split()[0])
    batch = float(done.stdout.split("Batch API (engine.batch is on): at most about $")[1].split()[0])
    assert batch == pytest.approx(online / 2, abs=0.01)


def test_a_server_refusing_every_line_alike_stops_the_job_and_records_no_line_as_rejected(data, tmp_path):
    with batch_server("--reject-field", "response_format") as url:
        spec = write_spec(tmp_path / "job.yaml", url)
        done = cm_run(spec, data)
        counts = served(url)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "refused every request alike" in done.stderr
    assert "Unrecognized request argument supplied: response_format" in done.stderr  # the server's own message
    assert "engine.structured_output" in done.stderr
    assert counts["batches_created"] == 1  # the estimate's batch: refused on every line, the job went no further
    answers = spec.with_suffix("") / "batch" / "answers.jsonl"
    recorded = [orjson.loads(line) for line in answers.read_bytes().splitlines()] if answers.exists() else []
    assert recorded == []  # a rerun against a server that takes the setting asks every line again
