"""Object storage: a job reading its data from and writing its output to S3 (a real local server, moto's)."""

import os
import socket
import subprocess
import sys

import boto3
import orjson
import polars as pl
import pytest

from runner import run_job
from runner._storage import ObjectPath
from runner.checkpoint import LOCK_NAME, Checkpoint, CheckpointError
from runner.data import DataError
from runner.pipeline import read_annotations
from tests._s3_server import ACCESS_KEY, SECRET_KEY
from tests.scripted_engine import ScriptedEngine

N_USER, N_CORPUS, CHUNK = 10, 23, 4
N_QUESTIONS = 6  # paper CM's held-out questions on this user split (as in test_checkpoint.py)
LABELS = ["a", "b", "c"]


@pytest.fixture
def job(toy_job, tmp_path):
    user = [(f"u{i}", LABELS[i % 3]) for i in range(N_USER)]
    corpus = [(f"c{i}", LABELS[i % 3]) for i in range(N_CORPUS)]
    spec = toy_job(user, corpus, name="storage", output=f"chunk_size: {CHUNK}")
    first = {f"{p}{i}": ("b" if i % 3 == 0 else "a") for p in "uc" for i in range(max(N_USER, N_CORPUS))}
    second = {f"c{i}": "c" for i in range(N_CORPUS)}
    return spec, lambda **kw: ScriptedEngine(first, second, n_labels=3, **kw)


def on_s3(spec, bucket, tmp_path, *, output="out"):
    """The same job with its two data files uploaded to ``bucket`` and its output there."""
    s3 = boto3.client("s3", region_name=os.environ["AWS_REGION"])
    name = bucket.removeprefix("s3://")
    for file in ("user.jsonl", "corpus.jsonl"):
        s3.upload_file(str(tmp_path / "data" / file), name, f"data/{file}")
    return spec.model_copy(
        update={
            "user_split": spec.user_split.model_copy(update={"path": f"{bucket}/data/user.jsonl"}),
            "corpus": spec.corpus.model_copy(update={"path": f"{bucket}/data/corpus.jsonl"}),
            "output": spec.output.model_copy(update={"dir": f"{bucket}/{output}"}),
        }
    )


def objects(bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", region_name=os.environ["AWS_REGION"])
    name = bucket.removeprefix("s3://")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]
    return {key: s3.get_object(Bucket=name, Key=key)["Body"].read() for key in keys}


