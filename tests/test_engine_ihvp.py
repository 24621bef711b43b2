"""LiSSA, conjugate gradients and the exact solve against np.linalg.solve."""

import numpy as np
import pytest
import tensorflow as tf

from engine_models import (explicit_hessian, flat, mlp, random_vector, softmax_regression,
                           tabular_data)
from influence.sampling import MinibatchSampler
from influence import hvp, ihvp, params
from influence.errors import UserError


def _spd(eigenvalues, seed=0) -> np.ndarray:
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return rotation @ np.diag(eigenvalues) @ rotation.T


def _matrix_hvp(matrix):
    """An hvp_fn for a fixed matrix, on a single-tensor vector."""
    operator = tf.constant(matrix, tf.float64)
    return lambda vec: [tf.linalg.matvec(operator, vec[0])]


def _rel_error(got, expected) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


V3 = [tf.constant([1.0, -2.0, 0.5], tf.float64)]


def test_lissa_fixed_point_is_solve_with_damping_times_scale():
    matrix = _spd([3.0, 1.0, 0.2])
    result = ihvp.lissa(_matrix_hvp(matrix), V3, depth=400, damping=0.02, scale=4.0)
    assert result.effective_damping == pytest.approx(0.08)
    expected = np.linalg.solve(matrix + 0.08 * np.eye(3), flat(V3))
    assert _rel_error(flat(result.s_test), expected) < 1e-8
    # ... and not the solve with damping alone, which is a different vector here.
    assert _rel_error(flat(result.s_test), np.linalg.solve(matrix + 0.02 * np.eye(3), flat(V3))) > 0.05


def test_lissa_norms_and_callback():
    steps = []
    result = ihvp.lissa(_matrix_hvp(_spd([2.0, 1.0, 0.5])), V3, depth=30, damping=0.1, scale=3.0,
                        repeat=2, callback=lambda done, total, norm: steps.append((done, total, norm)))
    assert result.norms.shape == (2, 30)
    assert [done for done, _, _ in steps] == list(range(1, 61))
    assert {total for _, total, _ in steps} == {60}
    np.testing.assert_allclose([norm for _, _, norm in steps], result.norms.ravel())
    # Deterministic product: both runs are identical, and h_J = scale * s_test.
    np.testing.assert_allclose(result.norms[0], result.norms[1])
    assert result.norms[0, -1] == pytest.approx(3.0 * np.linalg.norm(flat(result.s_test)), rel=1e-12)
    assert result.relative_change < 1e-3


def test_repeat_averages_every_run():
    # A different matrix at every step stands in for random minibatches.
    matrices = [_spd([2.0 + k % 5, 1.0, 0.3 + 0.1 * (k % 3)], seed=k) for k in range(3 * 25)]

    def stream_hvp(offset=0):
        counter = iter(range(offset, len(matrices)))
        return lambda vec: _matrix_hvp(matrices[next(counter)])(vec)

    settings = dict(depth=25, damping=0.05, scale=10.0)
    averaged = flat(ihvp.lissa(stream_hvp(), V3, repeat=3, **settings).s_test)
    runs = [flat(ihvp.lissa(stream_hvp(25 * k), V3, repeat=1, **settings).s_test) for k in range(3)]
    np.testing.assert_allclose(averaged, np.mean(runs, axis=0), rtol=1e-12)
    for run in runs:  # the runs differ, so keeping only one would fail the line above
        assert _rel_error(run, averaged) > 1e-3


def test_lissa_on_a_model_converges_to_the_damped_solve():
    model = softmax_regression(l2=0.01)
    x, y = tabular_data(40)
    variables = params.select(model)
    hvp_fn = hvp.training_hvp(model, variables, MinibatchSampler.from_arrays(x, y, len(x)))  # full batch
    v = hvp.loss_gradient(model, variables, x[:1], y[:1])
    result = ihvp.lissa(hvp_fn, v, depth=600, damping=0.001, scale="auto")
    hessian = explicit_hessian(model, variables, x, y)
    top = np.linalg.eigvalsh(hessian)[-1]
    assert result.scale == pytest.approx(ihvp.DEFAULT_SCALE_MARGIN * top, rel=0.02)
    expected = np.linalg.solve(hessian + result.effective_damping * np.eye(len(hessian)), flat(v))
    assert _rel_error(flat(result.s_test), expected) < 1e-3


