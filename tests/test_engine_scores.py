"""Batched forward-mode scores against per-example gradient dot products."""

import numpy as np
import pytest
import tensorflow as tf

from engine_models import (flat, image_data, mlp, per_example_gradients, random_vector,
                           small_cnn, tabular_data)
from influence import hvp, params, scores


def _check(model, variables, x, y, s_test):
    got = scores.influence_scores(model, variables, s_test, x, y)
    gradients = per_example_gradients(model, variables, x, y)  # (B, N) float64 from float32
    expected = gradients @ flat(s_test)
    assert got.shape == (len(y),)
    # float32 precision: relative to the size of the summands, not of a cancelling sum.
    summands = np.abs(gradients) @ np.abs(flat(s_test))
    np.testing.assert_array_less(np.abs(got - expected), 2e-5 * summands + 1e-7)
    return got, expected


@pytest.mark.parametrize("softmax", [True, False])
def test_batched_scores_equal_per_example_dot_products_on_a_cnn(softmax):
    model = small_cnn(softmax=softmax, regularise=0.1)
    x, y = image_data(12)
    variables = params.select(model)
    got, expected = _check(model, variables, x, y, random_vector(variables, seed=11))
    assert np.std(expected) > 10 * np.abs(got - expected).max()  # the comparison discriminates


def test_scores_on_selected_layers_use_only_those_weights():
    model = small_cnn()
    x, y = image_data(9)
    variables = params.select(model, layers="fc,predictions")
    s_test = random_vector(variables, seed=12)
    got, _ = _check(model, variables, x, y, s_test)
    # The same s_test padded with zeros for the other layers gives the same scores.
    everything = params.select(model)
    padded = [tf.zeros(v.shape) for v in everything[:2]] + s_test
    np.testing.assert_allclose(scores.influence_scores(model, everything, padded, x, y), got, rtol=1e-5)


def test_scores_exclude_regularisers_and_do_not_depend_on_batching():
    x, y = tabular_data(10)
    plain, regularised = mlp(softmax=True), mlp(softmax=True, regularise=3.0)  # same weights
    s_test = random_vector(params.select(plain), seed=13)
    whole = scores.influence_scores(plain, params.select(plain), s_test, x, y)
    np.testing.assert_allclose(
        scores.influence_scores(regularised, params.select(regularised), s_test, x, y), whole, rtol=1e-6)
    pieces = np.concatenate([scores.influence_scores(plain, params.select(plain), s_test, x[i:i + 3], y[i:i + 3])
                             for i in range(0, 10, 3)])  # batches of 3, 3, 3, 1
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-7)


def test_scores_are_linear_in_s_test_and_match_the_gradient_of_the_mean():
    model = mlp(softmax=False)
    x, y = tabular_data(8)
    variables = params.select(model)
    a, b = random_vector(variables, seed=1), random_vector(variables, seed=2)
    combined = [2.0 * p - 0.5 * q for p, q in zip(a, b)]
    score = lambda s: scores.influence_scores(model, variables, s, x, y)  # noqa: E731
    np.testing.assert_allclose(score(combined), 2.0 * score(a) - 0.5 * score(b), rtol=1e-4, atol=1e-5)
    # mean of the scores = s_test . gradient of the mean loss
    mean_gradient = flat(hvp.loss_gradient(model, variables, x, y))
    assert score(a).mean() == pytest.approx(mean_gradient @ flat(a), rel=1e-4)


@pytest.mark.parametrize("unroll", [1, 3], ids=["vectorised", "one-pass-each"])
def test_group_scores_are_each_test_images_per_example_dot_products(unroll):
    """Scoring a batch for several test images at once: row k is s_test_k . grad L(z_i), whether
    the 3 test vectors are vectorised over or scored one pass after another."""
    model = small_cnn(softmax=True)
    x, y = image_data(10)
    variables = params.select(model)
    s_tests = [random_vector(variables, seed=seed) for seed in (1, 2, 3)]
    got = scores.influence_scores_many(model, variables, scores.stack_s_tests(s_tests, variables), x, y,
                                       unroll=unroll)
    gradients = per_example_gradients(model, variables, x, y)  # (B, N)
    expected = np.stack([gradients @ flat(s_test) for s_test in s_tests])  # (m, B)
    assert got.shape == (3, 10)
    summands = np.stack([np.abs(gradients) @ np.abs(flat(s_test)) for s_test in s_tests])
    np.testing.assert_array_less(np.abs(got - expected), 2e-5 * summands + 1e-7)
    assert np.std(expected[0] - expected[1]) > 10 * np.abs(got - expected).max()  # rows differ measurably


def test_groups_of_changing_sizes_share_one_scorer():
    """Groups of 1, 3 and 2 test vectors through one compiled scorer (unrolled up to 2): once
    it has seen two sizes its group dimension is unknown, and every group is still scored right."""
    model = small_cnn(softmax=True)
    x, y = image_data(6)
    variables = params.select(model)
    gradients = per_example_gradients(model, variables, x, y)  # (B, N)
    for m in (1, 3, 2):
        s_tests = [random_vector(variables, seed=10 * m + k) for k in range(m)]
        got = scores.influence_scores_many(model, variables, scores.stack_s_tests(s_tests, variables), x, y, unroll=2)
        expected = np.stack([gradients @ flat(s_test) for s_test in s_tests])
        summands = np.stack([np.abs(gradients) @ np.abs(flat(s_test)) for s_test in s_tests])
        np.testing.assert_array_less(np.abs(got - expected), 2e-5 * summands + 1e-7)
