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

The kind is read off the graph: from the output back through layers that change nothing at
inference (a linear ``Activation``, ``Identity``, dropout and noise layers, ``Reshape``,
``Flatten``, a nested model's pass-through) to the first layer that does, which must end in
a softmax or be linear. A layer that leaves it unclear (a ``Lambda``, a ``Rescaling`` after
the softmax) is refused, unless the user says which it is (:func:`declare_output_kind`,
``calculate.py --outputs``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from influence.errors import UserError

PROBABILITIES = "probabilities"
LOGITS = "logits"
OUTPUT_KINDS = (LOGITS, PROBABILITIES)

# Layers that pass their input through unchanged at inference (training=False), up to its shape.
_PASS_THROUGH = tuple(getattr(keras.layers, name) for name in (
    "Identity", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianDropout",
    "GaussianNoise", "AlphaDropout", "ActivityRegularization", "Reshape", "Flatten", "InputLayer",
) if hasattr(keras.layers, name))
_DECLARED = "_influence_output_kind"  # attribute set on a model by declare_output_kind


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


def _activation_name(layer: keras.layers.Layer) -> str | None:
    """"softmax", "linear", another activation's name, or None when the layer does not say."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))


def _is_pass_through(layer) -> bool:
    return isinstance(layer, _PASS_THROUGH) or (
        isinstance(layer, keras.layers.Activation) and _activation_name(layer) == "linear")


def _producer(tensor):
    """(layer, node) that produced a symbolic tensor, or (None, None)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, None
    layer = history.operation
    nodes = getattr(layer, "_inbound_nodes", [])
    return layer, nodes[history.node_index] if history.node_index < len(nodes) else None


def deciding_layer(model: keras.Model):
    """The layer whose activation decides what ``model`` outputs: the output layer, or, when
    that passes its input through (:data:`_PASS_THROUGH`, a linear ``Activation``), the first
    layer before it that does not; inside nested models too."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return output_layer(model)
    if len(outputs) != 1:
        output_layer(model)  # raises the one-output error
    return _deciding(outputs[0], model) or output_layer(model)


def _deciding(tensor, model, depth: int = 0):
    if depth > 1000:
        return None
    layer, node = _producer(tensor)
    if layer is None:
        return None
    inputs = list(getattr(node, "input_tensors", None) or [])
    if isinstance(layer, keras.Model) and getattr(layer, "outputs", None) and len(layer.outputs) == 1:
        inner = _deciding(layer.outputs[0], layer, depth + 1)
        if inner is not None and not isinstance(inner, keras.layers.InputLayer):
            return inner
        # The nested model passes its input through: keep looking outside it.
        return _deciding(inputs[0], model, depth + 1) if len(inputs) == 1 else inner
    if _is_pass_through(layer) and len(inputs) == 1:
        return _deciding(inputs[0], model, depth + 1) or layer
    return layer


def declare_output_kind(model: keras.Model, kind: str) -> None:
    """Say what ``model`` outputs (``"logits"`` or ``"probabilities"``), overriding the detection."""
    if kind not in OUTPUT_KINDS:
        raise UserError(f"unknown output kind {kind!r}; valid: {', '.join(OUTPUT_KINDS)}")
    setattr(model, _DECLARED, kind)


def output_kind(model: keras.Model) -> str:
    """``"probabilities"`` if the model ends in a softmax, ``"logits"`` if in a linear layer
    (looking through layers that change nothing, see the module docstring); as declared with
    :func:`declare_output_kind` if it was."""
    declared = getattr(model, _DECLARED, None)
    if declared is not None:
        return declared
    layer = deciding_layer(model)
    name = _activation_name(layer)
    if name == "softmax":
        return PROBABILITIES
    if name == "linear":
        return LOGITS
    if name is None:
        raise UserError(f"cannot tell whether model {model.name!r} outputs logits or probabilities: its output "
                        f"comes from layer {layer.name!r} ({type(layer).__name__}); say which with "
                        f"--outputs logits or --outputs probabilities")
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