def test_lissa_with_random_minibatches_approaches_the_full_batch_answer():
    model = softmax_regression(l2=0.02)
    x, y = tabular_data(64)
    variables = params.select(model)
    v = hvp.loss_gradient(model, variables, x[:1], y[:1])
    hvp_fn = hvp.training_hvp(model, variables, MinibatchSampler.from_arrays(x, y, 32, seed=0))
    scale = ihvp.estimate_scale(hvp_fn, like=v, damping=0.01)
    result = ihvp.lissa(hvp_fn, v, depth=200, damping=0.01, scale=scale, repeat=8)
    damped = result.effective_damping * np.eye(params.count(variables))
    expected = np.linalg.solve(explicit_hessian(model, variables, x, y) + damped, flat(v))
    error = _rel_error(flat(result.s_test), expected)
    # Stochastic: close to, not equal to, the full-batch solve. Sampling from one shard
    # only (the older suite's bug) lands much farther away than this tolerance.
    assert error < 0.08
    shard = np.linalg.solve(explicit_hessian(model, variables, x[:32], y[:32]) + damped, flat(v))
    assert _rel_error(shard, expected) > 2 * 0.08


def test_estimate_scale_finds_the_top_eigenvalue():
    matrix = _spd([40.0, 4.0, 1.0])
    scale = ihvp.estimate_scale(_matrix_hvp(matrix), like=V3, margin=1.25, iterations=30)
    assert scale == pytest.approx(1.25 * 40.0, rel=1e-3)
    negative = _spd([-40.0, 4.0, 1.0])  # magnitude, not signed value
    assert ihvp.estimate_scale(_matrix_hvp(negative), like=V3, iterations=30) == pytest.approx(60.0, rel=1e-3)
    with pytest.raises(UserError, match="margin"):
        ihvp.estimate_scale(_matrix_hvp(matrix), like=V3, margin=0.4)


def test_auto_scale_converges_where_a_small_scale_diverges():
    matrix = _spd([40.0, 4.0, 1.0])
    hvp_fn = _matrix_hvp(matrix)
    with pytest.raises(ihvp.LissaDivergedError) as error:
        ihvp.lissa(hvp_fn, V3, depth=200, damping=0.01, scale=10.0)
    message = str(error.value)
    assert "passed the bound" in message and "scale 'auto'" in message and "at least 20" in message
    assert isinstance(error.value, UserError)
    # Without the bound the same run goes to inf/NaN, and the guard says so.
    with pytest.raises(ihvp.LissaDivergedError, match="not finite"):
        ihvp.lissa(hvp_fn, V3, depth=2000, damping=0.01, scale=10.0, max_norm=np.inf)
    result = ihvp.lissa(hvp_fn, V3, depth=2000, damping=0.01, scale="auto")
    assert result.scale == pytest.approx(60.0, rel=1e-3)
    expected = np.linalg.solve(matrix + result.effective_damping * np.eye(3), flat(V3))
    assert _rel_error(flat(result.s_test), expected) < 1e-3
    assert np.isfinite(result.norms).all()


def test_auto_scale_on_a_model_where_a_small_scale_goes_to_nan():
    model = softmax_regression(l2=0.01)
    x, y = tabular_data(40)
    variables = params.select(model)
    hvp_fn = hvp.training_hvp(model, variables, MinibatchSampler.from_arrays(x, y, len(x)))
    v = hvp.loss_gradient(model, variables, x[:1], y[:1])
    hessian = explicit_hessian(model, variables, x, y)
    small = np.linalg.eigvalsh(hessian)[-1] / 4
    with pytest.raises(ihvp.LissaDivergedError, match="not finite"):
        ihvp.lissa(hvp_fn, v, depth=1000, damping=0.01, scale=small, max_norm=np.inf)
    with pytest.raises(ihvp.LissaDivergedError, match="passed the bound"):
        ihvp.lissa(hvp_fn, v, depth=1000, damping=0.01, scale=small)
    result = ihvp.lissa(hvp_fn, v, depth=1000, damping=0.01, scale="auto")
    expected = np.linalg.solve(hessian + result.effective_damping * np.eye(len(hessian)), flat(v))
    assert _rel_error(flat(result.s_test), expected) < 1e-3


