"""The Batch API's file formats (pure) and the engine's record, without a server."""

from __future__ import annotations

import orjson
import pytest

from runner.engines._batch_record import BatchRecord, StoredAnswer
from runner.engines._batch_wire import custom_id, input_line, read_results, split_lines, validation_errors
from runner.engines._wire import request_body
from runner.engines.base import ChoiceRequest, Message

REQUEST = ChoiceRequest(messages=(Message("user", "turn on the lights"),), choices=("iot", "music"), max_tokens=8)


def test_an_input_line_carries_exactly_the_online_body():
    body = orjson.dumps(request_body("gpt-4o-mini", REQUEST, "json_schema"))
    line = orjson.loads(input_line("abc-0", body))
    assert line == {
        "custom_id": "abc-0",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": request_body("gpt-4o-mini", REQUEST, "json_schema"),
    }


def test_custom_ids_name_the_body_and_its_occurrence():
    body = orjson.dumps(request_body("m", REQUEST, "vllm_choice"))
    other = orjson.dumps(request_body("m", ChoiceRequest(REQUEST.messages, ("iot",)), "vllm_choice"))
    assert custom_id(body, 0) == custom_id(body, 0) != custom_id(body, 1)
    assert custom_id(body, 0).split("-")[0] != custom_id(other, 0).split("-")[0]
    assert len(custom_id(body, 12)) <= 64  # OpenAI's custom_id limit


def test_files_are_cut_at_the_line_and_byte_limits():
    lines = [(f"id{i}", b"x" * 10 + b"\n") for i in range(7)]  # 11 bytes each
    by_count = split_lines(lines, max_requests=3, max_bytes=10_000)
    assert [len(f) for f in by_count] == [3, 3, 1]
    by_bytes = split_lines(lines, max_requests=100, max_bytes=25)  # two lines (22 bytes) fit, three do not
    assert [len(f) for f in by_bytes] == [2, 2, 2, 1]
    assert [i for f in by_bytes for i, _ in f] == [i for i, _ in lines]
    with pytest.raises(ValueError, match=r"more than engine\.batch_max_bytes"):
        split_lines(lines, max_requests=100, max_bytes=5)


def test_output_and_error_lines_are_read_by_custom_id():
    answer = {"choices": [{"message": {"content": "iot"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
    lines = [
        {"custom_id": "b-0", "response": {"status_code": 500, "body": {"error": {"message": "oops"}}}, "error": None},
        {"custom_id": "a-0", "response": {"status_code": 200, "body": answer}, "error": None},
        {"custom_id": "c-0", "response": {"status_code": 400, "body": {"error": {"message": "too long"}}}},
        {"custom_id": "d-0", "response": None, "error": {"code": "batch_expired", "message": "not run"}},
    ]
    payload = b"".join(orjson.dumps(line) + b"\n" for line in lines) + b"\n{cut short"
    results = {r.custom_id: r for r in read_results(payload)}
    assert set(results) == {"a-0", "b-0", "c-0", "d-0"}
    assert (results["a-0"].text, results["a-0"].prompt_tokens, results["a-0"].completion_tokens) == ("iot", 7, 1)
    assert results["b-0"].text is None and results["b-0"].retryable and results["b-0"].kind == "http_500"
    assert results["c-0"].kind == "http_400" and not results["c-0"].retryable and "too long" in results["c-0"].error
    assert results["d-0"].kind == "batch_expired" and results["d-0"].retryable


def test_validation_errors_name_the_line():
    batch = {"errors": {"data": [{"code": "invalid_request", "message": "bad body", "line": 3}]}}
    assert validation_errors(batch) == ["line 3: invalid_request: bad body"]
    assert validation_errors({"errors": None}) == ["no reason given"]


def test_the_record_survives_a_reload_and_a_torn_last_answer(tmp_path):
    record = BatchRecord(tmp_path)
    entry = record.new_entry(["a-0", "b-0"], 100)
    entry.state, entry.input_file_id = "uploaded", "file-1"
    record.save()
    record.add_answers({"a-0": StoredAnswer(text="iot", prompt_tokens=5, completion_tokens=1)})
    with (tmp_path / "answers.jsonl").open("ab") as handle:
        handle.write(b'{"id": "b-0", "text": "mu')  # killed in the middle of an append
    again = BatchRecord(tmp_path)
    assert [(e.key, e.state, e.input_file_id) for e in again.batches] == [("b00001", "uploaded", "file-1")]
    assert again.ids(again.batches[0]) == ["a-0", "b-0"]
    assert set(again.answers) == {"a-0"} and again.answers["a-0"].text == "iot"


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        (b'{"id": "b-0", "text": "mu', {}),  # killed mid-append: b-0 was never counted, so it is asked again
        (b'{"id": "b-0", "text": "mu"}', {"b-0": "mu"}),  # killed before the newline: a whole answer
    ],
)
def test_an_append_after_a_torn_last_answer_keeps_every_record(tmp_path, tail, kept):
    first = StoredAnswer(text="iot", prompt_tokens=5, completion_tokens=1)
    (tmp_path / "answers.jsonl").write_bytes(
        orjson.dumps({"id": "a-0", **first.model_dump(exclude_defaults=True)}) + b"\n" + tail
    )
    record = BatchRecord(tmp_path)
    assert {line_id: a.text for line_id, a in record.answers.items()} == {"a-0": "iot", **kept}
    record.add_answers({"c-0": StoredAnswer(text="music", prompt_tokens=6, completion_tokens=2)})
    again = BatchRecord(tmp_path)
    assert {line_id: a.text for line_id, a in again.answers.items()} == {"a-0": "iot", **kept, "c-0": "music"}
    lines = (tmp_path / "answers.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(orjson.loads(line) for line in lines[:-1])  # nothing glued together
