"""What ``cm.accept.per_label`` costs and buys: pooled against per-label acceptance on real datasets.

The fit is bench_trust.py's (the recommended probe configuration, no LLM call) on seeded 5% user
splits; both acceptances come from ``fit.accept_cascade``, as a job's do. Per target and mode: the
share of up to ``--n`` seeded test items accepted, their accuracy on gold, the labels the user split
lists below the target, and on gold the labels with at least 10 accepted items right less often
than the target (the rows a pooled bound hides).

    python tests/bench/bench_per_label.py --data-dir ../shared/datasets --seeds 0 1 --n 1000
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import orjson

# this script's folder is on sys.path when it runs
from bench_neighbour_vote import sample_items
from bench_trust import RECOMMENDED

from runner import apply
from runner.bank import Sample, UserSplitInfo, estimate_bank
from runner.data import load_user_split
from runner.embeddings import embed
from runner.fit import accept_cascade, fit_cm
from runner.spec import AcceptSpec


def run(name: str, args: argparse.Namespace) -> list[dict]:
    spec, items, item_vectors = sample_items(name, args.data_dir, args.n)
    rows = []
    for seed in args.seeds:
        split = load_user_split(
            spec.resolve_data_path(spec.user_split.path, args.data_dir),
            spec.dataset,
            spec.user_split.model_copy(update={"fraction": args.fraction, "seed": seed}),
        )
        texts, truths = split.rows["text"].to_list(), split.rows["label"].to_list()
        answer = split.labels[0]  # w = 0: the answer cannot move the posterior (bench_trust.py)
        samples = [
            Sample(id=str(i), text=t, answer=answer, truth=y)
            for i, (t, y) in enumerate(zip(texts, truths, strict=True))
        ]
        info = UserSplitInfo(path="-", fraction=args.fraction, seed=seed, stratified=True, n_samples=len(texts))
        bank = estimate_bank(
            [(answer, y) for y in truths],
            split.labels,
            dataset=name,
            model="none",
            strategy="none",
            user_split=info,
            samples=samples,
        )
        fitted = fit_cm(bank, RECOMMENDED, embed(texts))
        ids = items["id"].to_list()
        refined = [
            apply.refine(fitted, c, None, row_id=i)
            for c, i in zip(apply.neighbourhoods(fitted, item_vectors, items["text"].to_list()), ids, strict=True)
        ]
        given = [r.refinement.decided for r in refined]
        confidence = np.array(
            [apply.confidence(fitted, apply.score(fitted, r, y)) for r, y in zip(refined, given, strict=True)]
        )
        gold = items["label"].to_list()
        right = np.array([y == g for y, g in zip(given, gold, strict=True)])
        for target in args.targets:
            for per_label in (False, True):
                [chosen] = accept_cascade([fitted], AcceptSpec(target_accuracy=target, per_label=per_label))
                t = chosen.acceptance.threshold
                accepted = confidence >= t if t is not None else np.zeros(len(right), bool)
                n_by, right_by = Counter(), Counter()
                for y, ok, a in zip(given, right, accepted, strict=True):
                    if a:
                        n_by[y] += 1
                        right_by[y] += int(ok)
                hidden = sorted(y for y in n_by if n_by[y] >= 10 and right_by[y] / n_by[y] < target)
                row = {
                    "dataset": name,
                    "seed": seed,
                    "target": target,
                    "per_label": per_label,
                    "n_user": len(texts),
                    "n_test": len(right),
                    "share": float(accepted.mean()),
                    "accuracy": float(right[accepted].mean()) if accepted.any() else None,
                    "user_below_target": len(chosen.trust_settings.get("labels_below_target", [])),
                    "gold_labels_below_target_n10": len(hidden),
                }
                rows.append(row)
                print(orjson.dumps(row).decode(), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=["massive-en-US", "banking77", "clinc150"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.05)
    args = parser.parse_args()
    for name in args.datasets:
        run(name, args)


if __name__ == "__main__":
    main()
