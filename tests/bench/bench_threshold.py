"""The acceptance threshold's guarantee and power, by simulation (no model, no data; seconds).

Validity: user splits whose accepted rows are right ``--below`` of the time at every confidence
(just under the 0.95 target): any threshold chosen is a false pass. Reports the false-pass rate of
fixed-sequence testing (``runner.trust.choose_threshold``) beside the scan it replaced (every
threshold tested at the full level, the lowest passing kept), on the same splits.

Power: user splits where half the samples (confidence above 0.5) are right 0.99 of the time and
the rest 0.6, so accepting down to 0.443 keeps 0.95: the share accepted, by ``min_accepted``.

    python tests/bench/bench_threshold.py --runs 2000
"""

from __future__ import annotations

import argparse

import numpy as np

from runner.trust import choose_threshold, clopper_pearson

TARGET = LEVEL = 0.95


def scan_every_threshold(
    confidences: np.ndarray, right: np.ndarray, target: float = TARGET, level: float = LEVEL
) -> float | None:
    """The replaced rule: the lowest threshold whose Clopper-Pearson bound passes, each at the full level."""
    order = np.argsort(-confidences, kind="stable")
    ranked, n_right = confidences[order], np.cumsum(right[order])
    bounds = clopper_pearson(n_right, np.arange(1, len(confidences) + 1), level)
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # one test per distinct threshold
    passing = ends[bounds[ends] >= target]
    return float(ranked[passing[-1]]) if len(passing) else None


def validity(runs: int, accuracy: float, n: int, min_accepted: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    fixed = scan = 0
    for _ in range(runs):
        confidences = rng.uniform(0.5, 1.0, size=n)
        right = rng.uniform(size=n) < accuracy
        fixed += choose_threshold(confidences, right, TARGET, LEVEL, min_accepted).threshold is not None
        scan += scan_every_threshold(confidences, right) is not None
    return fixed / runs, scan / runs


def power(runs: int, n: int, min_accepted: int, seed: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    shares, false = [], 0
    for _ in range(runs):
        confidences = rng.uniform(size=n)
        right = rng.uniform(size=n) < np.where(confidences > 0.5, 0.99, 0.6)
        chosen = choose_threshold(confidences, right, TARGET, LEVEL, min_accepted)
        shares.append(chosen.accepted_share)
        false += chosen.threshold is not None and chosen.threshold < 0.4429
    shares_array = np.array(shares)
    return float((shares_array > 0).mean()), float(shares_array.mean()), false / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    mc = 2 * np.sqrt(LEVEL * (1 - LEVEL) / args.runs)
    print(f"false passes (nominal {1 - LEVEL:.2f}, +- {mc:.3f} at two Monte-Carlo standard errors), {args.runs} runs")
    print("| true accuracy | n | fixed-sequence (min 200) | fixed-sequence (min 100) | scan every threshold |")
    print("|---|---|---|---|---|")
    for seed, (accuracy, n) in enumerate([(a, n) for a in (0.945, 0.949) for n in (400, 1000, 4000)]):
        fixed_200, scan = validity(args.runs, accuracy, n, 200, seed)
        fixed_100, _ = validity(args.runs, accuracy, n, 100, seed)
        print(f"| {accuracy} | {n} | {fixed_200:.3f} | {fixed_100:.3f} | {scan:.3f} |")
    print("\npower: half the samples right 0.99, half 0.6 (the most a valid threshold accepts: 0.557)")
    print("| n | min_accepted | any accepted | mean share accepted | false passes |")
    print("|---|---|---|---|---|")
    for n in (400, 800, 2000):
        for min_accepted in (60, 100, 200, 300):
            share_any, share_mean, false = power(args.runs, n, min_accepted, seed=n + min_accepted)
            print(f"| {n} | {min_accepted} | {share_any:.3f} | {share_mean:.3f} | {false:.3f} |")


if __name__ == "__main__":
    main()
