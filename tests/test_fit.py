"""Fitting CM on the user split (runner.fit) and applying the fit to items (runner.apply).

The expected settings (k and temperature, the likelihood weight, tau, the questions) are worked
out here by hand or by brute force over the grids on tiny banks, not read back from the code.
"""

import hashlib
import math

import numpy as np
import orjson
import polars as pl
import pytest
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression

from runner import apply
from runner.bank import Sample, UserSplitInfo, estimate_bank
from runner.fit import (
    NEIGHBOUR_GRID,
    TEMPERATURE_GRID,
    WEIGHT_GRID,
    FitDraft,
    FittedCM,
    _earned_weight,
    finish_fit,
    fit_cm,
    prepare_fit,
    split_weights,
)
from runner.probe import fit_probe
from runner.review import with_reviewed
from runner.spec import AcceptSpec, CMSpec

LABELS = ["pets", "weather", "music"]
SPLIT = UserSplitInfo(path="u", fraction=None, seed=0, stratified=True, n_samples=0)


def toy_embed(texts):
    """Bag of words over a tiny vocabulary, L2-normalised: texts sharing words are neighbours."""
    vocab = ["cat", "dog", "rain", "sun", "song", "band", "loud"]
    vectors = np.array([[text.split().count(word) + 1e-3 for word in vocab] for text in texts], dtype=float)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bank_from(samples):
    pairs = [(s.answer, s.truth) for s in samples]
    return estimate_bank(
        pairs, LABELS, dataset="toy", model="m", strategy="zero_shot", user_split=SPLIT, samples=samples
    )


# The model answers "music" for loud pets and for every song; weather is answered right.
SAMPLES = [
    Sample(id="1", text="cat dog", answer="pets", truth="pets"),
    Sample(id="2", text="dog cat cat", answer="pets", truth="pets"),
    Sample(id="3", text="loud dog", answer="music", truth="pets"),
    Sample(id="4", text="loud cat dog", answer="music", truth="pets"),
    Sample(id="5", text="rain sun", answer="weather", truth="weather"),
    Sample(id="6", text="sun rain rain", answer="weather", truth="weather"),
    Sample(id="7", text="song band", answer="music", truth="music"),
    Sample(id="8", text="band song song", answer="music", truth="music"),
    Sample(id="9", text="loud band", answer="music", truth="music"),
]
TRUTHS = np.array([LABELS.index(s.truth) for s in SAMPLES])


def fit(samples, cm: CMSpec, embed=None, choose=lambda question, truth: question.most_probable) -> FittedCM:
    """Fit on ``samples``, answering each held-out question with ``choose(question, its truth)``."""
    draft = draft_of(samples, cm, embed)
    return finish_fit(draft, [choose(q, samples[q.sample].truth) for q in draft.questions])


def draft_of(samples, cm: CMSpec, embed=None) -> FitDraft:
    return prepare_fit(bank_from(samples), cm, embed([s.text for s in samples]) if embed else None)


def refine_texts(fitted: FittedCM, embed, texts, answers):
    """Each text's refinement, its neighbourhood embedded as the pipeline does."""
    contexts = apply.neighbourhoods(fitted, embed(texts), texts)
    refined = [
        apply.refine(fitted, c, a, row_id=f"t{i}") for i, (c, a) in enumerate(zip(contexts, answers, strict=True))
    ]
    return [r.refinement for r in refined]


# --- worked out by hand, independently of runner.fit and runner.posterior -------------------


def votes_by_hand(vectors, truths, k, temperature):
    """Leave-one-out neighbour vote weights: each sample's k nearest others, weighted exp(s / T)."""
    weights = np.zeros((len(vectors), len(LABELS)))
    for i in range(len(vectors)):
        others = sorted((j for j in range(len(vectors)) if j != i), key=lambda j: -(vectors[i] @ vectors[j]))
        near = others[:k]
        closest = vectors[i] @ vectors[near[0]]
        for j in near:
            weights[i, truths[j]] += math.exp((vectors[i] @ vectors[j] - closest) / temperature)
    return weights


def best_neighbourhood_by_hand(vectors, truths):
    """The (k, T) whose leave-one-out vote is right most often, the first in grid order on ties."""
    right = {
        (k, t): int(np.sum(votes_by_hand(vectors, truths, k, t).argmax(axis=1) == truths))
        for k in NEIGHBOUR_GRID
        for t in TEMPERATURE_GRID
    }
    return max(right, key=right.get), right


def counts_posterior_by_hand(samples, i, weight, alpha=0.1, beta=1.0):
    """p(Y | Y' = sample i's answer) from every other sample's counts: likelihood^w x class prior."""
    others = samples[:i] + samples[i + 1 :]
    answer = samples[i].answer
    joint = []
    for label in LABELS:
        with_truth = sum(o.truth == label for o in others)
        answered = sum(o.truth == label and o.answer == answer for o in others)
        likelihood = (answered + alpha) / (with_truth + len(LABELS) * alpha)
        prior = (with_truth + beta) / (len(others) + len(LABELS) * beta)
        joint.append(likelihood**weight * prior)
    return np.array(joint) / sum(joint)


