"""Scoring a finished corpus again with a new fit (after a review import): paid answers kept, chunks run as the
first run ran them (issue 23 items 8 and 9)."""

from __future__ import annotations

import asyncio

import orjson
import polars as pl
import pytest

from runner import run_job
from runner.review import import_reviewed
from tests.scripted_engine import ScriptedEngine

LABELS = ["a", "b", "c"]
# The model is always right on the user split, so every row of M holds one label and the first run
# makes no second call. It answers 'a' on every corpus row. The paper's binary M: its sets do not move
# with a randomised threshold, so a review that adds a pair to row 'a' widens every row's set alike.
USER = [(f"u{y}{i}", y) for y in LABELS for i in range(20)]
CORPUS = [(f"c{i}", "a") for i in range(12)]
FIRST = {text: label for text, label in USER + CORPUS}
CM = "cm: {variant: paper, second_call: when_ambiguous}"


class Overlapping(ScriptedEngine):
    """Answers corpus rows after a pause, counting how many of their requests wait at once."""

    def __init__(self, *args, whole_phase: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.waiting = self.most_waiting = 0
        if whole_phase:  # as the Batch API engine: the job hands it whole phases
            self.wants_whole_phase = True

    async def complete(self, requests):
        corpus = sum(request.messages[-1].content.startswith("c") for request in requests)
        self.waiting += corpus
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await asyncio.sleep(0.2 if corpus else 0)
            return await super().complete(requests)
        finally:
            self.waiting -= corpus


@pytest.fixture
def reviewed_job(toy_job, tmp_path, write):
    """A finished job (4 chunks of 3 rows, 2 in flight), then a review saying two corpus rows answered 'a' are 'b'.

    Row 'a' of M becomes {a: 20, b: 2}: the refit's candidate set for an answer 'a' is {a, b}, so the
    rescore asks every corpus row again within {a, b}.
    """

    async def _job(**engine_options) -> tuple[Overlapping, dict]:
        spec = toy_job(USER, CORPUS, labels=LABELS, output="chunk_size: 3, chunks_in_flight: 2", extra=CM)
        first = await run_job(spec, engine=ScriptedEngine(FIRST, n_labels=3))
        assert first.metrics["calls_per_item"] == 1.0
        ids = pl.read_parquet(tmp_path / "out/annotations.parquet")["id"].to_list()
        write("reviewed.csv", f"id,label\n{ids[0]},b\n{ids[1]},b\n")
        import_reviewed(tmp_path / "out", tmp_path / "reviewed.csv", LABELS)
        engine = Overlapping(FIRST, {text: "a" for text, _ in CORPUS}, n_labels=3, **engine_options)
        result = await run_job(spec, engine=engine)
        return engine, result.metrics

    return _job


async def test_a_rescore_runs_chunks_in_flight_at_once(reviewed_job, tmp_path):
    engine, metrics = await reviewed_job()
    asked = [request for request in engine.requests if request.messages[-1].content.startswith("c")]
    assert metrics["run"]["rows_rescored"] == 12
    # second calls only, no first call again: one a row, but none for the two reviewed rows (their label is
    # the reviewer's; they are no held-out questions either)
    assert [request.choices for request in asked] == [("a", "b")] * 10
    # chunks_in_flight: 2 chunks of 3 rows, every row of a chunk asked at once (one chunk at a time: 3); the
    # first chunk holds the two reviewed rows, so at most 1 + 3 rows wait at once there, then 3 + 3
    assert engine.most_waiting == 6
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    reviewed = table["source"] == "human"
    assert reviewed.sum() == 2 and table.filter(reviewed)["calls"].to_list() == [1, 1]  # kept as first annotated
    assert table.filter(~reviewed)["candidates"].to_list() == [["a", "b"]] * 10
    assert table.filter(~reviewed)["calls"].to_list() == [2] * 10


async def test_a_rescore_puts_the_whole_phase_in_flight_for_a_batch_engine(reviewed_job):
    engine, metrics = await reviewed_job(whole_phase=True)
    assert metrics["run"]["rows_rescored"] == 12
    # the phase's second calls at once (the 10 rows no reviewer labelled): one batch, not one a chunk
    assert engine.most_waiting == 10


async def test_a_rescore_keeps_a_paid_first_answer_the_new_fit_does_not_weigh(toy_job, tmp_path):
    from runner.checkpoint import Checkpoint, job_files
    from runner.fit import fit_cm
    from runner.pipeline import StageWork, _rescore, load_inputs
    from runner.spec import CMSpec
    from runner.strategies import make_strategy
    from tests.test_fit import ANSWERS, LABELS, neighbour_job, toy_embed

    options = dict(variant="neighbour_prior", second_call="never", first_call="when_weighted", neighbours=3)
    spec = neighbour_job(toy_job, orjson.dumps({**options, "likelihood_weight": 0.5}).decode())
    result = await run_job(spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
    paid = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert paid["y_prime"].to_list() == ["music", "weather", "music"] and paid["calls"].to_list() == [1] * 3

    inputs = load_inputs(spec)
    strategy = make_strategy(spec.strategy, inputs.labels, spec.generation)
    checkpoint = Checkpoint(tmp_path / "out", spec, job_files(spec))
    vectors = toy_embed([sample.text for sample in result.bank.samples])

    async def rescore(weight: float) -> tuple[ScriptedEngine, pl.DataFrame]:
        """The corpus scored again with a refit (as after a review) that puts ``weight`` on the first answer."""
        refit = fit_cm(result.bank, CMSpec(**options, likelihood_weight=weight), vectors)
        assert refit.labels == tuple(LABELS)
        engine = ScriptedEngine(ANSWERS, n_labels=3)
        manifest = checkpoint.load()
        stages = [StageWork("main", engine, strategy, refit, None, toy_embed)]
        await _rescore(spec, inputs, stages, checkpoint, manifest, None, True, spec.output.chunks_in_flight)
        return engine, pl.read_parquet(checkpoint.shard_path("annotate", 0))

    # a refit that no longer weighs the first answer need not ask for it, but keeps the one paid for
    engine, rescored = await rescore(0.0)
    assert engine.requests == []
    assert rescored["y_prime"].to_list() == paid["y_prime"].to_list() and rescored["calls"].to_list() == [1] * 3
    assert rescored["y_hat"].to_list() == rescored["y_neighbour"].to_list()  # the prior alone decides
    # so a later refit weighing it again pays for nothing
    engine, again = await rescore(0.5)
    assert engine.requests == []
    assert again.select("y_prime", "y_hat", "calls").equals(paid.select("y_prime", "y_hat", "calls"))


async def test_shards_whose_fit_the_manifest_does_not_record_are_scored_anew(toy_job, tmp_path):
    spec = toy_job(USER, CORPUS, labels=LABELS, extra=CM)
    await run_job(spec, engine=ScriptedEngine(FIRST, n_labels=3))
    first = pl.read_parquet(tmp_path / "out/annotations.parquet")
    manifest = tmp_path / "out/manifest.json"
    # shards on file scored by a fit the manifest does not name (a run stopped before recording it)
    manifest.write_bytes(orjson.dumps({**orjson.loads(manifest.read_bytes()), "fit_key": None, "complete": False}))
    engine = ScriptedEngine(FIRST, n_labels=3)
    result = await run_job(spec, engine=engine)
    # fit_key None means "no fit recorded", never "nothing to score again": the shards are scored with this fit
    assert result.metrics["run"]["rows_rescored"] == 12 and engine.requests == []  # every answer reused
    assert pl.read_parquet(tmp_path / "out/annotations.parquet").equals(first)
    assert orjson.loads(manifest.read_bytes())["fit_key"] is not None


async def test_a_rescore_asks_again_only_the_first_calls_the_engine_failed_on(toy_job, tmp_path, write):
    corpus = [*CORPUS, ("garbled", "a"), ("timed out", "a")]
    spec = toy_job(USER, corpus, labels=LABELS, extra=CM)
    # 'garbled' gets an answer naming no label (final: resume does not ask again); 'timed out' an engine failure
    await run_job(spec, engine=ScriptedEngine(FIRST, n_labels=3, failing={"timed out"}))
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["error_kind"].to_list()[-2:] == ["unparsed", "engine"]
    write("reviewed.csv", f"id,label\n{table['id'][0]},b\n")
    import_reviewed(tmp_path / "out", tmp_path / "reviewed.csv", LABELS)
    engine = ScriptedEngine(FIRST | {"timed out": "a"}, {text: "a" for text, _ in corpus}, n_labels=3)
    result = await run_job(spec, engine=engine)
    assert result.metrics["run"]["rows_rescored"] == len(corpus)
    assert [r.messages[-1].content for r in engine.requests if len(r.choices) == 3] == ["timed out"]
    rescored = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert rescored["error_kind"].to_list()[-2:] == ["unparsed", None] and rescored["y_hat"][-1] == "a"
    # what was spent counts: 'garbled' its one call; 'timed out' the failed one, its first answer, a second call
    assert rescored["calls"].to_list()[-2:] == [1, 3]


async def test_a_label_no_second_call_chose_is_not_taken_for_the_models_choice_when_a_refit_asks(toy_job, tmp_path):
    from tests.test_fit import ANSWERS, SAMPLES, toy_embed
    from tests.test_fit import CORPUS as NEIGHBOUR_CORPUS
    from tests.test_fit import LABELS as NEIGHBOUR_LABELS

    # cm.second_call auto: on the user split alone the model's choices within C win once (within one standard
    # error), so the first run makes no second call. A reviewed row among the pets, labelled music, moves a pet's
    # neighbours' vote off pets, where the model's choice within C stays right: the refit's trial says second
    # calls pay (found by trying each short text of the toy vocabulary)
    odd = "cat dog loud"
    corpus = [*NEIGHBOUR_CORPUS, (odd, "music")]
    first = ANSWERS | {odd: "pets"}
    within_c = {s.text: s.truth for s in SAMPLES} | dict(corpus)
    cm = "{variant: neighbour_prior, tau: 0.98, neighbours: 3, likelihood_weight: 0, second_call: auto}"
    spec = toy_job([(s.text, s.truth) for s in SAMPLES], corpus, labels=NEIGHBOUR_LABELS, extra=f"cm: {cm}")
    result = await run_job(spec, engine=ScriptedEngine(first, within_c, n_labels=3), embed=toy_embed)
    assert result.metrics["cm_settings"]["second_call"] == "never"
    before = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert (before["candidates"].list.len() > 1).all()  # every set ambiguous, its label decided without asking
    (tmp_path / "reviewed.csv").write_text(f"id,label\n{before['id'][-1]},music\n")
    import_reviewed(tmp_path / "out", tmp_path / "reviewed.csv", NEIGHBOUR_LABELS)
    trial = tmp_path / "out/second_call_trial.json"
    asked_before = {(q["id"], tuple(q["candidates"])) for q in orjson.loads(trial.read_bytes())["asked"]}

    engine = ScriptedEngine(first, within_c, n_labels=3)
    result = await run_job(spec, engine=engine, embed=toy_embed)
    assert result.metrics["cm_settings"]["second_call"] == "when_ambiguous"
    texts = dict(NEIGHBOUR_CORPUS)
    asked = sorted(r.messages[-1].content for r in engine.requests if r.messages[-1].content in texts)
    assert asked == sorted(texts)  # each unreviewed row: the model chooses within its set, as a fresh run would
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").head(len(NEIGHBOUR_CORPUS))
    assert table["y_hat"].to_list() == list(texts.values())
    # and the refit asks only the held-out questions (a sample, a set) it had not asked before
    asked_now = {(q["id"], tuple(q["candidates"])) for q in orjson.loads(trial.read_bytes())["asked"]}
    user_texts = {s.text for s in SAMPLES}
    questions = [r for r in engine.requests if r.messages[-1].content in user_texts]
    assert asked_now & asked_before and len(questions) == len(asked_now - asked_before) > 0
