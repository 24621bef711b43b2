"""Gradients and Hessian-vector products of the training objective.

The training objective on a minibatch ``B`` is

    R_B(theta) = mean_{z in B} L(z, theta) + sum(model.losses)

(the model's own weight regularisers included), and its Hessian ``H_B`` is what LiSSA
samples. ``H_B v`` is computed without ever forming ``H_B``, in one of two forms:

- ``forward_over_backward``: the directional derivative along ``v`` (a
  ``ForwardAccumulator``) of the gradient (a ``GradientTape``);
- ``summed_gradient``: the gradient of ``sum(grad R_B * v)`` (reverse over reverse,
  the older suite's "sumup gradients").

Both give the same vector; ``benchmarks/bench_engine.py`` times them, and ``"auto"`` is
forward-over-backward: as fast as the other on VGG16 and lighter on memory (on a head over
cached features the engine asks for the summed gradient, the faster there). Every
function is a ``tf.function`` compiled once per model and variable selection, so a run
of thousands of products traces a handful of times (per batch shape, and per update that
``training_hvp``'s ``followed_by`` fuses with the product), not once per product.
"""

from __future__ import annotations

import weakref
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from influence import losses
from influence.errors import UserError
from influence.graphs import graph_function

FORWARD_OVER_BACKWARD = "forward_over_backward"
SUMMED_GRADIENT = "summed_gradient"
FORMS = (FORWARD_OVER_BACKWARD, SUMMED_GRADIENT)
# benchmarks/bench_engine.py (docs/benchmarks.md): on VGG16 both forms take the same time (within
# 1%) and forward-over-backward peaks 0.4-1 GiB lower with all weights; on a small CNN the
# summed gradient is up to 10% faster, but there a product takes milliseconds.
AUTO_FORM = FORWARD_OVER_BACKWARD

_ZERO = tf.UnconnectedGradients.ZERO


def tf_variables(variables) -> list[tf.Variable]:
    """The TensorFlow variables behind keras Variables (what tapes and accumulators watch)."""
    unwrapped = []
    for variable in variables:
        value = getattr(variable, "value", variable)
        unwrapped.append(value if isinstance(value, tf.Variable) else variable)
    return unwrapped


def as_batch(x, y) -> tuple[tf.Tensor, tf.Tensor]:
    """``x`` as float32 (B, ...) and ``y`` as int32 (B,) tensors."""
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    y = tf.cast(tf.convert_to_tensor(y), tf.int32)
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{x.shape[0]} images but {y.shape[0]} labels in one batch")
    return x, y


# One compiled function per (model, variable selection, job). The functions hold the model
# only through a weak reference, so the cache does not keep dead models alive.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model: keras.Model, variables, job: str, build: Callable) -> Callable:
    """``build(model_ref, tf_vars)`` compiled once per ``model``, ``variables`` and ``job``."""
    per_model = _COMPILED.setdefault(model, {})
    key = (job, tuple(id(variable) for variable in variables))
    if key not in per_model:
        per_model[key] = build(weakref.ref(model), tf_variables(variables))
    return per_model[key]


def _objective(model: keras.Model, x, y, weights=None, regularizer_weight=None) -> tf.Tensor:
    """``sum_i weights_i L(z_i) + regularizer_weight * sum(model.losses)``.

    Defaults: ``weights_i = 1 / B`` (the minibatch mean) and ``regularizer_weight = 1``.
    Importance-sampled minibatches pass ``weights_i = 1 / (B N q_i)`` (an unbiased estimate
    of the full objective's Hessian, :mod:`influence.sampling`); a chunk ``c`` of a fixed set
    of ``S`` examples passes ``1 / S`` and ``|c| / S``, so that the chunks' products sum
    exactly to the product on the whole set (:func:`dataset_hvp`).
    """
    per_example = losses.per_example_loss(model)(x, y)  # (B,)
    if weights is None:
        data_term = tf.reduce_mean(per_example)
    else:
        data_term = tf.reduce_sum(tf.cast(weights, per_example.dtype) * per_example)
    terms = model.losses  # the weight regularisers, evaluated on the current weights
    if not terms:
        return data_term
    regularizer = tf.add_n([tf.cast(term, data_term.dtype) for term in terms])
    if regularizer_weight is not None:
        regularizer = tf.cast(regularizer_weight, data_term.dtype) * regularizer
    return data_term + regularizer


