"""``cm-run``: run a job spec, prepare embedded models, export schemas, inspect banks.

    cm-run jobs/massive.yaml [--data-dir DIR] [--restart] [--quiet]
    cm-run eval jobs/eval/smoke.yml [--data-dir DIR] [--restart] [--quiet]
    cm-run prepare-model smollm2-135m-instruct
    cm-run schemas [--check]
    cm-run bank show out/massive/memory_bank.json

Exit codes: 0 done, 2 bad spec/data/bank/output dir, 3 engine failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from runner.bank import BankError, load_bank
from runner.checkpoint import CheckpointError
from runner.data import DataError
from runner.engines.base import EngineError
from runner.spec import JobSpec, SpecError, load_spec

EXIT_INPUT = 2
EXIT_ENGINE = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
T = TypeVar("T")


class _Terminated(Exception):
    """SIGTERM arrived (a scheduler or `kill` stopping the job)."""


async def _stoppable(job: Coroutine[Any, Any, T]) -> T:
    """Run ``job`` so SIGTERM stops it like Ctrl-C: cancelled, engine shut down, finished shards kept."""
    task = asyncio.ensure_future(job)
    terminated = False

    def stop() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await task
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _run(args: argparse.Namespace) -> int:
    from runner.pipeline import run_job
    from runner.report import summary_lines

    spec = load_spec(args.spec)
    if args.dry_run:
        return _dry_run(spec, args)
    show = not args.quiet and sys.stderr.isatty()
    print(
        f"cm-run: {spec.name}: model {spec.engine.model}, strategy {spec.strategy.name}, output {spec.output.dir}",
        file=sys.stderr,
    )
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        rate = TextColumn("{task.fields[rate]}")
        bars = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), rate, TimeRemainingColumn())
        tasks: dict[str, int] = {}
        started: dict[str, tuple[float, int]] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total, rate="")
                started[phase] = (time.monotonic(), done)  # resumed chunks done at once don't count
            since, done_before = started[phase]
            per_second = (done - done_before) / max(time.monotonic() - since, 1e-9)
            bars.update(tasks[phase], completed=done, rate=f"{per_second:,.1f} rows/s" if done > done_before else "")

        with bars:
            result = asyncio.run(
                _stoppable(run_job(spec, data_dir=args.data_dir, restart=args.restart, progress=progress))
            )
    else:

        def log(phase: str, done: int, total: int) -> None:
            if not args.quiet:
                print(f"cm-run: {phase} {done}/{total}", file=sys.stderr)

        result = asyncio.run(_stoppable(run_job(spec, data_dir=args.data_dir, restart=args.restart, progress=log)))
    for line in summary_lines(result.metrics):
        print(line)
    print(f"outputs in {result.output_dir}/ (memory_bank.json, annotations.parquet, metrics.json)")
    return 0


def _dry_run(spec: JobSpec, args: argparse.Namespace) -> int:
    """Check the spec and data, show one prompt and what the job would ask for; call nothing."""
    from runner.engines._usage import TokenEstimator
    from runner.pipeline import load_inputs
    from runner.strategies import ZeroShot

    inputs = load_inputs(spec, args.data_dir)
    labels = inputs.labels
    strategy = ZeroShot(labels, spec.generation, spec.strategy.instruction)
    max_chars = spec.dataset.max_text_chars
    first_text = next(inputs.corpus.chunks(1))[1]["text"][0][:max_chars]
    request = strategy.request(first_text, labels.labels)
    print(f"cm-run: dry run of {spec.name}: spec and data are valid; nothing is called, nothing is written")
    print(f"\none rendered prompt ({spec.strategy.name} uses this template; {len(request.choices)} allowed answers):")
    for message in request.messages:
        print(f"--- {message.role}\n{message.content}")

    estimator = TokenEstimator()
    overhead = estimator.raw(strategy.request("", labels.labels).messages)  # everything but the text
    corpus_chars = sum(
        rows["text"].str.slice(0, max_chars).str.len_chars().sum() if max_chars else rows["text"].str.len_chars().sum()
        for _, rows in inputs.corpus.chunks(spec.output.chunk_size)
    )
    user_chars = inputs.user.rows["text"].str.len_chars().sum()
    n_user = inputs.user.rows.height if spec.cm.enabled and spec.cm.bank is None else 0
    n_corpus = inputs.corpus.height
    n_second = n_corpus if spec.cm.enabled else 0
    calls = n_user + n_corpus + n_second
    text_tokens = (user_chars if n_user else 0) / 4 + corpus_chars / 4 * (2 if n_second else 1)
    prompt_tokens = round(text_tokens + calls * overhead)
    completion_tokens = calls * spec.generation.max_tokens
    print(f"\nrequests (zero_shot): estimate {n_user:,} + annotate {n_corpus:,} first + up to {n_second:,} second")
    print(f"  at most {calls:,} requests, about {prompt_tokens:,} prompt tokens (chars/4, an upper bound: second")
    print(f"  calls list fewer labels), at most {completion_tokens:,} completion tokens")
    if spec.engine.kind == "openai":
        from runner.engines.openai import OpenAIEngine

        engine = OpenAIEngine(spec.engine)
        key = f"${spec.engine.api_key_env} {'is set' if os.environ.get(spec.engine.api_key_env) else 'is NOT set'}"
        print(f"  engine: {engine.base_url}, answers constrained by {engine.constraint}, {key}")
    prices = getattr(spec.engine, "prices", None)
    if prices is not None:
        cost = (prompt_tokens * prices.prompt_per_million + completion_tokens * prices.completion_per_million) / 1e6
        print(f"  at most about ${cost:,.2f} at the configured prices")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from runner.eval_report import write_report
    from runner.evaluate import FinishedCellsOnly, load_grid, run_grid

    grid = load_grid(args.grid)
    print(f"cm-run eval: {grid.name}: output {grid.output_dir}", file=sys.stderr)

    def log(line: str) -> None:
        if not args.quiet:
            print(f"cm-run eval: {line}", file=sys.stderr)

    factory = FinishedCellsOnly if args.report_only else None
    results = asyncio.run(
        _stoppable(run_grid(grid, data_dir=args.data_dir, restart=args.restart, engine_factory=factory, progress=log))
    )
    report = write_report(results, Path(grid.output_dir), f"Evaluation grid {grid.name}")
    print(report.markdown.read_text(encoding="utf-8").split("## Cost per cell")[0].rstrip())
    print(
        f"\nreport: {report.page} (tables also in {report.markdown.name}, {report.summary_csv.name}, "
        f"{report.cells_csv.name}; {len(report.figures)} figures in {report.page.parent / 'figures'})"
    )
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from runner.engines.embedded import prepare_embedded_model

    print(prepare_embedded_model(args.name))
    return 0


def _schemas(args: argparse.Namespace) -> int:
    from runner.schemas import check_schemas, write_schemas

    if args.check:
        stale = check_schemas(Path(args.dir))
        for name in stale:
            print(f"{args.dir}/{name} is out of date: run 'cm-run schemas'", file=sys.stderr)
        return 1 if stale else 0
    for path in write_schemas(Path(args.dir)):
        print(path)
    return 0


def _bank_update(args: argparse.Namespace) -> int:
    import polars as pl

    from runner.bank import Sample, save_bank, update_bank
    from runner.data import scan_table

    bank = load_bank(args.path)
    path = Path(args.corrections)
    table = scan_table(path).collect()
    for column in (args.answer_column, args.truth_column):
        if column not in table.columns:
            raise DataError(f"{path}: no column '{column}'; columns are {table.columns}")
    table = table.filter(pl.col(args.truth_column).is_not_null())
    ids = table["id"].cast(pl.String).to_list() if "id" in table.columns else [str(i) for i in range(table.height)]
    texts = table["text"].to_list() if "text" in table.columns else [""] * table.height
    corrections = [
        Sample(id=f"correction:{i}", text=text, answer=answer, truth=truth)
        for i, text, answer, truth in zip(
            ids, texts, table[args.answer_column].to_list(), table[args.truth_column].to_list(), strict=True
        )
    ]
    updated = update_bank(bank, corrections)
    save_bank(updated, args.output or args.path)
    print(f"{args.output or args.path}: {len(corrections)} corrections added, now {updated.n_samples} samples")
    return 0


def _bank_merge(args: argparse.Namespace) -> int:
    from runner.bank import merge_banks, save_bank

    merged = merge_banks([load_bank(path) for path in args.paths])
    save_bank(merged, args.output)
    print(f"{args.output}: {len(args.paths)} banks, {merged.n_samples} samples")
    return 0


def _bank_show(args: argparse.Namespace) -> int:
    bank = load_bank(args.path)
    print(
        f"{args.path}: {bank.dataset}, model {bank.model}, strategy {bank.strategy}, "
        f"{bank.n_samples} user samples, {len(bank.labels)} labels"
    )
    rows = bank.rows()
    counts = bank.counts
    for answer in bank.labels:
        row = rows[answer]
        if not row:
            continue
        ranked = sorted(row, key=lambda truth: -counts[(answer, truth)])
        shown = ", ".join(f"{truth} ({counts[(answer, truth)]})" for truth in ranked[: args.top])
        more = f", +{len(row) - args.top} more" if len(row) > args.top else ""
        print(f"  answer {answer!r} -> truth {shown}{more}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cm-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job spec: estimate, annotate, evaluate (the default)")
    run.add_argument("spec", help="the job spec YAML file")
    run.add_argument("--data-dir", help="where dataset paths resolve (default: $CM_DATA_DIR)")
    run.add_argument(
        "--restart",
        action="store_true",
        help="discard what an earlier run left in the output directory",
    )
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check the spec and data, print one prompt and the request/token estimate; call nothing",
    )
    run.set_defaults(func=_run)

    evaluate = sub.add_parser("eval", help="run an evaluation grid: strategies x {Z, CM+Z} x budgets x seeds")
    evaluate.add_argument("grid", help="the grid spec YAML file (schemas/eval-grid.schema.json)")
    evaluate.add_argument("--data-dir", help="where dataset paths resolve (default: $CM_DATA_DIR)")
    evaluate.add_argument("--restart", action="store_true", help="redo cells an earlier run finished")
    evaluate.add_argument("--quiet", action="store_true", help="print only the tables")
    evaluate.add_argument(
        "--report-only", action="store_true", help="rebuild tables and figures from finished cells; start no engine"
    )
    evaluate.set_defaults(func=_eval)

    prepare = sub.add_parser("prepare-model", help="convert an embedded model once into the cache")
    prepare.add_argument("name", help="e.g. smollm2-135m-instruct, gemma-3-270m or qwen2.5-coder-0.5b-instruct")
    prepare.set_defaults(func=_prepare_model)

    schemas = sub.add_parser("schemas", help="write (or --check) the JSON Schemas in schemas/")
    schemas.add_argument("--dir", default="schemas")
    schemas.add_argument("--check", action="store_true")
    schemas.set_defaults(func=_schemas)

    bank = sub.add_parser("bank", help="inspect a memory bank file")
    bank_sub = bank.add_subparsers(dest="bank_command", required=True)
    show = bank_sub.add_parser("show", help="top confusions per answer label")
    show.add_argument("path")
    show.add_argument("--top", type=int, default=5)
    show.set_defaults(func=_bank_show)
    update = bank_sub.add_parser(
        "update", help="add user-corrected examples (model answer + corrected label) without re-estimating"
    )
    update.add_argument("path", help="the bank to update")
    update.add_argument("corrections", help="a table (jsonl, csv, parquet) e.g. annotations.parquet with a fixed label")
    update.add_argument("--answer-column", default="y_prime", help="the model's answer (default: y_prime)")
    update.add_argument("--truth-column", default="corrected", help="the user's label (default: corrected)")
    update.add_argument("-o", "--output", help="write here instead of replacing the bank")
    update.set_defaults(func=_bank_update)
    merge = bank_sub.add_parser("merge", help="sum the counts of banks made for the same label set")
    merge.add_argument("paths", nargs="+")
    merge.add_argument("-o", "--output", required=True)
    merge.set_defaults(func=_bank_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "eval", "prepare-model", "schemas", "bank", "-h", "--help"}
    if argv and argv[0] not in commands:
        argv.insert(0, "run")  # `cm-run jobs/x.yaml` is `cm-run run jobs/x.yaml`
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="cm-run: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (SpecError, DataError, BankError, CheckpointError) as error:
        print(f"cm-run: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except EngineError as error:
        print(f"cm-run: engine error: {error}", file=sys.stderr)
        return EXIT_ENGINE
    except (KeyboardInterrupt, _Terminated) as stop:
        print(
            "cm-run: stopped; every finished chunk is saved. Rerun the same command to resume "
            "(add --restart to start over).",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if isinstance(stop, _Terminated) else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
