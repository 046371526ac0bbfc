"""The OpenAI-compatible engine against the local fault-injecting server (real HTTP on 127.0.0.1, no mocks)."""

from __future__ import annotations

import asyncio
import time

import pytest

from runner.engines import make_engine
from runner.engines._limits import AdaptiveLimiter, RequestPacer, TokenBudget
from runner.engines._wire import classify_status, retry_after_seconds
from runner.engines.base import ChoiceRequest, EngineError, Message
from runner.engines.openai import OpenAIEngine
from runner.spec import OpenAIEngineSpec, Prices
from tests.fault_server import WRONG_LABEL, FaultConfig, FaultServer, expected_answer

KEY = "sk-test-SECRET123"
LABELS = ("alarm", "audio", "calendar", "iot", "music", "weather")


def ask(text: str, choices: tuple[str, ...] = LABELS, listed: tuple[str, ...] = LABELS) -> ChoiceRequest:
    system = "Classify the text.\n\nLabels:\n" + "\n".join(f"- {label}" for label in listed)
    return ChoiceRequest((Message("system", system), Message("user", text)), choices, max_tokens=8)


def engine_for(server: FaultServer, **options: object) -> OpenAIEngine:
    settings: dict[str, object] = {"kind": "openai", "model": "fault-model", "base_url": server.base_url}
    settings.update({"max_concurrency": 16, "timeout_seconds": 5, "max_retries": 3, **options})
    return OpenAIEngine(OpenAIEngineSpec.model_validate(settings), environ={"OPENAI_API_KEY": KEY})


@pytest.fixture
async def server():
    async with FaultServer(FaultConfig(latency=0.005, fault_retry_after=0.05, api_key=KEY)) as started:
        yield started


async def test_every_answer_comes_back_in_order_with_usage(server):
    texts = [f"utterance number {i}" for i in range(60)]
    async with engine_for(server) as engine:
        completions = await engine.complete([ask(text) for text in texts])
        stats = engine.stats()
    assert [c.text for c in completions] == [expected_answer(text, LABELS) for text in texts]
    assert all(c.error is None and c.prompt_tokens > 0 and c.completion_tokens > 0 for c in completions)
    assert stats["requests"] == 60 and stats["retries"] == 0 and stats["rows_answered"] == 60
    assert stats["prompt_tokens"] == sum(c.prompt_tokens for c in completions)
    assert server.counters.as_dict()["texts_answered_more_than_once"] == 0


async def test_vllm_choice_sends_the_allowed_answers_in_structured_outputs(server):
    # The prompt lists six labels, the request allows two: the server answers from what the body allows.
    texts = [f"set an alarm {i}" for i in range(12)]
    narrow = ("calendar", "weather")
    async with engine_for(server, structured_output="vllm_choice") as engine:
        constrained = await engine.complete([ask(text, narrow) for text in texts])
    async with engine_for(server, structured_output="none") as engine:
        unconstrained = await engine.complete([ask(text, narrow) for text in texts])
    assert [c.text for c in constrained] == [expected_answer(text, narrow) for text in texts]
    assert [c.text for c in unconstrained] == [expected_answer(text, LABELS) for text in texts]


async def test_json_schema_answers_are_parsed_back_to_the_bare_label(server):
    texts = [f"play some jazz {i}" for i in range(8)]
    async with engine_for(server, structured_output="json_schema") as engine:
        completions = await engine.complete([ask(text) for text in texts])
    assert [c.text for c in completions] == [expected_answer(text, LABELS) for text in texts]


async def test_transient_faults_are_retried_until_the_row_is_answered(server):
    texts = [
        "wake me [[503*2]]",
        "lights off [[500*1]]",
        "rain today [[drop*1]]",
        "louder [[malformed*1]]",
        "next song [[429*2]]",
        "my meetings [[slow*1]]",
        "plain one",
    ]
    server.config.slow_seconds = 2.0
    async with engine_for(server, timeout_seconds=0.5) as engine:
        completions = await engine.complete([ask(text) for text in texts])
        stats = engine.stats()
    assert [c.text for c in completions] == [expected_answer(text, LABELS) for text in texts]
    assert stats["retries"] == 8 and stats["requests"] == 15
    assert stats["attempt_errors"] == {
        "connection": 1,
        "http_429": 2,
        "http_500": 1,
        "http_503": 2,
        "malformed_response": 1,
        "timeout": 1,
    }
    assert stats["rows_failed"] == 0


