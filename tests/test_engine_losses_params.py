"""The per-example loss and the parameter selection."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine_models import hand_cross_entropy, mlp, small_cnn, tabular_data
from influence import losses, params
from influence.errors import UserError


@pytest.mark.parametrize("softmax", [True, False])
def test_loss_is_hand_computed_cross_entropy(softmax):
    model = mlp(softmax=softmax)
    x, y = tabular_data(7)
    loss_fn = losses.per_example_loss(model)
    expected = hand_cross_entropy(model, x, y)
    assert loss_fn.kind == ("probabilities" if softmax else "logits")
    np.testing.assert_allclose(loss_fn(x, y).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(tf.function(loss_fn)(x, y).numpy(), expected, rtol=1e-5)


def test_softmax_loss_stays_finite_where_the_probability_underflows():
    model = mlp(softmax=True)
    x, y = tabular_data(4)
    # Huge last-layer weights push the wrong classes' probabilities below float32's range.
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel * 400.0, bias])
    probabilities = model(x).numpy()
    wrong = np.argmin(probabilities, axis=1)
    assert (probabilities[np.arange(4), wrong] == 0).any()  # the naive -log(p) would be inf
    expected = hand_cross_entropy(model, x, wrong)
    for loss_fn in (losses.per_example_loss(model), tf.function(losses.per_example_loss(model))):
        got = loss_fn(x, wrong).numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_functional_model_with_nested_softmax_output():
    inner = mlp(softmax=True)
    outer = keras.Sequential([keras.Input((5,)), inner], name="outer")
    x, y = tabular_data(3)
    assert losses.output_kind(outer) == "probabilities"
    np.testing.assert_allclose(losses.per_example_loss(outer)(x, y).numpy(),
                               hand_cross_entropy(inner, x, y), rtol=1e-5)


def test_sigmoid_output_is_refused_with_a_clear_error():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="sigmoid")], name="multi")
    with pytest.raises(UserError, match="sigmoid"):
        losses.per_example_loss(model)


def _names(variables):
    return [v.path for v in variables]


def test_select_all_trainable_by_default():
    model = small_cnn()
    chosen = params.select(model)
    assert _names(chosen) == _names(model.trainable_variables)
    assert params.count(chosen) == sum(int(np.prod(v.shape)) for v in model.trainable_variables)


@pytest.mark.parametrize("layers", ["fc,predictions", "predictions, fc", ["predictions", "fc"]])
def test_select_named_layers_in_model_order(layers):
    model = small_cnn()
    chosen = params.select(model, layers=layers)
    assert _names(chosen) == ["fc/kernel", "fc/bias", "predictions/kernel", "predictions/bias"]


def test_select_last_k_layers_with_weights():
    model = small_cnn()  # conv, pool, flatten, fc, predictions: three layers have weights
    assert _names(params.select(model, last=1)) == ["predictions/kernel", "predictions/bias"]
    assert _names(params.select(model, last=2)) == _names(params.select(model, layers="fc,predictions"))
    assert _names(params.select(model, last=3)) == _names(model.trainable_variables)


def test_select_skips_frozen_layers():
    model = small_cnn()
    model.get_layer("fc").trainable = False
    assert _names(params.select(model, last=2)) == ["conv/kernel", "conv/bias",
                                                    "predictions/kernel", "predictions/bias"]


def test_select_unknown_layer_names_the_valid_ones():
    model = small_cnn()
    with pytest.raises(UserError) as error:
        params.select(model, layers="fc2,predictions")
    message = str(error.value)
    assert "'fc2'" in message and "valid: conv, fc, predictions" in message
    with pytest.raises(UserError, match="'pool'"):
        params.select(model, layers="pool")  # a layer without weights is not a choice


@pytest.mark.parametrize("last", [0, 4, -1, 1.5, True])
def test_select_bad_last_k(last):
    with pytest.raises(UserError, match="give 1 to 3"):
        params.select(small_cnn(), last=last)


def test_select_names_and_count_together_is_an_error():
    with pytest.raises(UserError, match="not both"):
        params.select(small_cnn(), layers="fc", last=1)
    with pytest.raises(UserError, match="no layer names"):
        params.select(small_cnn(), layers=" , ")


def test_plain_probabilities_fall_back_to_a_clipped_log():
    probabilities = tf.constant([[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]])  # no logits behind them
    got = losses.cross_entropy(probabilities, tf.constant([0, 2]), kind="probabilities").numpy()
    np.testing.assert_allclose(got, [-np.log(0.7), -np.log(0.3)], rtol=1e-6)
    zero = losses.cross_entropy(probabilities, tf.constant([2, 1]), kind="probabilities").numpy()
    assert np.isfinite(zero).all() and zero[0] > 80  # -log(smallest normal float32) = 87.3


def _softmax_then(*after):
    """An MLP whose softmax output goes through ``after`` layers."""
    inputs = keras.Input((5,))
    x = keras.layers.Dense(4, activation="tanh")(inputs)
    x = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    for layer in after:
        x = layer(x)
    return keras.Model(inputs, x, name="softmax_then")


@pytest.mark.parametrize("after", [
    lambda: [keras.layers.Activation("linear")],
    lambda: [keras.layers.Dropout(0.5), keras.layers.Identity(), keras.layers.Reshape((3,))],
], ids=["linear-activation", "dropout-identity-reshape"])
def test_softmax_is_detected_through_layers_that_change_nothing(after):
    """Taking probabilities for logits gives another loss (and other scores) without a word."""
    model = _softmax_then(*after())
    x, y = tabular_data(6)
    loss_fn = losses.per_example_loss(model)
    assert loss_fn.kind == "probabilities"
    expected = -np.log(model(x).numpy()[np.arange(len(y)), y])  # -log p(y | x), by hand
    np.testing.assert_allclose(loss_fn(x, y).numpy(), expected, rtol=1e-5)


def test_output_kind_that_cannot_be_told_is_refused_unless_declared():
    model = _softmax_then(keras.layers.Rescaling(1.0))
    with pytest.raises(UserError, match=r"cannot tell whether .* logits or probabilities.*--outputs"):
        losses.output_kind(model)
    losses.declare_output_kind(model, "probabilities")
    x, y = tabular_data(3)
    expected = -np.log(model(x).numpy()[np.arange(len(y)), y])
    np.testing.assert_allclose(losses.per_example_loss(model)(x, y).numpy(), expected, rtol=1e-5)