def _build_loss_gradient(model_ref, tf_vars):
    @graph_function
    def gradient(x, y):
        model = model_ref()
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(tf_vars)
            loss = tf.reduce_mean(losses.per_example_loss(model)(x, y))
        return tape.gradient(loss, tf_vars, unconnected_gradients=_ZERO)

    return gradient


def loss_gradient(model: keras.Model, variables, x, y) -> list[tf.Tensor]:
    """Gradient of the mean per-example loss over ``(x, y)`` w.r.t. ``variables``.

    No regularisers: this is the test gradient ``grad L(z_test)`` that ``s_test`` solves for.
    """
    x, y = as_batch(x, y)
    return compiled(model, variables, "loss_gradient", _build_loss_gradient)(x, y)


def _build_forward_over_backward(model_ref, tf_vars):
    @graph_function
    def hvp(x, y, vec, weights=None, regularizer_weight=None):
        with tf.autodiff.ForwardAccumulator(primals=tf_vars, tangents=vec) as accumulator:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(tf_vars)
                objective = _objective(model_ref(), x, y, weights, regularizer_weight)
            gradient = tape.gradient(objective, tf_vars, unconnected_gradients=_ZERO)
        return [accumulator.jvp(g, unconnected_gradients=_ZERO) for g in gradient]

    return hvp


def _build_summed_gradient(model_ref, tf_vars):
    @graph_function
    def hvp(x, y, vec, weights=None, regularizer_weight=None):
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(tf_vars)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(tf_vars)
                objective = _objective(model_ref(), x, y, weights, regularizer_weight)
            gradient = inner.gradient(objective, tf_vars, unconnected_gradients=_ZERO)
            summed = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(gradient, vec)])
        return outer.gradient(summed, tf_vars, unconnected_gradients=_ZERO)

    return hvp


_BUILDERS = {FORWARD_OVER_BACKWARD: _build_forward_over_backward,
             SUMMED_GRADIENT: _build_summed_gradient}


def resolve_form(form: str) -> str:
    """The product form that ``form`` (possibly ``"auto"``) stands for."""
    if form == "auto":
        return AUTO_FORM
    if form not in _BUILDERS:
        raise UserError(f"unknown Hessian-vector product form {form!r}; "
                        f"valid: auto, {', '.join(FORMS)}")
    return form


def batch_hvp(model: keras.Model, variables, *, form: str = "auto") -> Callable:
    """Compiled ``f(x, y, vec, weights=None, regularizer_weight=None) -> H_B vec`` on the given
    batch (lists of tensors in and out); ``weights`` (B,) and ``regularizer_weight`` as in
    :func:`_objective`."""
    form = resolve_form(form)
    return compiled(model, variables, f"hvp/{form}", _BUILDERS[form])


def _next_batch_source(batches) -> Callable[[], tuple]:
    if callable(batches):
        return batches
    iterator = iter(batches)
    return lambda: next(iterator)


