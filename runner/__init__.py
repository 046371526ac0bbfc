"""cm-runner: batch annotation with Consistent Marginalization (CM).

The public API; everything else is an implementation detail::

    from runner import load_spec, run_job
    result = asyncio.run(run_job(load_spec("jobs/demo.yaml"), data_dir="../shared/datasets"))
    print(result.metrics["accuracy_baseline"], result.metrics["accuracy_cm"])
"""

from runner.bank import (
    BankError,
    MemoryBank,
    Refinement,
    binary_matrix,
    candidate_set,
    count_confusions,
    estimate_bank,
    load_bank,
    merge_banks,
    p_answer_given_truth,
    refine,
    save_bank,
    update_bank,
)
from runner.data import DataError
from runner.engines import ChoiceRequest, Completion, Engine, EngineError, Message, make_engine
from runner.eval_report import write_report
from runner.evaluate import GridSpec, load_grid, run_grid
from runner.examples import ExamplePool, examples_for_jobs
from runner.labels import LabelSet
from runner.pipeline import JobResult, annotate_rows, read_annotations, run_job
from runner.report import compute_metrics
from runner.spec import JobSpec, SpecError, load_spec
from runner.strategies import Answer, Strategy, make_strategy

__all__ = [
    "Answer",
    "BankError",
    "ChoiceRequest",
    "Completion",
    "DataError",
    "Engine",
    "EngineError",
    "ExamplePool",
    "GridSpec",
    "JobResult",
    "JobSpec",
    "LabelSet",
    "MemoryBank",
    "Message",
    "Refinement",
    "SpecError",
    "Strategy",
    "annotate_rows",
    "binary_matrix",
    "candidate_set",
    "compute_metrics",
    "count_confusions",
    "estimate_bank",
    "examples_for_jobs",
    "load_bank",
    "load_grid",
    "load_spec",
    "make_engine",
    "make_strategy",
    "merge_banks",
    "p_answer_given_truth",
    "read_annotations",
    "refine",
    "run_grid",
    "run_job",
    "save_bank",
    "update_bank",
    "write_report",
]
