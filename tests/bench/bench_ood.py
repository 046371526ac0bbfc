"""cm.ood measured: the share of rows flagged unlike the user split, on a dataset's own test items and on
junk and foreign rows mixed into its corpus, with the real MiniLM embeddings (runner.novelty).

For each dataset: a 5% user split (seed 0) and 1000 seeded test items, embedded with all-MiniLM-L6-v2;
the novelty check fitted on the user split at each k and level; the share flagged on the dataset's own
test items (exchangeable: at most about ``level``), on 1000 junk rows (spreadsheet formulas, URLs,
random strings, markup, numbers) and on 1000 foreign rows each: the other datasets' test items and
MASSIVE de-DE and fr-FR items. Also the embedding's and the check's cost per row. CLINC150's own test
items are split into in-scope and ``oos`` (18% of its test set, 0.7% of its training pool).

Three checks from the same two p-values: the embedding's alone at the level (cm.ood before
``lexical``, and with ``lexical: false``), the character n-gram one alone, and both (the default: either
p-value at most level / 2).

What the flag changes: with the recommended configuration and no LLM (the probe prior alone,
``likelihood_weight: 0``, as SmolLM2's answers earn no weight), the share of each set that
``cm.accept`` (0.95 / 0.95) accepts without the flag and with each check's, at the default k and level.

    flock /tmp/cm-heavy2.lock python tests/bench/bench_ood.py --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import string
import time
from pathlib import Path

import numpy as np
import orjson

# this script's folder is on sys.path when it runs
from bench_neighbour_vote import sample_items

from runner import apply
from runner.bank import Sample, UserSplitInfo, estimate_bank
from runner.data import load_user_split
from runner.embeddings import embed
from runner.fit import fit_cm
from runner.novelty import either_p_value, fit_novelty
from runner.spec import CMSpec

DATASETS = ["massive-en-US", "banking77", "clinc150"]
FOREIGN = ["massive-de-DE", "massive-fr-FR"]


def junk_rows(n: int, seed: int = 0) -> list[str]:
    """Rows a corpus export picks up that are no utterance at all."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_letters + string.digits))
    words = ["x", "data", "id", "img", "foo", "tmp", "a1", "row", "val", "user"]

    def token(low: int, high: int) -> str:
        return "".join(rng.choice(letters, size=int(rng.integers(low, high))))

    makers = [
        lambda: f'=HYPERLINK("http://{token(3, 10)}.com/{token(2, 8)}")',
        lambda: (
            f"=SUM({rng.choice(list('ABCDEF'))}{rng.integers(1, 99)}:{rng.choice(list('GHIJ'))}{rng.integers(1, 99)})"
        ),
        lambda: f'=IMPORTXML("https://{token(4, 9)}.org", "//{rng.choice(words)}")',
        lambda: f"https://www.{token(4, 12)}.{rng.choice(['com', 'io'])}/{token(3, 10)}?{rng.choice(words)}=1",
        lambda: token(6, 40),
        lambda: " ".join(token(2, 9) for _ in range(int(rng.integers(2, 6)))),
        lambda: f'<div class="{rng.choice(words)}">{token(3, 12)}</div>',
        lambda: orjson.dumps({str(rng.choice(words)): int(rng.integers(0, 10**6))}).decode(),
        lambda: f"{rng.integers(0, 10**9)}",
        lambda: f"{token(4, 10)}@{token(3, 8)}.com",
    ]
    return [makers[i % len(makers)]() for i in range(n)]


JUNK_KINDS = ["hyperlink", "sum", "importxml", "url", "random", "random words", "html", "json", "number", "email"]


CHECKS = ("embedding", "lexical", "both")  # the embedding's p-value at level (before cm.ood.lexical), ...


def check_flags(p_embed: np.ndarray, p_lex: np.ndarray, level: float) -> dict[str, np.ndarray]:
    """Each check's flags from the two p-values: either alone at ``level``, both by Bonferroni (runner.novelty)."""
    return {"embedding": p_embed <= level, "lexical": p_lex <= level, "both": either_p_value(p_embed, p_lex) <= level}


