"""The novelty check (cm.ood): its p-values by hand, its flag rate by simulation (embeddings and character
n-grams), junk against a MASSIVE user split, and a job that keeps junk out."""

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


# The lexical check (cm.ood.lexical): character n-gram sets, a second p-value, Bonferroni.


def _ngram_set(text: str) -> set[str]:
    """Character 2- to 4-grams of each space-padded, lowercased word: what the hashed vectors hold, by hand."""
    grams = set()
    for word in text.lower().split():
        padded = f" {word} "
        grams |= {padded[i : i + n] for n in (2, 3, 4) for i in range(len(padded) - n + 1)}
    return grams


def _set_distance(a: str, b: str) -> float:
    """1 - cosine of binary n-gram vectors: 1 - |A & B| / sqrt(|A| |B|)."""
    x, y = _ngram_set(a), _ngram_set(b)
    return 1 - len(x & y) / np.sqrt(len(x) * len(y))


def test_lexical_scores_are_the_n_gram_set_distance_to_the_kth_nearest_user_text():
    user = ["wake me up at nine", "wake me up at ten", "set an alarm for nine", "what is the weather"]
    rows = ["wake me at nine", '=HYPERLINK("http://x")', "what's the weather like"]
    fitted = fit_novelty(_circle(0.0, 0.1, 0.3, 1.0), neighbours=2, level=0.4, texts=user)
    assert fitted.lexical is not None and fitted.lexical.neighbours == 2
    # leave-one-out: each user text's second nearest other user text
    expected = [sorted(_set_distance(u, v) for v in user if v is not u)[1] for u in user]
    assert np.allclose(fitted.lexical.calibration, np.sort(expected), atol=1e-6)
    by_hand = [sorted(_set_distance(r, u) for u in user)[1] for r in rows]
    assert np.allclose(fitted.lexical.scores(rows), by_hand, atol=1e-6)
    assert _set_distance('=HYPERLINK("http://x")', "wake me up at nine") > 0.9  # a formula shares few n-grams
    # p-values rank the scores among the calibration as the embedding's do
    p_lex = fitted.lexical.p_values(rows)
    assert np.allclose(p_lex, [(1 + np.sum(np.array(expected) >= d - 1e-9)) / 5 for d in by_hand])


def test_a_row_is_flagged_by_either_p_value_at_half_the_level():
    user_vectors = _circle(0.0, 0.1, 0.3, 1.0)
    user = ["wake me up at nine", "wake me up at ten", "set an alarm for nine", "what is the weather"]
    both = fit_novelty(user_vectors, neighbours=1, level=0.4, texts=user)
    alone = fit_novelty(user_vectors, neighbours=1, level=0.4)
    assert alone.lexical is None
    # row 1: near in both spaces; row 2: far by embedding (p 0.2), a user text; row 3: near by embedding, junk
    vectors, texts = _circle(0.05, 2.0, 0.05), ["wake me up at nine", "wake me up at ten", "=SUM(A1:B2)"]
    p_embed = both.p_values(vectors)
    p_lex = both.lexical.p_values(texts)
    assert np.allclose(p_embed, [1.0, 0.2, 1.0]) and np.allclose(p_lex, [1.0, 1.0, 0.2])
    assert np.allclose(both.combined_p_values(vectors, texts), [1.0, 0.4, 0.4])  # min(1, 2 min(p_e, p_l))
    assert both.flags(vectors, texts).tolist() == [False, True, True]
    assert alone.flags(vectors).tolist() == [False, True, False]  # the embedding alone misses the formula
    with pytest.raises(ValueError, match="needs the rows' texts"):
        both.flags(vectors)
    with pytest.raises(ValueError, match="2 texts for 4"):
        fit_novelty(user_vectors, neighbours=1, level=0.4, texts=user[:2])