def training_hvp(model: keras.Model, variables, batches, *, form: str = "auto"):
    """``hvp_fn(vec) -> H_j vec`` where ``H_j`` is the objective's Hessian on the NEXT minibatch.

    ``batches``: an iterator (or a callable returning the next) of ``(x, y)`` training
    minibatches, drawn at random from the whole training set (a :class:`influence.sampling.MinibatchSampler`),
    or of ``(x, y, weights)`` with per-example weights (importance sampling: a sampler with
    ``probabilities``).
    ``vec`` and the result are lists of tensors shaped like ``variables``.
    ``form``: ``"forward_over_backward"``, ``"summed_gradient"`` or ``"auto"``; the form
    actually used is ``hvp_fn.form``.
    """
    form = resolve_form(form)
    product = batch_hvp(model, variables, form=form)
    next_batch = _next_batch_source(batches)
    dtypes = [variable.dtype for variable in tf_variables(variables)]

    def next_inputs(vec):
        try:
            batch = next_batch()
        except StopIteration:
            raise UserError("the training minibatches ran out before LiSSA finished; "
                            "pass an endless source such as sampling.MinibatchSampler") from None
        x, y = as_batch(batch[0], batch[1])
        weights = tf.constant(batch[2], tf.float32) if len(batch) > 2 and batch[2] is not None else None
        return x, y, [tf.cast(part, dtype) for part, dtype in zip(vec, dtypes)], weights

    def hvp_fn(vec):
        x, y, vec, weights = next_inputs(vec)
        return product(x, y, vec, weights)

    def followed_by(update: Callable) -> Callable:
        """``g(vec, *args) = update(vec, H_j vec, *args)`` on the next minibatch: the product and
        ``update`` (tensors in, tensors out) in one compiled call, so that ``H_j vec`` never
        has to be handed back and read again (a LiSSA step on VGG16's top layers: 6-8% faster)."""
        fused = compiled(model, variables, (f"followed_by/{form}", update),
                         lambda model_ref, tf_vars: _build_followed_by(product, update))

        def step(vec, *args):
            x, y, vec, weights = next_inputs(vec)
            return fused(x, y, weights, vec, *args)

        return step

    hvp_fn.form = form
    hvp_fn.followed_by = followed_by
    return hvp_fn


def _build_followed_by(product: Callable, update: Callable) -> Callable:
    @graph_function
    def fused(x, y, weights, vec, *args):
        return update(vec, product(x, y, vec, weights), *args)

    return fused


def dataset_hvp(model: keras.Model, variables, source, *, indices=None, chunk_size: int = 64,
                form: str = "auto", cache_bytes: int = 256 * 2**20):
    """``hvp_fn(vec) -> H_S vec``: the objective's Hessian on a FIXED set ``S`` of training examples.

    ``H_S = (1/S) sum_{i in S} H_i + H_reg`` (``S`` = ``indices`` of ``source``, default all of
    it), computed chunk by chunk: chunk ``c`` contributes its product with weights ``1 / S``
    and the regularisers with ``|c| / S``, so the chunks sum exactly (up to float rounding)
    to the product on the whole set, whatever ``chunk_size`` (the memory knob: one chunk's
    activations at a time). Deterministic: conjugate gradients and Lanczos need that.
    The preprocessed chunks are kept in memory when they fit in ``cache_bytes``; otherwise
    every product reads them again from ``source``.
    ``source``: an :class:`influence.sampling.Source` (``take(indices)``, ``labels``).
    """
    form = resolve_form(form)
    product = batch_hvp(model, variables, form=form)
    dtypes = [variable.dtype for variable in tf_variables(variables)]
    indices = np.arange(len(source)) if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
    total = len(indices)
    if total == 0:
        raise UserError("the Hessian on an empty set of training examples is undefined")
    if chunk_size < 1:
        raise UserError(f"chunk size must be at least 1, not {chunk_size}")
    chunks = [indices[start:start + chunk_size] for start in range(0, total, chunk_size)]

    def load(chunk):
        x, y = as_batch(source.take(chunk), np.asarray(source.labels)[chunk])
        weights = tf.fill([len(chunk)], tf.constant(1.0 / total, tf.float32))
        return x, y, weights, tf.constant(len(chunk) / total, tf.float32)

    cached = None
    first = load(chunks[0])
    if first[0].dtype.size * int(np.prod(first[0].shape[1:])) * total <= cache_bytes:
        cached = [first] + [load(chunk) for chunk in chunks[1:]]

    def hvp_fn(vec):
        vec = [tf.cast(part, dtype) for part, dtype in zip(vec, dtypes)]
        summed = None
        for position, chunk in enumerate(chunks):
            x, y, weights, regularizer_weight = cached[position] if cached is not None else load(chunk)
            part = product(x, y, vec, weights, regularizer_weight)
            summed = part if summed is None else [a + b for a, b in zip(summed, part)]
        return summed

    hvp_fn.form = form
    hvp_fn.size = total
    return hvp_fn
