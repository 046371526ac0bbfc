"""``cm-run``: run a job spec, prepare embedded models, export schemas, inspect banks.

    cm-run jobs/massive.yaml [--data-dir DIR] [--restart] [--quiet] [--verbose]
    cm-run eval jobs/eval/smoke.yml [--data-dir DIR] [--restart] [--quiet] [--verbose]
    cm-run prepare-model smollm2-135m-instruct
    cm-run schemas [--check]
    cm-run bank show out/massive/memory_bank.json
    cm-run review export out/massive --csv        (then: cm-run review import out/massive reviewed.csv)
    cm-run cancel jobs/openai/x-batch.yaml   (cancel the job's running Batch API batches)

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
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from runner._quiet import engine_output_to
from runner._storage import ObjectPath, StorageError, local_side, location
from runner.bank import BankError, load_bank
from runner.checkpoint import ENGINE_LOG, CheckpointError
from runner.data import DataError
from runner.engines.base import EngineDied, EngineError
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
    from runner.pipeline import JobResult, run_job
    from runner.report import summary_lines

    spec = load_spec(args.spec)
    if args.dry_run:
        return _dry_run(spec, args)
    show = not args.quiet and sys.stderr.isatty()
    print(
        f"cm-run: {spec.name}: model {spec.engine.model}, strategy {spec.strategy.name}, output {spec.output.dir}",
        file=sys.stderr,
    )

    def go(progress: Callable[[str, int, int], None] | None) -> JobResult:
        job = run_job(spec, data_dir=args.data_dir, restart=args.restart, progress=progress)
        if args.verbose:
            return asyncio.run(_stoppable(job))
        with engine_output_to(local_side(spec.output.dir) / ENGINE_LOG) as log:
            try:
                return asyncio.run(_stoppable(job))
            except EngineError as error:
                cause = log.cause() if log is not None else None
                if log is not None and cause and cause not in str(error):  # the root cause is in the log, not here
                    error.args = (f"{error}; vLLM logged {cause!r} (all of it in {log.path})",)
                raise

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
            result = go(progress)
    else:
        from runner._progress import ProgressLog, interval_from_env

        def say(line: str) -> None:
            print(f"cm-run: {line}", file=sys.stderr, flush=True)

        result = go(None if args.quiet else ProgressLog(say, interval_from_env()))
    for line in summary_lines(result.metrics):
        print(line)
    print(f"outputs in {result.output_dir}/ (annotations.parquet, review.parquet, metrics.json, memory_bank.json)")
    return 0


def _dry_run(spec: JobSpec, args: argparse.Namespace) -> int:
    """Check the spec and data, show one prompt and what the job would ask for; call nothing."""
    from runner._dry_run import Usage, answer_usage
    from runner.engines._usage import TokenEstimator
    from runner.engines.base import Message
    from runner.pipeline import load_inputs
    from runner.strategies import ZeroShot

    inputs = load_inputs(spec, args.data_dir)
    output = location(spec.output.dir)
    if isinstance(output, ObjectPath):  # nothing is written, but a bucket the job cannot reach is bad input
        try:
            output.check_bucket()
        except StorageError as error:
            raise CheckpointError(f"output.dir: {error}") from None
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
    # few-shot examples are user samples, each a user turn and an assistant turn (the label)
    example = user_chars / max(inputs.user.rows.height, 1) / 4 + estimator.raw([Message("user", "")]) * 2 + 2
    n_corpus = inputs.corpus.height
    stages = spec.stages()
    shares = _expected_shares(spec) if len(stages) > 1 else None
    if len(stages) > 1 and shares is None:
        print(f"\na cascade of {len(stages)} stages; each is priced as if every corpus row reached it (an upper")
        print("bound: a stage sees only the rows earlier ones left). The expected share each stage sees is known")
        print("once the user split has run through every stage: after a first run, --dry-run prints it")
    elif shares is not None:
        print(f"\na cascade of {len(stages)} stages; each is priced by the share of corpus rows expected to reach it,")
        print("from the user split run through every stage on the last run (the fit on file)")

    def usage_of(stage: JobSpec, reach: float) -> tuple[Usage, int, int, int, Usage]:
        asks = stage.cm.first_call != "never"
        n_user = inputs.user.rows.height if asks and stage.cm.enabled and stage.cm.bank is None else 0
        n_first = round(n_corpus * reach) if asks else 0
        n_second = round(n_corpus * reach) if stage.cm.enabled and stage.cm.second_call != "never" else 0
        per_answer = partial(answer_usage, stage.strategy, stage.generation, example=example)
        usage = Usage(0, 0, 0)
        if n_user:
            usage += per_answer(overhead + user_chars / 4 / n_user) * n_user
        if n_corpus:
            usage += per_answer(overhead + corpus_chars / 4 / n_corpus) * (n_first + n_second)
        return usage, n_user, n_first, n_second, per_answer(overhead)

    costs: list[float | None] = []
    for position, (name, stage) in enumerate(stages):
        if len(stages) > 1:
            print(f"\nstage {position + 1}, {name}: {stage.engine.kind} {stage.engine.model}, {stage.strategy.name}")
        if shares:
            share = shares[position]
            print(f"  expected: reaches {share.reached:.1%} of the corpus, accepts {share.accepted:.1%}")
        usage, *counts = usage_of(stage, shares[position].reached if shares else 1.0)
        _print_usage(stage, usage, *counts)
        costs.append(_cost(stage, usage))
    if shares:
        print(f"\nexpected to go to review: {1 - sum(share.accepted for share in shares):.1%} of the corpus")
        last = stages[-1][1]
        every = _cost(last, usage_of(last, 1.0)[0])
        if every is not None:
            total = sum(cost for cost in costs if cost is not None)
            unpriced = " (its local stages not priced: engine time)" if None in costs else ""
            print(f"the cascade: about ${total:,.2f}{unpriced}; every row to the last stage instead: ${every:,.2f}")
    return 0


def _cost(spec: JobSpec, usage: Any) -> float | None:
    """What ``usage`` costs in USD at the engine's prices (batch prices with engine.batch); 0 if it asks
    nothing; None for an engine without prices (a local one)."""
    if not round(usage.calls):
        return 0.0
    prices = getattr(spec.engine, "prices", None)
    if prices is None:
        return None
    cost = _online_cost(prices, usage)
    return cost * spec.engine.batch_discount if spec.engine.kind == "openai" and spec.engine.batch else cost


def _online_cost(prices: Any, usage: Any) -> float:
    prompt, completion = round(usage.prompt_tokens), round(usage.completion_tokens)
    return (prompt * prices.prompt_per_million + completion * prices.completion_per_million) / 1e6


def _expected_shares(spec: JobSpec) -> Any:
    """Each stage's expected share of the corpus, from the fits an earlier run of this spec left; else None."""
    from runner._fitted_store import fits_on_file
    from runner.checkpoint import MANIFEST_NAME, STAGES_DIR, Manifest, changed_keys, material_spec
    from runner.fit import accept_cascade, stage_shares

    directory = location(spec.output.dir)
    if not (directory / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.model_validate_json((directory / MANIFEST_NAME).read_bytes())
    except ValueError:
        return None  # a run would say what is wrong with it
    if changed_keys(manifest.spec, material_spec(spec)):
        return None  # fitted under another spec: it says nothing about this one (a run would refuse it)
    fits = fits_on_file(directory, [directory / STAGES_DIR / name for name, _ in spec.stages()], manifest.fit_key)
    return stage_shares(accept_cascade(fits, spec.cm.accept)) if fits else None


def _print_usage(spec: JobSpec, usage: Any, n_user: int, n_first: int, n_second: int, per: Any) -> None:
    calls, prompt_tokens, completion_tokens = (
        round(usage.calls),
        round(usage.prompt_tokens),
        round(usage.completion_tokens),
    )
    if not calls:
        print("  asks the model nothing (cm.first_call never): its prior labels alone")
        return
    print(f"answers: estimate {n_user:,} + annotate {n_first:,} first + up to {n_second:,} second")
    print(f"  {spec.strategy.name} makes up to {round(per.calls)} call(s) per answer")
    print(f"  at most {calls:,} requests, about {prompt_tokens:,} prompt tokens (chars/4, an upper bound: second")
    print(f"  calls list fewer labels), at most {completion_tokens:,} completion tokens")
    if spec.engine.kind == "openai":
        from runner.engines.openai import OpenAIEngine

        engine = OpenAIEngine(spec.engine)
        key = f"${spec.engine.api_key_env} {'is set' if os.environ.get(spec.engine.api_key_env) else 'is NOT set'}"
        print(f"  engine: {engine.base_url}, answers constrained by {engine.constraint}, {key}")
    prices = getattr(spec.engine, "prices", None)
    if prices is not None:
        cost = _online_cost(prices, usage)
        print(f"  at most about ${cost:,.2f} at the configured prices")
    if spec.engine.kind == "openai" and prices is not None:
        batch = cost * spec.engine.batch_discount
        chosen = "engine.batch is on" if spec.engine.batch else "with engine.batch: true"
        print(f"  through the Batch API ({chosen}): at most about ${batch:,.2f} (online ${cost:,.2f}),")
        print(f"  up to {spec.engine.batch_completion_window} per phase (estimate; first calls; second calls)")


def _cancel(args: argparse.Namespace) -> int:
    """Cancel the Batch API batches a job left running; its next run collects what they answered."""
    from runner.checkpoint import BATCH_DIR, Checkpoint
    from runner.engines.openai_batch import OpenAIBatchEngine

    spec = load_spec(args.spec)
    if spec.engine.kind != "openai" or not spec.engine.batch:
        print(f"cm-run cancel: {spec.name} does not use the Batch API (engine.batch); nothing to cancel")
        return 0
    directory = Path(spec.output.dir)

    async def cancel() -> list[str]:
        async with OpenAIBatchEngine(spec.engine, directory / BATCH_DIR) as engine:
            return await engine.cancel_pending()

    lines: list[str] = []
    if (directory / BATCH_DIR).is_dir():
        # The batch record is the running job's while it runs: cancelling under it would race its writes.
        try:
            with Checkpoint(directory, spec).locked():
                lines = asyncio.run(cancel())
        except CheckpointError as error:
            raise CheckpointError(
                f"{error}. To cancel its batches, stop it first (Ctrl-C, or kill -TERM that pid: its finished "
                "rows are kept), then run cm-run cancel again"
            ) from None
    for line in lines or ["no batch of this job is running"]:
        print(f"cm-run cancel: {line}")
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
    job = run_grid(grid, data_dir=args.data_dir, restart=args.restart, engine_factory=factory, progress=log)
    if args.verbose:
        results = asyncio.run(_stoppable(job))
    else:
        with engine_output_to(Path(grid.output_dir) / ENGINE_LOG):
            results = asyncio.run(_stoppable(job))
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

    def show(answer: str) -> None:
        row = rows[answer]
        if not row:
            return
        ranked = sorted(row, key=lambda truth: -counts[(answer, truth)])
        shown = ", ".join(f"{truth} ({counts[(answer, truth)]})" for truth in ranked[: args.top])
        more = f", +{len(row) - args.top} more" if len(row) > args.top else ""
        print(f"  answer {answer!r} -> truth {shown}{more}")

    for answer in bank.labels:
        show(answer)
    if bank.free_text_answers:
        n_free = sum(n for (answer, _), n in counts.items() if answer not in set(bank.labels))
        print(f"free-text answers matching no label: {len(bank.free_text_answers)} rows, {n_free} samples")
        for answer in bank.free_text_answers:
            show(answer)
    return 0


def _bank_import(args: argparse.Namespace) -> int:
    from runner.bank import import_answer_table, save_bank

    labels = None
    if args.spec:
        from runner.pipeline import load_inputs

        labels = load_inputs(load_spec(args.spec), args.data_dir).labels
    bank = import_answer_table(args.path, labels, strip_suffix=args.strip_suffix, model=args.model)
    save_bank(bank, args.output)
    print(
        f"{args.output}: {len(bank.labels)} labels, {len(bank.labels) + len(bank.free_text_answers)} answer rows "
        f"({len(bank.free_text_answers)} free-text), {len(bank.confusions)} (answer, truth) pairs"
    )
    return 0


def _review_export(args: argparse.Namespace) -> int:
    from runner.review import export_csv, export_label_studio

    job_dir = location(args.job_dir)
    here = Path(".") if isinstance(job_dir, ObjectPath) else job_dir  # a job on S3 exports to the current directory
    if args.format == "label-studio":
        from runner._fitted_store import fitted_labels

        labels = fitted_labels(job_dir)
        if labels is None:
            raise DataError(f"{job_dir}: not a finished cm-run job with a fitted CM (no fitted_cm.json)")
        tasks = Path(args.output) if args.output else here / "review-label-studio.json"
        config = tasks.with_suffix(".xml")
        n = export_label_studio(job_dir, tasks, config, labels)
        print(f"{tasks}: {n} Label Studio tasks with the model's label pre-selected (score = confidence);")
        print(f"{config}: the labeling config. Create a project with it (Settings > Labeling Interface > Code),")
        print("import the tasks, label them (sort by prediction score: most uncertain first), Export > JSON, then:")
        print(f"  cm-run review import {job_dir} EXPORTED.json")
        return 0
    output = Path(args.output) if args.output else here / "review.csv"
    n = export_csv(job_dir, output)
    print(f"{output}: {n} rows to review, most uncertain first; fill in the 'label' column, then:")
    print(f"  cm-run review import {job_dir} {output}")
    return 0


def _review_import(args: argparse.Namespace) -> int:
    from runner._fitted_store import fitted_labels
    from runner.review import REVIEWED_FILE, import_reviewed

    job_dir = location(args.job_dir)
    labels = fitted_labels(job_dir)
    if labels is None:
        raise DataError(f"{job_dir}: not a finished cm-run job with a fitted CM (no fitted_cm.json)")
    n = import_reviewed(job_dir, Path(args.reviewed), labels)
    print(f"{job_dir / REVIEWED_FILE}: {n} reviewed rows. Rerun the job's spec: they join the bank (calibration")
    print("stays on the random user split), CM is refit, the corpus is re-scored (no first calls again), and")
    print("they are marked source = human.")
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
        "--verbose",
        action="store_true",
        help=f"show the engine's own logs and warnings (else kept in <output.dir>/{ENGINE_LOG})",
    )
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
        "--verbose", action="store_true", help=f"show the engines' own logs (else kept in <output_dir>/{ENGINE_LOG})"
    )
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

    cancel = sub.add_parser("cancel", help="cancel the Batch API batches a job (engine.batch) left running")
    cancel.add_argument("spec", help="the job spec YAML file")
    cancel.set_defaults(func=_cancel)

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
    review = sub.add_parser("review", help="the rows a job did not accept: export them, import their labels")
    review_sub = review.add_subparsers(dest="review_command", required=True)
    export = review_sub.add_parser("export", help="review.parquet as CSV or as Label Studio tasks")
    export.add_argument("job_dir", help="the job's output directory")
    export.add_argument(
        "--format",
        choices=["csv", "label-studio"],
        default="csv",
        help="csv (a 'label' column to fill in) or label-studio (tasks JSON and, beside it, the labeling config XML)",
    )
    export.add_argument("--csv", action="store_const", const="csv", dest="format", help="the same as --format csv")
    export.add_argument(
        "-o",
        "--output",
        help="where to write (default: JOB_DIR/review.csv or JOB_DIR/review-label-studio.json; the current "
        "directory for an s3:// job)",
    )
    export.set_defaults(func=_review_export)
    imported = review_sub.add_parser("import", help="reviewed labels (columns id, label) back into the job")
    imported.add_argument("job_dir", help="the job's output directory")
    imported.add_argument(
        "reviewed",
        help="the reviewed table (csv, jsonl or parquet) with columns id and label, or Label Studio's JSON export",
    )
    imported.set_defaults(func=_review_import)

    imported = bank_sub.add_parser(
        "import", help="a bank from the paper authors' {answer: [labels]} JSON (each pair counted once)"
    )
    imported.add_argument("path", help="the JSON file, e.g. Memory_Masking_massive_scenario_0.05_0.7_1.json")
    imported.add_argument("-o", "--output", required=True, help="the bank file to write")
    imported.add_argument("--spec", help="check every label against this job's label set and use its label names")
    imported.add_argument("--data-dir", help="where the spec's dataset paths are resolved")
    imported.add_argument("--strip-suffix", help="drop this suffix from every answer and label first (e.g. .txt)")
    imported.add_argument("--model", default="imported", help="the model the bank was estimated with")
    imported.set_defaults(func=_bank_import)
    merge = bank_sub.add_parser("merge", help="sum the counts of banks made for the same label set")
    merge.add_argument("paths", nargs="+")
    merge.add_argument("-o", "--output", required=True)
    merge.set_defaults(func=_bank_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "eval", "prepare-model", "schemas", "bank", "review", "cancel", "-h", "--help"}
    if argv and argv[0] not in commands:
        argv.insert(0, "run")  # `cm-run jobs/x.yaml` is `cm-run run jobs/x.yaml`
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="cm-run: %(levelname)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "quiet", False):  # the Batch API engine's line per poll: each batch's status and counts
        logging.getLogger("runner.batch").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (SpecError, DataError, BankError, CheckpointError, StorageError) as error:
        print(f"cm-run: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except EngineDied as error:
        print(
            f"cm-run: engine died: {error}. Every finished row is saved; rerun the same command to resume.",
            file=sys.stderr,
        )
        return EXIT_ENGINE
    except EngineError as error:
        print(f"cm-run: engine error: {error}", file=sys.stderr)
        return EXIT_ENGINE
    except (KeyboardInterrupt, _Terminated) as stop:
        print(
            "cm-run: stopped; every finished row is saved. Rerun the same command to resume "
            "(add --restart to start over). Batch API batches keep running: the rerun collects them, "
            "`cm-run cancel SPEC` cancels them.",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if isinstance(stop, _Terminated) else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
