"""Resume: what a rerun keeps, what it redoes, and what it refuses."""

import asyncio
import hashlib

import orjson
import polars as pl
import pytest

from runner import run_job
from runner.bank import BankError
from runner.checkpoint import CheckpointError
from runner.data import DataError
from tests.scripted_engine import ScriptedEngine

N_USER, N_CORPUS = 10, 23
# Before annotating, paper CM asks the model among each user sample's held-out row of M when it holds
# several labels: the six samples answered 'a' (truths b and c) still see {b, c} without themselves.
N_QUESTIONS = 6
LABELS = ["a", "b", "c"]


@pytest.fixture
def job(toy_job):
    user = [(f"u{i}", LABELS[i % 3]) for i in range(N_USER)]
    corpus = [(f"c{i}", LABELS[i % 3]) for i in range(N_CORPUS)]
    spec = toy_job(user, corpus, name="resume", output="chunk_size: 4")
    # The model answers 'a' for everything but multiples of 3 ('b'); second calls pick 'c'.
    first = {f"{p}{i}": ("b" if i % 3 == 0 else "a") for p in "uc" for i in range(max(N_USER, N_CORPUS))}
    second = {f"c{i}": "c" for i in range(N_CORPUS)}
    return spec, lambda **kw: ScriptedEngine(first, second, n_labels=3, **kw)


def estimate_requests(engine: ScriptedEngine) -> list[str]:
    """The user samples an engine was asked for a first answer (not the held-out questions, among fewer labels)."""
    return [
        r.messages[-1].content
        for r in engine.requests
        if r.messages[-1].content.startswith("u") and len(r.choices) == len(LABELS)
    ]


def snapshot(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


async def test_interrupted_annotate_resumes_and_matches_an_uninterrupted_run(job, tmp_path):
    spec, engine = job
    reference = await run_job(
        spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(tmp_path / "ref")})}),
        engine=engine(),
    )

    # one chunk at a time, so the crash point is a count: the estimate; the questions, asked while chunk 0's
    # first calls go out (4), then its 2 second calls (c1, c2); chunk 1's 4 first and 3 second calls; chunk 2 dies
    one_at_a_time = spec.model_copy(update={"output": spec.output.model_copy(update={"chunks_in_flight": 1})})
    with pytest.raises(RuntimeError, match="engine died"):
        await run_job(one_at_a_time, engine=engine(crash_after=N_USER + N_QUESTIONS + 4 + 2 + 4 + 3))
    manifest = orjson.loads((tmp_path / "out/manifest.json").read_bytes())
    assert manifest["finished_shards"]["annotate"] == [0, 1] and not manifest["complete"]

    resumed_engine = engine()
    resumed = await run_job(spec, engine=resumed_engine)
    texts = [r.messages[-1].content for r in resumed_engine.requests]
    assert not any(t.startswith("u") for t in texts)  # the bank was reused, not re-estimated
    assert not {f"c{i}" for i in range(8)} & set(texts)  # finished chunks were not paid for again
    ours = pl.read_parquet(tmp_path / "out/annotations.parquet")
    theirs = pl.read_parquet(tmp_path / "ref/annotations.parquet")
    assert ours.equals(theirs)
    assert resumed.metrics["accuracy_cm"] == reference.metrics["accuracy_cm"]


async def test_interrupted_estimate_resumes_that_phase(job, tmp_path):
    spec, engine = job
    with pytest.raises(RuntimeError):
        await run_job(spec, engine=engine(crash_after=5))  # one estimate chunk of 4 done, and u4 of the next
    assert orjson.loads((tmp_path / "out/manifest.json").read_bytes())["finished_shards"]["estimate"] == [0]
    assert pl.read_parquet(tmp_path / "out/estimate/partial-00001.parquet")["text"].to_list() == ["u4"]
    resumed_engine = engine()
    await run_job(spec, engine=resumed_engine)
    estimated = estimate_requests(resumed_engine)
    assert estimated == [f"u{i}" for i in range(5, N_USER)]  # the row finished before the crash is not asked again


async def test_rows_an_engine_failed_on_are_redone_on_rerun(job, tmp_path):
    spec, engine = job
    first = await run_job(spec, engine=engine(failing={"c5", "c17"}))
    assert first.metrics["n_errors"] == 2
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table.filter(pl.col("error").is_not_null())["error_kind"].to_list() == ["engine", "engine"]

    rerun_engine = engine()
    again = await run_job(spec, engine=rerun_engine)
    assert sorted({r.messages[-1].content for r in rerun_engine.requests}) == ["c17", "c5"]
    assert again.metrics["n_errors"] == 0
    assert pl.read_parquet(tmp_path / "out/annotations.parquet")["id"].to_list() == [str(i) for i in range(N_CORPUS)]


