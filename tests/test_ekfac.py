"""EK-FAC against explicit constructions on tiny models.

Every reference here is built without the code under test: per-example gradients from one
tape per example (engine_models), layer inputs recomputed by hand or unfolded in NumPy,
the Gauss-Newton matrix as the explicit Hessian of a linear softmax model, and the inverse
as ``np.linalg.solve`` on the dense EK-FAC matrix. The fitted bases and eigenvalues are the
inputs of those references, never their answers.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine_models import explicit_hessian, flat, image_data, mlp, per_example_gradients, random_vector, \
    softmax_regression, tabular_data
from influence import ekfac, params, sampling, solvers
from influence.errors import UserError

TOLERANCE = 1e-6  # float64 fits against float64 references


def _fit(model, x, y, *, batch_size=7, seed=0, variables=None, label_draws=1):
    variables = params.select(model) if variables is None else variables
    blocks = ekfac.layer_blocks(model, variables)
    factors = ekfac.fit_factors(model, blocks, sampling.ArraySource(x, y), indices=np.arange(len(y)),
                                batch_size=batch_size, seed=seed, max_factor_dim=10_000, label_draws=label_draws,
                                dtype="float64",
                                echo=lambda *a, **k: None, progress=False)
    return variables, factors


def _curvature(model, x, y, variables=None, *, echo=lambda *a, **k: None):
    variables = params.select(model) if variables is None else variables
    sampler = sampling.MinibatchSampler.from_arrays(x, y, 8)
    return solvers.TrainingCurvature.build(model, variables, sampler, echo=echo)


def _close(actual, expected, tolerance=TOLERANCE):
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() <= tolerance * scale, np.abs(actual - expected).max() / scale


def _reconstruct(basis, values):
    return basis @ np.diag(values) @ basis.T


def _split(gradients, variables):
    """(N, P) flattened per-example gradients -> one (N, *shape) array per variable."""
    parts, start = [], 0
    for variable in variables:
        size = int(np.prod(variable.shape))
        parts.append(gradients[:, start:start + size].reshape((-1, *variable.shape)))
        start += size
    return parts


def _check_correction(layer, per_example_matrices):
    """Lambda[j, m] = mean_i ((Q_A^T G_i Q_S)[j, m])^2, straight from its definition."""
    projected = np.einsum("ja,nab,bm->njm", layer.activation_basis.T, per_example_matrices, layer.gradient_basis)
    _close(layer.eigenvalues, (projected ** 2).mean(axis=0))


def test_dense_factors_and_correction_match_per_example_gradients(monkeypatch):
    model = mlp(softmax=True)
    x, y = tabular_data(23)
    passes, covariances = [], ekfac.batch_covariances
    monkeypatch.setattr(ekfac, "batch_covariances", lambda *a, **k: passes.append(k["with_activations"])
                        or covariances(*a, **k))
    variables, factors = _fit(model, x, y, label_draws=2)  # moments are means over both draws
    assert passes == [True, False] * 4  # A (label-free) once per batch of 7, S for each draw
    labels = factors.pseudo_labels
    assert labels.shape == (2, 23) and set(labels.ravel()) <= {0, 1, 2} and np.any(labels[0] != labels[1])
    grads = [np.concatenate(parts) for parts in zip(*[  # (2N, ...) per variable, with the fit's own labels
        _split(per_example_gradients(model, variables, x, draw), variables) for draw in labels])]

    w1, b1 = (np.asarray(w, np.float64) for w in model.get_layer("hidden").get_weights())
    inputs = {"hidden": x.astype(np.float64), "predictions": np.tanh(x @ w1 + b1)}
    for layer, (kernel, bias) in zip(factors.layers, [(grads[0], grads[1]), (grads[2], grads[3])]):
        a = np.concatenate([inputs[layer.block.name], np.ones((23, 1))], axis=1)  # (N, d_a)
        g = bias  # (2N, d_out): for a Dense layer the bias gradient is dL_i/ds_i
        _close(_reconstruct(layer.activation_basis, layer.activation_covariance_eigenvalues), a.T @ a / 23)
        _close(_reconstruct(layer.gradient_basis, layer.gradient_covariance_eigenvalues), g.T @ g / 46)
        _check_correction(layer, np.concatenate([kernel, bias[:, None, :]], axis=1))


def _unfold(x, kernel_size, strides, dilation, padding):
    """(B, H, W, C) -> (B, H', W', kh*kw*C) by explicit loops, TensorFlow's SAME padding rule."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    batch, height, width, channels = x.shape
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        out_h, out_w = -(-height // sh), -(-width // sw)
        pad_h = max((out_h - 1) * sh + span_h - height, 0)
        pad_w = max((out_w - 1) * sw + span_w - width, 0)
        x = np.pad(x, [(0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)])
    else:
        out_h, out_w = (height - span_h) // sh + 1, (width - span_w) // sw + 1
    patches = np.zeros((batch, out_h, out_w, kh * kw * channels))
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, i * sh:i * sh + span_h:dh, j * sw:j * sw + span_w:dw, :]  # (B, kh, kw, C)
            patches[:, i, j] = window.reshape(batch, -1)
    return patches


