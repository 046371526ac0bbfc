"""The probe prior: p(Y | X) from a logistic regression on the user samples' embeddings."""

import numpy as np
import pytest

from runner.probe import fit_probe


def at_angles(*degrees):
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# three labels on the unit circle, the last one represented by two samples
VECTORS = at_angles(0, 10, 20, 30, 90, 100, 110, 120, 200, 210)
TRUTHS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])


def test_the_probe_labels_new_points_by_region_and_never_rules_a_label_out():
    probe = fit_probe(VECTORS, TRUTHS, n_labels=4)
    priors = probe.prior(at_angles(15, 105, 205))
    assert priors.argmax(axis=1).tolist() == [0, 1, 2]
    assert priors.sum(axis=1) == pytest.approx([1, 1, 1])
    # label 3 has no user sample: unlikely, not impossible (a share beta over all four labels)
    assert priors[:, 3] == pytest.approx([0.05 / 4] * 3)


def test_held_out_rows_come_from_probes_that_did_not_see_the_sample():
    vectors, truths = VECTORS[:-1], TRUTHS[:-1]
    probe = fit_probe(vectors, truths, n_labels=3, strengths=[100.0])
    # the only sample of label 2: held out, no probe saw its label; refit on all, the probe knows it
    assert probe.held_out[-1].argmax() != 2
    assert probe.prior(vectors[-1]).argmax() == 2
    assert probe.held_out.shape == (len(truths), 3)
    assert probe.held_out[:4].argmax(axis=1).tolist() == [0, 0, 0, 0]


def test_the_strength_is_the_grid_value_most_often_right_on_held_out_samples():
    assert fit_probe(VECTORS, TRUTHS, 3, strengths=[7.0]).strength == 7.0
    # far too much regularisation predicts the commonest label everywhere; the grid avoids it
    assert fit_probe(VECTORS, TRUTHS, 3, strengths=[1e-6, 100.0]).strength == 100.0


def test_a_user_split_with_a_single_label_or_sample_still_gives_a_prior():
    one_label = fit_probe(VECTORS[:4], TRUTHS[:4], n_labels=2)
    assert one_label.prior(at_angles(100)).argmax() == 0
    one_sample = fit_probe(VECTORS[:1], TRUTHS[:1], n_labels=2)
    assert one_sample.held_out.tolist() == [[0.5, 0.5]]
    assert one_sample.prior(at_angles(5)).argmax() == 0
