import numpy as np
import pytest

from runner.posterior import (
    choose_neighbourhood,
    class_prior,
    count_matrix,
    held_out_class_priors,
    held_out_likelihood_rows,
    instance_likelihood,
    likelihood,
    mass_candidates,
    nearest,
    neighbour_prior,
    posterior,
    posteriors,
    row_uniform,
)


def test_counts_leave_out_unparsed_answers():
    counts = count_matrix([0, 0, 1, -1], [0, 1, 1, 0], 2)
    assert counts.tolist() == [[1, 1], [0, 1]]


def test_likelihood_columns_are_distributions_over_answers():
    counts = np.array([[8.0, 0.0], [2.0, 0.0]])
    table = likelihood(counts, alpha=0.0 + 1e-9)
    assert table[:, 0] == pytest.approx([0.8, 0.2])
    assert likelihood(counts, alpha=1.0)[:, 1] == pytest.approx([0.5, 0.5])  # an unseen truth: uniform


def test_posterior_weighs_the_answer_by_how_common_each_truth_is():
    """The model says 0 for 90% of truth-0 items and for 50% of truth-1 items; truth 1 is 4x as common."""
    counts = np.array([[9.0, 20.0], [1.0, 20.0]])
    post = posterior(likelihood(counts, alpha=1e-9)[0], class_prior(counts, beta=0.0))
    # p(Y=0|Y'=0) ∝ 0.9 * 0.2 = 0.18 ; p(Y=1|Y'=0) ∝ 0.5 * 0.8 = 0.40
    assert post == pytest.approx([0.18 / 0.58, 0.40 / 0.58])


def test_mass_candidates_keep_the_crossing_label_for_the_share_of_its_mass_under_tau():
    probs = np.array([0.1, 0.6, 0.25, 0.05])  # ranked: 1 (0.6), 2 (0.25), 0 (0.1), 3 (0.05)
    # the top label is kept whatever tau and u; label 2 scores 0.6 + u * 0.25, label 0 0.85 + u * 0.1
    assert mass_candidates(probs, 0.01, u=0.0).tolist() == [1]
    assert mass_candidates(probs, 0.7, u=0.39).tolist() == [1, 2]  # 0.6975 <= 0.7
    assert mass_candidates(probs, 0.7, u=0.41).tolist() == [1]  # 0.7025 > 0.7
    assert mass_candidates(probs, 0.9, u=0.5).tolist() == [1, 2, 0]  # 0.85 + 0.05
    assert mass_candidates(probs, 0.9, u=0.51).tolist() == [1, 2]
    assert mass_candidates(probs, 1.0, u=1.0).tolist() == [1, 2, 0, 3]


def test_the_crossing_label_is_kept_as_often_as_its_share_of_mass_under_tau():
    # at tau 0.7 label 2 (mass 0.25, 0.6 above it) is kept when u <= 0.4: for 40% of uniform draws
    probs = np.array([0.1, 0.6, 0.25, 0.05])
    draws = np.random.default_rng(0).random(20_000)
    kept = np.mean([len(mass_candidates(probs, 0.7, u)) == 2 for u in draws])
    assert kept == pytest.approx(0.4, abs=0.02)


def test_a_row_draw_is_fixed_by_its_id_and_uniform_over_ids():
    assert row_uniform("row-17") == row_uniform("row-17") != row_uniform("row-18")
    draws = np.array([row_uniform(str(i)) for i in range(20_000)])
    assert ((draws >= 0) & (draws < 1)).all()
    deciles = np.histogram(draws, bins=10, range=(0, 1))[0]
    assert deciles.min() > 1_850 and deciles.max() < 2_150  # 2,000 expected per tenth, sd about 42


def test_nearest_orders_by_similarity_and_can_leave_one_out():
    sims = np.array([0.2, 0.9, 0.5, 0.95])
    assert nearest(sims, 2).tolist() == [3, 1]
    assert nearest(np.array([0.2, 0.9, 0.5, -np.inf]), 2).tolist() == [1, 2]  # the last one left out
    assert nearest(sims, 10).tolist() == [3, 1, 2, 0]


