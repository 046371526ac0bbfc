"""CM variants: the paper's binary row and the posterior candidate sets (issue: instance-dependent banks)."""

import numpy as np
import orjson
import pytest

from runner.bank import Sample, UserSplitInfo, estimate_bank
from runner.refiners import PaperRefiner, PosteriorRefiner, _earned_weight, make_refiner
from runner.spec import CMSpec

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


def test_paper_variant_is_the_binary_row():
    refiner = make_refiner(bank_from(SAMPLES), CMSpec())
    assert isinstance(refiner, PaperRefiner)
    refined = refiner.refine(None, "music")
    assert refined.candidates == ("pets", "music") and refined.needs_second_call


def test_counts_variant_keeps_the_likely_truths_and_decides_when_one_suffices():
    bank = bank_from(SAMPLES)
    refiner = PosteriorRefiner(bank, CMSpec(variant="counts", tau=0.5))
    # answer music: truths music (3) and pets (2): music alone has more than half the mass
    decided = refiner.refine(None, "music")
    assert decided.candidates == ("music",) and decided.decided == "music" and not decided.needs_second_call
    wide = PosteriorRefiner(bank, CMSpec(variant="counts", tau=0.95)).refine(None, "music")
    assert wide.candidates[:2] == ("music", "pets") and wide.needs_second_call
    never = PosteriorRefiner(bank, CMSpec(variant="counts", tau=0.95, second_call="never")).refine(None, "music")
    assert never.decided == "music" and not never.needs_second_call


def test_neighbour_prior_recovers_pets_the_model_calls_music():
    refiner = PosteriorRefiner(bank_from(SAMPLES), CMSpec(variant="neighbour_prior", tau=0.5, neighbours=3), toy_embed)
    [context] = refiner.prepare(["loud dog cat"])
    refined = refiner.refine(context, "music")
    assert refined.neighbour_vote == "pets" and refined.decided == "pets"


def test_instance_variant_uses_local_confusions():
    cm = CMSpec(variant="instance", tau=0.5, neighbours=3, instance_neighbours=3, blend=0.5)
    refiner = PosteriorRefiner(bank_from(SAMPLES), cm, toy_embed)
    [near_pets, near_music] = refiner.prepare(["loud dog", "song band loud"])
    assert refiner.refine(near_pets, "music").decided == "pets"
    assert refiner.refine(near_music, "music").decided == "music"


def test_tau_is_calibrated_to_the_coverage_on_held_out_samples():
    bank = bank_from(SAMPLES)
    loose = PosteriorRefiner(bank, CMSpec(variant="counts", coverage=0.5)).tau
    strict = PosteriorRefiner(bank, CMSpec(variant="counts", coverage=1.0)).tau
    assert 0 < loose <= strict <= 1