def uniform_by_hand(row_id):
    """The draw a row's id fixes: the first 8 bytes of its salted blake2b digest, over 2**64."""
    digest = hashlib.blake2b(f"cm-runner/candidate-set/{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def conformity_by_hand(posterior, truth, row_id):
    """Randomised APS, the top label kept: 0 for the most probable label; else the mass of the labels
    ranked above the truth (most probable first, label order on ties) plus the row's draw times its own."""
    ranked = sorted(range(len(posterior)), key=lambda j: -posterior[j])
    if ranked[0] == truth:
        return 0.0
    above = sum(posterior[j] for j in ranked[: ranked.index(truth)])
    return above + uniform_by_hand(row_id) * posterior[truth]


def conformal_quantile_by_hand(scores, coverage):
    rank = math.ceil((len(scores) + 1) * coverage)
    return 1.0 if rank > len(scores) else sorted(scores)[rank - 1]


# --- the variants --------------------------------------------------------------------------


def test_paper_variant_is_the_binary_row_and_asks_among_the_held_out_rows_with_several_labels():
    draft = draft_of(SAMPLES, CMSpec())
    # row "music" of M holds pets (2 samples) and music (3); without any one of those five it still
    # holds both, so each is asked among them (label order, as the second call lists a paper row).
    # Rows "pets" and "weather" hold one label each: nothing to ask.
    answered_music = [i for i, s in enumerate(SAMPLES) if s.answer == "music"]
    assert [q.sample for q in draft.questions] == answered_music
    assert all(q.candidates == ("pets", "music") for q in draft.questions)
    fitted = finish_fit(draft, [SAMPLES[q.sample].truth for q in draft.questions])
    assert fitted.variant == "paper"
    refined = apply.refine(fitted, None, "music", row_id="x").refinement
    assert refined.candidates == ("pets", "music") and refined.needs_second_call


def test_counts_variant_keeps_the_likely_truths_and_decides_when_one_suffices():
    # answer music: truths music (3) and pets (2): music alone has more than half the mass
    decided = apply.refine(fit(SAMPLES, CMSpec(variant="counts", tau=0.5)), None, "music", row_id="x").refinement
    assert decided.candidates == ("music",) and decided.decided == "music" and not decided.needs_second_call
    wide = apply.refine(fit(SAMPLES, CMSpec(variant="counts", tau=0.95)), None, "music", row_id="x").refinement
    assert wide.candidates[:2] == ("music", "pets") and wide.needs_second_call
    never_cm = CMSpec(variant="counts", tau=0.95, second_call="never")
    never = apply.refine(fit(SAMPLES, never_cm), None, "music", row_id="x").refinement
    assert never.decided == "music" and not never.needs_second_call


def test_neighbour_prior_recovers_pets_the_model_calls_music():
    fitted = fit(SAMPLES, CMSpec(variant="neighbour_prior", tau=0.5, neighbours=3), toy_embed)
    [refined] = refine_texts(fitted, toy_embed, ["loud dog cat"], ["music"])
    assert refined.neighbour_vote == "pets" and refined.decided == "pets"


def test_instance_variant_uses_local_confusions():
    cm = CMSpec(variant="instance", tau=0.5, neighbours=3, instance_neighbours=3, blend=0.5)
    fitted = fit(SAMPLES, cm, toy_embed)
    near_pets, near_music = refine_texts(fitted, toy_embed, ["loud dog", "song band loud"], ["music", "music"])
    assert near_pets.decided == "pets"
    assert near_music.decided == "music"


# The 9 scores come in runs of equal values (the samples come in pairs); these coverages (ranks
# ceil(10 * coverage) = 5, 6, 8) are chosen so that a rank one off either way, or ceil(9 * coverage),
# picks another value at one of them at least.
@pytest.mark.parametrize("coverage", [0.45, 0.55, 0.75])
def test_tau_is_the_conformal_quantile_of_held_out_conformity_scores(coverage):
    cm = CMSpec(variant="counts", coverage=coverage, likelihood_weight=1.0)
    scores = [
        conformity_by_hand(counts_posterior_by_hand(SAMPLES, i, weight=1.0), TRUTHS[i], SAMPLES[i].id)
        for i in range(len(SAMPLES))
    ]
    expected = conformal_quantile_by_hand(scores, coverage)
    draft = draft_of(SAMPLES, cm)
    assert draft.tau == pytest.approx(expected)
    covered = np.mean([truth in chosen for truth, chosen in zip(TRUTHS, draft.held_out_sets, strict=True)])
    assert covered >= coverage  # the held-out sets hold the truth at least as often as asked


def weighted_quantile_by_hand(scores, weights, coverage):
    """The smallest score whose cumulative weight (lowest first) reaches coverage of the total plus the
    largest weight (the new item's, at infinity); 1 when none does."""
    total, reached = sum(weights) + max(weights), 0.0
    for score, weight in sorted(zip(scores, weights, strict=True)):
        reached += weight
        if reached >= coverage * total:
            return score
    return 1.0


POOL = {"pets": 80, "weather": 10, "music": 10}  # of 100 pool rows; SAMPLES has 4 / 2 / 3 of 9


def stratified_bank(samples, *, stratified=True, pool=POOL):
    split = UserSplitInfo(path="u", fraction=0.05, seed=0, stratified=stratified, n_samples=9, pool_label_counts=pool)
    pairs = [(s.answer, s.truth) for s in samples]
    return estimate_bank(pairs, LABELS, dataset="toy", model="m", strategy="z", user_split=split, samples=samples)


@pytest.mark.parametrize("coverage", [0.45, 0.55, 0.75])
def test_a_stratified_splits_tau_weighs_each_sample_by_its_labels_pool_share_over_split_share(coverage):
    # weights: pets 0.8 / (4/9) = 1.8, weather 0.1 / (2/9) = 0.45, music 0.1 / (3/9) = 0.3. Two pets samples
    # score 0.73 and 0.76, the rest 0: weighted, 0.55 and 0.75 ask for them (unweighted: 0 and 0.73).
    cm = CMSpec(variant="counts", coverage=coverage, likelihood_weight=1.0)
    scores = [
        conformity_by_hand(counts_posterior_by_hand(SAMPLES, i, weight=1.0), TRUTHS[i], SAMPLES[i].id)
        for i in range(len(SAMPLES))
    ]
    by_label = {"pets": 0.8 / (4 / 9), "weather": 0.1 / (2 / 9), "music": 0.1 / (3 / 9)}
    weights = [by_label[s.truth] for s in SAMPLES]
    assert prepare_fit(stratified_bank(SAMPLES), cm).tau == pytest.approx(
        weighted_quantile_by_hand(scores, weights, coverage)
    )
    unweighted = conformal_quantile_by_hand(scores, coverage)
    assert prepare_fit(stratified_bank(SAMPLES, stratified=False), cm).tau == pytest.approx(unweighted)
    assert prepare_fit(stratified_bank(SAMPLES, pool=None), cm).tau == pytest.approx(unweighted)  # an old bank
    if coverage > 0.5:
        assert weighted_quantile_by_hand(scores, weights, coverage) > unweighted


def test_split_weights_count_only_the_drawn_samples():
    from runner.bank import update_bank

    reviewed = update_bank(stratified_bank(SAMPLES), [Sample(id="c", text="cat", answer="pets", truth="music")])
    truths = np.array([LABELS.index(s.truth) for s in reviewed.samples])
    drawn = np.array([s.source == "user_split" for s in reviewed.samples])
    by_label = {"pets": 0.8 / (4 / 9), "weather": 0.1 / (2 / 9), "music": 0.1 / (3 / 9)}
    expected = [by_label[s.truth] for s in SAMPLES] + [1.0]  # the correction is never held out: any weight
    assert split_weights(reviewed, truths, drawn) == pytest.approx(expected)


def test_a_coverage_the_held_out_scores_cannot_certify_keeps_every_label():
    # ceil(10 * 1.0) = 10 > 9 scores: no held-out score is a tau with that guarantee
    assert draft_of(SAMPLES, CMSpec(variant="counts", coverage=1.0, likelihood_weight=1.0)).tau == 1.0
    loose = draft_of(SAMPLES, CMSpec(variant="counts", coverage=0.5, likelihood_weight=1.0)).tau
    assert loose < 1.0


def test_neighbour_variants_need_samples_and_their_embeddings():
    no_samples = estimate_bank(
        [(s.answer, s.truth) for s in SAMPLES], LABELS, dataset="toy", model="m", strategy="z", user_split=SPLIT
    )
    with pytest.raises(ValueError, match="needs a bank with its user samples"):
        prepare_fit(no_samples, CMSpec(variant="neighbour_prior"), toy_embed([s.text for s in SAMPLES]))
    with pytest.raises(ValueError, match="needs the user samples' embeddings"):
        prepare_fit(bank_from(SAMPLES), CMSpec(variant="instance"))


CORPUS = [("cat loud dog", "pets"), ("rain sun sun", "weather"), ("song loud", "music")]
ANSWERS = {s.text: s.answer for s in SAMPLES} | {
    "cat loud dog": "music",
    "rain sun sun": "weather",
    "song loud": "music",
}


def neighbour_job(toy_job, cm: str, samples=SAMPLES):
    return toy_job([(s.text, s.truth) for s in samples], CORPUS, name="np", labels=LABELS, extra=f"cm: {cm}")


@pytest.mark.parametrize("prior", ["neighbours", "probe"])
async def test_a_job_with_the_neighbour_prior_reports_the_neighbour_vote_and_what_it_chose(tmp_path, toy_job, prior):
    import polars as pl

    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    spec = neighbour_job(toy_job, f"{{variant: neighbour_prior, prior: {prior}, second_call: never}}")
    result = await run_job(spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["y_neighbour"].to_list() == ["pets", "weather", "music"]
    assert table["y_hat"].to_list() == ["pets", "weather", "music"]
    assert result.metrics["accuracy_baseline"] == pytest.approx(2 / 3)
    assert result.metrics["accuracy_cm"] == 1.0 and result.metrics["accuracy_neighbour_vote"] == 1.0

    # what the user split chose is reported: worked out here from the bank's samples
    samples = result.bank.samples
    vectors = toy_embed([s.text for s in samples])
    truths = np.array([LABELS.index(s.truth) for s in samples])
    (k, temperature), _ = best_neighbourhood_by_hand(vectors, truths)
    if prior == "probe":
        probe = fit_probe(vectors, truths, len(LABELS))
        held_out_prior, strength = probe.held_out, probe.strength
    else:
        weights = votes_by_hand(vectors, truths, k, temperature)
        held_out_prior, strength = 0.95 * weights / weights.sum(axis=1, keepdims=True) + 0.05 / 3, None
    wrong = int(np.sum(held_out_prior.argmax(axis=1) != truths))
    # the answer can win at most the samples the prior gets wrong; with one, wins - losses <= 1 = sqrt(1):
    # never more than one standard error, so the answer gets no weight and the posterior is the prior
    assert wrong <= 1
    pairs = zip(held_out_prior, truths, samples, strict=True)
    scores = [conformity_by_hand(row, truth, sample.id) for row, truth, sample in pairs]
    chosen = result.metrics["cm_settings"]
    assert chosen["prior"] == prior and (chosen["neighbours"], chosen["neighbour_temperature"]) == (k, temperature)
    assert chosen["likelihood_weight"] == 0.0
    assert chosen["tau"] == pytest.approx(min(1.0, conformal_quantile_by_hand(scores, 0.9)))
    assert chosen.get("probe_strength") == strength


def test_likelihood_weight_zero_is_the_neighbour_vote_and_unset_is_chosen_on_held_out_samples():
    vote_only = fit(SAMPLES, CMSpec(variant="neighbour_prior", likelihood_weight=0.0, tau=0.5), toy_embed)
    texts, answers = ["loud dog cat", "song band", "rain"], ["music", "pets", "music"]
    for refined in refine_texts(vote_only, toy_embed, texts, answers):
        assert refined.decided == refined.neighbour_vote  # the model's answer is ignored at w = 0

    # unset, on the counts variant (class prior): the weight whose held-out argmax is right most often
    # (the smallest on ties), kept if it beats w = 0 by more than one standard error
    def right_at(weight):
        return np.array(
            [counts_posterior_by_hand(SAMPLES, i, weight).argmax() == TRUTHS[i] for i in range(len(SAMPLES))]
        )

    best = max(WEIGHT_GRID, key=lambda w: (right_at(w).sum(), -w))
    wins, losses = int(np.sum(right_at(best) & ~right_at(0.0))), int(np.sum(~right_at(best) & right_at(0.0)))
    expected = best if wins - losses > math.sqrt(wins + losses) else 0.0
    assert expected > 0  # this bank's answers are worth weighing: the test below can tell 0 from a choice
    assert draft_of(SAMPLES, CMSpec(variant="counts", tau=0.5)).weight == expected


def pets_arc_with_a_mislabelled_sample(query_angle: float):
    """A pets arc with one "music" sample in its middle, a music cluster far away, and a query:
    user samples on the unit circle (named by their angle) and the embedder that places them."""
    angles = {"p0": 0, "p10": 10, "p20": 20, "p30": 30, "m15": 15, "m90": 90, "m100": 100, "m110": 110}

    def embed_at_angle(texts):
        radians = np.deg2rad([query_angle if text == "query" else angles[text] for text in texts])
        return np.stack([np.cos(radians), np.sin(radians)], axis=1)

    samples = [Sample(id=t, text=t, answer="pets", truth="pets" if t[0] == "p" else "music") for t in angles]
    return samples, embed_at_angle


def test_unset_neighbourhood_is_the_one_whose_vote_is_best_on_held_out_samples():
    # the single nearest sample misleads half the pets, a vote of three does not
    samples, embed_at_angle = pets_arc_with_a_mislabelled_sample(query_angle=17)
    truths = np.array([LABELS.index(s.truth) for s in samples])
    best, right = best_neighbourhood_by_hand(embed_at_angle([s.text for s in samples]), truths)
    assert right[(1, 0.01)] == 5 and right[(3, 0.05)] == 7  # 1-NN gets 5 of 8 held-out samples right, 3 votes 7
    fixed = dict(variant="neighbour_prior", tau=0.5, likelihood_weight=0.0)
    tuned = fit(samples, CMSpec(**fixed), embed_at_angle)
    assert (tuned.neighbours, tuned.temperature) == best
    one = fit(samples, CMSpec(**fixed, neighbours=1, neighbour_temperature=0.01), embed_at_angle)
    assert refine_texts(one, embed_at_angle, ["query"], ["pets"])[0].decided == "music"
    assert refine_texts(tuned, embed_at_angle, ["query"], ["pets"])[0].decided == "pets"


def held_out(n_prior_right, n_prior_wrong, answer_fixes, answer_breaks):
    """Two labels, truth 0 everywhere: priors right or wrong, and answers that fix or break them."""
    right, wrong = [0.6, 0.4], [0.4, 0.6]
    priors = np.array([right] * n_prior_right + [wrong] * n_prior_wrong)
    rows = np.full_like(priors, 0.5)  # an answer that says nothing
    rows[n_prior_right : n_prior_right + answer_fixes] = [0.9, 0.1]
    rows[:answer_breaks] = [0.1, 0.9]
    return rows, priors, np.zeros(len(priors), dtype=np.int64)


def test_the_models_answer_gets_weight_only_when_it_clearly_beats_the_prior():
    # an answer row (0.9, 0.1) overturns a prior (0.4, 0.6) once 9^w > 1.5, w > 0.18: every weight from
    # 0.25 up fixes the same 30 samples, and the smallest is kept; 30 wins, no loss: 30 > sqrt(30)
    assert _earned_weight(*held_out(60, 40, answer_fixes=30, answer_breaks=0)) == 0.25
    # 3 fixed and 1 broken out of 100: better on the user split, but 3 - 1 = 2 is not more than sqrt(4)
    assert _earned_weight(*held_out(60, 40, answer_fixes=3, answer_breaks=1)) == 0.0


async def test_a_first_answer_that_cannot_count_is_not_asked_for(tmp_path, toy_job):
    import polars as pl

    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    cm = "{variant: neighbour_prior, tau: 0.8, neighbours: 3, likelihood_weight: 0, first_call: when_weighted}"
    engine = ScriptedEngine(ANSWERS, n_labels=3)
    result = await run_job(neighbour_job(toy_job, cm), engine=engine, embed=toy_embed)
    asked = sorted(request.messages[-1].content for request in engine.requests)
    # the estimate asks every user sample; the corpus, nobody. One user sample is asked again, among
    # its held-out set: "loud band"'s three nearest others are "loud dog", "song band" (equally close)
    # and "loud cat dog", so pets and music each hold 0.492 of its mass; the second is kept when
    # 0.492 + u * 0.492 <= tau, with this id's draw u = 0.53 at tau 0.8 (at 0.5 it would not be). The
    # others' top label holds 0.967: one label each.
    assert asked == sorted([s.text for s in SAMPLES] + ["loud band"])
    [question] = [r for r in engine.requests if len(r.choices) < 3]
    assert question.messages[-1].content == "loud band" and len(question.choices) == 2
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["y_prime"].to_list() == [None, None, None] and table["calls"].to_list() == [0, 0, 0]
    assert table["y_hat"].to_list() == table["y_neighbour"].to_list() == ["pets", "weather", "music"]
    assert result.metrics["accuracy_baseline"] is None and result.metrics["accuracy_cm"] == 1.0
    assert result.metrics["calls_per_item"] == 0


async def test_a_skipped_first_answer_still_lets_the_model_choose_within_an_ambiguous_set(tmp_path, toy_job):
    import polars as pl

    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    # tau 0.98: the neighbours' label and one more, so every item's set holds two labels
    cm = "{variant: neighbour_prior, tau: 0.98, neighbours: 3, likelihood_weight: 0, first_call: when_weighted}"
    engine = ScriptedEngine(ANSWERS, dict(CORPUS), n_labels=3)
    result = await run_job(neighbour_job(toy_job, cm), engine=engine, embed=toy_embed)
    corpus_requests = [r for r in engine.requests if r.messages[-1].content in dict(CORPUS)]
    assert len(corpus_requests) == 3 and all(len(r.choices) == 2 for r in corpus_requests)  # second calls only
    # every user sample is asked twice: its first answer for the bank, then (its held-out set holding two
    # labels at tau 0.98 too) a choice within that set, which the confidence is calibrated on
    user_requests = [r for r in engine.requests if r.messages[-1].content not in dict(CORPUS)]
    assert sorted(len(r.choices) for r in user_requests) == [2] * len(SAMPLES) + [3] * len(SAMPLES)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["calls"].to_list() == [1, 1, 1] and table["y_hat"].to_list() == [y for _, y in CORPUS]
    assert result.metrics["second_call_rate"] == 1.0 and result.metrics["candidate_set_size"]["mean"] == 2


def test_only_a_weighted_answer_is_needed():
    cm = dict(variant="neighbour_prior", tau=0.5, neighbours=3, neighbour_temperature=0.05)
    assert fit(SAMPLES, CMSpec(**cm, likelihood_weight=0.0), toy_embed).needs_answer  # first_call: always
    skip = fit(SAMPLES, CMSpec(**cm, likelihood_weight=0.0, first_call="when_weighted"), toy_embed)
    assert not skip.needs_answer
    assert refine_texts(skip, toy_embed, ["loud dog cat"], [None])[0].decided == "pets"
    assert fit(SAMPLES, CMSpec(**cm, likelihood_weight=0.5, first_call="when_weighted"), toy_embed).needs_answer
    assert fit(SAMPLES, CMSpec()).needs_answer


def test_the_probe_prior_follows_regions_where_the_nearest_sample_misleads():
    # the query's nearest sample is the mislabelled one, but no straight boundary cuts it out of the arc
    samples, embed_at_angle = pets_arc_with_a_mislabelled_sample(query_angle=16)
    cm = dict(variant="neighbour_prior", tau=0.5, likelihood_weight=0.0, neighbours=1, neighbour_temperature=0.01)
    probe = fit(samples, CMSpec(**cm, prior="probe"), embed_at_angle)
    [refined] = refine_texts(probe, embed_at_angle, ["query"], ["pets"])
    assert refined.neighbour_vote == "music"  # recorded beside the answer, whichever prior decides
    assert refined.decided == "pets"
    assert probe.probe is not None and probe.probe.held_out.shape == (8, len(LABELS))


def test_second_call_auto_asks_again_only_if_the_trial_on_user_samples_says_it_pays():
    cm = dict(variant="neighbour_prior", tau=0.98, neighbours=3, likelihood_weight=0.0, second_call="auto")
    draft = draft_of(SAMPLES, CMSpec(**cm), toy_embed)
    questions = draft.questions
    assert questions and all(len(q.candidates) > 1 for q in questions)
    assert draft.asks_second_call is None  # undecided until the model has answered the questions
    with pytest.raises(ValueError, match=f"{len(questions)} questions, 0 choices"):
        finish_fit(draft, [])
    truths = [SAMPLES[q.sample].truth for q in questions]
    # right wherever the most probable label is wrong: one win ("loud band"), within one standard error
    fitted = finish_fit(draft, truths)
    assert fitted.trial_outcome == {"asked": len(truths), "wins": 1, "losses": 0}
    assert fitted.asks_second_call is False and fitted.settings["second_call"] == "never"


async def test_a_job_with_second_call_auto_asks_user_samples_once_and_follows_their_verdict(tmp_path, toy_job):
    import polars as pl

    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    # loud music among the pets: the neighbours get these wrong, a model choosing within C does not
    loud_music = ["loud dog dog band", "loud cat cat band", "dog cat loud band"]
    samples = [*SAMPLES, *(Sample(id=text, text=text, answer="pets", truth="music") for text in loud_music)]
    first = ANSWERS | {s.text: s.answer for s in samples}
    right_within_c = {s.text: s.truth for s in samples} | dict(CORPUS)
    cm = "{variant: neighbour_prior, tau: 0.98, neighbours: 3, likelihood_weight: 0, second_call: auto}"
    spec = neighbour_job(toy_job, cm, samples)
    result = await run_job(spec, engine=ScriptedEngine(first, right_within_c, n_labels=3), embed=toy_embed)
    trial = orjson.loads((tmp_path / "out/second_call_trial.json").read_bytes())
    texts = {s.id: s.text for s in result.bank.samples}
    assert trial["choices"] == [right_within_c[texts[asked["id"]]] for asked in trial["asked"]]
    chosen = result.metrics["cm_settings"]
    assert chosen["second_call"] == "when_ambiguous" and chosen["second_call_trial"]["losses"] == 0
    assert chosen["second_call_trial"]["wins"] >= 2
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["y_hat"].to_list() == [y for _, y in CORPUS] and table["calls"].to_list() == [2, 2, 2]
    # a rerun reads the trial back: no request, no model started, the same verdict
    rerun = ScriptedEngine(first, right_within_c, n_labels=3)
    again = await run_job(spec, engine=rerun, embed=toy_embed)
    assert rerun.requests == [] and again.metrics["cm_settings"] == chosen
    # a model that always picks the wrong label within C is not asked again about the corpus
    wrong_within_c = {text: next(y for y in LABELS if y != truth) for text, truth in right_within_c.items()}
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(tmp_path / "out-wrong")})})
    wrong = await run_job(spec, engine=ScriptedEngine(first, wrong_within_c, n_labels=3), embed=toy_embed)
    assert wrong.metrics["cm_settings"]["second_call"] == "never" and wrong.metrics["calls_per_item"] == 1


