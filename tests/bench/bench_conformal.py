"""How tight the candidate sets are: coverage of gold labels and mean set size at several cm.coverage.

No LLM: the recommended probe-only configuration (``neighbour_prior``, ``prior: probe``,
``first_call: when_weighted``, ``second_call: never``, ``likelihood_weight: 0``, so the posterior is the
probe's prior) is fitted through the job's own ``runner.fit.fit_cm`` on seeded 5% user splits and
applied with ``runner.apply.refine`` to ``--n`` seeded test items; a set holds the truth when the gold
label is in ``Refinement.candidates``. Run against another checkout (``PYTHONPATH=/work/main``) for
the sets as they were.

Beside the job's sets, ``--diagnose`` rebuilds four kinds of set from the same probe, to tell the
causes of over-coverage apart: cumulative-mass scores without randomisation (the sets before this
bench) or randomised (APS, Romano et al. 2020, the top label always kept), each with the corpus
scored by the probe refit on all user samples, or by the fold model of a random fold (whose held-out
scores tau was taken on, so corpus and calibration scores come from the same kind of model).

    python tests/bench/bench_conformal.py --data-dir ../shared/datasets --seeds 0 1 --n 1000 --diagnose

``--pool-control`` also scores ``--n`` items held out from the pool the user split is drawn from (the pool's
rows not in the split, a seeded sample per split): items exchangeable with the pool by construction, beside
the test file's, to tell a test file unlike its train pool from sets that miss their guarantee.

Embeddings are cached in ``--cache`` (one .npy per list of texts), so a rerun loads no model.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson

from runner import apply, load_spec
from runner import fit as fit_module
from runner.bank import Sample, UserSplitInfo, estimate_bank
from runner.data import Corpus, load_user_split
from runner.fit import fit_cm
from runner.spec import CMSpec

REPO = Path(__file__).resolve().parents[2]
DATASETS = ["banking77", "clinc150", "massive-en-US", "mtop", "stackexchange"]
COVERAGES = (0.8, 0.9, 0.95)
PROBE_ONLY = dict(
    variant="neighbour_prior", prior="probe", first_call="when_weighted", second_call="never", likelihood_weight=0.0
)


def cached_embed(texts: list[str], cache: Path) -> np.ndarray:
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:24]
    path = cache / f"{key}.npy"
    if path.exists():
        return np.load(path)
    from runner.embeddings import embed

    vectors = embed(texts)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def test_items(name: str, data_dir: str, n: int):
    with tempfile.TemporaryDirectory() as scratch:
        job = Path(scratch) / "job.yaml"
        job.write_text(f"base: {REPO / 'jobs/_base' / f'{name}.yaml'}\nname: bench\noutput: {{dir: {scratch}}}\n")
        spec = load_spec(job)
    corpus = Corpus(
        spec.resolve_data_path(spec.corpus.path, data_dir),
        spec.dataset,
        spec.corpus.model_copy(update={"limit": n, "limit_seed": 0}),
        None,
    )
    return spec, next(iter(corpus.chunks(corpus.height)))[1]


def probe_bank(name: str, split, fraction: float, seed: int, stratified: bool):
    """A bank whose every answer is one stand-in label: with w = 0 the answer cannot move the posterior."""
    texts, truths = split.rows["text"].to_list(), split.rows["label"].to_list()
    answer = split.labels[0]
    ids = split.rows["id"].to_list()  # as a job's samples: the file's ids, which fix each sample's draw
    samples = [Sample(id=i, text=t, answer=answer, truth=y) for i, t, y in zip(ids, texts, truths, strict=True)]
    provenance = dict(path="-", fraction=fraction, seed=seed, stratified=stratified, n_samples=len(texts))
    if "pool_label_counts" in UserSplitInfo.model_fields:  # a checkout before weighted conformal: no such field
        provenance["pool_label_counts"] = split.pool_label_counts
    info = UserSplitInfo(**provenance)
    return estimate_bank(
        [(answer, y) for y in truths],
        split.labels,
        dataset=name,
        model="none (w = 0)",
        strategy="none",
        user_split=info,
        samples=samples,
    )


def _aps_scores(probabilities: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row and label: mass of the labels ranked above it plus u times its own; 0 for the top label."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    ranked = np.take_along_axis(probabilities, order, axis=1)
    before = np.cumsum(ranked, axis=1) - ranked
    ranked_scores = before + u[:, None] * ranked
    ranked_scores[:, 0] = 0.0
    scores = np.empty_like(probabilities)
    np.put_along_axis(scores, order, ranked_scores, axis=1)
    return scores


def _deterministic_sets(probabilities: np.ndarray, tau: float) -> np.ndarray:
    """Membership of the smallest most-probable-first set of mass >= tau (the sets before this bench)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    ranked = np.take_along_axis(probabilities, order, axis=1)
    before = np.cumsum(ranked, axis=1) - ranked
    member = np.zeros_like(probabilities, dtype=bool)
    np.put_along_axis(member, order, before < tau - 1e-12, axis=1)
    return member