@pytest.mark.parametrize("padding,strides,dilation", [
    ("valid", 1, 1), ("same", 1, 1), ("same", 2, 1), ("valid", 2, 1), ("same", 1, 2), ("valid", 1, 2)])
def test_conv_patches_match_explicit_unfolding_and_the_layer(padding, strides, dilation):
    x = np.random.default_rng(0).normal(size=(2, 7, 8, 3)).astype(np.float32)
    layer = keras.layers.Conv2D(4, (3, 2), strides=strides, dilation_rate=dilation, padding=padding)
    outputs = layer(x).numpy()  # linear activation: the pre-activation itself
    patches = ekfac.conv_patches(tf.constant(x), layer).numpy()
    expected = _unfold(x.astype(np.float64), (3, 2), layer.strides, layer.dilation_rate, padding)
    _close(patches, expected, 1e-6)
    kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
    _close(expected @ kernel.reshape(-1, 4) + bias, outputs, 1e-5)  # the kernel's row order


def _strided_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh", name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(3, activation="softmax", name="predictions"),
    ], name="strided_cnn")


def test_conv_factors_and_correction_match_explicit_gradients():
    model = _strided_cnn()
    x, y = image_data(9, size=6)
    x = x[..., :2]
    variables, factors = _fit(model, x, y, batch_size=4)
    conv, labels = factors.layers[0], factors.pseudo_labels[0]
    kernel, bias = (tf.constant(w) for w in model.get_layer("conv").get_weights())

    # Pre-activation gradients per position from a hand-written forward pass (tf.nn.conv2d).
    pre = tf.Variable(tf.nn.conv2d(x, kernel, strides=2, padding="SAME") + bias)  # (N, 3, 3, 3)
    with tf.GradientTape() as tape:
        probabilities = model.get_layer("predictions")(model.get_layer("flatten")(tf.tanh(pre)))
        total = -tf.reduce_sum(tf.math.log(tf.gather(probabilities, labels, axis=1, batch_dims=1)))
    g = tape.gradient(total, pre).numpy().astype(np.float64).reshape(9, 9, 3)  # (N, T, d_out)
    patches = _unfold(x.astype(np.float64), (3, 3), (2, 2), (1, 1), "same").reshape(9, 9, 18)
    a = np.concatenate([patches, np.ones((9, 9, 1))], axis=2)  # (N, T, d_a)

    _close(_reconstruct(conv.activation_basis, conv.activation_covariance_eigenvalues),
           np.einsum("nti,ntj->ij", a, a) / 81)
    _close(_reconstruct(conv.gradient_basis, conv.gradient_covariance_eigenvalues),
           np.einsum("nti,ntj->ij", g, g) / 9)
    grads = _split(per_example_gradients(model, variables, x, labels), variables)
    _check_correction(conv, np.concatenate([grads[0].reshape(9, 18, 3), grads[1][:, None, :]], axis=1))
    dense = factors.layers[1]
    _check_correction(dense, np.concatenate([grads[2], grads[3][:, None, :]], axis=1))


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_solve_matches_a_dense_solve_with_the_same_approximation(mode):
    l2, damping = 0.01, 0.05
    model = mlp(softmax=True, regularise=l2)  # L2 on the hidden kernel only: its bias row takes Woodbury
    x, y = tabular_data(30)
    variables = params.select(model)
    solver = ekfac.EkfacSolver(label_draws=1, damping=damping, damping_mode=mode, dtype="float64", batch_size=16)
    prepared = solver.prepare(_curvature(model, x, y), progress=False)
    v = random_vector(variables)
    s_test = prepared.solve(v).s_test

    all_eigenvalues = np.concatenate([layer.eigenvalues.ravel() for layer in prepared.factors.layers])
    tikhonov = damping * all_eigenvalues.mean() if mode == "relative" else damping
    assert prepared.diagnostics["effective_damping"] == pytest.approx(tikhonov, rel=1e-12)
    penalties = {"hidden": (2 * l2, 0.0), "predictions": (0.0, 0.0)}  # (kernel, bias) Hessian of the penalty
    for layer, (k, b) in zip(prepared.factors.layers, [(0, 1), (2, 3)]):
        basis = np.kron(layer.activation_basis, layer.gradient_basis)  # row-major vec of the (d_a, d_out) matrix
        d_in, d_out = model.get_layer(layer.block.name).kernel.shape
        on_kernel, on_bias = penalties[layer.block.name]
        penalty = np.concatenate([np.full(d_in * d_out, on_kernel), np.full(d_out, on_bias)])
        matrix = basis @ np.diag(layer.eigenvalues.ravel()) @ basis.T + np.diag(penalty + tikhonov)
        expected = np.linalg.solve(matrix, np.concatenate([np.ravel(v[k]), np.ravel(v[b])]))
        _close(np.concatenate([np.ravel(s_test[k]), np.ravel(s_test[b])]), expected, 1e-6)  # s_test is float32