async def test_a_row_that_exhausts_its_retries_is_returned_with_its_error(server):
    async with engine_for(server, max_retries=2) as engine:
        broken, fine = await engine.complete([ask("always fails [[500]]"), ask("fine")])
        stats = engine.stats()
    assert broken.text is None and broken.retryable
    assert broken.error.startswith("gave up after 3 attempt(s): http_500")
    assert fine.error is None and fine.text == expected_answer("fine", LABELS)
    assert server.counters.faults["500"] == 3  # max_retries=2: three attempts, not more
    assert stats["row_errors"] == {"http_500": 1}


async def test_a_bad_request_is_that_rows_error_and_is_not_retried(server):
    async with engine_for(server) as engine:
        rejected, fine = await engine.complete([ask("too long [[400]]"), ask("fine")])
    assert rejected.text is None and not rejected.retryable and rejected.error.startswith("http_400")
    assert fine.error is None
    assert server.counters.faults["400"] == 1


async def test_wrong_labels_come_back_as_raw_text_for_the_strategy_to_judge(server):
    async with engine_for(server) as engine:
        (completion,) = await engine.complete([ask("what [[wrong]]")])
    assert completion.error is None and completion.text == WRONG_LABEL


async def test_a_refused_key_stops_the_job_at_once_without_showing_the_key(server):
    engine = OpenAIEngine(
        OpenAIEngineSpec(kind="openai", model="m", base_url=server.base_url, api_key_env="CM_KEY", max_retries=5),
        environ={"CM_KEY": "sk-test-WRONG999"},
    )
    async with engine:
        with pytest.raises(EngineError) as raised:
            await engine.complete([ask(f"row {i}") for i in range(20)])
        with pytest.raises(EngineError):  # and every later call too
            await engine.complete([ask("later")])
    message = str(raised.value)
    assert "$CM_KEY" in message and "http_401" in message and "WRONG999" not in message
    assert server.counters.statuses["401"] <= 20  # no retries of a refused key


async def test_an_unreachable_server_stops_the_job(unused_tcp_port):
    spec = OpenAIEngineSpec(kind="openai", model="m", base_url=f"http://127.0.0.1:{unused_tcp_port}/v1", max_retries=1)
    async with OpenAIEngine(spec, environ={}) as engine:
        with pytest.raises(EngineError, match="cannot reach"):
            await engine.complete([ask("hello")])


def test_base_url_and_key_default_to_the_openai_environment_variables():
    spec = OpenAIEngineSpec(kind="openai", model="gpt-4o-mini")
    engine = OpenAIEngine(spec, environ={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1/", "OPENAI_API_KEY": KEY})
    assert engine.base_url == "http://127.0.0.1:9/v1" and engine.constraint == "vllm_choice"
    official = OpenAIEngine(spec, environ={})
    assert official.base_url == "https://api.openai.com/v1" and official.constraint == "json_schema"
    assert KEY not in repr(engine) and KEY not in str(engine.stats())
    assert isinstance(make_engine(spec), OpenAIEngine)


async def test_the_official_api_without_a_key_is_refused_before_any_call():
    with pytest.raises(EngineError, match=r"\$OPENAI_API_KEY is not set"):
        async with OpenAIEngine(OpenAIEngineSpec(kind="openai", model="gpt-4o-mini"), environ={}):
            pass


async def test_a_429_storm_slows_the_whole_dispatcher_and_loses_nothing():
    # The server allows 20 requests/s with almost no burst; the client has no limit configured.
    async with FaultServer(FaultConfig(latency=0.005, rpm=1200, burst_seconds=0.1)) as server:
        texts = [f"storm row {i}" for i in range(40)]
        async with engine_for(server, max_concurrency=16, max_retries=8) as engine:
            completions = await engine.complete([ask(text) for text in texts])
            stats = engine.stats()
    assert [c.text for c in completions] == [expected_answer(text, LABELS) for text in texts]
    assert stats["rate_limit_storms"] >= 1 and stats["lowest_concurrency_limit"] < 16
    assert server.counters.statuses["429"] == stats["attempt_errors"]["http_429"]


async def test_stats_estimate_the_cost_from_the_configured_prices(server):
    prices = Prices(prompt_per_million=1.0, completion_per_million=2.0)
    requests = [ask("one"), ask("two")]
    async with engine_for(server, prices=prices.model_dump()) as engine:
        await engine.complete(requests)
        stats = engine.stats()
    # the fault server reports usage as prompt characters // 4 + 1 and answer characters // 4 + 1
    prompt = sum(sum(len(m.content) for m in r.messages) // 4 + 1 for r in requests)
    completion = sum(len(expected_answer(r.messages[-1].content, LABELS)) // 4 + 1 for r in requests)
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (prompt, completion)
    assert stats["estimated_cost_usd"] == pytest.approx((prompt * 1.0 + completion * 2.0) / 1e6)


def test_retry_after_is_read_in_milliseconds_seconds_or_as_a_date():
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        *[(status, "Retryable") for status in (408, 409, 429, 500, 503)],
        *[(status, "Permanent") for status in (400, 422)],
        *[(status, "Fatal") for status in (401, 403, 404)],
    ],
)
def test_statuses_are_told_apart(status, kind):
    error = classify_status(status, {}, b'{"error": {"message": "no"}}')
    assert type(error).__name__ == f"{kind}Error" and str(error).endswith("no")


async def test_the_pacer_never_starts_more_than_a_window_allows():
    pacer = RequestPacer(per_minute=1800)  # 30 per one-second window
    stamps = []

    async def one() -> None:
        await pacer.wait()
        stamps.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(45)))
    assert len(stamps) == 45
    assert max(sum(1 for t in stamps if start <= t < start + 0.99) for start in stamps) <= 30


