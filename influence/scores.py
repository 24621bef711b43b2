"""Influence scores of training images: ``score(z) = s_test . grad L(z)``.

Sign convention (the README repeats it). With ``s_test = H^-1 grad L(z_test)``, Koh &
Liang's ``I_up,loss(z, z_test) = -s_test . grad L(z)``, and removing ``z`` from a training
set of ``n`` images changes the test loss by about ``-I_up,loss / n``. So

    score(z) = s_test . grad L(z) = n * (predicted change of the test loss if z is removed)

- positive: removing ``z`` would raise the test loss, so ``z`` is **useful** (it helped);
- negative: removing ``z`` would lower the test loss, so ``z`` is **harmful**.

``score / n_train`` is the leave-one-out prediction (``tests/test_loo.py`` checks it).

How: ``s_test . grad L(z_i)`` is the directional derivative of ``L(z_i)`` along ``s_test``
in weight space. One forward-mode pass (a ``ForwardAccumulator`` with tangents ``s_test``)
over the per-example losses of a whole batch gives it for every ``i`` at once: no Python
loop over images and no per-example gradient is ever materialised, so the memory is one
batch's activations (and their tangents) plus ``s_test``. No regularisers: they belong
to the training objective, not to one example.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from influence import hvp, losses


def _build_scorer(model_ref, tf_vars):
    @tf.function(reduce_retracing=True)
    def score(x, y, s_test):
        with tf.autodiff.ForwardAccumulator(primals=tf_vars, tangents=s_test) as accumulator:
            per_example = losses.per_example_loss(model_ref())(x, y)  # (B,)
        return accumulator.jvp(per_example, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    return score


def influence_scores(model: keras.Model, variables, s_test, x, y) -> np.ndarray:
    """(B,) float32 ``s_test . grad L(z_i)`` for the training images ``x`` (B, ...) with labels ``y`` (B,).

    ``s_test``: a list of tensors shaped like ``variables`` (``LissaResult.s_test``).
    Positive = useful, negative = harmful (module docstring).
    """
    x, y = hvp.as_batch(x, y)
    tangents = [tf.cast(part, variable.dtype)
                for part, variable in zip(s_test, hvp.tf_variables(variables))]
    scorer = hvp.compiled(model, variables, "influence_scores", _build_scorer)
    return scorer(x, y, tangents).numpy()


def _build_group_scorer(model_ref, tf_vars):
    @tf.function(reduce_retracing=True)
    def score_group(x, y, s_tests):
        rows = []
        for s_test in s_tests:  # one forward-mode pass per test image over the same batch
            with tf.autodiff.ForwardAccumulator(primals=tf_vars, tangents=s_test) as accumulator:
                per_example = losses.per_example_loss(model_ref())(x, y)  # (B,)
            rows.append(accumulator.jvp(per_example, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        return tf.stack(rows)

    return score_group


def influence_scores_many(model: keras.Model, variables, s_tests, x, y) -> np.ndarray:
    """(m, B) scores of the training images ``x`` for ``m`` test images at once.

    ``s_tests``: a list of ``m`` vectors, each a list of tensors shaped like ``variables``.
    The batch is converted once and all ``m`` directional derivatives are taken in one
    compiled call, so a caller that reads, decodes and preprocesses a batch once scores it for
    a whole group of test images. Row ``k`` equals ``influence_scores(..., s_tests[k], x, y)``.
    """
    x, y = hvp.as_batch(x, y)
    dtypes = [variable.dtype for variable in hvp.tf_variables(variables)]
    tangents = [[tf.cast(part, dtype) for part, dtype in zip(s_test, dtypes)] for s_test in s_tests]
    scorer = hvp.compiled(model, variables, "influence_scores_many", _build_group_scorer)
    return scorer(x, y, tangents).numpy()
