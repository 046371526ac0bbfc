"""A two-node Ray cluster on this machine, for tests of the Ray paths (replicas, the Ray Data executor)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import psutil
import pytest


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class LocalCluster:
    """A Ray head and a worker node, separate `ray start --block` processes on 127.0.0.1.

    Every process they start carries a marker in its environment; teardown stops the nodes and
    then kills exactly the processes with that marker (never `ray stop`, which would stop every
    Ray on the machine, other people's too).
    """

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None):
        self.root = root
        self.marker = uuid.uuid4().hex
        # A token of its own: the cluster's CLI calls must not depend on (or rewrite) ~/.ray/auth_token.
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {**os.environ, **(extra_env or {}), **auth, "CM_TEST_RAY_CLUSTER": self.marker}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen[bytes]] = []
        gcs, dashboard, client, *node_ports = free_ports(3 + 8)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self._head_args = [
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={root}",
        ]
        self._per_node_ports = [node_ports[:4], node_ports[4:]]

    def _start_node(self, role_args: list[str], ports: list[int], log: str) -> None:
        agent, agent_grpc, metrics, runtime_env_agent = ports
        command = [
            "ray",
            "start",
            *role_args,
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--object-store-memory=200000000",  # this job moves kilobytes; the default takes 30% of RAM
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            "--disable-usage-stats",
            "--block",
        ]
        with (self.root / log).open("wb") as output:
            self.nodes.append(
                subprocess.Popen(command, env=self.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def start(self) -> None:
        self._start_node(self._head_args, self._per_node_ports[0], "head.log")
        self._wait_for_nodes(1)
        self._start_node([f"--address={self.gcs_address}"], self._per_node_ports[1], "worker.log")
        self._wait_for_nodes(2)

    def join_from_this_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Let an in-process `ray.init(address=...)` authenticate to this cluster.

        Ray caches the auth token per process on first use, so a test that ran Ray earlier in the same
        pytest process would otherwise present that token and be refused ("Failed to connect").
        """
        monkeypatch.setenv("RAY_AUTH_TOKEN", self.env["RAY_AUTH_TOKEN"])
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        # after the environment: Ray reads RAY_AUTH_MODE once, when this process first imports it
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()

    def node_ids(self) -> set[str]:
        listed = subprocess.run(
            ["ray", "list", "nodes", "--address", self.dashboard_url, "--format", "json", "--filter", "state=ALIVE"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            return {node["node_id"] for node in orjson.loads(listed.stdout)}
        except orjson.JSONDecodeError:  # the dashboard is not up yet
            return set()

    def _wait_for_nodes(self, count: int) -> None:
        for _ in range(180):
            if any(node.poll() is not None for node in self.nodes):
                raise RuntimeError(f"a Ray node exited while starting; see {self.root}/*.log")
            if len(self.node_ids()) >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} node(s); see {self.root}/*.log")

    def stop(self) -> None:
        for node in reversed(self.nodes):  # worker first, then head
            if node.poll() is None:
                node.send_signal(signal.SIGINT)  # `ray start --block` then stops what it started
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.wait(timeout=60)
        leftovers = []
        for pid in self._marked_processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                process.kill()
                leftovers.append(process)
        psutil.wait_procs(leftovers, timeout=30)

    def _marked_processes(self) -> list[int]:
        marked = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("CM_TEST_RAY_CLUSTER") == self.marker:
                    marked.append(process.pid)
        return marked
