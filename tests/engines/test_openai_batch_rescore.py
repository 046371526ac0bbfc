"""A rescore after a review, on the Batch API (the local batch server): the corpus's second calls go out as one
batch, not one batch per chunk in series, each waiting the batch latency (issue 23 item 9), and only the refit's
new held-out questions are asked."""

from __future__ import annotations

import json
from collections import defaultdict

import orjson
import polars as pl
import pytest

from runner.review import import_reviewed
from tests.engines.test_openai_batch_job import LABELS, batch_server, cm_run, write_spec
from tests.fault_server import served

pytestmark = pytest.mark.slow

CHUNK = 16  # write_spec's chunk_size: the corpus's 48 rows are 3 chunks


def test_a_rescore_after_a_review_sends_the_corpus_second_calls_as_one_batch(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    user = [{"id": f"u{i}", "text": f"user utterance {i}", "label": LABELS[i % 6]} for i in range(36)]
    corpus = [{"id": f"c{i}", "text": f"corpus utterance {i}", "label": LABELS[i % 6]} for i in range(48)]
    for name, rows in (("user.jsonl", user), ("corpus.jsonl", corpus)):
        (data / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with batch_server() as url:
        spec = write_spec(tmp_path / "job.yaml", url)
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        out = spec.with_suffix("")
        trial_before = orjson.loads((out / "second_call_trial.json").read_bytes())["asked"]
        # A reviewer labels a row answered y' with a truth t row y' of M (the paper's C) has not seen: every row
        # answered y' gets t among its candidates, so each is asked again. The y' whose rows span most chunks.
        truths = defaultdict(set)
        for entry in orjson.loads((out / "memory_bank.json").read_bytes())["confusions"]:
            truths[entry["answer"]].add(entry["truth"])
        table = pl.read_parquet(out / "annotations.parquet").with_row_index("row")
        chunks_of = {
            answer: set(table.filter(pl.col("y_prime") == answer)["row"] // CHUNK)
            for answer in LABELS
            if set(LABELS) - truths[answer]
        }
        answer = max(chunks_of, key=lambda a: len(chunks_of[a]))
        assert len(chunks_of[answer]) >= 2  # one chunk at a time would send one batch per chunk
        label = sorted(set(LABELS) - truths[answer])[0]
        reviewed_id = table.filter(pl.col("y_prime") == answer)["id"][0]
        (tmp_path / "reviewed.csv").write_text(f"id,label\n{reviewed_id},{label}\n")
        assert import_reviewed(out, tmp_path / "reviewed.csv", LABELS) == 1

        before = served(url)
        done = cm_run(spec, data)
        assert done.returncode == 0, done.stderr[-3000:]
        after = served(url)
    rescored = pl.read_parquet(out / "annotations.parquet")
    # every row answered like the reviewed one now has the reviewer's label among its candidates; the reviewed
    # row itself is asked nothing more and keeps its first annotation
    model_rows = rescored.filter((pl.col("y_prime") == answer) & (pl.col("source") == "model"))
    assert model_rows.height and model_rows["candidates"].list.contains(label).all()
    assert orjson.loads((out / "metrics.json").read_bytes())["run"]["rows_rescored"] == 48
    # the refit's held-out questions not asked before (the review changed row y' only) are a batch of their own
    trial_after = orjson.loads((out / "second_call_trial.json").read_bytes())["asked"]
    new_questions = {(q["id"], tuple(q["candidates"])) for q in trial_after} - {
        (q["id"], tuple(q["candidates"])) for q in trial_before
    }
    assert 0 < len(new_questions) < len(trial_after)
    assert after["batches_created"] - before["batches_created"] == 1 + 1
    # requests: those questions, and a second call per row whose set is new and ambiguous; a request the same as
    # one of the first run (the reviewed row's question, among the set its second call was made in) is answered
    # from the engine's record of that run, the others are lines
    old_sets = [set(c) for c in table["candidates"].to_list()]
    new_sets = [set(c) for c in rescored["candidates"].to_list()]
    second = sum(1 for old, new in zip(old_sets, new_sets, strict=True) if new != old and len(new) > 1)
    engine = orjson.loads((out / "metrics.json").read_bytes())["run"]["engine"]
    assert engine["rows_answered"] == len(new_questions) + second
    lines = after["lines_submitted"] - before["lines_submitted"]
    assert lines == engine["lines_submitted"] == len(new_questions) + second - engine["lines_from_earlier_runs"]
    assert after["custom_ids_submitted_more_than_once"] == 0
