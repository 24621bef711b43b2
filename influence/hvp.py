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
forward-over-backward: as fast as the other on VGG16 and lighter on memory. Every
function is a ``tf.function`` compiled once per model and variable selection, so a run
of thousands of products traces once (twice if the last batch is smaller).
"""

from __future__ import annotations

import weakref
from typing import Callable

import keras
import tensorflow as tf

from influence import losses
from influence.errors import UserError

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


def _objective(model: keras.Model, x, y) -> tf.Tensor:
    mean_loss = tf.reduce_mean(losses.per_example_loss(model)(x, y))
    terms = model.losses  # the weight regularisers, evaluated on the current weights
    if not terms:
        return mean_loss
    return mean_loss + tf.add_n([tf.cast(term, mean_loss.dtype) for term in terms])


def _build_loss_gradient(model_ref, tf_vars):
    @tf.function(reduce_retracing=True)
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
    @tf.function(reduce_retracing=True)
    def hvp(x, y, vec):
        with tf.autodiff.ForwardAccumulator(primals=tf_vars, tangents=vec) as accumulator:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(tf_vars)
                objective = _objective(model_ref(), x, y)
            gradient = tape.gradient(objective, tf_vars, unconnected_gradients=_ZERO)
        return [accumulator.jvp(g, unconnected_gradients=_ZERO) for g in gradient]

    return hvp


def _build_summed_gradient(model_ref, tf_vars):
    @tf.function(reduce_retracing=True)
    def hvp(x, y, vec):
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(tf_vars)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(tf_vars)
                objective = _objective(model_ref(), x, y)
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
    """Compiled ``f(x, y, vec) -> H_B vec`` on the given batch (lists of tensors in and out)."""
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
    minibatches, drawn at random from the whole training set (a :class:`influence.sampling.MinibatchSampler`).
    ``vec`` and the result are lists of tensors shaped like ``variables``.
    ``form``: ``"forward_over_backward"``, ``"summed_gradient"`` or ``"auto"``; the form
    actually used is ``hvp_fn.form``.
    """
    form = resolve_form(form)
    product = batch_hvp(model, variables, form=form)
    next_batch = _next_batch_source(batches)
    dtypes = [variable.dtype for variable in tf_variables(variables)]

    def hvp_fn(vec):
        try:
            x, y = as_batch(*next_batch())
        except StopIteration:
            raise UserError("the training minibatches ran out before LiSSA finished; "
                            "pass an endless source such as sampling.MinibatchSampler") from None
        vec = [tf.cast(part, dtype) for part, dtype in zip(vec, dtypes)]
        return product(x, y, vec)

    hvp_fn.form = form
    return hvp_fn
