"""Tiny models, data and closed-form references for the influence-engine tests.

The references here use only TensorFlow's own autodiff on the explicit objective
(nested tapes and a Jacobian), never the engine, so that the engine is checked against
something it did not compute.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

def mlp(*, softmax: bool, regularise: float = 0.0, inputs: int = 5, hidden: int = 6,
        classes: int = 3, seed: int = 0) -> keras.Model:
    """Dense-tanh-Dense classifier, ``inputs*hidden + hidden + hidden*classes + classes`` weights."""
    keras.utils.set_random_seed(seed)
    regulariser = keras.regularizers.L2(regularise) if regularise else None
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="tanh", kernel_regularizer=regulariser, name="hidden"),
        keras.layers.Dense(classes, activation="softmax" if softmax else None, name="predictions"),
    ], name="mlp")


def softmax_regression(*, l2: float, inputs: int = 5, classes: int = 3, seed: int = 0,
                       dtype: str = "float32") -> keras.Model:
    """Multinomial logistic regression with an L2 penalty on all weights: a strictly convex objective."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((inputs,), dtype=dtype),
        keras.layers.Dense(classes, activation="softmax", kernel_regularizer=keras.regularizers.L2(l2),
                           bias_regularizer=keras.regularizers.L2(l2), name="predictions", dtype=dtype),
    ], name="softmax_regression")


def small_cnn(*, softmax: bool = True, regularise: float = 0.0, size: int = 8, classes: int = 3,
              seed: int = 0) -> keras.Model:
    """Conv-pool-Dense image classifier on (size, size, 3) images, about 900 weights."""
    keras.utils.set_random_seed(seed)
    regulariser = keras.regularizers.L2(regularise) if regularise else None
    inputs = keras.Input((size, size, 3))
    hidden = keras.layers.Conv2D(4, 3, activation="relu", kernel_regularizer=regulariser,
                                 name="conv")(inputs)
    hidden = keras.layers.MaxPooling2D(2, name="pool")(hidden)
    hidden = keras.layers.Flatten(name="flatten")(hidden)
    hidden = keras.layers.Dense(16, activation="relu", name="fc")(hidden)
    outputs = keras.layers.Dense(classes, activation="softmax" if softmax else None,
                                 name="predictions")(hidden)
    return keras.Model(inputs, outputs, name="small_cnn")


def tabular_data(count: int, *, inputs: int = 5, classes: int = 3, seed: int = 1):
    """(count, inputs) float32 features and (count,) int labels loosely tied to them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=count)
    centres = rng.normal(0, 1.5, size=(classes, inputs))
    x = centres[y] + rng.normal(0, 1, size=(count, inputs))
    return x.astype(np.float32), y


def image_data(count: int, *, size: int = 8, classes: int = 3, seed: int = 2):
    """(count, size, size, 3) float32 images in [0, 1] and (count,) int labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=count)
    colours = rng.uniform(0, 1, size=(classes, 3))
    x = colours[y][:, None, None, :] + rng.normal(0, 0.3, size=(count, size, size, 3))
    return x.astype(np.float32), y


def tf_vars(variables):
    return [v.value for v in variables]


def hand_cross_entropy(model, x, y) -> np.ndarray:
    """(B,) ``-log softmax(logits)[y]`` in float64, logits recomputed layer by layer by hand."""
    hidden = np.asarray(x, np.float64)
    for layer in model.layers:
        kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
        hidden = hidden @ kernel + bias
        if layer.name != "predictions":
            hidden = np.tanh(hidden)
    shifted = hidden - hidden.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(len(y)), y]


def explicit_hessian(model, variables, x, y, *, regularisers: bool = True) -> np.ndarray:
    """(N, N) Hessian of ``mean CE + sum(model.losses)`` w.r.t. ``variables``, by Jacobian of the gradient."""
    watched = tf_vars(variables)
    size = sum(int(np.prod(v.shape)) for v in watched)
    labels = tf.constant(y, tf.int32)
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            outputs = model(tf.constant(x), training=False)
            if model.layers[-1].activation.__name__ == "softmax":
                per_example = -tf.math.log(tf.gather(outputs, labels, axis=1, batch_dims=1))
            else:
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=outputs)
            objective = tf.reduce_mean(per_example)
            if regularisers and model.losses:
                objective += tf.add_n(model.losses)
        gradient = inner.gradient(objective, watched)
        flat_gradient = tf.concat([tf.reshape(g, [-1]) for g in gradient], axis=0)
    blocks = outer.jacobian(flat_gradient, watched)
    return np.concatenate([tf.reshape(b, [size, -1]).numpy() for b in blocks], axis=1).astype(np.float64)


def per_example_gradients(model, variables, x, y) -> np.ndarray:
    """(B, N) flattened gradient of each example's cross-entropy, one tape per example."""
    watched = tf_vars(variables)
    rows = []
    for index in range(len(y)):
        with tf.GradientTape() as tape:
            outputs = model(tf.constant(x[index:index + 1]), training=False)
            if model.layers[-1].activation.__name__ == "softmax":
                loss = -tf.math.log(outputs[0, int(y[index])])
            else:
                loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=tf.constant(y[index:index + 1], tf.int32), logits=outputs)[0]
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, watched)]))
    return np.asarray(rows, np.float64)


def random_vector(variables, seed: int = 3) -> list[tf.Tensor]:
    """A random list of tensors shaped like ``variables``."""
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=tuple(v.shape)), tf.float32) for v in variables]


def flat(vector) -> np.ndarray:
    return np.concatenate([np.asarray(part, np.float64).ravel() for part in vector])
