"""Per-example cross-entropy on a classifier's outputs.

The loss behind every gradient and Hessian in the engine is ``L(z) = -log p(y | x)``,
the cross-entropy of one example (the older suite used ``||onehot - softmax||``,
which is not the training loss and gives a different Hessian).

Models come in two kinds:

- the last layer applies softmax (Keras's VGG16): the model outputs probabilities.
  ``log`` of a probability that underflowed to 0 is ``-inf``, so the loss is taken
  from the logits that fed the softmax whenever the graph still has them (it does
  inside every ``tf.function`` of the engine and for Keras's softmax in eager mode),
  and from the probabilities clipped to the smallest normal float only otherwise;
- anything else (a linear last layer): the model outputs logits.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from influence.errors import UserError

PROBABILITIES = "probabilities"
LOGITS = "logits"


def output_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer that produces ``model``'s output, looking inside nested models."""
    layer = None
    outputs = getattr(model, "outputs", None)
    if outputs:
        if len(outputs) != 1:
            raise UserError(f"model {model.name!r} has {len(outputs)} outputs; "
                            "influence needs a classifier with exactly one output")
        history = getattr(outputs[0], "_keras_history", None)
        layer = history.operation if history is not None else None
    if layer is None:
        if not getattr(model, "layers", None):
            raise UserError(f"model {model.name!r} has no layers")
        layer = model.layers[-1]
    if isinstance(layer, keras.Model):
        return output_layer(layer)
    return layer


def _activation_name(layer: keras.layers.Layer) -> str:
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    return getattr(activation, "__name__", str(activation))


def output_kind(model: keras.Model) -> str:
    """``"probabilities"`` if the last layer applies softmax, ``"logits"`` if it is linear."""
    name = _activation_name(output_layer(model))
    if name == "softmax":
        return PROBABILITIES
    if name == "linear":
        return LOGITS
    raise UserError(f"the last layer of model {model.name!r} applies {name!r}; influence needs "
                    "a classifier whose last layer is linear (logits) or softmax (probabilities)")


def _softmax_input(probabilities: tf.Tensor) -> tf.Tensor | None:
    """The logits a softmax output was computed from, or None if the graph does not say."""
    logits = getattr(probabilities, "_keras_logits", None)  # set by keras.activations.softmax
    if logits is not None:
        return logits
    if tf.executing_eagerly() or not hasattr(probabilities, "op"):
        return None
    tensor = probabilities
    while tensor.op.type == "Identity":  # Functional models may wrap their outputs
        tensor = tensor.op.inputs[0]
    if tensor.op.type == "Softmax":
        return tensor.op.inputs[0]
    return None


def _at_least_float32(tensor: tf.Tensor) -> tf.Tensor:
    # Mixed-precision models output float16; a log-probability needs more.
    return tf.cast(tensor, tf.float32) if tensor.dtype.size < 4 else tensor


def cross_entropy(outputs: tf.Tensor, labels: tf.Tensor, *, kind: str) -> tf.Tensor:
    """Per-example ``-log p(label)``: (B,) from ``outputs`` (B, C) and integer ``labels`` (B,)."""
    labels = tf.cast(labels, tf.int32)
    if kind == PROBABILITIES:
        logits = _softmax_input(outputs)
        if logits is None:
            probabilities = _at_least_float32(outputs)
            picked = tf.gather(probabilities, labels, axis=1, batch_dims=1)  # (B,)
            # Clipping keeps log finite; its gradient is 0 only where p underflowed.
            tiny = np.finfo(probabilities.dtype.as_numpy_dtype).tiny
            return -tf.math.log(tf.maximum(picked, tiny))
        outputs = logits
    elif kind != LOGITS:
        raise ValueError(f"kind must be {PROBABILITIES!r} or {LOGITS!r}, not {kind!r}")
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                          logits=_at_least_float32(outputs))


def per_example_loss(model: keras.Model):
    """``loss_fn(x, y) -> (B,)`` cross-entropy of ``model`` on images ``x`` and integer labels ``y``.

    Inference mode (``training=False``): dropout off, batch-norm statistics frozen, so
    the loss is a deterministic function of the weights. No regularisers here: they
    belong to the training objective, not to one example (see ``hvp``).
    """
    kind = output_kind(model)

    def loss_fn(x, y):
        outputs = model(x, training=False)  # (B, C)
        return cross_entropy(outputs, y, kind=kind)

    loss_fn.kind = kind
    return loss_fn