# --- a review's rows: in the bank and the priors, not in what is calibrated on ---------------

# The random user split, as counts (the model's answer <- the truths behind it):
# answer pets <- 25 pets + 3 music; answer weather <- 25 weather; answer music <- 10 music + 2 pets.
RANDOM = [Sample(id=f"p{i}", text="cat", answer="pets", truth="pets") for i in range(25)]
RANDOM += [Sample(id=f"m{i}", text="song", answer="pets", truth="music") for i in range(3)]
RANDOM += [Sample(id=f"w{i}", text="rain", answer="weather", truth="weather") for i in range(25)]
RANDOM += [Sample(id=f"n{i}", text="band", answer="music", truth="music") for i in range(10)]
RANDOM += [Sample(id=f"q{i}", text="loud dog", answer="music", truth="pets") for i in range(2)]
# Rows a review picked for their low confidence: mostly the model's mistakes.
REVIEWED = pl.DataFrame(
    [(f"r{i}", "loud cat", "music", "pets") for i in range(3)] + [(f"s{i}", "tune", "pets", "music") for i in range(3)],
    schema=["id", "text", "y_prime", "label"],
    orient="row",
)
ACCEPT = AcceptSpec(target_accuracy=0.9, confidence_level=0.9, min_accepted=20)


def threshold_by_hand(confidence, right, target, level, min_accepted):
    """Fixed-sequence testing written out: distinct confidences from the highest down, the first tested
    accepting at least min_accepted, each passing while its accepted rows' Clopper-Pearson bound reaches target."""
    chosen = None
    for value in sorted(set(confidence), reverse=True):
        accepted = [r for c, r in zip(confidence, right, strict=True) if c >= value]
        if len(accepted) < min(min_accepted, len(confidence)):
            continue
        test = binomtest(sum(accepted), len(accepted), alternative="greater")
        if test.proportion_ci(confidence_level=level, method="exact").low < target:
            break
        chosen = value
    return chosen


