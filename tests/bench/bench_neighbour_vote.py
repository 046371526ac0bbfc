"""The priors the posterior variants fall back to, against the issue's plain vote, over user-split seeds.

With a weak model the likelihood weight chosen on the user split is 0 on most datasets, and the
posterior variants are then their prior's argmax: the neighbour vote whose k and temperature the
user split chose (``runner.posterior.choose_neighbourhood``), or with ``cm.prior: probe`` the
logistic regression on the user samples' embeddings (``runner.probe``). That needs no LLM, so it
is measured here on several seeded user splits and many test items, to see whether a margin over
the issue's plain vote (similarity-weighted k-NN with the k the issue measured best) is more than
one split's luck.

    python tests/bench/bench_neighbour_vote.py --data-dir ../shared/datasets --seeds 0 1 2 3 4 --n 3000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import polars as pl

# this script's folder is on sys.path when it runs: the datasets, the issue's k and its vote are bench_variants'
from bench_variants import DATASETS, VOTE_K, knn_votes

from runner import load_spec
from runner import posterior as post
from runner.data import Corpus, load_user_split
from runner.embeddings import embed
from runner.fit import NEIGHBOUR_GRID, TEMPERATURE_GRID
from runner.probe import fit_probe
from runner.spec import JobSpec

REPO = Path(__file__).resolve().parents[2]


def sample_items(name: str, data_dir: str, n: int) -> tuple[JobSpec, pl.DataFrame, np.ndarray]:
    """A dataset's base spec, ``n`` seeded test items and their embeddings (bench_trust uses it too)."""
    with tempfile.TemporaryDirectory() as scratch:  # the base spec, completed with what a job must name
        job = Path(scratch) / "job.yaml"
        job.write_text(f"base: {REPO / 'jobs/_base' / f'{name}.yaml'}\nname: bench\noutput: {{dir: {scratch}}}\n")
        spec = load_spec(job)
    corpus = Corpus(
        spec.resolve_data_path(spec.corpus.path, data_dir),
        spec.dataset,
        spec.corpus.model_copy(update={"limit": n, "limit_seed": 0}),
        None,
    )
    items = next(iter(corpus.chunks(corpus.height)))[1]
    return spec, items, embed(items["text"].to_list())


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    spec, items, item_vectors = sample_items(name, args.data_dir, args.n)
    result: dict = {"dataset": name, "n": items.height, "seeds": []}
    for seed in args.seeds:
        split = load_user_split(
            spec.resolve_data_path(spec.user_split.path, args.data_dir),
            spec.dataset,
            spec.user_split.model_copy(update={"fraction": args.fraction, "seed": seed}),
        )
        index = {label: i for i, label in enumerate(split.labels)}
        user_truths = np.array([index[label] for label in split.rows["label"].to_list()])
        gold = np.array([index.get(label, -1) for label in items["label"].to_list()])
        user_vectors = embed(split.rows["text"].to_list())
        held_out = user_vectors @ user_vectors.T
        np.fill_diagonal(held_out, -np.inf)
        k, temperature = post.choose_neighbourhood(
            held_out, user_truths, user_truths, len(split.labels), NEIGHBOUR_GRID, TEMPERATURE_GRID
        )
        similarities = item_vectors @ user_vectors.T
        tuned = post.neighbour_prior(similarities, user_truths, len(split.labels), k, temperature).argmax(axis=1)
        vote = knn_votes(similarities, user_truths, len(split.labels), VOTE_K[name])
        started = time.perf_counter()
        probe = fit_probe(user_vectors, user_truths, len(split.labels))
        fit_seconds = time.perf_counter() - started
        probed = probe.prior(item_vectors).argmax(axis=1)
        knn = {
            f"knn{j}": float(np.mean(knn_votes(similarities, user_truths, len(split.labels), j) == gold))
            for j in (1, 5, 10)
        }
        result["seeds"].append(
            {
                "seed": seed,
                "n_user": len(user_truths),
                "vote": float(np.mean(vote == gold)),
                "tuned": float(np.mean(tuned == gold)),
                "neighbourhood": [k, temperature],
                "wins": int(np.sum((tuned == gold) & (vote != gold))),
                "losses": int(np.sum((tuned != gold) & (vote == gold))),
                "probe": float(np.mean(probed == gold)),
                "probe_strength": probe.strength,
                "probe_fit_seconds": round(fit_seconds, 1),
                "probe_wins": int(np.sum((probed == gold) & (vote != gold))),
                "probe_losses": int(np.sum((probed != gold) & (vote == gold))),
                **knn,
            }
        )
        print(orjson.dumps({"dataset": name, **result["seeds"][-1]}).decode(), flush=True)
    for prior in ("tuned", "probe"):
        margins = np.array([s[prior] - s["vote"] for s in result["seeds"]])
        result[f"{prior}_margin_mean"] = float(margins.mean())
        result[f"{prior}_margin_sd"] = float(margins.std(ddof=1)) if len(margins) > 1 else None
        result[f"{prior}_seeds_won"] = int(np.sum(margins > 0))
    return result


def margin(result: dict, prior: str) -> str:
    sd = result[f"{prior}_margin_sd"]
    sd_text = f" ({100 * sd:.1f})" if sd is not None else ""
    won = f"{result[f'{prior}_seeds_won']}/{len(result['seeds'])}"
    return f"{100 * result[f'{prior}_margin_mean']:+.1f}{sd_text}, {won}"


def main(args: argparse.Namespace) -> None:
    results = [run_dataset(name, args) for name in args.datasets]
    Path(args.out).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print()
    print(
        "| dataset | test items | seeds | issue's vote | best fixed k | tuned vote | margin (sd), seeds won "
        "| probe | margin (sd), seeds won |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        seeds = r["seeds"]
        vote, tuned, probe = (100 * np.mean([s[key] for s in seeds]) for key in ("vote", "tuned", "probe"))
        best_k = max((1, 5, 10), key=lambda j: np.mean([s[f"knn{j}"] for s in seeds]))
        best = 100 * np.mean([s[f"knn{best_k}"] for s in seeds])
        print(
            f"| {r['dataset']} | {r['n']} | {len(seeds)} | {vote:.1f} | k={best_k}: {best:.1f} | {tuned:.1f} | "
            f"{margin(r, 'tuned')} | {probe:.1f} | {margin(r, 'probe')} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="user-split seeds")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--n", type=int, default=3000, help="test items per dataset (a seeded sample)")
    parser.add_argument("--out", default="/tmp/neighbour-vote.json")
    main(parser.parse_args())
