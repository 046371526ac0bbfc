"""The embedded vLLM engine on the real SmolLM2 model (loads once for the module, ~40 s on 2 cores)."""

import pytest
import pytest_asyncio

from runner.engines.base import ChoiceRequest, Message
from runner.engines.vllm import VLLMEngine, render_prompt
from runner.labels import LabelSet
from runner.prompts import classification_messages
from runner.spec import VLLMEngineSpec

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

SCENARIOS = LabelSet.build(["alarm", "audio", "calendar", "iot", "music", "weather"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    async with VLLMEngine(VLLMEngineSpec(model="smollm2-135m-instruct", max_model_len=1024)) as started:
        yield started


def ask(text, labels=SCENARIOS.shown, **options):
    return ChoiceRequest(classification_messages(text, labels), tuple(labels), **options)


async def test_answers_are_constrained_to_the_choices(engine):
    texts = ["wake me up at seven", "turn off the kitchen lights", "will it rain tomorrow", "play some jazz"]
    completions = await engine.complete([ask(text) for text in texts])
    assert [c.error for c in completions] == [None] * 4
    assert all(c.text in SCENARIOS.shown for c in completions)
    assert all(c.prompt_tokens > 20 and c.completion_tokens >= 1 for c in completions)
    # two labels only: the answer must be one of those two, whatever the model prefers
    narrow = await engine.complete([ask(text, ["calendar", "weather"]) for text in texts])
    assert {c.text for c in narrow} <= {"calendar", "weather"}


async def test_greedy_decoding_is_deterministic(engine):
    batch = [ask("set an alarm for 6 am"), ask("lower the volume")] * 3
    first = [c.text for c in await engine.complete(batch)]
    second = [c.text for c in await engine.complete(batch)]
    assert first == second and first[0] == first[2] == first[4]


async def test_prompt_uses_the_models_chat_template(engine):
    prompt = render_prompt(engine._tokenizer, (Message("system", "S"), Message("user", "U")))
    assert "<|im_start|>system\nS<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


async def test_a_prompt_past_the_context_is_an_error_row_not_a_crash(engine):
    too_long = ask("word " * 3000)
    ok, failed = await engine.complete([ask("play music"), too_long])
    assert ok.error is None and ok.text in SCENARIOS.shown
    assert failed.text is None and "rejected by vLLM" in failed.error


async def test_an_answer_carries_the_models_own_probability_of_it(engine):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    request = ask("wake me up at seven")
    (completion,) = await engine.complete([request])
    assert completion.logprob is not None and completion.logprob < 0
    # Worked out apart with transformers: vLLM reports log probabilities after the choice constraint has masked
    # the logits, so at each step the next token's probability is taken among the tokens that keep the text a
    # prefix of some label, and the steps' log probabilities are summed until the label is complete.
    tokenizer = engine._tokenizer
    model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32)
    pieces = {token: tokenizer.decode([token]) for token in range(len(tokenizer))}
    ids = tokenizer(render_prompt(tokenizer, request.messages), add_special_tokens=False)["input_ids"]
    spelled, expected = "", 0.0
    while spelled != completion.text:
        allowed = [
            t for t, piece in pieces.items() if piece and any(c.startswith(spelled + piece) for c in request.choices)
        ]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        steps = torch.log_softmax(logits[allowed], dim=-1)
        chosen = max(
            (i for i, t in enumerate(allowed) if completion.text.startswith(spelled + pieces[t])),
            key=lambda i: float(steps[i]),
        )
        expected += float(steps[chosen])
        spelled += pieces[allowed[chosen]]
        ids.append(allowed[chosen])
    assert math.isclose(completion.logprob, expected, abs_tol=0.15), (completion.logprob, expected)  # bf16 vs fp32


async def test_on_a_cpu_the_kv_cache_has_the_fixed_size_not_a_profiled_one(engine):
    config = engine._engine.vllm_config.cache_config
    assert config.kv_cache_memory_bytes == 2 * 2**30  # engine.kv_cache_gib unset: 2 GiB on a CPU
    # SmolLM2: 30 layers x K and V x 3 KV heads x 64 dims, per token, in the engine's dtype
    bytes_per_token = 30 * 2 * 3 * 64 * (2 if engine.dtype.dtype == "bfloat16" else 4)
    block_bytes = config.block_size * bytes_per_token
    assert config.num_gpu_blocks * block_bytes <= 2 * 2**30 < (config.num_gpu_blocks + 1) * block_bytes


async def test_on_two_cores_the_engines_compute_threads_use_both(engine):
    import os

    usable = os.sched_getaffinity(0)
    if len(usable) > 2:
        pytest.skip("more than 2 cores: vLLM's own default (one core reserved) applies")
    worker = [p for p in engine._spawned if p.name() == "VLLM::Worker"]
    assert len(worker) == 1
    # vLLM pins each OpenMP thread to one core; with one core reserved they would all sit on the same one
    pinned = set().union(*(os.sched_getaffinity(t.id) for t in worker[0].threads()))
    assert pinned == usable