def test_neighbour_variants_need_samples_and_an_embedder():
    no_samples = estimate_bank(
        [(s.answer, s.truth) for s in SAMPLES], LABELS, dataset="toy", model="m", strategy="z", user_split=SPLIT
    )
    with pytest.raises(ValueError, match="needs a bank with its user samples"):
        PosteriorRefiner(no_samples, CMSpec(variant="neighbour_prior"), toy_embed)
    with pytest.raises(ValueError, match="needs an embedding model"):
        PosteriorRefiner(bank_from(SAMPLES), CMSpec(variant="instance"))


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
    chosen = result.metrics["cm_settings"]  # what the user split chose is reported
    assert chosen["prior"] == prior and chosen["neighbours"] in (1, 3, 5, 10, 20) and 0 < chosen["tau"] <= 1
    assert chosen["likelihood_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert chosen.get("probe_strength") in ((1.0, 10.0, 100.0, 1000.0) if prior == "probe" else (None,))


def test_likelihood_weight_zero_is_the_neighbour_vote_and_unset_is_chosen_on_held_out_samples():
    bank = bank_from(SAMPLES)
    vote_only = PosteriorRefiner(bank, CMSpec(variant="neighbour_prior", likelihood_weight=0.0, tau=0.5), toy_embed)
    contexts = vote_only.prepare(["loud dog cat", "song band", "rain"])
    for context, answer in zip(contexts, ["music", "pets", "music"], strict=True):
        refined = vote_only.refine(context, answer)
        assert refined.decided == refined.neighbour_vote  # the model's answer is ignored at w = 0
    chosen = PosteriorRefiner(bank, CMSpec(variant="neighbour_prior", tau=0.5), toy_embed)
    assert chosen.weight in (0.0, 0.25, 0.5, 0.75, 1.0)


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
    bank = bank_from(samples)
    fixed = dict(variant="neighbour_prior", tau=0.5, likelihood_weight=0.0)
    tuned = PosteriorRefiner(bank, CMSpec(**fixed), embed_at_angle)
    one = PosteriorRefiner(bank, CMSpec(**fixed, neighbours=1, neighbour_temperature=0.01), embed_at_angle)
    assert tuned.neighbours >= 3  # 1-NN gets 5 of 8 held-out samples right, a vote of three 7
    assert one.refine(one.prepare(["query"])[0], "pets").decided == "music"
    assert tuned.refine(tuned.prepare(["query"])[0], "pets").decided == "pets"


def held_out(n_prior_right, n_prior_wrong, answer_fixes, answer_breaks):
    """Two labels, truth 0 everywhere: priors right or wrong, and answers that fix or break them."""
    right, wrong = [0.6, 0.4], [0.4, 0.6]
    priors = np.array([right] * n_prior_right + [wrong] * n_prior_wrong)
    rows = np.full_like(priors, 0.5)  # an answer that says nothing
    rows[n_prior_right : n_prior_right + answer_fixes] = [0.9, 0.1]
    rows[:answer_breaks] = [0.1, 0.9]
    return rows, priors, np.zeros(len(priors), dtype=np.int64)


def test_the_models_answer_gets_weight_only_when_it_clearly_beats_the_prior():
    assert _earned_weight(*held_out(60, 40, answer_fixes=30, answer_breaks=0)) > 0
    # 3 fixed and 1 broken out of 100: better on the user split, but within one standard error
    assert _earned_weight(*held_out(60, 40, answer_fixes=3, answer_breaks=1)) == 0.0


async def test_a_first_answer_that_cannot_count_is_not_asked_for(tmp_path, toy_job):
    import polars as pl

    from runner import run_job
    from tests.scripted_engine import ScriptedEngine

    cm = "{variant: neighbour_prior, tau: 0.5, neighbours: 3, likelihood_weight: 0, first_call: when_weighted}"
    engine = ScriptedEngine(ANSWERS, n_labels=3)
    result = await run_job(neighbour_job(toy_job, cm), engine=engine, embed=toy_embed)
    asked = {request.messages[-1].content for request in engine.requests}
    assert asked == {s.text for s in SAMPLES}  # the estimate asks every user sample; the corpus, nobody
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
    table = pl.read_parquet(tmp_path / "out/annotations.parquet")
    assert table["calls"].to_list() == [1, 1, 1] and table["y_hat"].to_list() == [y for _, y in CORPUS]
    assert result.metrics["second_call_rate"] == 1.0 and result.metrics["candidate_set_size"]["mean"] == 2


def test_only_a_weighted_answer_is_needed():
    bank = bank_from(SAMPLES)
    cm = dict(variant="neighbour_prior", tau=0.5, neighbours=3, neighbour_temperature=0.05)
    assert PosteriorRefiner(bank, CMSpec(**cm, likelihood_weight=0.0), toy_embed).needs_answer  # first_call: always
    skip = PosteriorRefiner(bank, CMSpec(**cm, likelihood_weight=0.0, first_call="when_weighted"), toy_embed)
    assert not skip.needs_answer
    [context] = skip.prepare(["loud dog cat"])
    assert skip.refine(context, None).decided == "pets"
    assert PosteriorRefiner(
        bank, CMSpec(**cm, likelihood_weight=0.5, first_call="when_weighted"), toy_embed
    ).needs_answer
    assert make_refiner(bank, CMSpec()).needs_answer


def test_the_probe_prior_follows_regions_where_the_nearest_sample_misleads():
    # the query's nearest sample is the mislabelled one, but no straight boundary cuts it out of the arc
    samples, embed_at_angle = pets_arc_with_a_mislabelled_sample(query_angle=16)
    cm = dict(variant="neighbour_prior", tau=0.5, likelihood_weight=0.0, neighbours=1, neighbour_temperature=0.01)
    probe = PosteriorRefiner(bank_from(samples), CMSpec(**cm, prior="probe"), embed_at_angle)
    [context] = probe.prepare(["query"])
    refined = probe.refine(context, "pets")
    assert refined.neighbour_vote == "music"  # recorded beside the answer, whichever prior decides
    assert refined.decided == "pets"
    assert probe.probe is not None and probe.probe.held_out.shape == (8, len(LABELS))


def test_second_call_auto_asks_again_only_if_the_trial_on_user_samples_says_it_pays():
    bank = bank_from(SAMPLES)
    cm = dict(variant="neighbour_prior", tau=0.98, neighbours=3, likelihood_weight=0.0, second_call="auto")
    refiner = PosteriorRefiner(bank, CMSpec(**cm), toy_embed)
    assert refiner.trial and all(len(item.candidates) > 1 for item in refiner.trial)
    truths = [SAMPLES[item.sample].truth for item in refiner.trial]
    with pytest.raises(RuntimeError, match="decided"):
        refiner.refine(refiner.prepare(["rain"])[0], "music")
    # right wherever the most probable label is wrong: one win ("loud band"), within one standard error
    refiner.decide_second_calls(truths)
    assert refiner.trial_outcome == {"asked": len(truths), "wins": 1, "losses": 0}
    assert refiner.asks_second_call is False and refiner.settings["second_call"] == "never"


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