async def test_a_job_on_s3_writes_what_the_same_job_writes_on_local_files(job, s3_bucket, tmp_path):
    spec, engine = job
    local = await run_job(spec, engine=engine())
    remote = await run_job(on_s3(spec, s3_bucket, tmp_path), engine=engine())

    assert str(remote.output_dir) == f"{s3_bucket}/out"
    assert read_annotations(remote.output_dir).equals(pl.read_parquet(tmp_path / "out/annotations.parquet"))
    assert remote.metrics["accuracy_cm"] == local.metrics["accuracy_cm"]
    stored = objects(s3_bucket)
    written = {key.removeprefix("out/") for key in stored if key.startswith("out/")}
    local_files = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    # the same files, but the lock (an object only while the job runs) and the engine log (kept locally)
    assert written == local_files - {LOCK_NAME, "engine.log"}
    manifest = orjson.loads(stored["out/manifest.json"])
    assert manifest["complete"] and manifest["finished_shards"]["annotate"] == list(range(-(-N_CORPUS // CHUNK)))
    assert manifest["files"]["corpus.path"]["path"] == f"{s3_bucket}/data/corpus.jsonl"
    for body in stored.values():  # credentials come from the environment and go nowhere
        assert SECRET_KEY.encode() not in body and ACCESS_KEY.encode() not in body


async def test_an_interrupted_job_on_s3_resumes_asking_only_what_was_in_flight(job, s3_bucket, tmp_path):
    spec, engine = job
    remote = on_s3(spec, s3_bucket, tmp_path)
    one_at_a_time = remote.model_copy(update={"output": remote.output.model_copy(update={"chunks_in_flight": 1})})
    # the estimate, the questions, chunks 0 and 1 (4 first + 2 and 4 first + 3 second calls), then chunk 2 dies
    with pytest.raises(RuntimeError, match="engine died"):
        await run_job(one_at_a_time, engine=engine(crash_after=N_USER + N_QUESTIONS + 4 + 2 + 4 + 3))
    manifest = orjson.loads(ObjectPath(f"{s3_bucket}/out/manifest.json").read_bytes())
    assert manifest["finished_shards"]["annotate"] == [0, 1] and not manifest["complete"]
    assert not ObjectPath(f"{s3_bucket}/out/{LOCK_NAME}").is_file()  # released as the job failed

    resumed_engine = engine()
    await run_job(remote, engine=resumed_engine)
    asked = [r.messages[-1].content for r in resumed_engine.requests]
    assert not any(t.startswith("u") for t in asked)  # the bank on S3 was reused, not estimated again
    assert set(asked) == {f"c{i}" for i in range(8, N_CORPUS)}  # finished chunks were not asked again
    annotations = read_annotations(f"{s3_bucket}/out")
    assert annotations["id"].to_list() == [str(i) for i in range(N_CORPUS)]  # every row exactly once
    await run_job(spec, engine=engine())  # the same job on local files, uninterrupted
    assert annotations.equals(pl.read_parquet(tmp_path / "out/annotations.parquet"))


async def test_review_export_and_import_on_a_job_on_s3(job, s3_bucket, tmp_path):
    from runner import cli

    spec, engine = job
    await run_job(on_s3(spec, s3_bucket, tmp_path), engine=engine())
    out = f"{s3_bucket}/out"
    assert cli.main(["review", "export", out, "-o", str(tmp_path / "review.csv")]) == 0
    review = pl.read_csv(tmp_path / "review.csv")
    assert review.height == pl.read_parquet(ObjectPath(f"{out}/review.parquet")).height > 0
    review.head(1).with_columns(pl.lit("a").alias("label")).write_csv(tmp_path / "reviewed.csv")
    assert cli.main(["review", "import", out, str(tmp_path / "reviewed.csv")]) == 0
    reviewed = pl.read_parquet(ObjectPath(f"{out}/reviewed.parquet"))
    assert reviewed.select("id", "label").rows() == [(str(review["id"][0]), "a")]


def test_the_lock_on_s3_refuses_a_second_run_naming_the_holder(job, s3_bucket):
    spec, _ = job
    directory = ObjectPath(f"{s3_bucket}/out")
    with Checkpoint(directory, spec).locked():
        holder = ObjectPath(f"{directory}/{LOCK_NAME}").read_text().splitlines()[0]
        assert holder == f"{os.getpid()}@{socket.gethostname()}"
        with (
            pytest.raises(CheckpointError, match=rf"another cm-run \({holder}\) is writing"),
            Checkpoint(directory, spec).locked(),
        ):
            pass
    assert not ObjectPath(f"{directory}/{LOCK_NAME}").is_file()
    with Checkpoint(directory, spec).locked():  # released: free again
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_on_its_host_only(job, s3_bucket):
    spec, _ = job
    directory = ObjectPath(f"{s3_bucket}/out")
    lock = ObjectPath(f"{directory}/{LOCK_NAME}")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_bytes(f"{gone.stdout.strip()}@{socket.gethostname()}\n".encode())  # as a SIGKILLed run leaves it
    with Checkpoint(directory, spec).locked():
        assert lock.read_text().splitlines()[0] == f"{os.getpid()}@{socket.gethostname()}"
    # our own pid but another start time: a restarted container whose new cm-run got the killed one's pid
    lock.write_bytes(f"{os.getpid()}@{socket.gethostname()}\n12345.000\n".encode())
    with Checkpoint(directory, spec).locked():
        pass
    lock.write_bytes(b"4242@another-node\n")  # another machine's: whether it runs cannot be seen from here
    with pytest.raises(CheckpointError, match=r"4242@another-node.*delete the lock object"):
        Checkpoint(directory, spec).locked().__enter__()
    assert lock.read_text().strip() == "4242@another-node"


async def test_a_missing_bucket_is_named_with_the_spec_key_and_url(job, s3_bucket, tmp_path):
    spec, engine = job
    remote = on_s3(spec, s3_bucket, tmp_path)

    def moved(section: str, key: str, value: str):
        return remote.model_copy(update={section: getattr(remote, section).model_copy(update={key: value})})

    no_bucket = "bucket 'no-such-bucket' does not exist"
    with pytest.raises(DataError, match=rf"^corpus\.path: s3://no-such-bucket/c\.jsonl: {no_bucket}"):
        await run_job(moved("corpus", "path", "s3://no-such-bucket/c.jsonl"), engine=engine())
    with pytest.raises(CheckpointError, match=rf"^output\.dir: s3://no-such-bucket/out: {no_bucket}"):
        await run_job(moved("output", "dir", "s3://no-such-bucket/out"), engine=engine())
    with pytest.raises(DataError, match=rf"{s3_bucket}/u\.jsonl: data file not found"):
        await run_job(moved("user_split", "path", f"{s3_bucket}/u.jsonl"), engine=engine())


async def test_missing_credentials_are_named_with_the_spec_key_and_url(job, s3_bucket, tmp_path, monkeypatch):
    from runner import _storage

    spec, engine = job
    remote = on_s3(spec, s3_bucket, tmp_path)
    local_output = remote.model_copy(update={"output": spec.output})
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    _storage._client.cache_clear()
    with pytest.raises(DataError, match=rf"^user_split\.path: {s3_bucket}/data/user\.jsonl: no S3 credentials found"):
        await run_job(local_output, engine=engine())
    with pytest.raises(CheckpointError, match=rf"^output\.dir: {s3_bucket}/out: no S3 credentials found"):
        await run_job(remote, engine=engine())


def test_a_dry_run_checks_the_s3_output_bucket_too(job, s3_bucket, tmp_path, capsys):
    from runner import cli

    spec, _ = job
    remote = on_s3(spec, s3_bucket, tmp_path)
    text = (tmp_path / "job.yaml").read_text()
    text = text.replace("path: user.jsonl", f"path: {remote.user_split.path}")
    text = text.replace("path: corpus.jsonl", f"path: {remote.corpus.path}")
    (tmp_path / "s3.yaml").write_text(text.replace(f"dir: {tmp_path / 'out'}", "dir: s3://no-such-bucket/out"))
    assert cli.main([str(tmp_path / "s3.yaml"), "--dry-run"]) == 2
    assert "output.dir: s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    (tmp_path / "ok.yaml").write_text(text.replace(f"dir: {tmp_path / 'out'}", f"dir: {s3_bucket}/out"))
    assert cli.main([str(tmp_path / "ok.yaml"), "--dry-run"]) == 0
    assert not objects(s3_bucket).keys() - {"data/user.jsonl", "data/corpus.jsonl"}  # a dry run writes nothing


def test_schemes_other_than_s3_are_refused_naming_the_key(toy_job, write, tmp_path):
    from runner import load_spec
    from runner.spec import SpecError

    toy_job([("u", "a")], [("c", "a")])
    text = (tmp_path / "job.yaml").read_text().replace("corpus: {path: corpus.jsonl}", "corpus: {path: gs://b/c.jsonl}")
    with pytest.raises(SpecError, match=r"corpus\.path: gs://b/c\.jsonl: the 'gs://' scheme is not supported"):
        load_spec(write("gs.yaml", text))