def test_solve_flushes_subnormal_floats():
    """The solve's products never produce subnormal floats (CPU arithmetic on them runs ~100x
    slower; tiny eigenvector entries times small gradient entries made VGG16's solve 10x slow).
    Here the exact answer's second entry is 6.7e-41, subnormal in float32: flushed, it is 0."""
    tiny = np.float32(1e-20)
    block = ekfac.LayerBlock("layer", "dense", kernel_index=0, bias_index=None, d_in=2, d_out=1)
    rotation = np.array([[1, -tiny], [tiny, 1]], np.float32)  # orthonormal to float32 precision
    layer = ekfac.LayerFactors(block, rotation, np.ones((1, 1), np.float32), np.array([[1], [3]], np.float32),
                               None, None)
    s_kernel, _ = ekfac._apply_inverse(layer, np.array([[tiny], [0]], np.float32), damping=0.0)  # noqa: SLF001
    assert s_kernel[0, 0] == pytest.approx(1e-20, rel=1e-6)
    assert not np.any((s_kernel != 0) & (np.abs(s_kernel) < np.finfo(np.float32).tiny)), s_kernel


def test_ekfac_approaches_the_gauss_newton_matrix_of_a_softmax_layer():
    # For a linear softmax model the Hessian of the mean cross-entropy IS the Gauss-Newton
    # matrix, whatever the labels, and the sampled-label Fisher converges to it. Labels taken
    # from the data (empirical Fisher: eigenvalues off by ~8x here) or the argmax (~0.6) would
    # not: this model is far from the data.
    count = 4000
    model = softmax_regression(l2=0.0, inputs=4, classes=3)
    model.get_layer("predictions").kernel.assign(np.random.default_rng(4).normal(0, 1.0, (4, 3)))
    x, y = tabular_data(count, inputs=4, classes=3, seed=7)
    variables, factors = _fit(model, x, y, batch_size=1000)
    gauss_newton = explicit_hessian(model, variables, x, y, regularisers=False)  # (15, 15) kernel then bias
    layer = factors.layers[0]
    basis = np.kron(layer.activation_basis, layer.gradient_basis)
    ekfac_matrix = basis @ np.diag(layer.eigenvalues.ravel()) @ basis.T
    kfac_matrix = np.kron(_reconstruct(layer.activation_basis, layer.activation_covariance_eigenvalues),
                          _reconstruct(layer.gradient_basis, layer.gradient_covariance_eigenvalues))

    # The Monte-Carlo Fisher of the fit's own pseudo-labels, in closed form: G_i = a_i (p_i - e_label)^T.
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_weights())
    logits = x @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    a = np.concatenate([x, np.ones((count, 1))], axis=1)
    per_example = np.einsum("ni,nm->nim", a, p - np.eye(3)[factors.pseudo_labels[0]]).reshape(count, -1)
    sampled_fisher = per_example.T @ per_example / count

    def error(matrix, reference):
        return np.linalg.norm(matrix - reference) / np.linalg.norm(reference)

    projected = np.diag(basis.T @ gauss_newton @ basis)  # what the corrected eigenvalues estimate
    eigenvalue_error = np.linalg.norm(layer.eigenvalues.ravel() - projected) / np.linalg.norm(projected)
    print(f"\neigenvalues vs Gauss-Newton {eigenvalue_error:.3f}; vs Gauss-Newton: EK-FAC "
          f"{error(ekfac_matrix, gauss_newton):.3f}, K-FAC {error(kfac_matrix, gauss_newton):.3f}")
    assert eigenvalue_error < 0.1
    # In the Frobenius norm the corrected eigenvalues are the best diagonal in this basis for
    # the Fisher they were fitted on (George et al. 2018), so never worse than K-FAC's.
    assert error(ekfac_matrix, sampled_fisher) < error(kfac_matrix, sampled_fisher)
    assert error(ekfac_matrix, gauss_newton) < error(kfac_matrix, gauss_newton)