async def test_a_shard_on_disk_but_not_in_the_manifest_is_redone(job, tmp_path):
    """A kill between a shard's rename and the manifest update leaves exactly this state."""
    spec, engine = job
    await run_job(spec, engine=engine())
    manifest_path = tmp_path / "out/manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["finished_shards"]["annotate"].remove(3)
    manifest["complete"] = False
    manifest_path.write_bytes(orjson.dumps(manifest))
    rerun_engine = engine()
    await run_job(spec, engine=rerun_engine)
    assert {r.messages[-1].content for r in rerun_engine.requests} == {f"c{i}" for i in range(12, 16)}


async def test_bad_input_leaves_earlier_output_untouched(job, tmp_path, write):
    spec, engine = job
    await run_job(spec, engine=engine())
    before = snapshot(tmp_path / "out")
    good_corpus = (tmp_path / "data/corpus.jsonl").read_text()
    write("data/corpus.jsonl", '{"text": "x", "label": "a"}\n{"text": "", "label": "a"}\n')
    with pytest.raises(DataError, match="empty or null text"):
        await run_job(spec, engine=engine())
    write("data/corpus.jsonl", good_corpus)
    changed = spec.model_copy(update={"generation": spec.generation.model_copy(update={"temperature": 0.7})})
    with pytest.raises(CheckpointError, match=r"generation\.temperature: 0\.0 -> 0\.7"):
        await run_job(changed, engine=engine())
    assert snapshot(tmp_path / "out") == before


async def test_corrupt_manifest_and_bank_are_named(job, tmp_path):
    spec, engine = job
    await run_job(spec, engine=engine())
    (tmp_path / "out/memory_bank.json").write_text('{"labels": ')
    with pytest.raises(BankError, match=r"memory_bank\.json: memory bank is not valid JSON"):
        await run_job(spec, engine=engine())
    (tmp_path / "out/manifest.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"manifest.json: corrupt manifest .* --restart"):
        await run_job(spec, engine=engine())
    await run_job(spec, engine=engine(), restart=True)


async def test_output_dir_that_is_not_ours_or_not_a_directory(job, tmp_path, write):
    spec, engine = job
    write("out/thesis.tex", "precious")
    with pytest.raises(CheckpointError, match="not a cm-run output directory"):
        await run_job(spec, engine=engine())
    assert (tmp_path / "out/thesis.tex").read_text() == "precious"
    blocked = spec.model_copy(
        update={"output": spec.output.model_copy(update={"dir": str(tmp_path / "out/thesis.tex/x")})}
    )
    with pytest.raises(CheckpointError, match="cannot be created"):
        await run_job(blocked, engine=engine())


async def test_labels_missing_from_the_user_split_are_reported(job, tmp_path, caplog):
    spec, engine = job
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"labels": [*LABELS, "d"]})})
    result = await run_job(spec, engine=engine())
    assert result.metrics["labels_without_user_samples"] == ["d"]
    assert "1 label(s) have no sample in the user split and cannot be recovered by CM: d" in caplog.text


async def test_long_texts_are_truncated_when_asked(job, tmp_path):
    spec, engine = job
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"max_text_chars": 2})})
    recorder = engine()
    await run_job(spec, engine=recorder)
    assert {len(r.messages[-1].content) for r in recorder.requests} == {2}
    assert pl.read_parquet(tmp_path / "out/annotations.parquet")["text"][12] == "c12"  # outputs keep the full text


async def test_keys_added_by_a_newer_version_at_their_defaults_do_not_block_resume(job, tmp_path):
    spec, engine = job
    with pytest.raises(RuntimeError):
        await run_job(spec, engine=engine(crash_after=N_USER + 14))
    manifest_path = tmp_path / "out/manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    for key in ("cm.variant", "cm.empty_row", "dataset.max_text_chars"):  # as an older cm-runner wrote it
        del manifest["spec"][key]
    manifest["spec_digest"] = "from-an-older-version"
    manifest_path.write_bytes(orjson.dumps(manifest))
    resumed_engine = engine()
    await run_job(spec, engine=resumed_engine)
    assert not any(r.messages[-1].content.startswith("u") for r in resumed_engine.requests)
    # ...but a key that is new and NOT at its default is a real change
    manifest = orjson.loads(manifest_path.read_bytes())
    del manifest["spec"]["cm.variant"]
    manifest["spec_digest"] = "older"
    manifest_path.write_bytes(orjson.dumps(manifest))
    counts = spec.model_copy(update={"cm": spec.cm.model_copy(update={"variant": "counts"})})
    with pytest.raises(CheckpointError, match=r"cm\.variant: 'paper' -> 'counts'"):  # unrecorded: the default
        await run_job(counts, engine=engine())