def accepted_shares(
    split, user: np.ndarray, items: dict[str, np.ndarray], texts: dict[str, list[str]]
) -> dict[str, dict[str, float]]:
    """Per set, the share cm.accept accepts with the probe prior alone: without the flag and with each check's."""
    samples = [
        Sample(id=str(i), text=t, answer=y, truth=y)
        for i, (t, y) in enumerate(zip(split.rows["text"].to_list(), split.rows["label"].to_list(), strict=True))
    ]
    info = UserSplitInfo(path="bench", fraction=0.05, seed=0, stratified=True, n_samples=len(samples))
    bank = estimate_bank(
        [(s.answer, s.truth) for s in samples], split.labels, dataset="bench", model="none", strategy="none",
        user_split=info, samples=samples,
    )  # fmt: skip
    cm = CMSpec(variant="neighbour_prior", prior="probe", likelihood_weight=0, first_call="when_weighted")
    fitted = fit_cm(bank, cm.model_copy(update={"second_call": "never"}), user)
    assert fitted.novelty is not None and fitted.novelty.lexical is not None  # the default: cm.ood.lexical true
    shares = {}
    for name, vectors in items.items():
        contexts = apply.neighbourhoods(fitted, vectors, texts[name])
        p_embed = fitted.novelty.p_values(vectors)
        p_lex = fitted.novelty.lexical.p_values(texts[name])
        flags = check_flags(p_embed, p_lex, fitted.novelty.level)
        assert np.array_equal(flags["both"], [c.ood for c in contexts])  # what a job flags
        confident = []
        for row, context in enumerate(contexts):
            refined = apply.refine(fitted, context, None, row_id=f"{name}:{row}")
            label = refined.refinement.decided
            confidence = apply.confidence(fitted, apply.score(fitted, refined, label))
            confident.append(apply.accepted(fitted, confidence, label))
        accepted = np.array(confident)
        shares[name] = {"without_ood": float(accepted.mean())}
        shares[name] |= {f"with_{check}": float((accepted & ~flags[check]).mean()) for check in CHECKS}
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--n", type=int, default=1000, help="test, junk and foreign rows per set")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--levels", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--default-k", type=int, default=5)
    parser.add_argument("--default-level", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("bench_ood.json"))
    args = parser.parse_args()

    items, texts, specs, embed_seconds, oos = {}, {}, {}, {}, None
    for name in DATASETS + FOREIGN:
        started = time.perf_counter()
        specs[name], table, items[name] = sample_items(name, args.data_dir, args.n)
        texts[name] = table["text"].to_list()
        embed_seconds[name] = time.perf_counter() - started
        if name == "clinc150":
            oos = np.array([label == "oos" for label in table["label"].to_list()])
    texts["junk"] = junk_rows(args.n)
    started = time.perf_counter()
    items["junk"] = embed(texts["junk"])
    junk_seconds = time.perf_counter() - started

    results = []
    for name in DATASETS:
        spec = specs[name]
        split = load_user_split(
            spec.resolve_data_path(spec.user_split.path, args.data_dir),
            spec.dataset,
            spec.user_split.model_copy(update={"fraction": args.fraction, "seed": args.seed}),
        )
        user = embed(split.rows["text"].to_list())
        for k in args.neighbours:
            started = time.perf_counter()
            novelty = fit_novelty(user, k, args.default_level, split.rows["text"].to_list())
            assert novelty.lexical is not None
            fit_seconds = time.perf_counter() - started
            started = time.perf_counter()
            p_embed = {other: novelty.p_values(vectors) for other, vectors in items.items()}
            embed_ms = 1000 * (time.perf_counter() - started) / sum(len(v) for v in items.values())
            started = time.perf_counter()
            p_lex = {other: novelty.lexical.p_values(texts[other]) for other in items}
            lexical_ms = 1000 * (time.perf_counter() - started) / sum(len(v) for v in items.values())
            for level in args.levels:
                flags = {other: check_flags(p_embed[other], p_lex[other], level) for other in items}
                for check in CHECKS:
                    shares = {other: float(flags[other][check].mean()) for other in items}
                    row = {"dataset": name, "n_user": len(user), "k": k, "level": level, "check": check}
                    row |= {"own": shares.pop(name), "flagged": shares, "fit_seconds": round(fit_seconds, 4)}
                    row |= {"apply_ms_per_row": {"embedding": round(embed_ms, 4), "lexical": round(lexical_ms, 4)}}
                    if name == "clinc150":
                        own = flags[name][check]
                        row |= {"own_in_scope": float(own[~oos].mean()), "own_oos": float(own[oos].mean())}
                        row |= {"n_oos": int(oos.sum())}
                    junk_flags = flags["junk"][check]
                    kinds = np.arange(len(junk_flags)) % len(JUNK_KINDS)
                    row["junk_by_kind"] = {
                        kind: float(junk_flags[kinds == i].mean()) for i, kind in enumerate(JUNK_KINDS)
                    }
                    results.append(row)
                    print(orjson.dumps(row).decode(), flush=True)
        default = CMSpec().ood
        assert default is not None and (default.neighbours, default.level) == (args.default_k, args.default_level)
        accepted = accepted_shares(split, user, items, texts)
        results.append({"dataset": name, "n_user": len(user), "accepted": accepted})
        print(orjson.dumps(results[-1]).decode(), flush=True)
    n_embedded = args.n * (len(DATASETS) + len(FOREIGN) + 1)
    cost = {
        "embed_rows_per_second": round(n_embedded / (sum(embed_seconds.values()) + junk_seconds), 1),
        "note": "sample_items' time includes reading the test file; MiniLM on the CPU, batch 64",
    }
    print(orjson.dumps(cost).decode())
    args.out.write_bytes(orjson.dumps({"results": results, "cost": cost}, option=orjson.OPT_INDENT_2))

    foreign = [name for name in DATASETS + FOREIGN]
    print("\n| user split (n) | k | level | check | own test items | junk | " + " | ".join(foreign) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(foreign))
    for row in (r for r in results if "k" in r):
        cells = [f"{100 * row['flagged'][f]:.1f}%" if f in row["flagged"] else "(own)" for f in foreign]
        print(
            f"| {row['dataset']} ({row['n_user']}) | {row['k']} | {row['level']} | {row['check']} | "
            f"{100 * row['own']:.1f}% | {100 * row['flagged']['junk']:.1f}% | " + " | ".join(cells) + " |"
        )
    print("\njunk flagged by kind at the default k and level:")
    print("| user split | check | " + " | ".join(JUNK_KINDS) + " |")
    print("|---|---|" + "---|" * len(JUNK_KINDS))
    for row in results:
        if row.get("k") == args.default_k and row.get("level") == args.default_level:
            cells = [f"{100 * row['junk_by_kind'][kind]:.0f}%" for kind in JUNK_KINDS]
            print(f"| {row['dataset']} | {row['check']} | " + " | ".join(cells) + " |")
    print("\nCLINC150's own test items at the default, in scope / oos:")
    for row in results:
        if "own_oos" in row and row["k"] == args.default_k and row["level"] == args.default_level:
            print(f"{row['check']}: in scope {100 * row['own_in_scope']:.1f}%, oos {100 * row['own_oos']:.1f}%")
    print("\naccepted by cm.accept (probe alone), without the flag -> with the embedding's / the lexical / both:")
    for row in (r for r in results if "accepted" in r):
        cells = [
            f"{f}: {100 * v['without_ood']:.1f}% -> "
            + " / ".join(f"{100 * v[f'with_{check}']:.1f}%" for check in CHECKS)
            for f, v in row["accepted"].items()
        ]
        print(f"{row['dataset']}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