def test_a_fit_pickled_before_the_lexical_check_reads_back_as_the_embedding_check_it_was():
    import pickle

    user = ["wake me up at nine", "wake me up at ten", "set an alarm for nine", "what is the weather"]
    fitted = fit_novelty(_circle(0.0, 0.1, 0.3, 1.0), neighbours=1, level=0.4, texts=user)
    old = pickle.loads(pickle.dumps(fitted))
    del old.__dict__["lexical"]  # what an older cm-runner's Novelty pickled: no such attribute
    reread = pickle.loads(pickle.dumps(old))
    assert reread.lexical is None
    vectors = _circle(0.05, 2.0, 0.05)
    assert reread.flags(vectors).tolist() == [False, True, False]  # no texts needed, the embedding's flags
    assert pickle.loads(pickle.dumps(fitted)).flags(vectors, ["a", "b", "=SUM(A1:B2)"]).tolist()[2]


@pytest.fixture(scope="module")
def massive_texts(data_dir) -> list[str]:
    """MASSIVE en-US validation utterances (2,033): a pool of real short requests."""
    import polars as pl

    return pl.read_ndjson(data_dir / "massive/en-US/validation.jsonl")["text"].to_list()


def _word_vectors(texts: list[str]) -> np.ndarray:
    """A cheap fixed embedding (hashed words, unit rows), standing in for MiniLM in the simulations."""
    from sklearn.feature_extraction.text import HashingVectorizer

    hashed = HashingVectorizer(n_features=256, alternate_sign=False).transform(texts).toarray() + 1e-3
    return hashed / np.linalg.norm(hashed, axis=1, keepdims=True)


def test_real_utterances_exchangeable_with_the_user_split_are_flagged_at_most_level_of_the_time(massive_texts):
    """User split and rows drawn without replacement from one pool of real utterances: exchangeable."""
    rng = np.random.default_rng(5)
    pool = np.array(massive_texts, dtype=object)
    vectors = _word_vectors(massive_texts)
    levels, trials, n, m = np.array([0.02, 0.05, 0.1]), 100, 199, 50
    combined, lexical = np.empty((trials, len(levels))), np.empty((trials, len(levels)))
    for t in range(trials):
        drawn = rng.permutation(len(pool))[: n + m]
        user, rows = drawn[:n], drawn[n:]
        fitted = fit_novelty(vectors[user], neighbours=5, level=0.05, texts=list(pool[user]))
        assert fitted.lexical is not None
        p_lex = fitted.lexical.p_values(list(pool[rows]))
        p_combined = np.minimum(1.0, 2.0 * np.minimum(fitted.p_values(vectors[rows]), p_lex))  # Bonferroni
        if t == 0:  # what a job flags by (worked out by hand in the test above)
            assert np.array_equal(p_combined, fitted.combined_p_values(vectors[rows], list(pool[rows])))
        # the p-values do not depend on the level: read each level's flags off the same draws
        combined[t] = (p_combined[:, None] <= levels).mean(axis=0)
        lexical[t] = (p_lex[:, None] <= levels).mean(axis=0)
    for rates in (combined, lexical):  # trials are the unit: rows within one share its user split
        error = rates.std(axis=0, ddof=1) / np.sqrt(trials)
        assert np.all(rates.mean(axis=0) <= levels + 3 * error), (rates.mean(axis=0), error)
    # not vacuous: the lexical p-value alone is near exact (duplicates in the pool tie at distance 0)
    assert np.all(lexical.mean(axis=0) >= 0.6 * levels), lexical.mean(axis=0)


