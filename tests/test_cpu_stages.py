"""The worker's per-stage CPU split: a stack's stage is named by its innermost owned frame."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

from runner._cpu_stages import StageSampler, split, stage_of


def _function_in(filename: str, source: str) -> Any:
    """A function whose code says it lives in ``filename`` (what a stack sample reads)."""
    scope: dict[str, Any] = {"sys": sys}
    exec(compile(source, filename, "exec"), scope)
    return scope["f"]


def test_the_innermost_owned_frame_names_the_stage() -> None:
    engine = _function_in("/site-packages/aiohttp/client.py", "def f(g):\n    return g()\n")
    apply = _function_in("/repo/runner/apply.py", "def f(g):\n    return g()\n")
    numpy = _function_in("/site-packages/numpy/linalg.py", "def f():\n    return sys._getframe()\n")
    assert stage_of(apply(numpy)) == "cm_apply"  # numpy owns nothing: the caller's stage
    assert stage_of(apply(lambda: engine(numpy))) == "engine_client"
    assert stage_of(numpy()) == "other"
    selector = _function_in("/usr/lib/python3/selectors.py", "def f(g):\n    return g()\n")
    assert stage_of(engine(lambda: selector(numpy))) == "idle"


def test_split_shares_seconds_by_samples() -> None:
    assert split(2.0, Counter(prompt=1, engine_client=3)) == {"prompt": 0.5, "engine_client": 1.5}
    assert split(1.0, Counter()) == {"other": 1.0}


def test_the_sampler_sees_a_busy_thread_in_its_stage() -> None:
    busy = _function_in(
        "/repo/runner/strategies.py",
        "def f(until):\n    while until():\n        pass\n",
    )
    stop = threading.Event()
    thread = threading.Thread(target=busy, args=(lambda: not stop.is_set(),))
    thread.start()
    assert thread.ident is not None
    sampler = StageSampler(thread.ident, interval=0.002)
    time.sleep(0.3)
    stop.set()
    thread.join()
    sampler.stop()
    counts = sampler.take()
    assert sum(counts.values()) >= 10
    assert counts["prompt"] / sum(counts.values()) == pytest.approx(1.0, abs=0.2)


def test_a_thread_inside_the_workers_c_event_loop_is_idle() -> None:
    """Ray's workers run uvloop: waiting, the loop thread's innermost Python frame is the one that runs it."""
    runs_the_loop = _function_in("/repo/runner/ray_executor.py", "def f():\n    return sys._getframe()\n")
    assert stage_of(runs_the_loop()) == "idle"