def test_reviewed_rows_join_the_bank_but_tau_calibration_and_threshold_rest_on_the_random_split_alone():
    cm = CMSpec(variant="counts", coverage=0.9, likelihood_weight=1.0, second_call="never", accept=ACCEPT)
    bank = with_reviewed(bank_from(RANDOM), REVIEWED)
    fitted = fit_cm(bank, cm)
    everyone = list(bank.samples)
    assert len(everyone) == len(RANDOM) + 6 and fitted.counts.sum() == len(RANDOM) + 6  # the bank has them
    assert fitted.counts[LABELS.index("music"), LABELS.index("pets")] == 2 + 3

    # Each random sample scored by every other sample, the reviewed ones included (they are the bank),
    # and only the random samples' scores used for tau, the calibration and the threshold.
    posteriors = [counts_posterior_by_hand(everyone, i, weight=1.0) for i in range(len(RANDOM))]
    truths = [LABELS.index(s.truth) for s in RANDOM]
    scores = [conformity_by_hand(p, t, s.id) for p, t, s in zip(posteriors, truths, RANDOM, strict=True)]
    tau = conformal_quantile_by_hand(scores, 0.9)
    assert fitted.tau == pytest.approx(tau)
    scores = np.array([p.max() for p in posteriors])  # second_call never: y_hat is the most probable label
    right = np.array([int(np.argmax(p)) == t for p, t in zip(posteriors, truths, strict=True)])
    logits = np.log(scores / (1 - scores)).reshape(-1, 1)
    reference = LogisticRegression(C=1e6, max_iter=1000).fit(logits, right)
    assert fitted.calibration.slope == pytest.approx(reference.coef_[0, 0], rel=1e-4)
    assert fitted.calibration.intercept == pytest.approx(reference.intercept_[0], rel=1e-4)
    confidence = list(reference.predict_proba(logits)[:, 1])
    threshold = threshold_by_hand(confidence, right, 0.9, 0.9, 20)
    assert threshold is not None and fitted.acceptance.threshold == pytest.approx(threshold, rel=1e-4)
    assert fitted.acceptance.n == len(fitted.held_out_right) == len(RANDOM)


