"""The job's garbage-collection thresholds: set while rows flow, the caller's put back after."""

from __future__ import annotations

import gc

import pytest

from runner._gc import ROWS_THRESHOLD, fewer_collections


@pytest.fixture
def callers_thresholds():
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's default, whatever the test process had
    yield (700, 10, 10)
    gc.set_threshold(*before)


def test_the_thresholds_hold_inside_and_are_restored_after(callers_thresholds):
    with fewer_collections():
        assert gc.get_threshold() == (50_000, 20, 10)
    assert gc.get_threshold() == callers_thresholds
    assert ROWS_THRESHOLD == (50_000, 20, 10)


def test_they_are_restored_when_the_job_fails(callers_thresholds):
    with pytest.raises(RuntimeError), fewer_collections((1234, 5, 6)):
        assert gc.get_threshold() == (1234, 5, 6)
        raise RuntimeError("the job failed")
    assert gc.get_threshold() == callers_thresholds


def test_young_collections_run_less_often_inside(callers_thresholds):
    def young_collections(allocations: int) -> int:
        before = gc.get_stats()[0]["collections"]
        keep = [[] for _ in range(allocations)]  # lists are tracked: each counts as an allocation
        del keep
        return gc.get_stats()[0]["collections"] - before

    outside = young_collections(40_000)
    with fewer_collections():
        inside = young_collections(40_000)
    assert outside >= 40_000 // 700 // 2  # about one every 700 allocations (the count is approximate)
    assert inside <= 1  # one every 50,000 at most