def diagnose(fitted, user_vectors, item_vectors, gold, coverage, rng) -> dict:
    """Coverage and size of four kinds of set from the same probe (see the module docstring)."""
    import math

    from sklearn.model_selection import KFold

    from runner.posterior import smoothed_shares
    from runner.probe import _fit, _probabilities

    probe, truths = fitted.probe, fitted.user_truths
    n, n_labels = len(truths), len(fitted.labels)
    held = probe.held_out
    folds = list(KFold(5, shuffle=True, random_state=0).split(user_vectors))
    fold_priors = [
        smoothed_shares(_probabilities(_fit(user_vectors[f], truths[f], probe.strength), item_vectors, n_labels), 0.05)
        for f, _ in folds
    ]
    which = rng.integers(0, len(folds), len(item_vectors))
    by_fold = np.stack(fold_priors)[which, np.arange(len(item_vectors))]
    refit = probe.prior(item_vectors)
    rank = math.ceil((n + 1) * coverage)
    out = {}
    ok = gold >= 0
    for kind in ("deterministic", "randomised"):
        if kind == "deterministic":
            order = np.argsort(-held, axis=1, kind="stable")
            ranked = np.take_along_axis(held, order, axis=1)
            truth_rank = np.argmax(order == truths[:, None], axis=1)
            cal = np.cumsum(ranked, axis=1)[np.arange(n), truth_rank]
        else:
            cal = _aps_scores(held, rng.random(n))[np.arange(n), truths]
        tau = 1.0 if rank > n else float(np.sort(cal)[rank - 1])
        for scored, probabilities in (("refit", refit), ("fold", by_fold)):
            if kind == "deterministic":
                member = _deterministic_sets(probabilities, tau)
            else:
                member = _aps_scores(probabilities, rng.random(len(probabilities))) <= tau
            covered = member[np.arange(len(gold)), np.maximum(gold, 0)] & ok
            out[f"{kind}_{scored}"] = (float(covered.mean()), float(member.sum(axis=1).mean()))
    held_cov = None
    out["held_out_accuracy"] = float((held.argmax(axis=1) == truths).mean())
    out["refit_accuracy"] = float((refit.argmax(axis=1) == gold).mean())
    out["fold_accuracy"] = float((by_fold.argmax(axis=1) == gold).mean())
    del held_cov
    return out


def _probe_once(fit_probe):
    """fit_probe memoised on its inputs: the coverages of one split share one probe (fitting is most of the time)."""
    fitted: dict = {}

    def once(vectors, truths, n_labels, *rest, **options):
        key = (hashlib.sha256(vectors.tobytes() + np.asarray(truths).tobytes()).hexdigest(), n_labels)
        if key not in fitted:
            fitted[key] = fit_probe(vectors, truths, n_labels, *rest, **options)
        return fitted[key]

    return once


def pool_held_out(spec, data_dir: str, split, n: int, seed: int):
    """``n`` rows of the user split's pool that are not in the split, a seeded sample: the pool-control items."""
    import polars as pl

    whole = spec.user_split.model_copy(update={"fraction": None})
    pool = load_user_split(spec.resolve_data_path(spec.user_split.path, data_dir), spec.dataset, whole).rows
    rest = pool.filter(~pl.col("id").is_in(split.rows["id"].implode()))
    return rest.sample(n=min(n, rest.height), seed=seed)


