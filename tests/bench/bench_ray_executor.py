"""The driver out of the data path: cm-run's two executors side by side against an instant local server.

Not a test (pytest does not collect tests/bench). Builds a corpus of N MASSIVE-derived rows
(en-US texts, repeated with distinct ids) as parquet, starts ``tests/fault_server.py`` answering
at once (``--latency 0``), and runs one cm-run job per configuration and executor, each in its own
process, reading from metrics.json: rows/s while annotating, the driver's CPU per row (the
cm-run process's CPU while annotating, threads included) and, on Ray, the workers' CPU per row
by stage.

    python tests/bench/bench_ray_executor.py                       # 40,000 rows, three configurations
    python tests/bench/bench_ray_executor.py --rows 4000 --configs off   # a quick look
    python tests/bench/bench_ray_executor.py --configs off,recommended --executors local  # one machine only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import polars as pl

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from runner import load_spec  # noqa: E402
from runner.engines._wire import request_body  # noqa: E402
from runner.engines.base import ChoiceRequest, Completion  # noqa: E402
from runner.pipeline import _prompt_texts, load_inputs  # noqa: E402
from runner.strategies import make_strategy  # noqa: E402
from tests.fault_server import serving_process  # noqa: E402

CONFIGS = {
    "off": "{enabled: false}",
    "paper": "{variant: paper}",
    # the recommended configuration with the model asked: embeddings and the probe on every row
    "recommended": "{variant: neighbour_prior, prior: probe, first_call: always, second_call: never}",
}
KEY_ENV = "CM_BENCH_KEY"


def build_corpus(data_dir: Path, root: Path, rows: int) -> Path:
    source = pl.read_ndjson(data_dir / "massive/en-US/test.jsonl").select("text", "label")
    repeats = -(-rows // source.height)
    corpus = pl.concat([source] * repeats).head(rows).with_row_index("n")
    corpus = corpus.select(pl.format("r{}", pl.col("n")).alias("id"), "text", "label")
    path = root / "corpus.parquet"
    corpus.write_parquet(path, row_group_size=16_384)
    return path


def write_spec(root: Path, name: str, data_dir: Path, corpus: Path, url: str, cm: str, executor: str) -> Path:
    spec = root / f"{name}.yaml"
    spec.write_text(
        f"""
base: {REPO / "jobs/_base/massive-en-US.yaml"}
name: {name}
data_dir: {data_dir}
corpus: {{path: {corpus}}}
engine: {{kind: openai, model: fault-model, base_url: {url}, api_key_env: {KEY_ENV}, max_concurrency: 256,
          structured_output: vllm_choice, timeout_seconds: 120}}
cm: {cm}
output: {{dir: {root / name}, chunk_size: 2048, chunks_in_flight: 3}}
executor: {executor}
"""
    )
    return spec


def run(spec: Path) -> dict:
    env = {**os.environ, KEY_ENV: "x", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", str(spec), "--quiet"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{spec.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    metrics = orjson.loads((spec.parent / spec.stem / "metrics.json").read_bytes())
    return {**metrics["run"], "wall_seconds": time.perf_counter() - started}


class _Recorder:
    """An engine that keeps the requests a strategy makes (and answers none), to replay them bare."""

    def __init__(self) -> None:
        self.requests: list[ChoiceRequest] = []

    async def complete(self, requests: list[ChoiceRequest]) -> list[Completion]:
        self.requests.extend(requests)
        return [Completion(text=None, error="recorded") for _ in requests]


def cm_off_requests(spec_path: Path, rows: int) -> list[bytes]:
    """The request bodies a CM-off job sends for its corpus: the job's own strategy renders them."""
    spec = load_spec(spec_path)
    inputs = load_inputs(spec)
    strategy = make_strategy(spec.strategy, inputs.labels, spec.generation)
    recorder = _Recorder()
    texts = _prompt_texts(next(iter(inputs.corpus.chunks(rows)))[1], spec.dataset.max_text_chars)
    asyncio.run(strategy.classify(recorder, texts, [inputs.labels.labels] * len(texts)))
    return [orjson.dumps(request_body("fault-model", request, "vllm_choice")) for request in recorder.requests]


async def _bare(url: str, bodies: list[bytes], concurrency: int) -> float:
    """rows/s of a bare aiohttp + orjson client sending ``bodies`` at ``concurrency``: the transport's limit."""
    queue = iter(bodies)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            for body in queue:
                async with session.post(f"{url}/chat/completions", data=body, headers=headers) as response:
                    orjson.loads(await response.read())["choices"][0]["message"]["content"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executors", default="local,ray", help="comma list of ['local', 'ray']")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("CM_DATA_DIR", REPO.parent / "shared/datasets"))
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-executor-"))
    corpus = build_corpus(args.data_dir, root, args.rows)
    executors = {"local": "{kind: local}", "ray": f"{{kind: ray, workers: {args.workers}}}"}
    print(f"{args.rows} rows, fault server --latency 0, {os.cpu_count()} cores")
    print("| configuration | executor | rows/s annotating | driver CPU ms/row | workers' CPU ms/row by stage |")
    print("|---|---|---|---|---|")
    with serving_process("--latency", "0", "--max-seconds", "3600") as url:
        bare_spec = write_spec(root, "bare", args.data_dir, corpus, url, CONFIGS["off"], executors["local"])
        bare = asyncio.run(_bare(url, cm_off_requests(bare_spec, args.rows), concurrency=256))
        print(f"| bare aiohttp + orjson client, the same CM-off requests | - | {bare:.0f} | - | - |", flush=True)
        for config in args.configs.split(","):
            for executor in args.executors.split(","):
                setting = executors[executor]
                name = f"{config}-{executor}"
                result = run(write_spec(root, name, args.data_dir, corpus, url, CONFIGS[config], setting))
                stages = result.get("executor", {}).get("worker_cpu_ms_per_row", {})
                stage_text = ", ".join(f"{stage} {value:.3f}" for stage, value in stages.items()) or "-"
                pipeline = result.get("executor", {}).get("driver_cpu_ms_per_row")  # Ray: the pipeline's part
                driver = f"{result['driver_cpu_ms_per_row']:.4f}" + (f" (pipeline {pipeline:.4f})" if pipeline else "")
                print(
                    f"| {config} | {executor} | {result['items_per_second']:.0f} "
                    f"({result['items_per_second'] / bare:.2f} x bare) | "
                    f"{driver} | {stage_text} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