async def test_the_token_budget_is_corrected_by_reported_usage():
    budget = TokenBudget(per_minute=60_000)  # 1,000 tokens per one-second window
    await budget.spend(800)
    budget.correct(estimated=800, actual=300)  # the call used less than estimated: 500 come back
    assert budget.tokens == pytest.approx(700, abs=50)
    await budget.spend(5_000)  # bigger than a window: goes when the bucket is full, then owes
    assert budget.tokens < 0


async def test_the_limiter_shrinks_on_pressure_and_grows_back():
    limiter = AdaptiveLimiter(4)
    for _ in range(4):
        await limiter.acquire()
    limiter.shrink(factor=0.5)  # limit 2 with 4 in flight: nobody new gets in until two leave
    waiter = asyncio.ensure_future(limiter.acquire())
    limiter.release()
    await asyncio.sleep(0)
    assert not waiter.done() and limiter.lowest_limit == 2
    limiter.release()
    limiter.release()
    await asyncio.sleep(0)
    assert waiter.done() and limiter.in_flight == 2
    for _ in range(10):
        limiter.grow()
    assert limiter.limit == 4


async def test_a_retry_is_let_in_before_first_attempts_that_queued_earlier():
    limiter = AdaptiveLimiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def attempt(name: str, retry: bool) -> None:
        await limiter.acquire(first=retry)
        order.append(name)
        limiter.release()

    waiting = [asyncio.ensure_future(attempt(f"new {i}", retry=False)) for i in range(3)]
    await asyncio.sleep(0)
    waiting.append(asyncio.ensure_future(attempt("retry", retry=True)))
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.gather(*waiting)
    assert order == ["retry", "new 0", "new 1", "new 2"]  # its chunk is not held open behind newer rows


async def test_timeouts_at_a_saturated_server_lower_the_concurrency_instead_of_piling_on():
    # A CPU model server: 2 requests worked on at once, 0.1 s each, so 20 answered per second; the
    # rest queue. With 64 in flight and a 1 s timeout most would time out and be sent again into the
    # same queue (measured before this fix: 781 retries and 41 rows given up on for 120 calls).
    async with FaultServer(FaultConfig(latency=0.1, capacity=2)) as saturated:
        async with engine_for(saturated, max_concurrency=64, timeout_seconds=1.0, max_retries=8) as engine:
            completions = await engine.complete([ask(f"row {i}") for i in range(120)])
            stats = engine.stats()
        seen_by_server = saturated.counters.requests
    assert [c.text for c in completions] == [expected_answer(f"row {i}", LABELS) for i in range(120)]
    assert stats["calls"] == 120 and stats["rows_failed"] == 0
    # every attempt is a call or a retry, and the server saw each attempt once
    assert stats["requests"] == stats["calls"] + stats["retries"] == seen_by_server
    assert stats["retries"] == stats["attempt_errors"]["timeout"]
    # no more in flight than the server answers within the timeout: 2 / 0.1 s x 1 s = 20
    assert stats["lowest_concurrency_limit"] <= 20
    assert stats["retries"] < stats["calls"]


async def test_a_waiter_cancelled_after_release_passed_it_over_leaves_the_limiter_whole():
    limiter = AdaptiveLimiter(1)
    await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)  # queued
    waiter.cancel()  # its future is cancelled now; the task learns it on its next step
    limiter.release()  # ... and release() pops it first, finding it done
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.in_flight == 0 and not limiter._waiters
    await asyncio.wait_for(limiter.acquire(), timeout=1)  # the slot is free for the next one
    assert limiter.in_flight == 1


