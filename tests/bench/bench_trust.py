"""How far the confidence column can be trusted: accepted share and accuracy at several targets.

With SmolLM2 the recommended configuration (``neighbour_prior``, ``prior: probe``,
``first_call: when_weighted``, ``second_call: never``) gives the model's answer a weight of 0
on four of five datasets, so its labels are the probe's, and need no LLM call. This bench fits
exactly that (``likelihood_weight: 0``) through the job's own ``runner.fit`` and ``runner.apply``
on seeded 5% user splits, applies it to up to ``--n`` seeded test items, and reports per target
accuracy: the share the user split let through, the accuracy of those rows on gold labels, and
the expected calibration error of ``confidence``.

    python tests/bench/bench_trust.py --data-dir ../shared/datasets --seeds 0 1 --n 1000
    python tests/bench/bench_trust.py --data-dir ../shared/datasets --baseline --datasets massive-en-US banking77

``--baseline`` runs plain jobs with the embedded model instead (LLM calls: the user split and the
items) and compares thresholding the model's own probability of its answer with cm-run's confidence.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

# this script's folder is on sys.path when it runs
from bench_neighbour_vote import sample_items
from bench_threshold import scan_every_threshold

from runner import apply, load_spec, trust
from runner.bank import Sample, UserSplitInfo, estimate_bank
from runner.data import load_user_split
from runner.embeddings import embed
from runner.fit import fit_cm
from runner.spec import AcceptSpec, CMSpec

REPO = Path(__file__).resolve().parents[2]
DATASETS = ["banking77", "clinc150", "massive-en-US", "massive-de-DE", "mtop", "stackexchange"]
TARGETS = (0.90, 0.95, 0.98)
RECOMMENDED = CMSpec(
    variant="neighbour_prior", prior="probe", first_call="when_weighted", second_call="never", likelihood_weight=0.0
)


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
        # w = 0: the model's answer cannot move the posterior, so every sample's answer is one stand-in label
        answer = split.labels[0]
        pairs = enumerate(zip(texts, truths, strict=True))
        samples = [Sample(id=str(i), text=t, answer=answer, truth=y) for i, (t, y) in pairs]
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
        started = time.perf_counter()
        fitted = fit_cm(bank, RECOMMENDED, embed(texts))
        fit_seconds = time.perf_counter() - started
        contexts = apply.neighbourhoods(fitted, item_vectors, items["text"].to_list())
        ids = items["id"].to_list()
        refined = [apply.refine(fitted, c, None, row_id=i) for c, i in zip(contexts, ids, strict=True)]
        labels_given = [r.refinement.decided for r in refined]
        gold_labels = items["label"].to_list()
        scores = [apply.score(fitted, r, y) for r, y in zip(refined, labels_given, strict=True)]
        confidence = np.array([apply.confidence(fitted, raw) for raw in scores])
        right = np.array([y == gold for y, gold in zip(labels_given, gold_labels, strict=True)])
        covered = np.mean([gold in r.refinement.candidates for r, gold in zip(refined, gold_labels, strict=True)])
        row = {
            "dataset": name,
            "seed": seed,
            "n_user": len(texts),
            "n_test": len(right),
            "accuracy": float(right.mean()),
            "ece": trust.expected_calibration_error(confidence, right),
            "coverage_at_0.9": float(covered),
            "fit_seconds": round(fit_seconds, 1),
        }
        held_out = fitted.held_out_confidence, fitted.held_out_right
        for target in TARGETS:
            chosen = trust.choose_threshold(*held_out, target, 0.95, args.min_accepted)
            accepted = confidence >= chosen.threshold if chosen.threshold is not None else np.zeros(len(right), bool)
            row[f"share@{target}"] = float(accepted.mean())
            row[f"acc@{target}"] = float(right[accepted].mean()) if accepted.any() else None
            row[f"user_share@{target}"] = chosen.accepted_share
            scanned = scan_every_threshold(*held_out, target, 0.95)  # the rule fixed-sequence testing replaced
            accepted = confidence >= scanned if scanned is not None else np.zeros(len(right), bool)
            row[f"scan_share@{target}"] = float(accepted.mean())
            row[f"scan_acc@{target}"] = float(right[accepted].mean()) if accepted.any() else None
        rows.append(row)
        print(orjson.dumps(row).decode(), flush=True)
    return rows


def run_baseline(name: str, args: argparse.Namespace) -> list[dict]:
    """What a user tries first: the model's own probability of its answer, thresholded on the user split.

    A plain job (``cm.enabled: false``) through ``run_job`` with the embedded model: the estimate
    gives the user samples' answers and their probabilities (``y_prime_probability``), the corpus
    its answers. Beside it, the same job's own ``confidence`` column (calibrated answer precision).
    """
    import asyncio
    import pickle

    import polars as pl

    from runner import run_job

    rows = []
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp(prefix=f"trust-{name}-{seed}-"))
        job = out / "job.yaml"
        job.write_text(
            f"base: {REPO / 'jobs/_base' / f'{name}.yaml'}\nname: trust-baseline\n"
            f"user_split: {{fraction: {args.fraction}, seed: {seed}}}\ncorpus: {{limit: {args.n}, limit_seed: 0}}\n"
            f"strategy: {{name: {args.strategy}}}\ncm: {{enabled: false}}\noutput: {{dir: {out / 'out'}}}\n"
        )
        started = time.perf_counter()
        asyncio.run(run_job(load_spec(job), data_dir=args.data_dir))
        seconds = time.perf_counter() - started
        user = pl.read_parquet(out / "out/estimate.parquet")
        user_right = (user["y_prime"] == user["label"]).fill_null(False).to_numpy()
        user_probability = user["y_prime_probability"].fill_null(0.0).to_numpy()
        corpus = pl.read_parquet(out / "out/annotations.parquet")
        right = (corpus["y_hat"] == corpus["gold"]).fill_null(False).to_numpy()
        probability = corpus["y_prime_probability"].fill_null(0.0).to_numpy()
        confidence = corpus["confidence"].to_numpy()
        fitted = pickle.loads((out / "out/fitted_cm.pkl").read_bytes())["fitted"]
        row = {"dataset": name, "seed": seed, "strategy": args.strategy, "n_user": user.height}
        row |= {"n_test": corpus.height, "accuracy": float(right.mean()), "seconds": round(seconds)}
        row["ece_probability"] = trust.expected_calibration_error(probability, right)
        row["ece_confidence"] = trust.expected_calibration_error(confidence, right)
        for target in TARGETS:
            for kind, user_scores, scores in (
                ("probability", user_probability, probability),
                ("confidence", fitted.held_out_confidence, confidence),
            ):
                truth = user_right if kind == "probability" else fitted.held_out_right
                chosen = trust.choose_threshold(user_scores, truth, target, 0.95, args.min_accepted)
                accepted = scores >= chosen.threshold if chosen.threshold is not None else np.zeros(len(right), bool)
                row[f"{kind}_share@{target}"] = float(accepted.mean())
                row[f"{kind}_acc@{target}"] = float(right[accepted].mean()) if accepted.any() else None
        rows.append(row)
        print(orjson.dumps(row).decode(), flush=True)
    return rows


def _share(row: dict, prefix: str, target: float) -> str:
    accuracy = row[f"{prefix}acc@{target}"]
    return f"{100 * row[f'{prefix}share@{target}']:.1f}% / " + ("-" if accuracy is None else f"{100 * accuracy:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--n", type=int, default=1000, help="test items per dataset (a seeded sample)")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--min-accepted", type=int, default=AcceptSpec().min_accepted, help="cm.accept.min_accepted")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="instead: plain jobs with the embedded model, the model's own probability against cm-run's confidence",
    )
    parser.add_argument("--strategy", default="zero_shot", help="--baseline: the prompt strategy")
    args = parser.parse_args()
    if args.baseline:
        rows = [row for name in args.datasets for row in run_baseline(name, args)]
        print(
            "\n| dataset | seed | accuracy | ECE p / conf | " + " | ".join(f"p / conf @{t:.2f}" for t in TARGETS) + " |"
        )
        print("|" + "---|" * (4 + len(TARGETS)))
        for row in rows:
            cells = []
            for t in TARGETS:
                pair = []
                for kind in ("probability", "confidence"):
                    acc = row[f"{kind}_acc@{t}"]
                    pair.append(
                        f"{100 * row[f'{kind}_share@{t}']:.0f}% ({'-' if acc is None else f'{100 * acc:.1f}%'})"
                    )
                cells.append(" / ".join(pair))
            print(
                f"| {row['dataset']} | {row['seed']} | {100 * row['accuracy']:.1f}% | "
                f"{row['ece_probability']:.3f} / {row['ece_confidence']:.3f} | " + " | ".join(cells) + " |"
            )
        if args.out:
            args.out.write_text("".join(orjson.dumps(row).decode() + "\n" for row in rows))
        return
    rows = [row for name in args.datasets for row in run_dataset(name, args)]
    header = "| dataset | seed | n user / test | accuracy | ECE | " + " | ".join(
        f"accepted / acc. @{t:.2f}" for t in TARGETS
    )
    print("\n" + header + " |\n|" + "---|" * (5 + len(TARGETS)))
    for row in rows:
        cells = [f"{_share(row, '', t)} (scan: {_share(row, 'scan_', t)})" for t in TARGETS]
        print(
            f"| {row['dataset']} | {row['seed']} | {row['n_user']} / {row['n_test']} | {100 * row['accuracy']:.1f}% | "
            f"{row['ece']:.3f} | " + " | ".join(cells) + " |"
        )
    if args.out:
        args.out.write_text("".join(orjson.dumps(row).decode() + "\n" for row in rows))


if __name__ == "__main__":
    main()
