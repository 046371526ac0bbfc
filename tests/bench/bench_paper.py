"""The paper's CM as its authors ran it (free-text first answers, temperature 0.7) against constrained decoding.

Per dataset, four real jobs on the same test items, one engine behind a request cache (so the
free-text first answers the plain and the CM job share are asked once, likewise the constrained ones):

- plain constrained: zero-shot, the answer constrained to the labels, no CM;
- plain free text: zero-shot, unconstrained, matched to a label (``strategy.first_answer: free_text``);
- paper-CM free text: the authors' setting, a bank estimated from free-text answers on the 5% split;
- paper-CM constrained: ``cm.variant: paper`` as cm-runner runs it by default.

With ``--authors DIR`` (the authors' ``meta_memorisation_estimated`` folder) a fifth job applies their
Llama-3-8B bank for the dataset (imported with ``runner.bank.import_answer_table``) to the
free-text first answers. Each row reports accuracy, the share of first answers matching no label,
corpus calls per item and the job's wall time; rows are appended to OUT/results.jsonl as they finish.

    python tests/bench/bench_paper.py --data-dir ../shared/datasets --out /tmp/paper-bench \\
        --authors /tmp/authors-banks --datasets massive-en-US banking77
    python tests/bench/bench_paper.py --model qwen2.5-coder-0.5b-instruct --out /tmp/paper-bench-qwen ...
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path

import orjson
import polars as pl

from runner import load_spec, run_job
from runner.bank import import_answer_table, save_bank
from runner.engines import make_engine
from runner.engines._cache import CachingEngine
from runner.pipeline import load_inputs

REPO = Path(__file__).resolve().parents[2]
DATASETS = ["massive-en-US", "banking77", "mtop", "clinc150", "stackexchange"]
AUTHORS_NAME = {  # the authors' dataset names in their bank files
    "massive-en-US": "massive_scenario",
    "banking77": "banking77",
    "mtop": "mtop_intent",
    "clinc150": "clinc",
    "stackexchange": "stackexchange",
}
SETTINGS = {
    "plain constrained": ("constrained", "cm: {enabled: false, accept: null}"),
    "plain free text": ("free_text", "cm: {enabled: false, accept: null}"),
    "paper-CM free text": ("free_text", "cm: {variant: paper, accept: null}"),
    "paper-CM constrained": ("constrained", "cm: {variant: paper, accept: null}"),
}


def measure(job_dir: Path, labels: set[str]) -> dict:
    metrics = orjson.loads((job_dir / "metrics.json").read_bytes())
    table = pl.read_parquet(job_dir / "annotations.parquet", columns=["y_prime", "y_hat", "gold"])
    answered = table.filter(pl.col("y_prime").is_not_null())
    unmatched = answered.filter(~pl.col("y_prime").is_in(list(labels))).height
    return {
        "n": table.height,
        "accuracy": metrics["accuracy_cm"],
        "accuracy_first": metrics["accuracy_baseline"],
        "unmatched_share": unmatched / table.height,
        "calls_per_item": metrics["calls_per_item"],
    }


async def run_dataset(name: str, args: argparse.Namespace) -> list[dict]:
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(SETTINGS)
    bank_file = Path(args.authors or ".") / f"Memory_Masking_{AUTHORS_NAME[name]}_{args.fraction}_0.7_1.json"
    if args.authors and bank_file.is_file():
        settings["authors' Llama-3-8B bank, free text"] = ("free_text", f"cm: {{bank: {out / 'authors.json'}}}")
    engine: CachingEngine | None = None
    rows = []
    for setting, (first_answer, cm) in settings.items():
        job_dir = out / re.sub(r"[^a-z0-9]+", "-", setting.lower()).strip("-")  # a plain path in YAML
        spec_path = out / f"{job_dir.name}.yaml"
        spec_path.write_text(
            f"""base: {REPO / "jobs/_base" / f"{name}.yaml"}
name: paper-{name}
user_split: {{fraction: {args.fraction}, seed: {args.seed}}}
corpus: {{limit: {args.n}, limit_seed: {args.seed}}}
strategy: {{name: zero_shot, first_answer: {first_answer}}}
generation: {{temperature: {args.temperature}, max_tokens: {args.max_tokens}, seed: {args.seed}}}
output: {{dir: {job_dir}}}
{cm}
{f"engine: {{model: {args.model}}}" if args.model else ""}
"""
        )
        spec = load_spec(spec_path)
        labels = load_inputs(spec, args.data_dir).labels
        if "bank:" in cm:
            save_bank(
                import_answer_table(bank_file, labels, strip_suffix=".txt", model="Llama-3-8B"), out / "authors.json"
            )
        if engine is None:
            engine = CachingEngine(make_engine(spec.engine))
        started = time.perf_counter()
        await run_job(spec, data_dir=args.data_dir, engine=engine)
        row = {"dataset": name, "model": spec.engine.model, "setting": setting}
        row |= measure(job_dir, set(labels.labels)) | {"wall_seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        with (Path(args.out) / "results.jsonl").open("a") as results:
            results.write(orjson.dumps(row).decode() + "\n")
        print(row, flush=True)
    if engine is not None:
        async with engine:
            pass  # closes the engine the jobs started
    return rows


async def main(args: argparse.Namespace) -> None:
    for name in args.datasets:
        await run_dataset(name, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--model", help="an embedded model name (default: the spec's, SmolLM2-135M)")
    parser.add_argument("--n", type=int, default=300, help="test items per dataset")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.7, help="every call's (the authors' 0.7 run)")
    parser.add_argument("--max-tokens", type=int, default=30, help="the authors' estimate: max_new_tokens=30")
    parser.add_argument("--authors", help="folder of the authors' Memory_Masking_*.json banks (their repository)")
    parser.add_argument("--out", default="/tmp/paper-bench")
    asyncio.run(main(parser.parse_args()))