async def test_a_server_refusing_a_setting_on_every_request_stops_within_seconds_with_its_message():
    # Azure-like: every request carrying vLLM's structured_outputs is a 400
    config = FaultConfig(latency=0.005, reject_field="structured_outputs")
    async with FaultServer(config) as server, engine_for(server, max_concurrency=4) as engine:
        started = time.monotonic()
        with pytest.raises(EngineError) as raised:
            await engine.complete([ask(f"row {i}") for i in range(500)])
        elapsed = time.monotonic() - started
    message = str(raised.value)
    assert "Unrecognized request argument supplied: structured_outputs" in message
    assert "engine.structured_output" in message and "rerun" in message
    assert elapsed < 5 and server.counters.requests <= 10  # five alike, and the four in flight then
    assert server.counters.answered == 0


async def test_a_server_that_starts_refusing_everything_mid_job_stops_it(server):
    async with engine_for(server, max_concurrency=4) as engine:
        answered = await engine.complete([ask(f"early {i}") for i in range(30)])
        assert all(c.error is None for c in answered)
        server.config.reject_field = "structured_outputs"
        with pytest.raises(EngineError, match="refused every request alike"):
            await engine.complete([ask(f"late {i}") for i in range(500)])
    assert server.counters.statuses["400"] <= 30  # a window's worth, not 500


async def test_refusals_with_no_answer_to_judge_them_by_are_kept_for_a_rerun(server):
    # Two rows, both refused, nothing answered: the row's fault or the server's cannot be told yet.
    async with engine_for(server) as engine:
        first = await engine.complete([ask("too long [[400]]"), ask("also too long [[400]]")])
        assert all(c.text is None and c.retryable for c in first)
        # Once the server answers others, a refusal is the row's own and is not asked again.
        later = await engine.complete([ask("long again [[400]]"), ask("fine")])
    assert later[0].text is None and not later[0].retryable and later[0].error.startswith("http_400")
    assert later[1].text == expected_answer("fine", LABELS)


async def test_a_spent_quota_stops_the_job_without_retrying(server):
    async with engine_for(server, max_retries=5) as engine:
        with pytest.raises(EngineError, match=r"quota is spent.*insufficient_quota.*rerun the same command"):
            await engine.complete([ask("no money [[quota]]")])
    assert server.counters.faults["quota"] == 1


@pytest.mark.parametrize("status", ["401", "403"])
async def test_a_key_refused_mid_job_stops_it_as_resumable_without_retrying(server, status):
    async with engine_for(server, max_retries=5) as engine:
        fine = await engine.complete([ask(f"fine {i}") for i in range(5)])
        assert all(c.error is None for c in fine)
        with pytest.raises(EngineError, match=rf"http_{status}.*rerun the same command to resume"):
            await engine.complete([ask(f"refused [[{status}]]")])
    assert server.counters.faults[status] == 1


def test_azure_openai_hosts_get_json_schema_answers():
    spec = OpenAIEngineSpec(kind="openai", model="gpt-4o-mini", base_url="https://x.openai.azure.com/openai/v1")
    assert OpenAIEngine(spec, environ={"OPENAI_API_KEY": KEY}).constraint == "json_schema"


async def test_a_job_against_a_server_refusing_everything_stops_and_records_no_row_as_rejected(toy_job, tmp_path):
    import polars as pl

    from runner import run_job

    corpus = [(f"corpus row {i}", LABELS[i % 6]) for i in range(40)]
    async with FaultServer(FaultConfig(latency=0.005, reject_field="structured_outputs")) as server:
        engine = f"{{kind: openai, model: m, base_url: '{server.base_url}', structured_output: vllm_choice}}"
        spec = toy_job(
            corpus[:6],
            corpus,
            output="chunk_size: 2, chunks_in_flight: 1",
            extra=f"engine: {engine}\ncm: {{enabled: false, accept: null}}",  # no estimate: the corpus is refused
        )
        with pytest.raises(EngineError, match="refused every request alike"):
            await run_job(spec)
    shards = sorted((tmp_path / "out/annotations").glob("*.parquet"))
    written = pl.concat([pl.read_parquet(shard) for shard in shards])
    # one chunk at a time: the first two chunks came back with nothing answered to judge their refusals by
    assert written.height == 4 and written["error_kind"].to_list() == ["engine"] * 4  # asked again by a rerun
    assert server.counters.requests == 6  # the fifth refusal alike stopped it; its chunk-mate was in flight
