"""Corpus-level estimates on the datasets: PPI++ intervals against gold-only ones, and how often they hold.

The probe configuration of bench_trust.py (``neighbour_prior``, ``prior: probe``, w = 0: no LLM call)
is fitted through ``runner.fit`` on seeded 5% user splits and applied through ``runner.apply`` to
``--n`` seeded test items; ``runner.prevalence`` then estimates each label's share of those items from
the fit's held-out user samples and the items' labels and confidences. Reported per dataset and seed:
the mean width over labels of the PPI++ and gold-only intervals (95% jointly over labels), and
whether they hold the items' true shares (per label, and all labels at once).

    python tests/bench/bench_prevalence.py --data-dir ../shared/datasets --seeds 0 1 --n 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import orjson

# this script's folder is on sys.path when it runs
from bench_neighbour_vote import sample_items
from bench_trust import RECOMMENDED

from runner import apply
from runner.bank import Sample, UserSplitInfo, estimate_bank
from runner.data import load_user_split
from runner.embeddings import embed
from runner.fit import fit_cm
from runner.prevalence import estimate_prevalence

DATASETS = ["massive-en-US", "banking77", "clinc150"]


def run_dataset(name: str, args: argparse.Namespace) -> list[dict]:
    spec, items, item_vectors = sample_items(name, args.data_dir, args.n)
    rows = []
    for seed in args.seeds:
        split = load_user_split(
            spec.resolve_data_path(spec.user_split.path, args.data_dir),
            spec.dataset,
            spec.user_split.model_copy(update={"fraction": args.fraction, "seed": seed}),
        )
        texts, truths = split.rows["text"].to_list(), split.rows["label"].to_list()
        answer = split.labels[0]  # w = 0: the answer cannot move the posterior; one stand-in label
        samples = [
            Sample(id=str(i), text=t, answer=answer, truth=y)
            for i, (t, y) in enumerate(zip(texts, truths, strict=True))
        ]
        bank = estimate_bank(
            [(answer, y) for y in truths],
            split.labels,
            dataset=name,
            model="none (w = 0)",
            strategy="none",
            user_split=UserSplitInfo(
                path="-", fraction=args.fraction, seed=seed, stratified=True, n_samples=len(texts)
            ),
            samples=samples,
        )
        fitted = fit_cm(bank, RECOMMENDED, embed(texts))
        contexts = apply.neighbourhoods(fitted, item_vectors, items["text"].to_list())
        refined = [apply.refine(fitted, context, None) for context in contexts]
        given = [r.refinement.decided for r in refined]
        confidence = np.array(
            [apply.confidence(fitted, apply.score(fitted, r, y)) for r, y in zip(refined, given, strict=True)]
        )
        index = {label: i for i, label in enumerate(fitted.labels)}
        corpus_given = np.array([index.get(y, -1) if y is not None else -1 for y in given])
        gold = np.array([index[y] for y in items["label"].to_list()])
        n_labels = len(fitted.labels)
        true_share = np.bincount(gold, minlength=n_labels) / len(gold)
        got = estimate_prevalence(
            fitted.labels,
            fitted.held_out_truths,
            fitted.held_out_labels,
            fitted.held_out_confidence,
            corpus_given,
            confidence,
            np.zeros(0, np.int64),
            args.level,
        )
        holds = (got.low <= true_share) & (true_share <= got.high)
        gold_holds = (got.gold_low <= true_share) & (true_share <= got.gold_high)
        row = {
            "dataset": name,
            "seed": seed,
            "labels": n_labels,
            "n_user": got.n_labelled,
            "n_test": len(gold),
            "accuracy": float(np.mean(corpus_given == gold)),
            "ppi_width": float(np.mean(got.high - got.low)),
            "gold_width": float(np.mean(got.gold_high - got.gold_low)),
            "ppi_label_coverage": float(holds.mean()),
            "gold_label_coverage": float(gold_holds.mean()),
            "ppi_joint": bool(holds.all()),
            "gold_joint": bool(gold_holds.all()),
            "ppi_abs_error": float(np.mean(np.abs(got.estimate - true_share))),
            "raw_abs_error": float(np.mean(np.abs(got.raw_share - true_share))),
            "gold_abs_error": float(np.mean(np.abs((got.gold_low + got.gold_high) / 2 - true_share))),
        }
        rows.append(row)
        print(orjson.dumps(row).decode(), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--n", type=int, default=1000, help="test items per dataset (a seeded sample)")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--level", type=float, default=0.95, help="joint confidence level over labels")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    rows = [row for name in args.datasets for row in run_dataset(name, args)]
    print(
        "\n| dataset | seed | labels | user samples | accuracy | width PPI++ / gold-only | "
        "labels held PPI++ / gold-only | all held | mean abs error PPI++ / gold-only / raw |"
    )
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['dataset']} | {r['seed']} | {r['labels']} | {r['n_user']} | {100 * r['accuracy']:.1f}% | "
            f"{100 * r['ppi_width']:.2f} / {100 * r['gold_width']:.2f} pts ({r['ppi_width'] / r['gold_width']:.2f}x) | "
            f"{100 * r['ppi_label_coverage']:.1f}% / {100 * r['gold_label_coverage']:.1f}% | "
            f"{'yes' if r['ppi_joint'] else 'no'} / {'yes' if r['gold_joint'] else 'no'} | "
            f"{100 * r['ppi_abs_error']:.2f} / {100 * r['gold_abs_error']:.2f} / {100 * r['raw_abs_error']:.2f} pts |"
        )
    if args.out:
        args.out.write_text("".join(orjson.dumps(r).decode() + "\n" for r in rows))


if __name__ == "__main__":
    main()