def test_plain_confidence_with_reviewed_rows_in_a_row_of_their_own_is_the_random_splits_alone():
    # The random split never answers music, so the reviewed rows (all answered music) change no random
    # sample's count share: calibration and threshold must be those of the random split without them.
    random = [s for s in RANDOM if s.answer != "music"]
    reviewed = REVIEWED.filter(pl.col("y_prime") == "music")
    cm = CMSpec(enabled=False, accept=ACCEPT)
    alone, with_review = fit_cm(bank_from(random), cm), fit_cm(with_reviewed(bank_from(random), reviewed), cm)
    assert with_review.counts[LABELS.index("music"), LABELS.index("pets")] == 3  # in the bank
    assert with_review.calibration == alone.calibration and with_review.acceptance == alone.acceptance
    assert np.array_equal(with_review.held_out_confidence, alone.held_out_confidence)


def _second_call_auto_job(tmp_path, toy_job):
    """The job above: a model right within C on the loud music a neighbour gets wrong, so second calls pay."""
    loud_music = ["loud dog dog band", "loud cat cat band", "dog cat loud band"]
    samples = [*SAMPLES, *(Sample(id=text, text=text, answer="pets", truth="music") for text in loud_music)]
    first = ANSWERS | {s.text: s.answer for s in samples}
    right_within_c = {s.text: s.truth for s in samples} | dict(CORPUS)
    cm = "{variant: neighbour_prior, tau: 0.98, neighbours: 3, likelihood_weight: 0, second_call: auto}"
    return neighbour_job(toy_job, cm, samples), samples, first, right_within_c