def test_junk_is_flagged_against_a_massive_user_split_by_the_lexical_check(massive_texts):
    user, held = massive_texts[:300], massive_texts[300:800]
    # an embedding that sees no difference at all: every p-value it gives is 1, the flags are the lexical check's
    flat = np.ones((1, 4)) / 2.0
    fitted = fit_novelty(np.repeat(flat, len(user), axis=0), neighbours=5, level=0.01, texts=user)
    junk = [
        '=HYPERLINK("http://x")',
        '=HYPERLINK("http://example.com/a1")',
        "=SUM(A1:B22)",
        '=IMPORTXML("https://abcd.org", "//data")',
        "https://www.kq3vzt.com/xr7?id=1",
        "Xk29fQpLz0wRt",
        "qx7 zt3k vv9w",
        '<div class="row">a1b2</div>',
        '{"user": 123456}',
        "804233917",
        "jsmith42@mail.com",
    ]
    flags = fitted.flags(np.repeat(flat, len(junk), axis=0), junk)
    assert flags.all(), [j for j, f in zip(junk, flags, strict=True) if not f]
    own = fitted.flags(np.repeat(flat, len(held), axis=0), held)
    assert own.mean() <= 0.02  # real utterances like the split's: about level / 2 at most


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


@pytest.mark.parametrize("lexical", [True, False])
async def test_a_formula_the_embedding_cannot_tell_from_the_user_samples_is_flagged_by_its_characters(
    tmp_path, toy_job, lexical
):
    import polars as pl

    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    formula = "=SUM(A1:B2) cat dog"  # to _embed, the words cat and dog: the same vector as "cat dog"
    user = _samples() * 2
    corpus = [("cat dog dog", "pets"), ("sun rain", "weather"), ("band song", "music"), (formula, None)]
    cm = (
        "{variant: neighbour_prior, prior: neighbours, neighbours: 3, neighbour_temperature: 0.01, "
        f"likelihood_weight: 0, first_call: when_weighted, second_call: never, "
        f"ood: {{level: 0.05, lexical: {str(lexical).lower()}}}, accept: {{target_accuracy: 0.8, min_accepted: 10}}}}"
    )
    spec = toy_job(user, corpus, labels=["music", "pets", "weather"], extra=f"cm: {cm}")
    await run_job(spec, engine=ScriptedEngine({text: label for text, label in user}, n_labels=3), embed=_embed)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    # 48 user samples: the smallest p-value is 1/49, so 2/49 <= 0.05 can still flag with both checks
    assert table["ood"].to_list() == [False, False, False, lexical]
    assert table["accepted"].to_list() == [True, True, True, not lexical]


def test_the_ood_level_is_part_of_what_a_neighbour_job_resumes_on_and_unread_by_the_paper_variant(toy_job):
    from runner.checkpoint import _digest, changed_keys, material_spec, spec_digest

    def spec(cm: str):
        return toy_job([("cat", "pets"), ("rain", "weather")], [("cat", None)], extra=f"cm: {cm}")

    neighbour = spec("{variant: neighbour_prior}")
    stricter = spec("{variant: neighbour_prior, ood: {level: 0.05}}")
    off = spec("{variant: neighbour_prior, ood: null}")
    embedding_only = spec("{variant: neighbour_prior, ood: {lexical: false}}")
    assert changed_keys(material_spec(neighbour), material_spec(stricter)) == ["cm.ood.level"]
    assert changed_keys(material_spec(neighbour), material_spec(off)) == ["cm.ood"]
    assert changed_keys(material_spec(neighbour), material_spec(embedding_only)) == ["cm.ood.lexical"]
    assert len({spec_digest(s) for s in (neighbour, stricter, off, embedding_only)}) == 4  # and so the fit's key
    # a run recorded before cm.ood.lexical resumes (the default filled in); its fit's key differs, so the
    # fit on file (embedding check alone) is not reused and the finished shards are scored again
    before = {key: value for key, value in material_spec(neighbour).items() if key != "cm.ood.lexical"}
    assert changed_keys(before, material_spec(neighbour)) == []
    assert _digest(before) != spec_digest(neighbour)
    # the paper variant embeds nothing and checks no row: its setting changes nothing
    paper, paper_off = spec("{variant: paper}"), spec("{variant: paper, ood: null}")
    assert changed_keys(material_spec(paper), material_spec(paper_off)) == []
    assert spec_digest(paper) == spec_digest(paper_off)
