"""Gradients and Hessian-vector products against the explicit Hessian."""

import numpy as np
import pytest
import tensorflow as tf

from engine_models import (explicit_hessian, flat, hand_cross_entropy, mlp, random_vector,
                           small_cnn, image_data, tabular_data)
from influence.sampling import MinibatchSampler
from influence import hvp, params
from influence.errors import UserError


def _product(model, variables, x, y, form, vector):
    hvp_fn = hvp.training_hvp(model, variables, MinibatchSampler.from_arrays(x, y, len(x)), form=form)
    return flat(hvp_fn(vector))


@pytest.mark.parametrize("form", ["forward_over_backward", "summed_gradient", "auto"])
@pytest.mark.parametrize("softmax", [True, False])
def test_hvp_equals_explicit_hessian_with_regulariser(form, softmax):
    model = mlp(softmax=softmax, regularise=0.05)  # 57 weights, an L2 kernel regulariser
    x, y = tabular_data(24)
    variables = params.select(model)
    hessian = explicit_hessian(model, variables, x, y)
    vector = random_vector(variables)
    expected = hessian @ flat(vector)
    got = _product(model, variables, x, y, form, vector)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # The regulariser really is part of it: 2 * 0.05 on the kernel's diagonal.
    without = explicit_hessian(model, variables, x, y, regularisers=False)
    assert np.abs(hessian - without).max() == pytest.approx(0.1, rel=1e-5)
    assert np.abs(got - without @ flat(vector)).max() > 1e-2


@pytest.mark.parametrize("form", ["forward_over_backward", "summed_gradient"])
def test_a_product_followed_by_the_lissa_update_is_one_step_with_importance_weights(form):
    """``followed_by`` (the product and an update in one compiled call, what LiSSA runs) on a
    weighted minibatch: one step ``v + keep h - (sum_i w_i H_i + H_reg) h / scale`` exactly."""
    from influence import ihvp

    model = mlp(softmax=True, regularise=0.05)
    x, y = tabular_data(4)
    weights = np.array([0.1, 0.4, 0.2, 0.3], np.float32)
    variables = params.select(model)
    hvp_fn = hvp.training_hvp(model, variables, iter([(x, y, weights)] * 2), form=form)
    v, h = random_vector(variables, seed=5), random_vector(variables, seed=6)
    keep, inv_scale = tf.constant(0.9), tf.constant(0.25)
    step = hvp_fn.followed_by(ihvp._lissa_update)  # noqa: SLF001
    updated, tail, norm = step(h, v, keep, inv_scale, None)
    assert tail is None
    summed = step(h, v, keep, inv_scale, list(v))[1]  # the tail: v + the updated iterate
    with_regulariser = explicit_hessian(model, variables, x[:1], y[:1])
    hessian = (with_regulariser - explicit_hessian(model, variables, x[:1], y[:1], regularisers=False)
               + sum(w * explicit_hessian(model, variables, x[i:i + 1], y[i:i + 1], regularisers=False)
                     for i, w in enumerate(weights)))
    expected = flat(v) + 0.9 * flat(h) - 0.25 * hessian @ flat(h)
    np.testing.assert_allclose(flat(updated), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(flat(summed), flat(v) + expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert float(norm) == pytest.approx(np.linalg.norm(expected), rel=1e-5)


@pytest.mark.parametrize("form", ["forward_over_backward", "summed_gradient"])
def test_hvp_on_a_cnn_and_on_selected_layers(form):
    model = small_cnn(regularise=0.01)
    x, y = image_data(10)
    for variables in (params.select(model), params.select(model, layers="conv,predictions")):
        hessian = explicit_hessian(model, variables, x, y)
        vector = random_vector(variables, seed=5)
        expected = hessian @ flat(vector)
        got = _product(model, variables, x, y, form, vector)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_hvp_follows_the_minibatches_in_order():
    model = mlp(softmax=True, regularise=0.01)
    x, y = tabular_data(30)
    variables = params.select(model)
    vector = random_vector(variables)
    batches = [(x[:10], y[:10]), (x[10:25], y[10:25]), (x[25:], y[25:])]  # sizes 10, 15, 5
    hvp_fn = hvp.training_hvp(model, variables, iter(batches))
    for bx, by in batches:
        expected = explicit_hessian(model, variables, bx, by) @ flat(vector)
        np.testing.assert_allclose(flat(hvp_fn(vector)), expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())
    with pytest.raises(UserError, match="ran out"):
        hvp_fn(vector)


def test_hvp_accepts_a_callable_source_and_traces_once_per_shape():
    model = mlp(softmax=False)
    x, y = tabular_data(12)
    variables = params.select(model)
    hvp_fn = hvp.training_hvp(model, variables, lambda: (x, y), form="forward_over_backward")
    first = flat(hvp_fn(random_vector(variables)))
    for seed in range(4):
        hvp_fn(random_vector(variables, seed=seed))
    compiled = hvp.batch_hvp(model, variables, form="forward_over_backward")
    assert compiled.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(flat(hvp_fn(random_vector(variables))), first, rtol=1e-6)


def test_unknown_form_is_a_user_error():
    model = mlp(softmax=True)
    with pytest.raises(UserError, match="valid: auto, forward_over_backward, summed_gradient"):
        hvp.training_hvp(model, params.select(model), iter([]), form="sumup")


def test_loss_gradient_is_mean_gradient_without_regulariser():
    model = mlp(softmax=True, regularise=0.5)
    x, y = tabular_data(6)
    variables = params.select(model)
    watched = [v.value for v in variables]
    with tf.GradientTape() as tape:
        outputs = model(x, training=False)
        mean_loss = tf.reduce_mean(-tf.math.log(tf.gather(outputs, tf.constant(y), axis=1, batch_dims=1)))
    expected = flat(tape.gradient(mean_loss, watched))
    got = flat(hvp.loss_gradient(model, variables, x, y))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(mean_loss), hand_cross_entropy(model, x, y).mean(), rtol=1e-5)
    # Restricted to the last layer: the matching slice of the full gradient.
    last = hvp.loss_gradient(model, params.select(model, last=1), x[:1], y[:1])
    full = hvp.loss_gradient(model, variables, x[:1], y[:1])
    np.testing.assert_allclose(flat(last), flat(full[2:]), rtol=1e-6)


def test_minibatches_draw_distinct_examples_from_the_whole_set():
    x = np.arange(100)[:, None].astype(np.float32)
    y = np.arange(100)
    stream = MinibatchSampler.from_arrays(x, y, 8, seed=0)
    seen = set()
    for _ in range(200):
        bx, by = next(stream)
        assert bx.shape == (8, 1) and len(set(by)) == 8
        np.testing.assert_array_equal(bx[:, 0], by)  # images stay with their labels
        seen.update(by.tolist())
    assert seen == set(range(100))
    again = MinibatchSampler.from_arrays(x, y, 8, seed=0)
    np.testing.assert_array_equal(next(again)[1], next(MinibatchSampler.from_arrays(x, y, 8, seed=0))[1])
    full_x, full_y = next(MinibatchSampler.from_arrays(x, y, 500, seed=0))
    np.testing.assert_array_equal(full_y, y)
    with pytest.raises(UserError, match="at least 1"):
        next(MinibatchSampler.from_arrays(x, y, 0))
