"""A real Label Studio server on 127.0.0.1 for tests/test_label_studio.py: the PyPI package ``label-studio``,
SQLite in a scratch folder, a user with a known API token, started as a subprocess and stopped whatever happens.

It lives in a virtualenv of its own (``make label-studio`` makes ``~/.cache/cm-runner/label-studio-1.23``; or point
``$CM_LABEL_STUDIO`` at a ``label-studio`` executable): it pins Django and many other packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests._ray_cluster import free_ports

REPO = Path(__file__).resolve().parents[1]
VENV_BINARY = Path.home() / ".cache" / "cm-runner" / "label-studio-1.23" / "bin" / "label-studio"
TOKEN = "cm-runner-test-token-0123456789abcdef0123"  # a legacy token: `Authorization: Token ...`
USER = "reviewer@example.com"


def binary() -> Path | None:
    """``$CM_LABEL_STUDIO``, else the Makefile's virtualenv, else ``label-studio`` on PATH; None if none is there."""
    explicit = os.environ.get("CM_LABEL_STUDIO")
    if explicit:
        return Path(explicit)
    if VENV_BINARY.is_file():
        return VENV_BINARY
    found = shutil.which("label-studio")
    return Path(found) if found else None


@dataclass(frozen=True)
class Server:
    url: str
    startup_seconds: float
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)


@contextlib.contextmanager
def label_studio_server(executable: Path, data_dir: Path, *, timeout: float = 300) -> Iterator[Server]:
    """Start ``label-studio start`` on a free port; yield once its API answers; kill its process group after."""
    port = free_ports(1)[0]
    data_dir.mkdir(parents=True, exist_ok=True)
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(data_dir),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # nothing leaves the machine: no version check on PyPI, no analytics, no error reports
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }
    command = [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--username", USER, "--password", "reviewer-password-1"]
    command += ["--user-token", TOKEN, "--enable-legacy-api-token", "--log-level", "WARNING"]
    log = data_dir / "server.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        # its own process group: `label-studio` may start helpers, and all of them go at the end
        process = subprocess.Popen(
            command, env=environment, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = started + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(f"{url}/api/projects", headers={"Authorization": f"Token {TOKEN}"}, timeout=5)
                if answer.status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"label-studio did not answer on {url} (exit code {process.poll()}):\n{tail}")
            time.sleep(0.5)
        yield Server(url, time.monotonic() - started, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # a helper that outlived the server
            os.killpg(process.pid, signal.SIGKILL)