def test_neighbour_prior_votes_among_the_k_nearest():
    sims = np.array([0.9, 0.8, 0.1, -0.5])
    truths = np.array([2, 2, 0, 1])
    prior = neighbour_prior(sims, truths, n_labels=3, k=3, beta=1e-9)
    assert prior.argmax() == 2 and prior[1] == pytest.approx(0, abs=1e-6)  # not among the 3 nearest
    assert prior.sum() == pytest.approx(1.0)


def test_a_small_temperature_trusts_the_closest_sample_and_a_large_one_counts_votes():
    sims = np.array([0.80, 0.75, 0.74])
    truths = np.array([0, 1, 1])
    assert neighbour_prior(sims, truths, n_labels=2, k=3, temperature=0.01).argmax() == 0  # the 1-NN label
    assert neighbour_prior(sims, truths, n_labels=2, k=3, temperature=1.0).argmax() == 1  # two votes to one


def test_neighbour_prior_takes_one_row_per_item_and_skips_left_out_samples():
    sims = np.array([[-np.inf, 0.9, 0.2], [0.9, -np.inf, 0.3], [-np.inf, -np.inf, -np.inf]])
    truths = np.array([0, 1, 1])
    priors = neighbour_prior(sims, truths, n_labels=2, k=2, beta=1e-9)
    assert priors.shape == (3, 2) and priors.sum(axis=1) == pytest.approx([1, 1, 1])
    assert priors[0].argmax() == 1 and priors[1].argmax() == 0  # each row's own sample never votes
    assert priors[2] == pytest.approx([0.5, 0.5])  # nobody left to vote: beta alone


def test_the_chosen_neighbourhood_is_the_one_whose_held_out_vote_is_most_often_right():
    # sample 1 sits closest to sample 0 but carries another label; samples 2 and 3 agree with 0
    sims = np.array(
        [
            [-np.inf, 0.9, 0.8, 0.8],
            [0.9, -np.inf, 0.1, 0.1],
            [0.8, 0.1, -np.inf, 0.85],
            [0.8, 0.1, 0.85, -np.inf],
        ]
    )
    truths = np.array([0, 1, 0, 0])
    k, temperature = choose_neighbourhood(sims, truths, truths, 2, neighbours=(1, 3), temperatures=(0.01, 1.0))
    assert (k, temperature) == (3, 1.0)  # 1-NN gets sample 0 wrong; three votes alike get it right
    assert choose_neighbourhood(sims, truths, truths, 2, neighbours=(1,), temperatures=(0.01,)) == (1, 0.01)


def test_held_out_rows_equal_estimates_made_without_the_sample():
    answers, truths = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    counts = count_matrix(answers, truths, n_labels=2)
    rows = held_out_likelihood_rows(counts, answers, truths, alpha=0.5)
    priors = held_out_class_priors(counts, truths, beta=1.0)
    for i in range(len(answers)):
        keep = np.arange(len(answers)) != i
        without = count_matrix(answers[keep], truths[keep], n_labels=2)
        assert rows[i] == pytest.approx(likelihood(without, alpha=0.5)[answers[i]])
        assert priors[i] == pytest.approx(class_prior(without, beta=1.0))


def test_posteriors_at_weight_zero_are_the_priors():
    priors = np.array([[0.2, 0.8], [0.6, 0.4]])
    rows = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert posteriors(rows, priors, 0.0) == pytest.approx(priors)
    assert posteriors(rows, priors, 1.0)[0] == pytest.approx(posterior(rows[0], priors[0]))


def test_instance_likelihood_follows_close_neighbours_and_falls_back_to_the_class():
    class_counts = np.array([[5.0, 0.0], [5.0, 10.0]])  # overall, truth 0 is answered 0 or 1 alike
    sims = np.array([0.9, 0.9, 0.0])
    answers, truths = np.array([0, 0, 1]), np.array([0, 0, 1])  # near X, truth 0 is always answered 0
    local = instance_likelihood(sims, answers, truths, class_counts, k=2, alpha=1e-9, blend=1.0)
    assert local[0, 0] > 0.75  # (2*0.9 + 0.5) / (1.8 + 1)
    assert local[:, 1] == pytest.approx([0.0, 1.0], abs=1e-6)  # no close neighbour: the class column
