"""The novelty check (cm.ood): its p-values by hand, its flag rate by simulation, and a job that keeps junk out."""

from __future__ import annotations

import numpy as np
import pytest

from runner import novelty
from runner.novelty import fit_novelty


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _circle(*angles: float) -> np.ndarray:
    return np.array([[np.cos(a), np.sin(a)] for a in angles])


def test_p_values_rank_a_rows_distance_among_the_user_splits_leave_one_out_distances():
    # On the unit circle the cosine distance is 1 - cos(angle between). k = 1: the user samples' nearest
    # other sample is 0.1, 0.1, 0.2 and 0.7 rad away
    fitted = fit_novelty(_circle(0.0, 0.1, 0.3, 1.0), neighbours=1, level=0.2)
    assert np.allclose(fitted.calibration, np.sort(1 - np.cos([0.1, 0.1, 0.2, 0.7])))
    # 0.05 rad from a sample: nearer than every sample to its neighbour, p = (1 + 4) / 5; 0.45: 0.15 rad from
    # 0.3, which 0.2 and 0.7 reach or pass, p = 3 / 5; 2.0: 1 rad from 1.0, farther than all, p = 1 / 5
    p = fitted.p_values(_circle(0.05, 0.45, 2.0))
    assert np.allclose(p, [1.0, 0.6, 0.2])
    assert fitted.flags(_circle(0.05, 0.45, 2.0)).tolist() == [False, False, True]  # p <= level 0.2
    # k = 2: the second nearest other sample (0.3, 0.2, 0.3, 0.9 rad away)
    two = fit_novelty(_circle(0.0, 0.1, 0.3, 1.0), neighbours=2, level=0.2)
    assert np.allclose(two.calibration, np.sort(1 - np.cos([0.3, 0.2, 0.3, 0.9])))
    assert fit_novelty(_circle(0.0, 0.1), neighbours=5, level=0.1).neighbours == 1  # at most n - 1 others


def test_blocks_of_rows_give_what_one_block_gives(monkeypatch):
    rng = np.random.default_rng(3)
    user, rows = _unit(rng.normal(size=(50, 6))), _unit(rng.normal(size=(30, 6)))
    whole = fit_novelty(user, neighbours=3, level=0.1)
    monkeypatch.setattr(novelty, "_BLOCK", 7)
    blocked = fit_novelty(user, neighbours=3, level=0.1)
    assert np.allclose(blocked.calibration, whole.calibration)
    assert np.allclose(blocked.p_values(rows), whole.p_values(rows))


def _mixture(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around a few centres: sentences of a few intents."""
    return _unit(centres[rng.integers(len(centres), size=n)] + spread * rng.normal(size=(n, centres.shape[1])))


def _full_conformal_p(user: np.ndarray, row: np.ndarray, k: int) -> float:
    """Every one of the n + 1 points scored against the other n (the textbook p-value), by brute force."""
    points = np.vstack([user, row])
    similarities = points @ points.T
    np.fill_diagonal(similarities, -np.inf)
    scores = 1 - np.sort(similarities, axis=1)[:, -k]
    return float(np.mean(scores >= scores[-1]))


@pytest.mark.parametrize("level", [0.01, 0.05, 0.2])
def test_rows_exchangeable_with_the_user_split_are_flagged_at_most_level_of_the_time(level):
    rng = np.random.default_rng(int(level * 1000))
    centres = rng.normal(size=(5, 16))
    trials, n, m = 300, 199, 40
    rates = np.empty(trials)
    for t in range(trials):
        fitted = fit_novelty(_mixture(rng, n, centres), neighbours=5, level=level)
        rates[t] = fitted.flags(_mixture(rng, m, centres)).mean()
    error = rates.std(ddof=1) / np.sqrt(trials)  # rows within a trial share its user split: trials are the unit
    assert rates.mean() <= level + 3 * error
    # and not vacuously: the leave-one-out p-value is barely conservative (1/(n+1) = 0.005 resolution)
    assert rates.mean() >= 0.6 * level


def test_the_leave_one_out_p_value_is_never_below_the_full_conformal_one():
    """The validity argument of runner.novelty, checked row by row."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(4, 8))
    user, rows = _mixture(rng, 60, centres), _mixture(rng, 40, centres)
    for k in (1, 5):
        fitted = fit_novelty(user, neighbours=k, level=0.05)
        p = fitted.p_values(rows)
        full = np.array([_full_conformal_p(user, row, k) for row in rows])
        assert np.all(p >= full - 1e-12), k


def test_rows_far_from_the_user_split_are_flagged():
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(5, 16))
    fitted = fit_novelty(_mixture(rng, 400, centres), neighbours=5, level=0.01)
    far = _mixture(rng, 200, rng.normal(size=(3, 16)), spread=0.2)  # another domain: other centres
    assert fitted.flags(far).mean() >= 0.95
    assert np.all(fitted.p_values(far[fitted.flags(far)]) <= 0.01)