def test_negative_curvature_needs_damping_and_the_guard_says_so():
    model = mlp(softmax=True, regularise=0.05)  # random weights: an indefinite Hessian
    x, y = tabular_data(32)
    variables = params.select(model)
    hvp_fn = hvp.training_hvp(model, variables, MinibatchSampler.from_arrays(x, y, len(x)))
    v = hvp.loss_gradient(model, variables, x[:1], y[:1])
    hessian = explicit_hessian(model, variables, x, y)
    scale = ihvp.estimate_scale(hvp_fn, like=v)
    lowest = np.linalg.eigvalsh(hessian)[0]
    assert 0.01 * scale < -lowest < 0.3 * scale
    with pytest.raises(ihvp.LissaDivergedError, match="larger damping"):
        ihvp.lissa(hvp_fn, v, depth=3000, damping=0.01, scale=scale)
    result = ihvp.lissa(hvp_fn, v, depth=600, damping=0.3, scale=scale)
    assert lowest + result.effective_damping > 0
    expected = np.linalg.solve(hessian + result.effective_damping * np.eye(len(hessian)), flat(v))
    assert _rel_error(flat(result.s_test), expected) < 1e-3


def test_conjugate_gradient_and_exact_solve_agree():
    model = mlp(softmax=False, regularise=0.05)
    x, y = tabular_data(32)
    variables = params.select(model)
    hvp_fn = hvp.training_hvp(model, variables, MinibatchSampler.from_arrays(x, y, len(x)))
    v = random_vector(variables, seed=9)
    damping = 1.2  # enough to make this random network's Hessian positive definite
    hessian = explicit_hessian(model, variables, x, y)
    assert np.linalg.eigvalsh(hessian + damping * np.eye(len(hessian)))[0] > 0
    expected = np.linalg.solve(hessian + damping * np.eye(len(hessian)), flat(v))
    exact = ihvp.exact_solve(hvp_fn, v, damping=damping)
    cg = ihvp.conjugate_gradient(hvp_fn, v, damping=damping, max_iterations=200, tolerance=1e-6)
    assert exact.effective_damping == cg.effective_damping == damping
    assert _rel_error(flat(exact.s_test), expected) < 1e-4
    assert _rel_error(flat(cg.s_test), flat(exact.s_test)) < 1e-4
    assert cg.residual_norms[-1] <= 1e-6 * cg.residual_norms[0] * 1.0001


def test_conjugate_gradient_on_3x3_and_negative_curvature():
    matrix = _spd([5.0, 2.0, 0.1])
    cg = ihvp.conjugate_gradient(_matrix_hvp(matrix), V3, damping=0.3)
    np.testing.assert_allclose(flat(cg.s_test), np.linalg.solve(matrix + 0.3 * np.eye(3), flat(V3)), rtol=1e-8)
    assert len(cg.residual_norms) <= 4  # CG is exact in n = 3 steps
    with pytest.raises(ihvp.LissaDivergedError, match="raise the damping"):
        ihvp.conjugate_gradient(_matrix_hvp(_spd([5.0, -2.0, 0.1])), V3, damping=0.0)


def test_exact_solve_refuses_large_models():
    with pytest.raises(UserError, match="too large"):
        ihvp.exact_solve(_matrix_hvp(np.eye(3)), V3, damping=0.1, max_parameters=2)


@pytest.mark.parametrize("settings, match", [
    (dict(depth=0, damping=0.0, scale=1.0), "depth"),
    (dict(depth=5, damping=1.0, scale=1.0), "damping"),
    (dict(depth=5, damping=-0.1, scale=1.0), "damping"),
    (dict(depth=5, damping=0.0, scale=-2.0), "scale"),
    (dict(depth=5, damping=0.0, scale="big"), "scale"),
    (dict(depth=5, damping=0.0, scale=1.0, repeat=0), "repeat"),
])
def test_lissa_rejects_bad_settings(settings, match):
    with pytest.raises(UserError, match=match):
        ihvp.lissa(_matrix_hvp(np.eye(3)), V3, **settings)
