"""Which vLLM exceptions become a row's error, without loading a model."""

from __future__ import annotations

import pytest

from runner.engines.base import ChoiceRequest, Message
from runner.engines.vllm import VLLMEngine, _rejection_errors
from runner.spec import VLLMEngineSpec

pytest.importorskip("vllm")


class _Raising:
    """Stands in for vLLM's AsyncLLM at the one call that fails: no real engine raises a bug on demand."""

    def __init__(self, error: Exception):
        self.error = error

    async def generate(self, prompt, sampling, request_id):
        raise self.error
        yield  # an async generator, as AsyncLLM.generate is


def _engine(error: Exception) -> VLLMEngine:
    engine = VLLMEngine(VLLMEngineSpec(model="smollm2-135m-instruct"))
    engine._engine, engine._tokenizer, engine._rejections = _Raising(error), None, _rejection_errors()
    return engine


REQUEST = ChoiceRequest((Message("user", "hello"),), ("a", "b"), max_tokens=4)


async def test_a_request_vllm_validates_away_is_that_rows_error():
    from vllm.exceptions import VLLMValidationError

    (completion,) = await _engine(VLLMValidationError("prompt too long")).complete([REQUEST])
    assert completion.text is None and not completion.retryable
    assert completion.error == "rejected by vLLM: prompt too long"


async def test_any_other_exception_inside_vllm_is_raised_not_recorded():
    with pytest.raises(ValueError, match="external_req_id"):
        await _engine(ValueError("The external_req_id field should not be set")).complete([REQUEST])
