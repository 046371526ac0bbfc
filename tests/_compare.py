"""What the job tests compare: annotation tables from two runs of the real engine, and calls a job must make."""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl

# vLLM's log probabilities move slightly with which requests share a batch (bfloat16 most of all); the labels
# do not. Within this, the two runs gave the model the same probability of its answer.
PROBABILITY_TOLERANCE = 0.05


def assert_same_annotations(ours: pl.DataFrame, theirs: pl.DataFrame, *, ignore: tuple[str, ...] = ()) -> None:
    """Every column equal, row for row, but ``y_prime_probability``: equal within ``PROBABILITY_TOLERANCE``."""
    drop = ("y_prime_probability", *ignore)
    assert ours.drop(drop).equals(theirs.drop(drop))
    gap = (ours["y_prime_probability"] - theirs["y_prime_probability"]).abs().max()
    assert gap is None or gap <= PROBABILITY_TOLERANCE, gap


def held_out_questions(job_dir: Path) -> int:
    """User samples whose row of M, without that sample, still holds several truths: paper CM asks the model
    among it, to calibrate the confidence. Counted from the job's bank file, by hand."""
    bank = orjson.loads((job_dir / "memory_bank.json").read_bytes())
    pairs = {(c["answer"], c["truth"]): c["count"] for c in bank["confusions"]}
    return sum(
        1
        for s in bank["samples"]
        if sum(n - (truth == s["truth"]) > 0 for (answer, truth), n in pairs.items() if answer == s["answer"]) > 1
    )
