"""A cascade of stages (issue 25 item 2): a neighbour stage that asks nothing, the scripted model, then a
real local OpenAI-compatible server; one threshold for all, each stage seeing only what earlier ones left.

The toy is built so the outcome is known without the code: easy texts (words of one label) are told
apart by their neighbours alone; hard texts hold only the word "loud", so their neighbours cannot tell;
the scripted model is right on the hard pets/weather texts (its answers there are always right) and
answers "music" on the hard texts of every label (a row of M that is right a third of the time).
"""

from __future__ import annotations

import pickle

import polars as pl
import pytest

from runner import run_job
from tests.fault_server import FaultConfig, FaultServer
from tests.scripted_engine import ScriptedEngine
from tests.test_fit import toy_embed

LABELS = ["pets", "weather", "music"]
WORDS = {"pets": "cat dog", "weather": "rain sun", "music": "song band"}


def _rows(prefix: str, n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    easy = [(f"{WORDS[y]} {prefix}e{i}", y) for y in LABELS for i in range(n)]
    sure = [(f"loud {prefix}a{y}{i}", y) for y in ("pets", "weather") for i in range(n // 2)]
    unsure = [(f"loud {prefix}b{y}{i}", y) for y in LABELS for i in range(n // 3)]
    return easy, sure, unsure


USER_EASY, USER_SURE, USER_UNSURE = _rows("u", 60)
CORPUS_EASY, CORPUS_SURE, CORPUS_UNSURE = _rows("c", 9)
USER = USER_EASY + USER_SURE + USER_UNSURE
CORPUS = CORPUS_EASY + CORPUS_SURE + CORPUS_UNSURE
# the scripted model: right on easy and sure texts, "music" on every unsure one
ANSWERS = {text: label for text, label in USER_EASY + USER_SURE + CORPUS_EASY + CORPUS_SURE}
ANSWERS |= {text: "music" for text, _ in USER_UNSURE + CORPUS_UNSURE}
KEY_ENV = "CM_TEST_CASCADE_KEY"


def cascade_job(toy_job, base_url: str, output: str = "", prices: str = ""):
    # ood: the embedding's check alone. The toy's row names differ by split ("ue0" user, "ce0" corpus), so
    # every corpus row is two characters from its nearest user rows where user rows are one from each other:
    # lexically unlike the user split (cm.ood.lexical flags all of them), which is not what this test is about
    stages = [
        "{name: neighbours, cm: {variant: neighbour_prior, first_call: never, ood: {lexical: false}}}",
        "{name: scripted}",
        f"{{name: api, engine: {{kind: openai, model: fault-model, base_url: {base_url}, api_key_env: {KEY_ENV}, "
        f"structured_output: vllm_choice, max_retries: 1{prices}}}}}",
    ]
    extra = "cm: {variant: counts, second_call: never}\ncascade:\n" + "".join(f"  - {s}\n" for s in stages)
    return toy_job(USER, CORPUS, name="cascade", labels=LABELS, output=output, extra=extra)


@pytest.fixture
async def api(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "unused")
    async with FaultServer(FaultConfig(latency=0.0)) as server:
        yield server


def _texts(requests) -> list[str]:
    return [request.messages[-1].content for request in requests]


async def test_each_stage_answers_only_what_earlier_stages_left_and_one_threshold_holds_them_all(
    toy_job, tmp_path, api
):
    spec = cascade_job(toy_job, api.base_url)
    engine = ScriptedEngine(ANSWERS, n_labels=3)
    result = await run_job(spec, engine=engine, embed=toy_embed)
    rows = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert rows.height == len(CORPUS) and rows["id"].n_unique() == len(CORPUS)
    by_text = {row["text"]: row for row in rows.iter_rows(named=True)}

    # the neighbour stage asked nothing, not even on the user split: the scripted model saw the user
    # split once (its own stage's estimate) and only the corpus rows the neighbours left
    asked = _texts(engine.requests)
    user_texts = {text for text, _ in USER}
    assert sorted(t for t in asked if t in user_texts) == sorted(user_texts)
    assert sorted(t for t in asked if t not in user_texts) == sorted(t for t, _ in CORPUS_SURE + CORPUS_UNSURE)

    for text, label in CORPUS_EASY:
        row = by_text[text]
        assert (row["stage"], row["y_hat"], row["accepted"], row["stage_calls"]) == ("neighbours", label, True, [0])
    for text, label in CORPUS_SURE:
        row = by_text[text]
        assert (row["stage"], row["y_hat"], row["accepted"], row["stage_calls"]) == ("scripted", label, True, [0, 1])
    for text, _ in CORPUS_UNSURE:  # nobody is sure: the last stage keeps them, for review
        row = by_text[text]
        assert (row["stage"], row["accepted"], row["stage_calls"]) == ("api", False, [0, 1, 1])
        assert row["calls"] == 2

    # one threshold for all stages, from the user split run through the cascade
    trust = result.metrics["trust"]
    assert trust["threshold"] is not None and trust["user_split_accepted_accuracy"] >= 0.95
    stages = {stage["stage"]: stage for stage in result.metrics["stages"]}
    n = len(CORPUS)
    assert stages["neighbours"]["accepted_share"] == len(CORPUS_EASY) / n
    assert stages["neighbours"]["calls"] == 0 and stages["neighbours"]["rows_seen"] == n
    assert stages["scripted"]["calls"] == len(CORPUS_SURE) + len(CORPUS_UNSURE)
    assert stages["scripted"]["accuracy_accepted"] == 1.0
    assert stages["api"]["answered_share"] == len(CORPUS_UNSURE) / n and stages["api"]["accepted_share"] == 0
    # corpus-level shares compare the corpus with the user split as the whole cascade labels it
    from runner.fit import accept_cascade, through_cascade
    from runner.report import summary_lines

    stage_fits = [
        pickle.loads((tmp_path / "out/stages" / name / "fitted_cm.pkl").read_bytes())["fitted"]
        for name in ("neighbours", "scripted", "api")
    ]
    whole = through_cascade(accept_cascade(stage_fits, spec.cm.accept))
    label_of = dict(zip(whole.held_out_ids, whole.held_out_labels, strict=True))
    ids = {text: sample.id for text, sample in ((s.text, s) for s in result.bank.samples)}
    assert all(label_of[ids[text]] == LABELS.index(label) for text, label in USER_EASY + USER_SURE)
    assert result.metrics["prevalence"] is not None

    summary = "\n".join(summary_lines(result.metrics))
    assert f"stage neighbours: saw {n} rows, answered {100 * len(CORPUS_EASY) / n:.1f}%" in summary
    assert "cm (neighbours) variant neighbour_prior" in summary and "cm (api) variant counts" in summary
    review = pl.read_parquet(tmp_path / "out/review.parquet")
    assert sorted(review["text"]) == sorted(t for t, _ in CORPUS_UNSURE)

    # the server (the last stage) answered the user split once and the rows no earlier stage accepted
    answered = api.counters.answered_texts
    assert sorted(answered) == sorted(user_texts | {t for t, _ in CORPUS_UNSURE})
    assert set(answered.values()) == {1}
    # a rerun of the finished job asks nothing anywhere
    served = api.counters.requests
    again = ScriptedEngine(ANSWERS, n_labels=3)
    await run_job(spec, engine=again, embed=toy_embed)
    assert again.requests == [] and api.counters.requests == served
    assert pl.read_parquet(tmp_path / "out/annotations.parquet").equals(rows)


async def test_an_interrupted_cascade_resumes_asking_only_what_it_lacks(toy_job, tmp_path, api):
    spec = cascade_job(toy_job, api.base_url, output="chunk_size: 9, chunks_in_flight: 1")
    dying = ScriptedEngine(ANSWERS, n_labels=3, crash_after=len(USER) + 4)  # mid-corpus
    with pytest.raises(RuntimeError, match="engine died"):
        await run_job(spec, engine=dying, embed=toy_embed)
    engine = ScriptedEngine(ANSWERS, n_labels=3)
    await run_job(spec, engine=engine, embed=toy_embed)
    rows = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert sorted(rows["text"]) == sorted(t for t, _ in CORPUS)
    asked = _texts(engine.requests)
    assert not set(asked) & {text for text, _ in USER}  # the stage's estimate was kept
    assert len(asked) <= len(CORPUS_SURE) + len(CORPUS_UNSURE)
    fresh = tmp_path / "fresh"
    fresh_spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(fresh)})})
    await run_job(fresh_spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
    uninterrupted = pl.read_parquet(fresh / "annotations.parquet")
    columns = ["id", "y_hat", "stage", "accepted", "stage_calls"]
    assert rows.select(columns).equals(uninterrupted.select(columns))


def test_a_stage_that_asks_nothing_must_say_so_consistently(toy_job):
    from runner.spec import SpecError

    with pytest.raises((SpecError, ValueError), match="second_call"):
        toy_job(USER, CORPUS, labels=LABELS, extra="cm: {variant: neighbour_prior, first_call: never}")
    bad = "cascade:\n  - {name: a}\n  - {name: a}\n"
    with pytest.raises((SpecError, ValueError), match="repeat"):
        toy_job(USER, CORPUS, labels=LABELS, extra=bad)
    with pytest.raises((SpecError, ValueError), match=r"cascade\[1\].*accept"):
        toy_job(USER, CORPUS, labels=LABELS, extra="cascade:\n  - {name: a}\n  - {name: b, cm: {accept: null}}\n")
    with pytest.raises((SpecError, ValueError), match=r"cascade\[0\] \(a\): cm.variant"):
        toy_job(USER, CORPUS, labels=LABELS, extra="cascade:\n  - {name: a, cm: {variant: nope}}\n")


def test_a_dry_run_prices_each_stage_and_the_one_that_asks_nothing_at_nothing(toy_job, tmp_path, capsys):
    from runner.cli import main

    cascade_job(toy_job, "http://127.0.0.1:9/v1")  # nothing is called: no server needed
    assert main([str(tmp_path / "job.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    n_user, n_corpus = len(USER), len(CORPUS)
    assert "stage 1, neighbours" in out and "asks the model nothing" in out
    # the two model stages each price the whole user split and every corpus row's first call (counts,
    # second_call never: no second call), as if every row reached them
    expected = f"answers: estimate {n_user:,} + annotate {n_corpus:,} first + up to 0 second"
    assert out.count(expected) == 2
    assert "stage 3, api: openai fault-model" in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


async def test_after_a_run_a_dry_run_prices_each_stage_by_the_share_the_user_split_says_reaches_it(
    toy_job, tmp_path, api, capsys
):
    from runner.cli import main

    prices = ", prices: {prompt_per_million: 1000000, completion_per_million: 0}"  # a dollar a prompt token
    spec = cascade_job(toy_job, api.base_url, prices=prices)
    await run_job(spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
    capsys.readouterr()
    assert main([str(tmp_path / "job.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # by the toy's construction: the neighbours settle the easy texts, the scripted model the sure ones,
    # and nobody the unsure ones, which the last stage sees and leaves for review
    n = len(USER)
    easy, sure, unsure = len(USER_EASY) / n, len(USER_SURE) / n, len(USER_UNSURE) / n
    assert f"reaches 100.0% of the corpus, accepts {easy:.1%}" in out
    assert f"reaches {sure + unsure:.1%} of the corpus, accepts {sure:.1%}" in out
    assert f"reaches {unsure:.1%} of the corpus, accepts 0.0%" in out
    assert f"expected to go to review: {unsure:.1%}" in out
    # the last stage answers every user sample and the corpus rows that reach it; alone, every row
    reach = round(len(CORPUS) * unsure)
    assert f"answers: estimate {n:,} + annotate {reach:,} first + up to 0 second" in out

    def dollars(text: str) -> float:
        return float(text.split("$")[1].split()[0].rstrip(";,").replace(",", ""))

    priced = [dollars(line) for line in out.splitlines() if "at the configured prices" in line]
    assert len(priced) == 1  # the local stages carry no prices
    # a dollar a prompt token: the last stage's prompts alone, and every row's prompts at that stage
    total = dollars(out.split("the cascade: ")[1])
    assert total == priced[0] and "local stages not priced" in out
    every = dollars(out.split("last stage instead: ")[1])
    assert every > total


async def test_a_review_of_a_cascades_rows_comes_back_to_every_stage_as_its_own(toy_job, tmp_path, api, write):
    from runner.review import import_reviewed

    spec = cascade_job(toy_job, api.base_url)
    await run_job(spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
    first = pl.read_parquet(tmp_path / "out/annotations.parquet")
    unsure = first.filter(pl.col("stage") == "api")
    write(
        "reviewed.csv", "id,label\n" + "".join(f"{i},{y}\n" for i, y in zip(unsure["id"], unsure["gold"], strict=True))
    )
    import_reviewed(tmp_path / "out", tmp_path / "reviewed.csv", LABELS)
    await run_job(spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
    again = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert again.height == first.height and again["id"].n_unique() == first.height
    human = again.filter(pl.col("source") == "human")
    assert sorted(human["id"]) == sorted(unsure["id"]) and (human["y_hat"] == human["gold"]).all()
    # the api stage answered those rows: its fit counts its own answers on them; the others learn only
    # the texts and labels (the scripted model's answers on them were never given, the neighbours ask nothing)
    for stage, answered in (("api", len(USER) + unsure.height), ("scripted", len(USER)), ("neighbours", 0)):
        fitted = pickle.loads((tmp_path / "out/stages" / stage / "fitted_cm.pkl").read_bytes())["fitted"]
        assert fitted.counts.sum() == answered
        assert len(fitted.user_truths) == len(USER) + unsure.height


async def test_the_cost_per_accepted_row_counts_every_stages_calls(toy_job, tmp_path, api):
    spec = cascade_job(toy_job, api.base_url)
    result = await run_job(spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
    accepted = len(CORPUS_EASY) + len(CORPUS_SURE)
    corpus_calls = len(CORPUS_SURE) + 2 * len(CORPUS_UNSURE)  # the scripted stage's, then the api stage's
    assert result.metrics["per_accepted_row"]["calls"] == pytest.approx(corpus_calls / accepted)
    assert set(result.metrics["run"]["engines"]) == {"api"}  # the scripted engine keeps no API figures


async def test_a_local_stage_costs_the_seconds_its_engine_was_busy(toy_job, tmp_path, api):
    spec = cascade_job(toy_job, api.base_url)
    engine = ScriptedEngine(ANSWERS, n_labels=3, seconds_per_request=0.004)  # one request at a time
    result = await run_job(spec, engine=engine, embed=toy_embed)
    run = result.metrics["run"]
    # the neighbours share the job's engine and never ask it; the scripted stage's time is its requests'
    busy = len(engine.requests) * 0.004
    assert set(run["engine_seconds"]) == {"scripted", "api"}
    assert busy <= run["engine_seconds"]["scripted"] <= busy + 0.5
    assert 0 < run["engine_seconds"]["api"] < run["annotate_seconds"] + run["estimate_seconds"]
    accepted = len(CORPUS_EASY) + len(CORPUS_SURE)
    total = run["engine_seconds"]["scripted"] + run["engine_seconds"]["api"]
    assert result.metrics["per_accepted_row"]["engine_seconds"] == pytest.approx(total / accepted)
    from runner.report import summary_lines

    summary = "\n".join(summary_lines(result.metrics))
    assert f"calls, engine busy {run['engine_seconds']['scripted']:.1f} s" in summary