async def test_keys_that_stopped_counting_do_not_block_resume(job, tmp_path):
    spec, engine = job
    await run_job(spec, engine=engine())
    manifest_path = tmp_path / "out/manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["spec"]["engine.replicas"] = 1  # an older cm-runner counted the replica layout
    manifest["spec_digest"] = "older"
    manifest_path.write_bytes(orjson.dumps(manifest))
    rerun = engine()
    await run_job(spec, engine=rerun)
    assert rerun.requests == []


async def test_settings_the_variant_does_not_read_do_not_block_resume(job, tmp_path):
    spec, engine = job
    await run_job(spec, engine=engine())  # the paper's CM: no posterior, no neighbours
    unread = spec.model_copy(update={"cm": spec.cm.model_copy(update={"neighbours": 3, "tau": 0.5, "prior": "probe"})})
    rerun = engine()
    await run_job(unread, engine=rerun)
    assert rerun.requests == []
    read = spec.model_copy(update={"cm": spec.cm.model_copy(update={"empty_row": "abstain"})})
    with pytest.raises(CheckpointError, match=r"cm\.empty_row: 'keep_initial' -> 'abstain'"):
        await run_job(read, engine=engine())


async def test_every_file_the_job_writes_is_fsynced_before_its_rename_and_its_directory_after(
    job, tmp_path, monkeypatch
):
    import os

    synced: list[str] = []
    renamed: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    def recording_replace(source, target):
        renamed.append((str(source), str(target)))
        synced.append(f"renamed {target}")
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    spec, engine = job
    await run_job(spec, engine=engine())

    out = tmp_path / "out"
    written = {str(p) for p in out.rglob("*") if p.is_file() and p.name != ".cm-run.lock"}  # a lock holds no output
    # manifest, bank, estimate.parquet, annotations.parquet, metrics.json; the fitted CM (pickle and JSON), the
    # held-out questions' answers, review.parquet, risk_coverage.png, prevalence.png; and every shard
    assert len(written) == 11 + -(-N_USER // 4) + -(-N_CORPUS // 4)
    assert {target for _, target in renamed} == written
    for source, target in renamed:
        at = synced.index(f"renamed {target}", synced.index(source))  # the temp file synced, then renamed
        assert str(os.path.dirname(target)) in synced[at + 1 :]  # ... then its directory


async def test_estimate_rows_that_failed_once_are_retried_within_the_run(job, tmp_path):
    spec, engine = job
    flaky = engine(failing={"u2", "u7"})
    complete = flaky.complete

    async def fails_once(requests):
        answers = await complete(requests)
        if len(flaky.requests) >= N_USER:  # a transient fault: once every user sample was asked, all are answered
            flaky.failing = set()
        return answers

    flaky.complete = fails_once
    await run_job(spec, engine=flaky)
    bank = orjson.loads((tmp_path / "out/memory_bank.json").read_bytes())
    # the scripted model answers 'b' for u0, u3, u6, u9 (truth a) and 'a' for the rest (truths b, c, b, c ...)
    expected = {("b", "a"): 4, ("a", "b"): 3, ("a", "c"): 3}
    assert {(c["answer"], c["truth"]): c["count"] for c in bank["confusions"]} == expected
    assert bank["n_unparsed"] == 0 and bank["user_split"]["n_samples"] == N_USER


async def test_estimate_rows_that_keep_failing_stop_the_job_without_a_bank(job, tmp_path):
    from runner.engines.base import EngineError

    spec, engine = job
    with pytest.raises(EngineError, match=r"^2 of 10 user samples could not be answered; rerun to retry them"):
        await run_job(spec, engine=engine(failing={"u2", "u7"}))
    assert not (tmp_path / "out/memory_bank.json").exists()
    assert orjson.loads((tmp_path / "out/manifest.json").read_bytes())["bank_digest"] is None

    rerun_engine = engine()
    await run_job(spec, engine=rerun_engine)
    estimated = estimate_requests(rerun_engine)
    assert sorted(estimated) == ["u2", "u7"]  # only the rows that failed are asked again
    bank = orjson.loads((tmp_path / "out/memory_bank.json").read_bytes())
    assert sum(c["count"] for c in bank["confusions"]) == N_USER and bank["n_unparsed"] == 0


async def test_n_unparsed_counts_answers_that_match_no_label_not_rejected_rows(job, tmp_path):
    from runner.engines.base import Completion

    spec, engine = job
    scripted = engine()
    scripted.first = {**scripted.first, "u4": "zzz"}
    complete = scripted.complete

    async def rejecting(requests):
        answers = await complete(requests)
        return [
            Completion(text=None, error="http_400: too long", retryable=False) if r.messages[-1].content == "u5" else a
            for r, a in zip(requests, answers, strict=True)
        ]

    scripted.complete = rejecting
    await run_job(spec, engine=scripted)
    bank = orjson.loads((tmp_path / "out/memory_bank.json").read_bytes())
    assert bank["n_unparsed"] == 1  # u4's answer; u5 was never answered
    assert sum(c["count"] for c in bank["confusions"]) == N_USER - 2
    assert bank["user_split"]["n_samples"] == N_USER - 1  # u4 was answered, u5 not


def test_a_cm_setting_no_table_names_is_material_for_every_variant(job):
    from runner.checkpoint import material_spec
    from runner.spec import CMSpec, JobSpec

    class NewerCM(CMSpec):
        some_new_setting: int = 3

    class NewerJob(JobSpec):
        cm: NewerCM

    spec, _ = job
    for variant in ("paper", "counts", "neighbour_prior", "instance"):
        newer = NewerJob.model_validate({**spec.model_dump(), "cm": {**spec.cm.model_dump(), "variant": variant}})
        assert material_spec(newer)["cm.some_new_setting"] == 3, variant
    off = NewerJob.model_validate({**spec.model_dump(), "cm": {**spec.cm.model_dump(), "enabled": False}})
    assert "cm.some_new_setting" not in material_spec(off)  # CM off reads no cm setting


@pytest.mark.parametrize("name", ["user", "corpus"])
async def test_a_changed_file_at_the_same_path_refuses_to_resume(job, tmp_path, name):
    spec, engine = job
    await run_job(spec, engine=engine())
    path = tmp_path / f"data/{name}.jsonl"
    path.touch()  # a new mtime, the same bytes: the same job
    rerun = engine()
    await run_job(spec, engine=rerun)
    assert rerun.requests == []
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same size, same rows, new order
    key = "user_split.path" if name == "user" else "corpus.path"
    with pytest.raises(CheckpointError, match=rf"content of {key}: '{path.stat().st_size} bytes, sha256 .*--restart"):
        await run_job(spec, engine=engine())
    await run_job(spec, engine=engine(), restart=True)


async def test_an_unchanged_file_is_not_hashed_again_on_resume(job, monkeypatch):
    import hashlib

    spec, engine = job
    await run_job(spec, engine=engine())
    hashed = []
    file_digest = hashlib.file_digest
    monkeypatch.setattr(
        hashlib, "file_digest", lambda handle, name: hashed.append(handle.name) or file_digest(handle, name)
    )
    await run_job(spec, engine=engine())
    assert hashed == []  # size and mtime as recorded: the sha256 recorded stands


async def test_a_second_run_on_a_locked_output_dir_is_refused_naming_the_holder(job, tmp_path):
    import asyncio
    import os

    spec, engine = job
    holder = engine()
    asked, release = asyncio.Event(), asyncio.Event()
    complete = holder.complete

    async def held(requests):
        asked.set()
        await release.wait()
        return await complete(requests)

    holder.complete = held
    first = asyncio.ensure_future(run_job(spec, engine=holder))
    await asyncio.wait_for(asked.wait(), timeout=10)
    with pytest.raises(CheckpointError, match=rf"another cm-run \(pid {os.getpid()}\) is writing"):
        await run_job(spec, engine=engine())
    release.set()
    await first  # the first run was not disturbed, and once it ended the directory is free again
    await run_job(spec, engine=engine())


class _SlowEngine(ScriptedEngine):
    """Answers one request at a time, ``delay`` seconds each: a chunk takes longer than checkpoint_seconds."""

    def __init__(self, *args, delay: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay
        self._one_at_a_time = asyncio.Lock()

    async def complete(self, requests):
        async with self._one_at_a_time:
            await asyncio.sleep(self.delay)
            return await super().complete(requests)


async def test_a_chunk_slower_than_checkpoint_seconds_saves_its_finished_rows(toy_job, tmp_path):
    user = [(f"u{i}", LABELS[i % 3]) for i in range(N_USER)]
    corpus = [(f"c{i}", LABELS[i % 3]) for i in range(N_CORPUS)]
    spec = toy_job(user, corpus, name="slow", output="chunk_size: 100, checkpoint_seconds: 0.2")  # one chunk
    first = {f"{p}{i}": ("b" if i % 3 == 0 else "a") for p in "uc" for i in range(N_CORPUS)}
    second = {f"c{i}": "c" for i in range(N_CORPUS)}

    def elsewhere(name):
        return spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(tmp_path / name)})})

    await run_job(elsewhere("ref"), engine=ScriptedEngine(first, second, n_labels=3))
    # uninterrupted but slow: partial shards written on the way leave the finished shard as a fast run's
    await run_job(elsewhere("slow"), engine=_SlowEngine(first, second, n_labels=3, delay=0.02))
    reference = pl.read_parquet(tmp_path / "ref/annotations.parquet")
    assert pl.read_parquet(tmp_path / "slow/annotations.parquet").equals(reference)

    running = asyncio.ensure_future(run_job(spec, engine=_SlowEngine(first, second, n_labels=3, delay=0.02)))
    partial = tmp_path / "out/annotations/partial-00000.parquet"
    for _ in range(1000):
        if partial.is_file() or running.done():
            break
        await asyncio.sleep(0.01)
    saved_while_running = set(pl.read_parquet(partial)["text"])  # written by the deadline, not by a stop
    assert 0 < len(saved_while_running) < N_CORPUS
    running.cancel()  # as SIGTERM does
    with pytest.raises(asyncio.CancelledError):
        await running
    saved = set(pl.read_parquet(partial)["text"])
    assert saved >= saved_while_running
    manifest = orjson.loads((tmp_path / "out/manifest.json").read_bytes())
    assert manifest["finished_shards"]["annotate"] == []  # the chunk itself is unfinished

    rerun_engine = ScriptedEngine(first, second, n_labels=3)
    await run_job(spec, engine=rerun_engine)
    asked = {r.messages[-1].content for r in rerun_engine.requests if r.messages[-1].content.startswith("c")}
    assert asked == {f"c{i}" for i in range(N_CORPUS)} - saved  # only the rows the partial shard lacked
    assert not partial.exists()
    assert pl.read_parquet(tmp_path / "out/annotations.parquet").equals(reference)  # same rows, same order