def test_factor_file_is_reused_and_refitted_when_stale(tmp_path, monkeypatch):
    model = mlp(softmax=True)
    x, y = tabular_data(20)
    path = tmp_path / "factors.npz"
    lines = []
    curvature = _curvature(model, x, y, echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
    v = random_vector(curvature.variables)
    solver = ekfac.EkfacSolver(label_draws=1, damping=0.01, batch_size=8, dtype="float64")
    first = solver.prepare(curvature, cache_path=path, cache_key={"model": "abc"}, progress=False)
    assert path.is_file() and not first.diagnostics["factors_reused"]

    fit = ekfac.fit_factors
    monkeypatch.setattr(ekfac, "fit_factors", lambda *a, **k: pytest.fail("refitted although the file fits"))
    again = ekfac.EkfacSolver(label_draws=1, damping=0.5, batch_size=8, dtype="float64").prepare(  # not fitted
        curvature, cache_path=path, cache_key={"model": "abc"}, progress=False)
    assert again.diagnostics["factors_reused"]
    first_s, again_s = flat(first.solve(v).s_test), flat(again.solve(v).s_test)
    assert not np.allclose(first_s, again_s)  # other damping, same factors:
    _close(flat(ekfac.EkfacSolver(label_draws=1, damping=0.01, batch_size=8, dtype="float64").prepare(
        curvature, cache_path=path, cache_key={"model": "abc"}, progress=False).solve(v).s_test), first_s, 1e-12)

    fits = []
    monkeypatch.setattr(ekfac, "fit_factors", lambda *a, **k: fits.append(1) or fit(*a, **k))
    for change in ["caller key", "weights", "batch size", "fit sample", "corrupt file"]:
        key, batch, samples = {"model": "abc"}, 8, ekfac.DEFAULT_SAMPLES
        if change == "caller key":
            key = {"model": "other"}
        elif change == "weights":
            kernel = model.get_layer("hidden").kernel
            kernel.assign(kernel.numpy() * 1.01)
        elif change == "batch size":
            batch = 4
        elif change == "fit sample":
            batch, samples = 4, 12
        else:
            path.write_bytes(b"not an npz file")
        before = len(fits)
        prepared = ekfac.EkfacSolver(label_draws=1, damping=0.01, batch_size=batch, samples=samples,
                                     dtype="float64").prepare(curvature, cache_path=path, cache_key=key, progress=False)
        assert len(fits) == before + 1 and not prepared.diagnostics["factors_reused"], change
        assert prepared.diagnostics["sample_size"] == min(samples, 20)
        assert "refitting" in lines[-2], (change, lines[-2:])
    stored = json.loads(str(np.load(path)["key"]))
    assert stored["fit"]["batch_size"] == 8 and stored["caller"] == {"model": "abc"}  # rewritten by the last fit


def test_unsupported_layers_are_refused_and_large_ones_left_out():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 2)),
                              keras.layers.DepthwiseConv2D(3, name="depthwise"),
                              keras.layers.BatchNormalization(name="norm"),
                              keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax", name="predictions")])
    x, y = image_data(6, size=6)
    x = x[..., :2]
    for layers, culprit in [("depthwise,predictions", "depthwise"), ("norm,predictions", "norm")]:
        with pytest.raises(UserError, match=f"Dense and Conv2D layers only.*'{culprit}'"):
            ekfac.EkfacSolver(label_draws=1).prepare(_curvature(model, x, y, params.select(model, layers)),
                                                     progress=False)

    chosen = params.select(model, "predictions")
    prepared = ekfac.EkfacSolver(label_draws=1, max_factor_dim=50, dtype="float64").prepare(
        _curvature(model, x, y, chosen), progress=False)
    assert prepared.diagnostics["layers_fitted"] == ["predictions"]
    small = mlp(softmax=True, hidden=60)  # hidden: d_out 60 > 50, predictions: d_a 61 > 50
    with pytest.raises(UserError, match="max_factor_dim=50"):
        ekfac.EkfacSolver(label_draws=1, max_factor_dim=50).prepare(_curvature(small, *tabular_data(10)),
                                                                    progress=False)
    wide = mlp(softmax=True, inputs=60, hidden=4)  # hidden: d_a 61 left out, predictions fitted
    x60, y60 = tabular_data(10, inputs=60)
    prepared = ekfac.EkfacSolver(label_draws=1, max_factor_dim=50, dtype="float64").prepare(
        _curvature(wide, x60, y60), progress=False)
    assert [entry["layer"] for entry in prepared.diagnostics["layers_left_out"]] == ["hidden"]
    s_test = prepared.solve(random_vector(params.select(wide))).s_test
    assert not np.any(s_test[0].numpy()) and not np.any(s_test[1].numpy()) and np.all(np.abs(s_test[2]) > 0)