async def test_a_held_out_question_the_engine_failed_on_is_asked_again_never_scored_as_wrong(tmp_path, toy_job):
    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    spec, samples, first, right_within_c = _second_call_auto_job(tmp_path, toy_job)
    # every question on a user sample times out once (the engine's retries exhausted), then is answered
    once = {s.text: 1 for s in samples}
    engine = ScriptedEngine(first, right_within_c, n_labels=3, failing_within=once)
    result = await run_job(spec, engine=engine, embed=toy_embed)
    trial = orjson.loads((tmp_path / "out/second_call_trial.json").read_bytes())
    texts = {s.id: s.text for s in result.bank.samples}
    assert trial["choices"] == [right_within_c[texts[asked["id"]]] for asked in trial["asked"]]  # no None
    questions = [r for r in engine.requests if len(r.choices) < 3 and r.messages[-1].content not in dict(CORPUS)]
    assert len(questions) == 2 * len(trial["asked"])  # each asked again within the run, once
    chosen = result.metrics["cm_settings"]
    # the verdict of a run where nothing failed: second calls pay (with the failures as wrong answers they lose)
    assert chosen["second_call"] == "when_ambiguous" and chosen["second_call_trial"]["losses"] == 0
    assert chosen["second_call_trial"]["wins"] >= 2