# A job on the scripted engine: pets, weather and music user samples, and a corpus with a junk row.
_VOCAB = ["cat", "dog", "rain", "sun", "song", "band", "http"]


def _embed(texts):
    """Word counts over a tiny vocabulary (substrings, so a URL counts as 'http'), L2-normalised."""
    vectors = np.array([[text.count(word) + 1e-3 for word in _VOCAB] for text in texts], dtype=float)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _samples() -> list[tuple[str, str]]:
    pairs = [("cat", "dog", "pets"), ("rain", "sun", "weather"), ("song", "band", "music")]
    return [
        (" ".join([a] * i + [b] * j), label) for a, b, label in pairs for i in (1, 2, 3) for j in (1, 2, 3) if i + j < 6
    ]


JUNK = '=HYPERLINK("http://x") cat'


@pytest.mark.parametrize("ood", ["null", "{level: 0.05}"])
async def test_a_junk_row_in_the_corpus_is_not_accepted_and_is_in_review_saying_why(tmp_path, toy_job, ood):
    import polars as pl

    from runner import run_job
    from runner.report import summary_lines
    from runner.review import export_csv
    from tests.scripted_engine import ScriptedEngine

    user = _samples() * 2  # 2 x 24 samples: each has near twins, a junk row has none
    corpus = [("cat dog dog", "pets"), ("sun rain", "weather"), ("band song", "music"), (JUNK, None)]
    cm = (
        "{variant: neighbour_prior, prior: neighbours, neighbours: 3, neighbour_temperature: 0.01, "
        f"likelihood_weight: 0, first_call: when_weighted, second_call: never, ood: {ood}, "
        "accept: {target_accuracy: 0.8, min_accepted: 10}}"
    )
    spec = toy_job(user, corpus, labels=["music", "pets", "weather"], extra=f"cm: {cm}")
    engine = ScriptedEngine({text: label for text, label in user}, n_labels=3)
    result = await run_job(spec, engine=engine, embed=_embed)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    junk = table.filter(pl.col("text") == JUNK).row(0, named=True)
    # the neighbour prior puts the junk row among the pets, as confident as any row
    assert junk["y_hat"] == "pets" and junk["confidence"] == pytest.approx(table["confidence"].max())
    others = table.filter(pl.col("text") != JUNK)
    assert others["accepted"].all() and others["y_hat"].to_list() == ["pets", "weather", "music"]
    review = pl.read_parquet(tmp_path / "out/review.parquet")
    trust = result.metrics["trust"]
    if ood == "null":  # what a user saw before cm.ood: the formula accepted
        assert junk["accepted"] and junk["ood"] is None and review.height == 0
        assert trust["n_ood"] is None and "ood_level" not in trust
        return
    assert not junk["accepted"] and junk["ood"] is True
    assert others["ood"].to_list() == [False, False, False]
    assert review["text"].to_list() == [JUNK] and review["ood"].to_list() == [True]
    assert trust["n_ood"] == 1 and trust["n_review"] == 1 and trust["ood_level"] == 0.05
    [line] = [line for line in summary_lines(result.metrics) if line.startswith("trust:")]
    assert "; 1 rows to review (1 unlike the user split, whatever their confidence: ood);" in line
    export_csv(tmp_path / "out", tmp_path / "review.csv")
    exported = pl.read_csv(tmp_path / "review.csv")
    assert exported["ood"].to_list() == [True]


def test_the_ood_level_is_part_of_what_a_neighbour_job_resumes_on_and_unread_by_the_paper_variant(toy_job):
    from runner.checkpoint import changed_keys, material_spec, spec_digest

    def spec(cm: str):
        return toy_job([("cat", "pets"), ("rain", "weather")], [("cat", None)], extra=f"cm: {cm}")

    neighbour = spec("{variant: neighbour_prior}")
    stricter = spec("{variant: neighbour_prior, ood: {level: 0.05}}")
    off = spec("{variant: neighbour_prior, ood: null}")
    assert changed_keys(material_spec(neighbour), material_spec(stricter)) == ["cm.ood.level"]
    assert changed_keys(material_spec(neighbour), material_spec(off)) == ["cm.ood"]
    assert len({spec_digest(s) for s in (neighbour, stricter, off)}) == 3  # and so the fit's key
    # the paper variant embeds nothing and checks no row: its setting changes nothing
    paper, paper_off = spec("{variant: paper}"), spec("{variant: paper, ood: null}")
    assert changed_keys(material_spec(paper), material_spec(paper_off)) == []
    assert spec_digest(paper) == spec_digest(paper_off)