def test_the_fit_sample_is_capped_and_chosen_on_the_command_line():
    import calculate
    from influence.settings import Settings, SolverSettings

    parse = calculate.build_parser().parse_args
    assert ekfac.EkfacSolver().samples == ekfac.DEFAULT_SAMPLES == 2000 == parse([]).ekfac_samples
    assert SolverSettings(method="ekfac").solver().samples == 2000
    for text, samples in [("all", None), ("0", None), ("300", 300)]:
        chosen = SolverSettings(method="ekfac", ekfac_samples=parse(["--ekfac-samples", text]).ekfac_samples)
        assert chosen.solver().samples == samples, text
    for text in ["-1", "some"]:
        with pytest.raises(SystemExit):
            parse(["--ekfac-samples", text])
    with pytest.raises(UserError, match="EK-FAC samples"):
        SolverSettings(ekfac_samples=-3)
    # It decides EK-FAC's scores, so it is in EK-FAC runs' fingerprint, and in no other method's.
    ekfac_run = Settings(solver=SolverSettings(method="ekfac")).fingerprint()
    assert Settings(solver=SolverSettings(method="ekfac", ekfac_samples=300)).fingerprint() != ekfac_run
    assert Settings(solver=SolverSettings(ekfac_samples=300)).fingerprint() == Settings().fingerprint()

    model = mlp(softmax=True)
    x, y = tabular_data(20)
    fits = [ekfac.EkfacSolver(samples=12, label_draws=1, dtype="float64").prepare(_curvature(model, x, y),
                                                                                  progress=False).factors
            for _ in range(2)]
    assert fits[0].sample_size == 12 and len(set(fits[0].indices)) == 12 and set(fits[0].indices) <= set(range(20))
    np.testing.assert_array_equal(fits[0].indices, fits[1].indices)  # drawn from the seed: the same each run
