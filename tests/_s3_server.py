"""A real S3 server on 127.0.0.1 for the object-storage tests: moto's server mode, as a subprocess.

The client side is the real one (boto3 and polars over HTTP), so what is tested is what talks to
S3, MinIO or R2 in production; only the server is a stand-in. ``s3_env`` points the AWS
environment variables at it, as a user would point them at their store.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from tests._ray_cluster import free_ports

# Any key works with moto; a recognisable one lets a test check it is written nowhere.
ACCESS_KEY = "AKIATESTSTORAGEKEY01"
SECRET_KEY = "secret-never-written-anywhere-0123456789"


# moto's server app answering one request at a time. moto (5.2.1, and its main branch in Aug 2026)
# checks a conditional PUT's If-Match/If-None-Match and then writes, unlocked, in a threaded server:
# two racing PUTs on one ETag both succeeded in 2 of 300 tries here. S3 evaluates the condition and
# the write as one step; served one at a time, moto does too.
_SERIAL = (
    "import os, sys; from werkzeug.serving import run_simple; "
    "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app; "
    "os.environ['MOTO_PORT'] = sys.argv[1]; "
    "run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False)"
)


@contextlib.contextmanager
def s3_server(*, serial: bool = False) -> Iterator[str]:
    """Start ``moto_server`` on a free port; yield its endpoint URL; stop it (no process left).

    ``serial``: one request at a time, so that conditional writes are atomic as on S3 (see ``_SERIAL``).
    """
    port = free_ports(1)[0]
    command = ["-c", _SERIAL, str(port)] if serial else ["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(
        [sys.executable, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port} (exit code {process.poll()})")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def environment(endpoint: str) -> dict[str, str]:
    """The variables the AWS SDKs (and polars) read, pointing at ``endpoint``."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no credentials: fail at once, not after probing an instance role
    }


def make_bucket(name: str) -> None:
    """Create a bucket with the environment's credentials (a fresh one per test: the server is shared)."""
    import boto3

    boto3.client("s3", region_name=os.environ["AWS_REGION"]).create_bucket(Bucket=name)
