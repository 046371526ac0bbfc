from pathlib import Path

import pytest

from runner.spec import JobSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DATASETS = "s3://my-cm-runner-bucket/datasets/"  # deploy/README.md's placeholder bucket
JOB_FILES = sorted(p for p in (REPO / "jobs").rglob("*.yaml") if "_base" not in p.parts)

MINIMAL = """
name: toy
dataset: {name: toy}
user_split: {path: train.jsonl}
corpus: {path: test.jsonl}
output: {dir: out}
"""


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_job_spec_is_valid(path, data_dir):
    spec = load_spec(path)
    for key, relative in (("user_split.path", spec.user_split.path), ("corpus.path", spec.corpus.path)):
        if relative.startswith(CLUSTER_DATASETS):
            # a cluster spec reads the datasets folder as deploy/README.md uploads it to the bucket
            assert (Path(data_dir) / relative.removeprefix(CLUSTER_DATASETS)).is_file(), key
        else:
            assert spec.resolve_data_path(relative, data_dir).is_file(), key


def test_paper_datasets_have_1_and_5_percent_specs():
    names = {p.stem for p in JOB_FILES}
    for dataset in [
        "banking77",
        "clinc150",
        "massive-en-US",
        "massive-de-DE",
        "massive-fr-FR",
        "mtop",
        "stackexchange",
    ]:
        assert {f"{dataset}-1pct", f"{dataset}-5pct"} <= names, dataset


def test_minimal_spec_gets_defaults(write):
    spec = load_spec(write("job.yaml", MINIMAL))
    assert spec.user_split.fraction == 0.05 and spec.strategy.name == "zero_shot"
    assert spec.engine.kind == "vllm" and spec.engine.model == "smollm2-135m-instruct"
    assert spec.cm.empty_row == "keep_initial"


def test_unknown_key_is_named_with_the_file(write):
    path = write("job.yaml", MINIMAL + "engine: {kind: vllm, modle: x}\n")
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert str(path) in str(error.value) and "engine.modle: unknown key" in str(error.value)


def test_missing_key_is_named(write):
    path = write("job.yaml", MINIMAL.replace("output: {dir: out}\n", ""))
    with pytest.raises(SpecError, match="output: missing required key"):
        load_spec(path)


def test_mistyped_value_is_named(write):
    path = write("job.yaml", MINIMAL + "generation: {max_tokens: lots}\n")
    with pytest.raises(SpecError, match=r"generation.max_tokens: .*'lots'"):
        load_spec(path)


def test_fraction_out_of_range(write):
    path = write("job.yaml", MINIMAL.replace("{path: train.jsonl}", "{path: train.jsonl, fraction: 5}"))
    with pytest.raises(SpecError, match=r"user_split\.fraction"):
        load_spec(path)


def test_malformed_yaml_names_the_line(write):
    path = write("job.yaml", "name: toy\ndataset: {name: [toy\n")
    with pytest.raises(SpecError, match=r"job.yaml: line \d+, column \d+: malformed YAML"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_base_spec_is_deep_merged(write):
    write("base/common.yaml", MINIMAL + "engine: {kind: vllm, model: a-model, max_concurrency: 8}\n")
    spec = load_spec(write("job.yaml", "base: base/common.yaml\nname: child\nengine: {model: b-model}\n"))
    assert spec.name == "child" and spec.engine.model == "b-model" and spec.engine.max_concurrency == 8


def test_base_loop_is_an_error(write):
    write("a.yaml", "base: b.yaml\n")
    path = write("b.yaml", "base: a.yaml\n")
    with pytest.raises(SpecError, match="loops"):
        load_spec(path)


def test_label_descriptions_must_name_listed_labels(write):
    body = MINIMAL.replace("dataset: {name: toy}", "dataset: {name: toy, labels: [a, b], label_descriptions: {c: x}}")
    with pytest.raises(SpecError, match=r"not in dataset.labels: \['c'\]"):
        load_spec(write("job.yaml", body))


def test_data_dir_resolution_order(write, tmp_path, monkeypatch):
    spec = load_spec(write("job.yaml", MINIMAL + "data_dir: /from/spec\n"))
    monkeypatch.delenv("CM_DATA_DIR", raising=False)
    assert spec.resolve_data_path("x.jsonl") == Path("/from/spec/x.jsonl")
    monkeypatch.setenv("CM_DATA_DIR", "/from/env")
    assert spec.resolve_data_path("x.jsonl") == Path("/from/env/x.jsonl")
    assert spec.resolve_data_path("x.jsonl", "/from/flag") == Path("/from/flag/x.jsonl")
    assert spec.resolve_data_path("/abs/x.jsonl") == Path("/abs/x.jsonl")


def test_relative_path_without_data_dir_is_an_error(write, monkeypatch):
    monkeypatch.delenv("CM_DATA_DIR", raising=False)
    spec = load_spec(write("job.yaml", MINIMAL))
    with pytest.raises(SpecError, match="no data directory is set"):
        spec.resolve_data_path("train.jsonl")


def test_a_spec_reads_back_as_written_with_numbers_typed(write):
    body = MINIMAL.replace("{path: train.jsonl}", "{path: train.jsonl, fraction: 0.01, seed: 7}")
    body += "generation: {temperature: 0, max_tokens: 16}\nengine: {kind: openai, model: gpt-4o-mini}\n"
    spec = load_spec(write("job.yaml", body))
    dumped = spec.model_dump(mode="json")
    assert dumped["user_split"] == {"path": "train.jsonl", "fraction": 0.01, "seed": 7, "stratified": True}
    assert dumped["generation"] == {"temperature": 0.0, "max_tokens": 16, "seed": 0}
    assert type(spec.generation.temperature) is float  # YAML's 0 is an int; the spec says a float
    assert dumped["engine"]["kind"] == "openai" and dumped["engine"]["base_url"] is None
    assert JobSpec.model_validate(dumped) == spec  # what a manifest records loads back to the same spec
