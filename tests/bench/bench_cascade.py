"""The cascade against its stages alone (issue 25): the probe alone, the LLM alone, and probe -> LLM -> review.

Per dataset and seed, real jobs on the same test items (``corpus.limit``, 5% user split), one
engine behind a request cache (the LLM's answers on the user split are the same requests in the
LLM-alone job and the cascade's LLM stage: asked once), each at two acceptance targets:

- probe alone: ``neighbour_prior`` with the probe, ``first_call: never`` (no LLM call at all);
- LLM alone: the probe prior with the LLM's first answer weighed in and second calls where ambiguous
  (the best zero-shot configuration of the section "A model that reads");
- cascade: the probe stage, then the LLM stage; what neither accepts goes to review.

Each row: accepted share and accuracy of the accepted rows on gold, LLM calls per corpus row, calls
per accepted row, the job's wall time, and its engine seconds (estimate and annotation phases, the cost
of a local engine; a later job's requests the cache already holds cost nothing) per accepted row. The
cascade's row also gives, on the rows the probe stage left to the LLM, the accuracy of the LLM's first
answer and of the stage's answer, against the probe-alone job's on the same rows (why the LLM stage
accepts what it does). Rows are appended to OUT/results.jsonl as they finish.

    python tests/bench/bench_cascade.py --data-dir ../shared/datasets --model qwen2.5-coder-0.5b-instruct \
        --datasets massive-en-US --n 300 --out /tmp/cascade-bench
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import orjson
import polars as pl

from runner import load_spec, run_job
from runner.engines import make_engine
from runner.engines._cache import CachingEngine

REPO = Path(__file__).resolve().parents[2]
PROBE = "variant: neighbour_prior, prior: probe"
ACCEPT = "accept: {target_accuracy: TARGET}"
LLM = f"cm: {{{PROBE}, first_call: always, second_call: when_ambiguous, {ACCEPT}}}"
SETTINGS = {
    "probe alone": f"cm: {{{PROBE}, first_call: never, second_call: never, {ACCEPT}}}",
    "LLM alone": LLM,
    "cascade probe -> LLM": LLM
    + "\ncascade:\n  - {name: probe, cm: {first_call: never, second_call: never}}\n  - {name: llm}",
}


def escalated(job_dir: Path, probe_dir: Path) -> dict:
    """On the rows the cascade's probe stage left to the LLM: the LLM's accuracy, and the probe alone's."""
    rows = pl.read_parquet(job_dir / "annotations.parquet").filter(pl.col("stage") != "probe")
    probe = pl.read_parquet(probe_dir / "annotations.parquet").select("id", pl.col("y_hat").alias("y_probe"))
    rows = rows.join(probe, on="id", how="left")
    n = rows.height
    return {
        "escalated_share": n / pl.read_parquet(job_dir / "annotations.parquet").height,
        "llm_first_answer_accuracy_escalated": (rows["y_prime"] == rows["gold"]).mean() if n else None,
        "llm_accuracy_escalated": (rows["y_hat"] == rows["gold"]).mean() if n else None,
        "probe_accuracy_escalated": (rows["y_probe"] == rows["gold"]).mean() if n else None,
    }


def measure(job_dir: Path) -> dict:
    metrics = orjson.loads((job_dir / "metrics.json").read_bytes())
    trust = metrics["trust"]
    calls = metrics["calls_per_item"] * metrics["n_annotated"]
    accepted = trust["n_accepted"]
    run = metrics["run"]
    engine_seconds = run["estimate_seconds"] + run["annotate_seconds"]
    row = {
        "accepted_share": trust["accepted_share"],
        "accuracy_accepted": trust["accuracy_accepted"],
        "threshold": trust["threshold"],
        "user_split_lower_bound": trust.get("user_split_accepted_lower_bound"),
        "calls_per_row": metrics["calls_per_item"],
        "calls_per_accepted_row": calls / accepted if accepted else None,
        "accuracy_all": metrics["accuracy_cm"],
        "engine_seconds": round(engine_seconds, 1),
        "engine_seconds_per_accepted_row": engine_seconds / accepted if accepted else None,
    }
    if "stages" in metrics:
        row["stages"] = {s["stage"]: round(s["accepted_share"], 4) for s in metrics["stages"]}
    return row


async def run_dataset(name: str, seed: int, args: argparse.Namespace) -> None:
    out = Path(args.out) / f"{name}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    engine: CachingEngine | None = None
    for target in args.targets:
        for setting, cm in SETTINGS.items():
            slug = setting.replace(" -> ", "-").replace(" ", "-").lower()
            job_dir = out / f"{slug}-{target}"
            spec_path = out / f"{job_dir.name}.yaml"
            spec_path.write_text(
                f"""base: {REPO / "jobs/_base" / f"{name}.yaml"}
name: cascade-{name}
user_split: {{fraction: {args.fraction}, seed: {seed}}}
corpus: {{limit: {args.n}, limit_seed: {seed}}}
strategy: {{name: zero_shot}}
output: {{dir: {job_dir}}}
{cm.replace("TARGET", str(target))}
{f"engine: {{model: {args.model}}}" if args.model else ""}
"""
            )
            spec = load_spec(spec_path)
            if engine is None:
                engine = CachingEngine(make_engine(spec.engine))
            started = time.perf_counter()
            await run_job(spec, data_dir=args.data_dir, engine=engine)
            row = {"dataset": name, "seed": seed, "model": spec.engine.model, "setting": setting, "target": target}
            row |= measure(job_dir)
            if "stages" in row:
                row |= escalated(job_dir, out / f"probe-alone-{target}")
            row |= {"wall_seconds": round(time.perf_counter() - started, 1), "n": args.n}
            with (Path(args.out) / "results.jsonl").open("a") as results:
                results.write(orjson.dumps(row).decode() + "\n")
            print(row, flush=True)
    if engine is not None:
        async with engine:
            pass  # closes the engine the jobs started


async def main(args: argparse.Namespace) -> None:
    for name in args.datasets:
        for seed in args.seeds:
            await run_dataset(name, seed, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--datasets", nargs="+", default=["massive-en-US", "banking77", "clinc150"])
    parser.add_argument("--model", help="an embedded model name (default: the spec's, SmolLM2-135M)")
    parser.add_argument("--n", type=int, default=1000, help="test items per dataset")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.90, 0.95])
    parser.add_argument("--out", default="/tmp/cascade-bench")
    asyncio.run(main(parser.parse_args()))
