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