async def test_a_held_out_question_still_failing_stops_the_job_and_saves_no_fit(tmp_path, toy_job):
    from runner import run_job
    from runner.engines.base import EngineError
    from tests.scripted_engine import ScriptedEngine

    spec, samples, first, right_within_c = _second_call_auto_job(tmp_path, toy_job)
    down = {s.text: 10 for s in samples}  # the engine keeps timing out on them
    engine = ScriptedEngine(first, right_within_c, n_labels=3, failing_within=down)
    with pytest.raises(EngineError, match=r"held-out questions .* could not be answered"):  # cm-run: exit 3
        await run_job(spec, engine=engine, embed=toy_embed)
    out = tmp_path / "out"
    assert not (out / "second_call_trial.json").exists() and not (out / "fitted_cm.pkl").exists()
    assert (out / "memory_bank.json").is_file()  # the paid estimate is kept
    # the rerun, the engine back: the questions asked again, the verdict as if nothing had failed
    rerun = ScriptedEngine(first, right_within_c, n_labels=3)
    result = await run_job(spec, engine=rerun, embed=toy_embed)
    assert all(len(r.choices) < 3 or r.messages[-1].content in dict(CORPUS) for r in rerun.requests)
    assert result.metrics["cm_settings"]["second_call"] == "when_ambiguous"


async def test_a_rows_randomised_set_is_fixed_by_its_id_whatever_the_run_or_chunking(tmp_path, toy_job):
    import polars as pl

    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    # Twelve copies of "cat song": its nearest user samples put 0.492 of its mass on pets and on music
    # each, so the second joins the first when 0.492 + u * 0.492 <= 0.8, u <= 0.626, u the draw of the
    # row's id. Same text, so only the draw tells the rows' sets apart.
    corpus = [("cat song", "music")] * 12
    cm = "{variant: neighbour_prior, tau: 0.8, neighbours: 3, likelihood_weight: 0, first_call: when_weighted}"
    tables = []
    for run, chunk_size in enumerate((5, 12)):
        out = f"chunk_size: {chunk_size}"
        spec = toy_job([(s.text, s.truth) for s in SAMPLES], corpus, labels=LABELS, output=out, extra=f"cm: {cm}")
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(tmp_path / f"out{run}")})})
        await run_job(spec, engine=ScriptedEngine(ANSWERS, n_labels=3), embed=toy_embed)
        tables.append(pl.read_parquet(tmp_path / f"out{run}/annotations.parquet").sort("id"))
    first, second = tables
    sizes = [len(c) for c in first["candidates"].to_list()]
    expected = [2 if 0.492 + uniform_by_hand(row_id) * 0.492 <= 0.8 else 1 for row_id in first["id"].to_list()]
    assert sizes == expected and 1 in sizes and 2 in sizes  # both kinds occur: the draw is at work
    assert first["candidates"].to_list() == second["candidates"].to_list()
    assert first["id"].to_list() == second["id"].to_list()


# CM off: a user sample's score is the share of right answers among the other samples with its answer.
# 100 answered a (all a) and 100 answered b (all b) score 1; of the 20 answered c, 16 are c (15/19 = 0.789
# each) and 4 are a (16/19 = 0.842): the calibrated confidences keep that order.
PER_LABEL_USER = [(f"a{i}", "a", "a") for i in range(100)] + [(f"b{i}", "b", "b") for i in range(100)]
PER_LABEL_USER += [(f"c{i}", "c", "c") for i in range(16)] + [(f"x{i}", "a", "c") for i in range(4)]
PER_LABEL_CORPUS = [("ca", "a", "a"), ("cc", "c", "c")]


async def _per_label_job(toy_job, per_label: bool, restart: bool = False):
    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    accept = f"{{target_accuracy: 0.95, confidence_level: 0.95, per_label: {str(per_label).lower()}}}"
    spec = toy_job(
        [(t, y) for t, y, _ in PER_LABEL_USER],
        [(t, y) for t, y, _ in PER_LABEL_CORPUS],
        labels=["a", "b", "c"],
        extra=f"cm: {{enabled: false, accept: {accept}}}",
    )
    answers = {t: answer for t, _, answer in PER_LABEL_USER + PER_LABEL_CORPUS}
    return await run_job(spec, engine=ScriptedEngine(answers, n_labels=3), restart=restart)