def _sets(fitted, vectors: np.ndarray, ids: list) -> list[tuple[str, ...]]:
    seeded = "row_id" in inspect.signature(apply.refine).parameters  # a checkout before seeded sets: none
    if getattr(fitted, "novelty", None) is not None:  # candidate sets do not read the ood flag (nor its texts)
        fitted = replace(fitted, novelty=None)
    contexts = apply.neighbourhoods(fitted, vectors)
    keyed = [{"row_id": str(i)} if seeded else {} for i in ids]
    return [apply.refine(fitted, c, None, **i).refinement.candidates for c, i in zip(contexts, keyed, strict=True)]


def run_dataset(name: str, args: argparse.Namespace) -> list[dict]:
    spec, items = test_items(name, args.data_dir, args.n)
    item_vectors = cached_embed(items["text"].to_list(), args.cache)
    rows = []
    for seed in args.seeds:
        split = load_user_split(
            spec.resolve_data_path(spec.user_split.path, args.data_dir),
            spec.dataset,
            spec.user_split.model_copy(
                update={"fraction": args.fraction, "seed": seed, "stratified": not args.unstratified}
            ),
        )
        index = {label: i for i, label in enumerate(split.labels)}
        gold_labels = items["label"].to_list()
        gold = np.array([index.get(label, -1) for label in gold_labels])
        bank = probe_bank(name, split, args.fraction, seed, not args.unstratified)
        user_vectors = cached_embed(split.rows["text"].to_list(), args.cache)
        control = pool_held_out(spec, args.data_dir, split, args.n, seed) if args.pool_control else None
        control_vectors = cached_embed(control["text"].to_list(), args.cache) if control is not None else None
        for coverage in args.coverages:
            fitted = fit_cm(bank, CMSpec(**PROBE_ONLY, coverage=coverage), user_vectors)
            sets = _sets(fitted, item_vectors, items["id"].to_list())
            row = {"dataset": name, "seed": seed, "coverage": coverage, "n_user": len(bank.samples)}
            row |= {"n_test": len(sets), "tau": fitted.tau}
            row["covered"] = float(np.mean([g in s for g, s in zip(gold_labels, sets, strict=True)]))
            row["size"] = float(np.mean([len(s) for s in sets]))
            if control is not None:
                pool_sets = _sets(fitted, control_vectors, control["id"].to_list())
                truths = control["label"].to_list()
                row["n_pool"] = len(pool_sets)
                row["covered_pool"] = float(np.mean([g in s for g, s in zip(truths, pool_sets, strict=True)]))
                row["size_pool"] = float(np.mean([len(s) for s in pool_sets]))
            if args.diagnose:
                row |= diagnose(fitted, user_vectors, item_vectors, gold, coverage, np.random.default_rng(seed))
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
    parser.add_argument("--coverages", nargs="+", type=float, default=list(COVERAGES))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cm-bench-embeddings")
    parser.add_argument(
        "--unstratified", action="store_true", help="a uniform random user split (default: stratified, as the specs)"
    )
    parser.add_argument("--diagnose", action="store_true", help="also the four kinds of set that tell causes apart")
    parser.add_argument(
        "--pool-control", action="store_true", help="also score --n pool rows held out of the user split"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()
    fit_module.fit_probe = _probe_once(fit_module.fit_probe)
    rows = [row for name in args.datasets for row in run_dataset(name, args)]
    pooled = " (test file; pool held out)" if args.pool_control else ""
    print("\n| dataset | seed | n user | " + " | ".join(f"@{c:.2f}{pooled}" for c in args.coverages) + " |")
    print("|" + "---|" * (3 + len(args.coverages)))
    for (name, seed), group in _groups(rows).items():
        cells = [_cell(r) for r in group]
        print(f"| {name} | {seed} | {group[0]['n_user']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text("".join(orjson.dumps(row).decode() + "\n" for row in rows))


def _cell(row: dict) -> str:
    """Covered / mean size on the test file, and on the held-out pool rows where scored."""
    cell = f"{100 * row['covered']:.1f}% / {row['size']:.2f}"
    if "covered_pool" in row:
        cell += f"; {100 * row['covered_pool']:.1f}% / {row['size_pool']:.2f}"
    return cell


def _groups(rows: list[dict]) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["seed"]), []).append(row)
    return groups


if __name__ == "__main__":
    main()
