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
from runner.labels import LabelSet
from runner.pipeline import JobResult, annotate_rows, read_annotations, run_job
from runner.report import compute_metrics
from runner.spec import JobSpec, SpecError, load_spec

__all__ = [
    "BankError",
    "ChoiceRequest",
    "Completion",
    "DataError",
    "Engine",
    "EngineError",
    "JobResult",
    "JobSpec",
    "LabelSet",
    "MemoryBank",
    "Message",
    "Refinement",
    "SpecError",
    "annotate_rows",
    "binary_matrix",
    "candidate_set",
    "compute_metrics",
    "count_confusions",
    "estimate_bank",
    "load_bank",
    "load_spec",
    "make_engine",
    "merge_banks",
    "p_answer_given_truth",
    "read_annotations",
    "refine",
    "run_job",
    "save_bank",
    "update_bank",
]
