"""``cm-run``: run a job spec, prepare embedded models, export schemas, inspect banks.

    cm-run jobs/massive.yaml [--data-dir DIR] [--restart] [--quiet]
    cm-run prepare-model smollm2-135m-instruct
    cm-run schemas [--check]
    cm-run bank show out/massive/memory_bank.json

Exit codes: 0 done, 2 bad spec/data/bank/output dir, 3 engine failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from runner.bank import BankError, load_bank
from runner.checkpoint import CheckpointError
from runner.data import DataError
from runner.engines.base import EngineError
from runner.spec import SpecError, load_spec

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
    show = not args.quiet and sys.stderr.isatty()
    print(
        f"cm-run: {spec.name}: model {spec.engine.model}, strategy {spec.strategy.name}, output {spec.output.dir}",
        file=sys.stderr,
    )
    if show:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bars = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total)
            bars.update(tasks[phase], completed=done)

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
    run.set_defaults(func=_run)

    prepare = sub.add_parser("prepare-model", help="convert an embedded model once into the cache")
    prepare.add_argument("name", help="e.g. smollm2-135m-instruct or gemma-3-270m")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "prepare-model", "schemas", "bank", "-h", "--help"}
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
