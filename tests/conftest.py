from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Read once, then unset for every test (fixtures of any scope, and subprocesses they start):
# $CM_DATA_DIR overrides a spec's own data_dir by design, and many tests write small datasets of
# their own. Tests that want the real datasets take the `data_dir` fixture.
DATA_DIR = Path(os.environ.pop("CM_DATA_DIR", None) or REPO.parent / "shared" / "datasets")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets: $CM_DATA_DIR, else ../shared/datasets beside the checkout."""
    if not (DATA_DIR / "massive").is_dir():
        pytest.fail(f"datasets not found at {DATA_DIR}: set CM_DATA_DIR")
    return DATA_DIR


@pytest.fixture
def write(tmp_path: Path):
    """Write a text file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


@pytest.fixture
def toy_job(tmp_path: Path, write):
    """A job over two small jsonl files under tmp_path/data, written from (text, label) rows; returns its spec.

    ``labels`` fixes the label set (else the rows' labels); ``output`` adds keys to the output
    mapping ("chunk_size: 4"); ``extra`` is more top-level YAML ("strategy: ...", "cm: ...").
    Output goes to tmp_path/out.
    """
    import orjson

    from runner import load_spec
    from runner.spec import JobSpec

    def _toy_job(user, corpus, *, name="toy", labels=None, output="", extra="") -> JobSpec:
        for file, rows in (("user.jsonl", user), ("corpus.jsonl", corpus)):
            write(f"data/{file}", "".join(orjson.dumps({"text": t, "label": y}).decode() + "\n" for t, y in rows))
        dataset = f"{{name: toy, labels: [{', '.join(labels)}]}}" if labels else "{name: toy}"
        more_output = f", {output}" if output else ""
        job = f"""
name: {name}
data_dir: {tmp_path / "data"}
dataset: {dataset}
user_split: {{path: user.jsonl, fraction: null}}
corpus: {{path: corpus.jsonl}}
output: {{dir: {tmp_path / "out"}{more_output}}}
{extra}
"""
        return load_spec(write("job.yaml", job))

    return _toy_job


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto's) on 127.0.0.1 for the session; stopped at the end."""
    from tests._s3_server import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> str:
    """The AWS environment pointed at the local S3 server, and a fresh bucket; returns ``s3://bucket``."""
    import re

    from runner import _storage
    from tests._s3_server import environment, make_bucket

    for name, value in environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    _storage._client.cache_clear()  # a client reads the environment once: this test's
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-" + str(id(request) % 10_000)
    make_bucket(bucket)
    yield f"s3://{bucket}"
    _storage._client.cache_clear()