@pytest.mark.parametrize("per_label", [False, True])
async def test_a_job_lists_the_labels_below_target_and_per_label_holds_each_to_it(tmp_path, toy_job, per_label):
    from runner.report import summary_lines

    result = await _per_label_job(toy_job, per_label)
    trust = orjson.loads((tmp_path / "out/metrics.json").read_bytes())["trust"]
    # Worked apart (tests/test_trust.py's bounds): down to the 4 wrong c's, 200/204 right, bound 0.9557;
    # down to all 20 c's, 216/220, bound 0.9589: both pass pooled. Label c's 16/20 has bound 0.599, and
    # 20 >= per_label_min_samples (10): with per_label the last step fails, and c keeps its 4 wrong ones.
    if per_label:
        assert trust["user_split_accepted_share"] == pytest.approx(204 / 220)
        assert trust["labels_below_target"] == [{"label": "c", "accepted": 4, "accuracy": 0.0, "lower_bound": 0.0}]
        assert trust["per_label_min_samples"] == 10
        expected = "1 label below 95.0% on the accepted user samples: c 0.0% (n 4, bound 0.0%)"
    else:
        assert trust["user_split_accepted_share"] == 1.0 and trust["per_label_min_samples"] is None
        [below] = trust["labels_below_target"]
        assert (below["label"], below["accepted"], below["accuracy"]) == ("c", 20, 0.8)
        bound = binomtest(16, 20, alternative="greater").proportion_ci(confidence_level=0.95, method="exact").low
        assert below["lower_bound"] == pytest.approx(bound)
        expected = f"1 label below 95.0% on the accepted user samples: c 80.0% (n 20, bound {100 * bound:.1f}%)"
    lines = summary_lines(result.metrics)
    assert expected in lines
    [trust_line] = [line for line in lines if line.startswith("trust:")]
    assert ("rows, pooled and of each label with at least 10 accepted user samples, are" in trust_line) == per_label
    assert ("rows, pooled, are" in trust_line) != per_label


async def test_switching_per_label_on_is_a_different_spec_with_cm_off_too(tmp_path, toy_job):
    from runner.checkpoint import CheckpointError

    # With CM off the user split still chooses the threshold, so every cm.accept setting decides the
    # output, as with CM on: switching per_label on must not resume with the old accepted column.
    await _per_label_job(toy_job, per_label=False)
    with pytest.raises(CheckpointError, match=r"cm.accept.per_label: False -> True"):
        await _per_label_job(toy_job, per_label=True)
    result = await _per_label_job(toy_job, per_label=True, restart=True)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    threshold = result.metrics["trust"]["threshold"]
    assert table["accepted"].to_list() == [c >= threshold for c in table["confidence"].to_list()] == [True, False]


@pytest.mark.parametrize("variant", ["counts", "paper"])
def test_the_fit_keeps_each_held_out_samples_label_shift_weight(variant):
    # the corpus-level estimates (runner.prevalence) weigh the held-out samples as tau does, every variant
    by_label = {"pets": 0.8 / (4 / 9), "weather": 0.1 / (2 / 9), "music": 0.1 / (3 / 9)}
    unparsed = [*SAMPLES[:-1], Sample(id="9", text="loud band", answer=None, truth="music")]  # not held out
    bank = stratified_bank(unparsed)
    cm = CMSpec(variant=variant, likelihood_weight=1.0)
    draft = prepare_fit(bank, cm)
    fitted = finish_fit(draft, [q.most_probable for q in draft.questions])
    assert fitted.held_out_ids == tuple(s.id for s in SAMPLES[:-1])
    assert fitted.held_out_weights == pytest.approx([by_label[s.truth] for s in SAMPLES[:-1]])
    uniform = prepare_fit(stratified_bank(SAMPLES, stratified=False), cm)
    plain = finish_fit(uniform, [q.most_probable for q in uniform.questions])
    assert (plain.held_out_weights == 1).all()


def _answered_fit(bank, cm: CMSpec) -> FittedCM:
    draft = prepare_fit(bank, cm)
    return finish_fit(draft, [q.most_probable for q in draft.questions])


def test_a_fit_pickled_before_weights_were_kept_loads_with_none(tmp_path):
    import pickle

    from runner._fitted_store import load_fitted, save_fitted

    fitted = _answered_fit(stratified_bank(SAMPLES), CMSpec(variant="counts", likelihood_weight=1.0))
    old = object.__new__(FittedCM)
    state = dict(fitted.__dict__)
    del state["held_out_weights"]  # as an older cm-runner pickled it
    object.__setattr__(old, "__dict__", state)
    restored = pickle.loads(pickle.dumps(old))
    assert "held_out_weights" not in restored.__dict__ and restored.held_out_weights is None
    save_fitted(tmp_path, "k", old)
    loaded = load_fitted(tmp_path, "k")
    assert loaded is not None and loaded.held_out_weights is None


def test_through_cascade_carries_the_weight_of_each_sample_and_none_if_a_stage_has_none():
    from dataclasses import replace

    from runner.fit import accept_cascade, through_cascade

    bank = stratified_bank(SAMPLES)
    stages = accept_cascade(
        [_answered_fit(bank, CMSpec(variant="counts", likelihood_weight=1.0)), _answered_fit(bank, CMSpec())],
        AcceptSpec(target_accuracy=0.5, confidence_level=0.5, min_accepted=1),
    )
    whole = through_cascade(stages)
    by_label = {"pets": 0.8 / (4 / 9), "weather": 0.1 / (2 / 9), "music": 0.1 / (3 / 9)}
    truth_of = {s.id: s.truth for s in SAMPLES}
    assert whole.held_out_weights is not None and len(whole.held_out_ids) == 9
    assert whole.held_out_weights == pytest.approx([by_label[truth_of[i]] for i in whole.held_out_ids])
    mixed = through_cascade([stages[0], replace(stages[1], held_out_weights=None)])
    assert mixed.held_out_weights is None and mixed.held_out_labels is not None