async def test_turning_acceptance_on_refuses_to_resume_a_run_with_cm_off(job, tmp_path):
    spec, engine = job
    off = spec.cm.model_copy(update={"enabled": False, "accept": None})
    await run_job(spec.model_copy(update={"cm": off}), engine=engine())  # shards without a calibrated confidence
    # cm.accept back at its default: the flattened manifest holds 'cm.accept': None, the spec now every
    # cm.accept setting (at its default; all are read with CM off): the same key, a new value.
    accepting = spec.model_copy(update={"cm": off.model_copy(update={"accept": type(spec.cm.accept)()})})
    with pytest.raises(CheckpointError, match=r"\(cm\.accept: None -> \{'confidence_level': 0\.95, 'min_accepted'"):
        await run_job(accepting, engine=engine())


async def test_removing_one_label_description_refuses_to_resume(job, tmp_path):
    spec, engine = job
    described = spec.dataset.model_copy(update={"label_descriptions": {"a": "the first", "b": "the second"}})
    await run_job(spec.model_copy(update={"dataset": described}), engine=engine())
    fewer = described.model_copy(update={"label_descriptions": {"a": "the first"}})
    with pytest.raises(CheckpointError, match=r"dataset\.label_descriptions\.b: 'the second' -> \(not set\)"):
        await run_job(spec.model_copy(update={"dataset": fewer}), engine=engine())
    none = described.model_copy(update={"label_descriptions": {}})
    with pytest.raises(
        CheckpointError, match=r"dataset\.label_descriptions: \{'a': 'the first', 'b': 'the second'\} -> \{\}"
    ):
        await run_job(spec.model_copy(update={"dataset": none}), engine=engine())


def test_changed_keys_fills_defaults_on_both_sides_and_compares_every_key_the_job_reads(job):
    from runner.checkpoint import changed_keys, material_spec

    spec, _ = job
    current = material_spec(spec)
    older = {key: value for key, value in current.items() if not key.startswith("cm.accept")}
    assert changed_keys(older, current) == []  # an older cm-runner's manifest: unrecorded keys at their defaults
    assert changed_keys(current, older) == []  # and the other way round
    removed = {**current, "cm.no_longer_a_setting": 1}
    assert changed_keys(removed, current) == ["cm.no_longer_a_setting"]  # material until listed immaterial
    assert changed_keys({**current, "engine.replicas": 4}, current) == []  # listed immaterial
    assert changed_keys({**current, "cm.tau": 0.5}, current) == []  # paper CM does not read cm.tau
