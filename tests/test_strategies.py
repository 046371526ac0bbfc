"""The prompt strategies' logic on a scripted engine: requests, calls and tokens counted, votes, rounds, parsing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import pytest

from runner import run_job
from runner.engines.base import ChoiceRequest, Completion
from runner.examples import ExamplePool, examples_for_jobs
from runner.labels import LabelSet
from runner.prompts import ANSWER_AFTER_FEEDBACK, ANSWER_AFTER_REASONING, REASONING_REQUEST
from runner.spec import GenerationSpec, SpecError, StrategySpec
from runner.strategies import FewShot, SelfConsistency, make_strategy

LABELS = LabelSet.build(["alarm", "iot", "music", "news"])
GREEDY = GenerationSpec(temperature=0.0, max_tokens=8, seed=0)


class Script:
    """An engine whose answer is a function of the whole request; every request is kept."""

    model_id = "script"

    def __init__(self, answer: Callable[[ChoiceRequest], str | Completion]):
        self.answer = answer
        self.requests: list[ChoiceRequest] = []

    async def __aenter__(self) -> Script:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def complete(self, requests: Sequence[ChoiceRequest]) -> list[Completion]:
        self.requests.extend(requests)
        out = []
        for request in requests:
            answer = self.answer(request)
            out.append(answer if isinstance(answer, Completion) else Completion(answer, 10, 2))
        return out


def strategy(**fields: object) -> object:
    return make_strategy(StrategySpec(**fields), LABELS, GREEDY)


def user_text(request: ChoiceRequest) -> str:
    """The text being labelled: the turn carrying the reasoning request, else the last turn."""
    for message in request.messages:
        if message.content.endswith(REASONING_REQUEST):
            return message.content.removesuffix(f"\n\n{REASONING_REQUEST}")
    return request.messages[-1].content


async def test_zero_shot_is_one_constrained_call():
    engine = Script(lambda r: "Music.")  # robust parsing: case and punctuation
    [answer] = await strategy(name="zero_shot").classify(engine, ["play jazz"], [LABELS.labels])
    assert (answer.label, answer.calls, answer.prompt_tokens, answer.completion_tokens) == ("music", 1, 10, 2)
    assert engine.requests[0].choices == LABELS.shown


# --- few-shot --------------------------------------------------------------------------------------------------

POOL_TEXTS = ["wake me at six", "lights off", "play jazz", "news today", "set an alarm", "play rock"]
POOL_LABELS = ["alarm", "iot", "music", "news", "alarm", "music"]


def keyword_embedder(texts: Sequence[str]) -> np.ndarray:
    """Deterministic stand-in for the sentence model: shared words make texts close."""
    vocabulary = sorted({word for text in POOL_TEXTS for word in text.split()} | {"jazz", "play", "alarm"})
    rows = np.array([[float(word in text.split()) for word in vocabulary] for text in texts]) + 1e-3
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def examples_shown(request: ChoiceRequest) -> list[tuple[str, str]]:
    turns = request.messages[1:-1]
    return [(turns[i].content, turns[i + 1].content) for i in range(0, len(turns), 2)]


async def test_few_shot_random_shows_the_same_examples_and_never_the_text_itself():
    pool = ExamplePool(POOL_TEXTS, POOL_LABELS, seed=3)
    few = FewShot(LABELS, GREEDY, pool, k=3, selection="random")
    engine = Script(lambda r: "alarm")
    answers = await few.classify(engine, ["something new", "play jazz"], [LABELS.labels] * 2)
    assert [a.calls for a in answers] == [1, 1]
    fresh, own = (examples_shown(r) for r in engine.requests)
    assert len(fresh) == 3 and len({text for text, _ in fresh}) == 3
    assert "play jazz" not in [text for text, _ in own]  # the item itself is left out ...
    assert [e for e in fresh if e[0] != "play jazz"][:2] == own[:2]  # ... the fixed order otherwise kept
    assert all(label in LABELS.shown for _, label in fresh)


async def test_few_shot_nearest_picks_similar_allowed_examples_closest_last():
    pool = ExamplePool(POOL_TEXTS, POOL_LABELS, embedder=keyword_embedder)
    few = FewShot(LABELS, GREEDY, pool, k=2, selection="nearest")
    engine = Script(lambda r: "music")
    await few.classify(engine, ["play jazz", "play jazz"], [LABELS.labels, ["alarm", "news"]])
    everything, restricted = (examples_shown(r) for r in engine.requests)
    assert everything[-1] == ("play rock", "music")  # nearest, and not 'play jazz' itself
    assert "play jazz" not in [text for text, _ in everything]
    assert {label for _, label in restricted} <= {"alarm", "news"}  # CM's second call: only candidates


async def test_few_shot_needs_a_pool():
    with pytest.raises(SpecError, match="example pool"):
        make_strategy(StrategySpec(name="few_shot"), LABELS, GREEDY)


USER = [("u1", "alarm"), ("u2", "iot"), ("u3", "music"), ("u4", "music"), ("u5", "news")]


@pytest.fixture
def strategy_job(toy_job):
    def spec(strategy: str) -> object:
        labels = ["alarm", "iot", "music", "news"]
        return toy_job(USER, USER, labels=labels, output="chunk_size: 2", extra=f"strategy: {strategy}")

    return spec


async def test_few_shot_in_a_job_never_shows_a_user_sample_its_own_label(strategy_job):
    spec = strategy_job("{name: few_shot, k: 10, selection: random}")
    pool = ExamplePool([t for t, _ in USER], [y for _, y in USER])
    engine = Script(lambda r: "music")
    with examples_for_jobs(pool):
        result = await run_job(spec, engine=engine)
    assert result.metrics["n_user"] == 5
    for request in engine.requests:  # estimate, first and second calls alike
        shown = [text for text, _ in examples_shown(request)]
        assert user_text(request) not in shown
        assert len(shown) == len([y for t, y in USER if t != user_text(request) and y in _allowed(request)])


async def test_few_shot_in_a_plain_job_draws_examples_from_its_user_split(strategy_job):
    spec = strategy_job("{name: few_shot, k: 10, selection: random}")
    engine = Script(lambda r: "music")
    result = await run_job(spec, engine=engine)  # no grid, no pool handed in
    assert result.metrics["n_annotated"] > 0
    estimate_requests = [r for r in engine.requests if user_text(r) in {t for t, _ in USER}]
    assert estimate_requests and all(examples_shown(r) for r in estimate_requests)
    assert all(user_text(r) not in [t for t, _ in examples_shown(r)] for r in engine.requests)


def _allowed(request: ChoiceRequest) -> set[str]:
    return {LABELS.parse(shown) for shown in request.choices}


# --- chain of thought ------------------------------------------------------------------------------------------


async def test_chain_of_thought_reasons_freely_then_answers_from_the_allowed_labels():
    def answer(request: ChoiceRequest) -> str:
        if not request.choices:
            return "The text asks for a song, so it is about music."
        return " **music**\n"

    engine = Script(answer)
    cot = strategy(name="chain_of_thought", reasoning_max_tokens=40)
    [result] = await cot.classify(engine, ["play jazz"], [["music", "news"]])
    assert (result.label, result.calls, result.prompt_tokens, result.completion_tokens) == ("music", 2, 20, 4)
    thinking, final = engine.requests
    assert thinking.choices == () and thinking.max_tokens == 40 and REASONING_REQUEST in thinking.messages[-1].content
    assert final.choices == ("music", "news") and final.max_tokens == GREEDY.max_tokens
    assert final.messages[: len(thinking.messages)] == thinking.messages  # same prefix: cached by the engine
    assert (
        final.messages[-2].content.startswith("The text asks") and final.messages[-1].content == ANSWER_AFTER_REASONING
    )


async def test_chain_of_thought_failures_are_counted_and_kinded():
    failing = Completion(None, error="timed out")
    engine = Script(lambda r: failing if not r.choices else "music")
    [result] = await strategy(name="chain_of_thought").classify(engine, ["x"], [LABELS.labels])
    assert (result.label, result.calls, result.error_kind) == (None, 1, "engine")
    engine = Script(lambda r: "thinking" if not r.choices else "weather")  # not an allowed label
    [result] = await strategy(name="chain_of_thought").classify(engine, ["x"], [LABELS.labels])
    assert (result.label, result.calls, result.error_kind) == (None, 2, "unparsed")


# --- self-consistency ------------------------------------------------------------------------------------------


def by_seed(answers: dict[int, str]) -> Script:
    return Script(lambda r: answers[r.seed])


async def test_self_consistency_samples_with_distinct_seeds_and_takes_the_majority():
    engine = by_seed({0: "iot", 1: "music", 2: "music", 3: "alarm", 4: "music"})
    sc = strategy(name="self_consistency", n_samples=5, temperature=0.8)
    [answer] = await sc.classify(engine, ["play jazz"], [LABELS.labels])
    assert answer.label == "music" and answer.calls == 5 and answer.prompt_tokens == 50
    assert sorted(r.seed for r in engine.requests) == [0, 1, 2, 3, 4]
    assert {r.temperature for r in engine.requests} == {0.8}
    assert answer.raw == "music: 3, iot: 1, alarm: 1"


async def test_self_consistency_breaks_ties_by_label_order():
    engine = by_seed({0: "news", 1: "iot", 2: "news", 3: "iot"})
    sc = strategy(name="self_consistency", n_samples=4)
    [answer] = await sc.classify(engine, ["x"], [LABELS.labels])
    assert answer.label == "iot"  # iot is listed before news
    [answer] = await sc.classify(engine, ["x"], [["news", "iot"]])
    assert answer.label == "news"  # ... unless the allowed labels list news first


async def test_self_consistency_counts_a_failed_sample_as_a_failure():
    engine = Script(lambda r: Completion(None, error="timed out") if r.seed == 1 else "music")
    [answer] = await strategy(name="self_consistency", n_samples=3).classify(engine, ["x"], [LABELS.labels])
    assert (answer.label, answer.error_kind, answer.calls) == (None, "engine", 3)


async def test_self_consistency_can_sample_reasoning_paths():
    engine = Script(lambda r: "because" if not r.choices else "alarm")
    sc = strategy(name="self_consistency", n_samples=3, sample_with="chain_of_thought")
    [answer] = await sc.classify(engine, ["x"], [LABELS.labels])
    assert isinstance(sc, SelfConsistency) and answer.label == "alarm" and answer.calls == 6
    assert sum(1 for r in engine.requests if not r.choices) == 3


# --- self-refine -----------------------------------------------------------------------------------------------


async def test_self_refine_stops_when_the_answer_is_kept():
    engine = Script(lambda r: "Looks right." if not r.choices else "music")
    [answer] = await strategy(name="self_refine", max_rounds=3).classify(engine, ["play jazz"], [LABELS.labels])
    assert (answer.label, answer.calls) == ("music", 3)  # draft, feedback, same answer: done


async def test_self_refine_rounds_are_bounded():
    flips = iter(["alarm", "iot", "music", "news", "alarm", "iot"])
    engine = Script(lambda r: "Try another label." if not r.choices else next(flips))
    [answer] = await strategy(name="self_refine", max_rounds=2).classify(engine, ["x"], [LABELS.labels])
    assert answer.calls == 1 + 2 * 2 and answer.label == "music"
    last = engine.requests[-1]
    assert last.messages[-1].content == ANSWER_AFTER_FEEDBACK
    assert [m.content for m in last.messages if m.role == "assistant"] == [
        "alarm",
        "Try another label.",
        "iot",
        "Try another label.",
    ]


async def test_self_refine_draft_is_the_zero_shot_request():
    engine = Script(lambda r: "fine" if not r.choices else "alarm")
    await strategy(name="self_refine").classify(engine, ["x"], [LABELS.labels])
    zero = strategy(name="zero_shot").request("x", LABELS.labels)
    assert engine.requests[0] == zero  # so a request cache answers it from zero-shot runs


# --- composed with CM ------------------------------------------------------------------------------------------


async def test_cm_second_pass_runs_the_whole_strategy_on_the_candidates(strategy_job, tmp_path):
    # first answers: every 'u*' text is called 'music' first, so row music of M = {iot, music} after estimation
    def answer(request: ChoiceRequest) -> str:
        if not request.choices:
            return "hmm"
        allowed = _allowed(request)
        if allowed == set(LABELS.labels):
            return "alarm" if user_text(request) == "u1" else "music"
        return "iot" if "iot" in allowed else "music"

    spec = strategy_job("{name: chain_of_thought}")
    engine = Script(answer)
    await run_job(spec, engine=engine)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    restricted = [set(r.choices) for r in engine.requests if r.choices and set(r.choices) != set(LABELS.shown)]
    # first, the held-out questions: u2..u5 answered music, and row music of M without each of them is
    questions = [{"music", "news"}, {"iot", "music", "news"}, {"iot", "music", "news"}, {"iot", "music"}]
    assert sorted(map(sorted, restricted[:4])) == sorted(map(sorted, questions))
    # then the corpus's second calls, among the whole row
    assert restricted[4:] and all(choices == {"iot", "music", "news"} for choices in restricted[4:])
    # one CoT pass (2 calls) where the row has one candidate, two passes (4 calls) otherwise
    assert table["calls"].to_list() == [2, 4, 4, 4, 4]
