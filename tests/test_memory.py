"""The job's peak-memory sampler: what it counts, and that it stays cheap with many processes."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from runner._memory import PeakMemory

HOLD_200_MIB = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"


def test_the_peak_counts_a_child_process_memory():
    child = subprocess.Popen([sys.executable, "-c", HOLD_200_MIB])
    try:
        while psutil.Process(child.pid).memory_info().rss < 200 * 2**20:  # touched: resident
            time.sleep(0.05)
        with PeakMemory(interval=0.05) as peak:
            time.sleep(0.3)
    finally:
        child.kill()
        child.wait()
    assert peak.mb >= 200


def test_sampling_many_processes_costs_at_most_its_share_of_a_core():
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(8)]
    try:
        sampler = PeakMemory(interval=0.0, cost_ratio=20.0)  # unbounded by the interval: only the ratio holds it
        with sampler:
            time.sleep(3.0)
            thread = next(t for t in psutil.Process().threads() if t.id == sampler._thread.native_id)
            busy = thread.user_time + thread.system_time
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert busy / 3.0 <= 1 / 20 * 1.5 + 0.02  # 1/(1 + ratio) of the time sampling, plus the clock's granularity
