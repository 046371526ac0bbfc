"""Object storage: a job reading its data from and writing its output to S3 (a real local server, moto's)."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


LEASE = 2.0  # seconds: renewed every 0.67 s; a lease left unrenewed is taken over after 3 s (the store's clock)
ME = f"{os.getpid()}@{socket.gethostname()}"
REPO = Path(__file__).resolve().parents[1]

# A cm-run's hold on an output directory, in a process of its own: it takes the lock as a job does,
# then writes an object every 50 ms (as a job writes its shards) until its writes are refused.
HOLDER = """
import itertools, socket, sys, time
spec_path, url, host, lease = sys.argv[1:]
if host != "-":
    socket.gethostname = lambda: host  # a holder on another node
from runner._durable import write_atomic
from runner._storage import StorageError, location
from runner.checkpoint import Checkpoint
from runner.spec import load_spec

spec = load_spec(spec_path)
spec = spec.model_copy(update={"output": spec.output.model_copy(update={"lock_lease_seconds": float(lease)})})
directory = location(url)
try:
    with Checkpoint(directory, spec).locked():
        print("holding", flush=True)
        for n in itertools.count():
            write_atomic(directory / f"beat-{n:05d}", b"x")
            time.sleep(0.05)
except StorageError as error:  # LockLost is one
    print(error, file=sys.stderr)
    sys.exit(3)
"""


@contextlib.contextmanager
def holder_process(spec_path: Path, directory: ObjectPath, host: str = "-") -> Iterator[subprocess.Popen]:
    command = [sys.executable, "-c", HOLDER, str(spec_path), str(directory), host, str(LEASE)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stdout.readline().strip() == "holding", process.communicate()[1]
        yield process
    finally:
        if process.poll() is None:
            process.kill()  # a stopped process too
        process.communicate()


def leased(spec, seconds: float = LEASE):
    return spec.model_copy(update={"output": spec.output.model_copy(update={"lock_lease_seconds": seconds})})


def lock_body(directory: ObjectPath) -> dict:
    return orjson.loads((directory / LOCK_NAME).read_bytes())


def take_when_free(directory: ObjectPath, spec, within: float) -> contextlib.ExitStack:
    """Hold the lock as soon as a run may take it, polling; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(Checkpoint(directory, spec).locked())
            return stack
        except CheckpointError:
            assert time.monotonic() < deadline, f"the lock of {directory} was not free within {within} s"
            time.sleep(0.2)


def test_a_live_lease_refuses_a_second_run_naming_the_holder_and_its_last_renewal(job, s3_bucket):
    spec = leased(job[0])
    directory = ObjectPath(f"{s3_bucket}/out")
    with Checkpoint(directory, spec).locked():
        first = lock_body(directory)
        assert (first["holder"], first["lease_seconds"], first["renewal"]) == (ME, LEASE, 0)
        refused = rf"another cm-run \({ME}, lock last renewed \S+ \((\d) s ago\)\) is writing to this output"
        until = time.monotonic() + 2 * LEASE  # past the lease and its second of margin: only renewals keep it
        while time.monotonic() < until:
            with pytest.raises(CheckpointError, match=refused + r".* lease of 2 s .*\(in \d s\)") as error:
                Checkpoint(directory, spec).locked().__enter__()
            assert int(re.search(refused, str(error.value)).group(1)) <= LEASE  # renewed within the lease
            time.sleep(0.3)
        last = lock_body(directory)
        assert last["token"] == first["token"] and last["renewal"] >= 3  # every LEASE / 3 s
    assert not (directory / LOCK_NAME).is_file()  # released
    with Checkpoint(directory, spec).locked():  # free again
        pass


@pytest.mark.slow  # kills (and pauses) a process holding the lock
def test_a_lock_whose_holder_was_killed_on_another_node_is_taken_over_once_its_lease_runs_out(job, s3_bucket, tmp_path):
    spec = leased(job[0])
    directory = ObjectPath(f"{s3_bucket}/out")
    with holder_process(tmp_path / "job.yaml", directory, host="another-node") as process:
        time.sleep(LEASE)
        holder = f"{process.pid}@another-node"
        assert lock_body(directory)["holder"] == holder and lock_body(directory)["renewal"] >= 1
        process.send_signal(signal.SIGKILL)  # as a lost spot node: its lock stays
        process.wait()
    killed = time.monotonic()
    gone = r"if it was killed, a rerun takes over once that runs out \(in \d s\)"
    with pytest.raises(CheckpointError, match=rf"another cm-run \({holder}, lock last renewed .*{gone}"):
        Checkpoint(directory, spec).locked().__enter__()
    with take_when_free(directory, spec, within=LEASE + 4):
        taken = time.monotonic() - killed
        assert lock_body(directory)["holder"] == ME
    # not before its lease (less the time since its last renewal, at most LEASE / 3) had run out
    assert taken >= LEASE - LEASE / 3 - 0.2
    assert not (directory / LOCK_NAME).is_file()


