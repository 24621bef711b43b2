"""Influence predicts leave-one-out retraining (Koh & Liang 2017, Fig. 2, left).

An L2-regularised softmax regression is trained to its optimum by Newton's method. For
one test point, ``score / n_train`` (engine: LiSSA, then batched scores) predicts how much
the test loss changes when a training point is removed; the actual change comes from
retraining without that point, warm-started at the optimum and converged tightly. The
retraining here uses its own closed-form objective, not the engine.
"""

import numpy as np
import tensorflow as tf

from engine_models import flat, softmax_regression, tabular_data
from influence.sampling import MinibatchSampler
from influence import hvp, ihvp, losses, params, scores

INPUTS, CLASSES, N_TRAIN, N_TEST, L2 = 8, 3, 500, 50, 0.003
TOP = 30  # the most influential training points, by |score|


def _newton_trainer(model):
    """``train(x, y)``: Newton's method with backtracking on mean CE + L2 * ||w||^2, in place."""
    layer = model.get_layer("predictions")
    kernel, bias = layer.kernel.value, layer.bias.value
    weights = [kernel, bias]

    @tf.function(reduce_retracing=True)
    def objective_gradient_hessian(x, y):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                logits = tf.matmul(x, kernel) + bias
                objective = (tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
                             + L2 * (tf.reduce_sum(kernel ** 2) + tf.reduce_sum(bias ** 2)))
            gradient = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(objective, weights)], 0)
        blocks = outer.jacobian(gradient, weights)
        hessian = tf.concat([tf.reshape(b, [tf.size(gradient), -1]) for b in blocks], 1)
        return objective, gradient, hessian

    def assign(vector):
        kernel.assign(vector[:kernel.shape.num_elements()].reshape(kernel.shape))
        bias.assign(vector[kernel.shape.num_elements():])

    def train(x, y, iterations=60):
        y = tf.constant(y, tf.int32)
        for _ in range(iterations):
            objective, gradient, hessian = objective_gradient_hessian(x, y)
            gradient = gradient.numpy().astype(np.float64)
            if np.linalg.norm(gradient) < 1e-7:
                break
            step = np.linalg.solve(hessian.numpy().astype(np.float64), gradient)
            start, length = flat(weights), 1.0
            while True:  # halve the step until the objective does not rise
                assign(start - length * step)
                if objective_gradient_hessian(x, y)[0] <= objective or length < 1e-4:
                    break
                length /= 2
        return float(np.linalg.norm(objective_gradient_hessian(x, y)[1]))

    return train, assign


def test_scores_predict_leave_one_out_retraining():
    x, y = tabular_data(N_TRAIN + N_TEST, inputs=INPUTS, classes=CLASSES, seed=5)
    x_test, y_test, x, y = x[N_TRAIN:], y[N_TRAIN:], x[:N_TRAIN], y[:N_TRAIN]
    model = softmax_regression(l2=L2, inputs=INPUTS, classes=CLASSES)
    train, assign = _newton_trainer(model)
    assert train(x, y) < 1e-5  # at the optimum: the gradient of the objective vanishes
    optimum = flat(params.select(model))

    loss_fn = losses.per_example_loss(model)
    k = int(np.argmax(loss_fn(x_test, y_test).numpy()))  # the worst-predicted test point
    z_test = (x_test[k:k + 1], y_test[k:k + 1])
    test_loss = lambda: float(loss_fn(*z_test)[0])  # noqa: E731
    base_loss = test_loss()

    variables = params.select(model)
    v = hvp.loss_gradient(model, variables, *z_test)
    hvp_fn = hvp.training_hvp(model, variables, MinibatchSampler.from_arrays(x, y, N_TRAIN))  # full batch
    # Converged to float32 by ~1,000 steps here (relative error 4e-6 at 1,000, 3.4e-6 from 1,500 on).
    lissa = ihvp.lissa(hvp_fn, v, depth=1500, damping=0.0, scale="auto")
    exact = ihvp.exact_solve(hvp_fn, v, damping=0.0)
    s_error = np.linalg.norm(flat(lissa.s_test) - flat(exact.s_test)) / np.linalg.norm(flat(exact.s_test))
    assert s_error < 1e-4
    predicted = scores.influence_scores(model, variables, lissa.s_test, x, y) / N_TRAIN

    top = np.argsort(-np.abs(predicted))[:TOP]
    actual = []
    for index in top:
        assign(optimum)
        keep = np.arange(N_TRAIN) != index
        assert train(x[keep], y[keep]) < 1e-5
        actual.append(test_loss() - base_loss)
    assign(optimum)
    actual = np.asarray(actual)

    pearson = np.corrcoef(predicted[top], actual)[0, 1]
    slope = np.polyfit(predicted[top], actual, 1)[0]
    print(f"\nleave-one-out, top {TOP} of {N_TRAIN} by |score|: Pearson {pearson:.4f}, "
          f"slope {slope:.3f} (actual vs score/n_train), LiSSA vs exact {s_error:.1e}")
    assert pearson >= 0.95, f"Pearson {pearson:.4f}"
    # Same scale and sign, not just correlated: positive score = removal raises the test loss.
    assert 0.8 < slope < 1.3, f"slope {slope:.3f}"
    assert (np.sign(actual) == np.sign(predicted[top])).mean() >= 0.9
