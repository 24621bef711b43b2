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
from influence.graphs import graph_function


def _build_scorer(model_ref, tf_vars):
    @graph_function
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


def _build_group_scorer(model_ref, tf_vars, unroll: int):
    def one(x, y, tangents):
        with tf.autodiff.ForwardAccumulator(primals=tf_vars, tangents=tangents) as accumulator:
            per_example = losses.per_example_loss(model_ref())(x, y)  # (B,)
        return accumulator.jvp(per_example, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    @graph_function
    def score_group(x, y, stacked):
        m = stacked[0].shape[0]  # None once groups of several sizes have been scored (reduce_retracing)
        if m is not None and m <= unroll:  # one pass per test vector, each with its own primal pass
            return tf.stack([one(x, y, [part[k] for part in stacked]) for k in range(m)])  # (m, B)
        # The primal pass does not depend on the tangents: pfor computes it once for all m,
        # and the m tangent products become batched matrix products.
        return tf.vectorized_map(lambda tangents: one(x, y, tangents), stacked)  # (m, B)

    return score_group


def stack_s_tests(s_tests, variables) -> list[tf.Tensor]:
    """``m`` s_test vectors (each a list shaped like ``variables``) -> one (m, *shape) tensor per variable."""
    dtypes = [variable.dtype for variable in hvp.tf_variables(variables)]
    return [tf.stack([tf.cast(s_test[i], dtype) for s_test in s_tests]) for i, dtype in enumerate(dtypes)]


def influence_scores_many(model: keras.Model, variables, stacked, x, y, *, unroll: int = 1) -> np.ndarray:
    """(m, B) scores of the training images ``x`` (B, ...) for ``m`` test images at once.

    ``stacked``: :func:`stack_s_tests` of the ``m`` s_test vectors. One forward-mode pass
    vectorised over the ``m`` tangents: the primal forward pass is shared and the tangent
    products become batched matrix products, so a caller that reads, decodes and preprocesses
    a batch once scores it for a whole group of test images. Row ``k`` equals
    ``influence_scores(..., s_tests[k], x, y)`` up to float32 rounding.

    ``unroll``: up to this many tangents are scored one after another instead, each with its
    own primal pass. The vectorised pass traces slowly (about 0.5 s the first time on VGG16's
    fc2+predictions head, against 0.2 s for two passes one after another), which pays off
    only where the primal pass is costly: a whole network (keep 1), not a head over cached
    features (2 costs no more per batch there).
    """
    x, y = hvp.as_batch(x, y)
    scorer = hvp.compiled(model, variables, f"influence_scores_many/unroll={unroll}",
                          lambda model_ref, tf_vars: _build_group_scorer(model_ref, tf_vars, unroll))
    return scorer(x, y, list(stacked)).numpy()