@pytest.fixture(scope="module")
def serial_s3_endpoint():
    from tests._s3_server import s3_server

    with s3_server(serial=True) as endpoint:
        yield endpoint


@pytest.fixture
def serial_bucket(serial_s3_endpoint, monkeypatch) -> Iterator[str]:
    """A bucket on a moto server that answers one request at a time: conditional writes atomic, as on S3."""
    from runner import _storage
    from tests._s3_server import environment, make_bucket

    for name, value in environment(serial_s3_endpoint).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    _storage._client.cache_clear()
    make_bucket("race")
    yield "s3://race"
    _storage._client.cache_clear()


def test_of_runs_racing_to_take_over_an_expired_lock_exactly_one_wins(job, serial_bucket):
    spec = leased(job[0])
    rounds, takers = 5, 4
    directories = [ObjectPath(f"{serial_bucket}/out-{n}") for n in range(rounds)]
    for directory in directories:  # each a lease of 1 s its holder stopped renewing
        body = {"holder": "4242@another-node", "started": 1.0, "token": "gone", "lease_seconds": 1.0, "renewal": 7}
        (directory / LOCK_NAME).write_bytes(orjson.dumps(body))
    # expired once older than 1 s + the second of margin by the store's whole-second clock: 2-4 s from now
    deadline = time.monotonic() + 6
    while (directories[-1] / LOCK_NAME).read_versioned().age_seconds <= 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for directory in directories:
        barrier = threading.Barrier(takers)
        won: list[contextlib.ExitStack] = []
        refused: list[str] = []

        def take(directory=directory, barrier=barrier, won=won, refused=refused) -> None:
            stack = contextlib.ExitStack()
            barrier.wait()
            try:
                stack.enter_context(Checkpoint(directory, spec).locked())
                won.append(stack)
            except CheckpointError as error:
                refused.append(str(error))

        threads = [threading.Thread(target=take) for _ in range(takers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1 and len(refused) == takers - 1, refused
        assert all(f"another cm-run ({ME}, lock last renewed" in message for message in refused)
        assert lock_body(directory)["holder"] == ME
        won[0].close()
        assert not (directory / LOCK_NAME).is_file()


@pytest.mark.slow  # kills (and pauses) a process holding the lock
def test_a_holder_whose_lock_was_taken_over_stops_and_writes_nothing_more(job, s3_bucket, tmp_path):
    spec = leased(job[0])
    directory = ObjectPath(f"{s3_bucket}/out")

    def beats() -> set[str]:
        return {path.name for path in directory.glob("beat-*")}

    def wait_for(condition, within: float) -> None:
        deadline = time.monotonic() + within
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.1)

    with holder_process(tmp_path / "job.yaml", directory) as process:
        holder = f"{process.pid}@{socket.gethostname()}"
        # paused past its lease, nobody taking over: on waking its lease renews and its writes go on
        process.send_signal(signal.SIGSTOP)
        time.sleep(LEASE + 1.5)
        paused = len(beats())
        process.send_signal(signal.SIGCONT)
        wait_for(lambda: len(beats()) > paused + 2, within=5)
        assert process.poll() is None

        process.send_signal(signal.SIGSTOP)  # paused again (a stalled node): this time another run takes over
        with take_when_free(directory, spec, within=LEASE + 4):
            written = beats()
            process.send_signal(signal.SIGCONT)
            _, stderr = process.communicate(timeout=30)
            assert process.returncode == 3, stderr
            assert f"this run ({holder}) no longer holds the output directory" in stderr
            assert f"taken over by {ME}" in stderr and "writes nothing more" in stderr
            assert beats() == written  # not one write after the take-over
            assert lock_body(directory)["holder"] == ME  # nor did it delete or overwrite the new holder's lock
    assert not (directory / LOCK_NAME).is_file()


def test_a_lock_of_a_dead_process_of_this_host_is_taken_over_at_once_one_without_a_lease_never(job, s3_bucket):
    spec = leased(job[0])
    directory = ObjectPath(f"{s3_bucket}/out")
    lock = directory / LOCK_NAME
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"holder": f"{gone.stdout.strip()}@{socket.gethostname()}", "token": "t", "lease_seconds": 60.0}
    lock.write_bytes(orjson.dumps(dead))  # as a SIGKILLed run of this host leaves it
    with Checkpoint(directory, spec).locked():
        assert lock_body(directory)["holder"] == ME
    # our own pid but another start time: a restarted container whose new cm-run got the killed one's pid
    lock.write_bytes(orjson.dumps(dead | {"holder": ME, "started": 12345.0}))
    with Checkpoint(directory, spec).locked():
        pass
    lock.write_bytes(b"4242@another-node\n")  # an older cm-runner's lock: no lease, another machine's
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
