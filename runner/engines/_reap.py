"""The processes an engine spawned, and ending them when its own shutdown did not.

vLLM starts its engine core as a child process and the core starts its workers. A clean
shutdown ends them; one after the core died, or a worker stuck in a step, may not, and such
a worker, reparented to init, keeps a core busy until killed by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable

import psutil

_GRACE_SECONDS = 5.0


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def spawned_since(before: Collection[psutil.Process]) -> list[psutil.Process]:
    """This process's descendants not in ``before``; Python's shared resource tracker excluded
    (multiprocessing starts it once per process and reuses it)."""
    known = {(p.pid, _started(p)) for p in before}
    spawned = []
    for process in _children():
        if (process.pid, _started(process)) in known:
            continue
        try:
            if any("resource_tracker" in part for part in process.cmdline()):
                continue
        except psutil.Error:
            continue
        spawned.append(process)
    return spawned


def _started(process: psutil.Process) -> float | None:
    try:
        return process.create_time()
    except psutil.Error:
        return None


def reap(processes: Iterable[psutil.Process], grace: float = _GRACE_SECONDS) -> list[int]:
    """End ``processes`` and their descendants: SIGTERM, then SIGKILL after ``grace`` seconds.

    psutil checks a process is still the one it recorded (pid and start time), so a pid reused
    since is left alone. Returns the pids that were still running.
    """
    alive: dict[int, psutil.Process] = {}
    for process in processes:
        try:
            if process.is_running():
                alive[process.pid] = process
                for child in process.children(recursive=True):
                    alive[child.pid] = child
        except psutil.Error:
            continue
    for process in alive.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, stubborn = psutil.wait_procs(list(alive.values()), timeout=grace)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stubborn, timeout=grace)
    return sorted(alive)
