"""EK-FAC against LiSSA at its defaults, side by side in one process (no assertions).

Four parts, each printing a table:

- ``loo``: the L2-regularised softmax regression of ``tests/test_loo.py`` (500 training
  points), trained to its optimum by Newton's method; every training point is removed in
  turn and the model retrained (warm start, converged), and the actual change of the worst
  test point's loss is compared with ``score / n_train`` of each method (Pearson over all
  500, and over the 30 largest actual changes). Methods: the exact solve (no damping, and at
  LiSSA's automatic damping), LiSSA at calculate.py's defaults (``SolverSettings()``:
  deflated, 2 chains x 12 steps at minibatch 64 where the Lanczos basis fits, else plain,
  2 x 50 at minibatch 8; curvature sampling, tail averaging, damping and scale auto) and
  EK-FAC (1 label draw; defaults, whose factors are also solved at other damping rules);
  three seeds each. Last, EK-FAC's limit with an exact Fisher (no label sampling), which
  separates the Kronecker basis's error from the sampling's.
- ``demo``: the digits demo's CNN and archives (``--demo-dir``, made by ``python demo.py
  --out DIR``). The damping is LiSSA's automatic rule on the curvature range of the WHOLE
  training set (Lanczos), which makes ``H + damping I`` positive definite; the reference is
  conjugate gradients on the full-batch Hessian at that damping. For every misclassified
  test image, scores of all training images from LiSSA at defaults with that damping, and
  EK-FAC (one fit at its defaults) at four damping rules: its default, 0.01 x its mean
  eigenvalue, LiSSA's rule on its own spectrum, and that Tikhonov damping. Reported: Pearson with
  the reference (median and worst over the test images), overlap of the top-5 harmful with
  the reference's, and how many planted label errors are among each top-5 harmful.
- ``demo-samples``: EK-FAC on the demo fitted on 1,000 and 500 of its training images,
  against the fit on all of them (Pearson, top-5 overlap, planted errors found).
- ``vgg16``: keras.applications.VGG16(weights=None), 224x224, all weights (fc1 is left out of
  EK-FAC by ``max_factor_dim``; LiSSA's default there is plain, 2 x 50 at minibatch 8: the
  deflation's basis would not fit). EK-FAC's fit, measured (``--vgg-images`` random images x
  ``--vgg-label-draws``; each phase timed), and its solve per test gradient, against LiSSA's
  products at minibatch 8; LiSSA's costs (per test image, for 20 test images, its Lanczos and
  scale preparation) are extrapolated from the best of ``--lissa-steps`` timed products.
- ``vgg16-apply``: the solve alone on VGG16's factor shapes (random matrices for the bases:
  the cost depends on the shapes only) against one Hessian-vector product at minibatch 8.

    python benchmarks/bench_ekfac.py --parts loo demo vgg16 --demo-dir /work/baseline_demo
    python benchmarks/bench_ekfac.py --parts vgg16-apply --rounds 2 --lissa-steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from influence import archive, ekfac, hvp, ihvp, losses, models, params, sampling, scores, settings, solvers  # noqa: E402

QUIET = dict(echo=lambda *a, **k: None)


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64), np.asarray(b, np.float64))[0, 1])


def _curvature(model, variables, source, batch_size=8, seed=0):
    sampler = sampling.MinibatchSampler(source, batch_size, seed=seed)
    return solvers.TrainingCurvature.build(model, variables, sampler, seed=seed, **QUIET)


def _lissa_defaults(variables, damping="auto"):
    """LiSSA as calculate.py runs it by default on these weights: (solver, minibatch, steps per
    chain, deflated), from the same SolverSettings defaults (deflated 2 x 12 x 64 where the
    Lanczos basis fits, else plain 2 x 50 x 8)."""
    chosen = settings.SolverSettings(damping=damping)
    solver = chosen.solver()
    deflated = solver.deflated(params.count(variables))
    depth = solver.depth or solvers.default_depth_and_batch(deflated)[0]
    return solver, chosen.batch_size_for(params.count(variables)), depth, deflated


# -- leave-one-out on softmax regression --------------------------------------------------


def part_loo(seeds=(0, 1, 2)) -> None:
    import test_loo
    from engine_models import flat, softmax_regression, tabular_data

    n, l2 = test_loo.N_TRAIN, test_loo.L2
    x, y = tabular_data(n + test_loo.N_TEST, inputs=test_loo.INPUTS, classes=test_loo.CLASSES, seed=5)
    x_test, y_test, x, y = x[n:], y[n:], x[:n], y[:n]
    model = softmax_regression(l2=l2, inputs=test_loo.INPUTS, classes=test_loo.CLASSES)
    train, assign = test_loo._newton_trainer(model)
    train(x, y)
    variables = params.select(model)
    optimum = flat(variables)
    loss_fn = losses.per_example_loss(model)
    k = int(np.argmax(loss_fn(x_test, y_test).numpy()))
    z_test = (x_test[k:k + 1], y_test[k:k + 1])
    base = float(loss_fn(*z_test)[0])

    began = time.perf_counter()
    actual = np.zeros(n)
    for index in range(n):
        assign(optimum)
        keep = np.arange(n) != index
        train(x[keep], y[keep])
        actual[index] = float(loss_fn(*z_test)[0]) - base
    assign(optimum)
    retrain_seconds = time.perf_counter() - began

    v = hvp.loss_gradient(model, variables, *z_test)
    source = sampling.ArraySource(x, y)
    lissa, lissa_batch, lissa_depth, deflated = _lissa_defaults(params.select(model))
    plain = dataclasses.replace(lissa, deflation=0)  # what models too large for the deflation get
    plain_batch = solvers.default_depth_and_batch(False)[1]

    def lissa_auto_damping(curvature):  # what calculate.py's LiSSA resolves "auto" to on this curvature
        return lissa.prepare(_curvature(model, variables, source, batch_size=lissa_batch,
                                        seed=curvature.seed)).damping

    methods = {
        "exact (damping 0)": lambda curvature: solvers.ExactSolver(damping=0.0),
        "exact at LiSSA's auto damping": lambda curvature: solvers.ExactSolver(damping=lissa_auto_damping(curvature)),
        f"LiSSA defaults ({'deflated, ' if deflated else ''}2 x {lissa_depth} x {lissa_batch})": lambda curvature: lissa,
        "LiSSA plain (--deflation 0: 2 x 50 x 8)": lambda curvature: plain,
        "EK-FAC, 1 label draw": lambda curvature: ekfac.EkfacSolver(label_draws=1),
        "EK-FAC defaults": lambda curvature: ekfac.EkfacSolver(),  # then the same factors at other dampings
    }
    top = np.argsort(-np.abs(actual))[:30]
    print(f"\n== leave-one-out: softmax regression, {n} training points, L2 {l2}, worst test point; "
          f"{n} retrainings in {retrain_seconds:.0f} s. Seeds {list(seeds)}: mean [min, max]")
    print(f"{'method':62s} {'Pearson all':>22s} {'Pearson top 30':>22s} {'slope':>6s} {'damping':>8s} {'solve s':>8s}")
    rows = {}  # name -> per-seed (Pearson all, Pearson top 30, slope, damping, solve seconds)

    def record(name, prepared, seed):
        began = time.perf_counter()
        s_test = prepared.solve(v, key=(seed, 1)).s_test
        seconds = time.perf_counter() - began
        predicted = scores.influence_scores(model, variables, s_test, x, y) / n
        rows.setdefault(name, []).append((_pearson(predicted, actual), _pearson(predicted[top], actual[top]),
                                          np.polyfit(predicted, actual, 1)[0],
                                          prepared.diagnostics["effective_damping"], seconds))

    for name, make in methods.items():
        for seed in seeds:
            curvature = _curvature(model, variables, source, seed=seed)
            solver = make(curvature)
            if solver is lissa:
                curvature = _curvature(model, variables, source, batch_size=lissa_batch, seed=seed)
            if solver is plain:
                curvature = _curvature(model, variables, source, batch_size=plain_batch, seed=seed)
            if isinstance(solver, ekfac.EkfacSolver):
                prepared = solver.prepare(curvature, progress=False)
            else:
                prepared = solver.prepare(curvature)
            if name != "EK-FAC defaults":
                record(name, prepared, seed)
                continue
            for rule, same_factors in _ekfac_damping_rules(prepared, lissa_auto_damping(curvature)).items():
                record(f"EK-FAC defaults, damping {rule}", same_factors, seed)
    limit = _ekfac_exact_fisher_limit(model, variables, x, y, v)
    for name, s_test in limit.items():
        predicted = scores.influence_scores(model, variables, s_test, x, y) / n
        rows[name] = [(_pearson(predicted, actual), _pearson(predicted[top], actual[top]),
                       np.polyfit(predicted, actual, 1)[0], float(name.rsplit(" ", 1)[1]), 0.0)]
    for name, figures in rows.items():
        figures = np.asarray(figures)

        def spread(column):
            values = figures[:, column]
            return f"{values.mean():.4f} [{values.min():.3f}, {values.max():.3f}]"

        print(f"{name:62s} {spread(0):>22s} {spread(1):>22s} {figures[:, 2].mean():6.2f} {figures[:, 3].mean():8.3g} "
              f"{figures[:, 4].mean():8.2f}", flush=True)


def _ekfac_damping_rules(prepared, lissa_damping: float) -> dict:
    """The fitted factors of ``prepared`` at other Tikhonov dampings: rule -> PreparedEkfac.

    ``0.1 x mean`` is EkfacSolver's default; ``LiSSA's rule`` applies LiSSA's automatic
    damping, 1.5 x max(-lambda_min, 0.01 lambda_max), to EK-FAC's own spectrum (PSD, so
    0.015 x its largest eigenvalue, the L2 penalty's 2 l2 included); ``lissa_damping`` is
    what LiSSA's rule gives on the Hessian of the same problem."""
    factors = prepared.factors
    mean = factors.mean_eigenvalue
    largest = max(float((layer.eigenvalues + 2 * layer.block.l2_kernel).max()) for layer in factors.layers)
    lissa_rule = solvers.AUTO_DAMPING_FACTOR * max(0.0, solvers.AUTO_DAMPING_FLOOR * largest)
    rules = {"0.1 x mean eigenvalue (default)": 0.1 * mean, "0.01 x mean eigenvalue": 0.01 * mean,
             "LiSSA's rule on EK-FAC's spectrum (0.015 x largest)": lissa_rule,
             "LiSSA's auto damping on the Hessian": lissa_damping}
    return {rule: ekfac.PreparedEkfac(ekfac.EkfacSolver(damping=damping, damping_mode="absolute"), prepared.curvature,
                                      factors, reused=True, prepare_seconds=0.0, factors_file=None)
            for rule, damping in rules.items()}


def _ekfac_exact_fisher_limit(model, variables, x, y, v) -> dict:
    """EK-FAC of the softmax regression with no label sampling: name -> s_test.

    Its Gauss-Newton matrix G (= Hessian without the L2 term) explicitly; the Kronecker basis
    from the exact factors A = mean a a^T and S = mean_i (diag p_i - p_i p_i^T) (the
    expectation over sampled labels); the corrected eigenvalues diag(Q^T G Q). What EK-FAC
    converges to with infinitely many label draws: its error is then the basis alone."""
    from engine_models import explicit_hessian

    (kernel_var, bias_var), l2 = variables, float(model.layers[-1].kernel_regularizer.l2)
    gauss_newton = explicit_hessian(model, variables, x, y, regularisers=False)  # (P, P) kernel rows, then bias
    kernel, bias = (np.asarray(w, np.float64) for w in (kernel_var, bias_var))
    logits = np.asarray(x, np.float64) @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    a = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
    s = np.mean([np.diag(row) - np.outer(row, row) for row in p], axis=0)
    basis = np.kron(np.linalg.eigh(a.T @ a / len(x))[1], np.linalg.eigh(s)[1])  # row-major vec of (d_a, d_out)
    rotated = basis.T @ gauss_newton @ basis
    eigenvalues = np.diag(rotated)
    print(f"Exact Fisher: the Gauss-Newton matrix keeps {np.linalg.norm(rotated - np.diag(eigenvalues)) / np.linalg.norm(rotated):.1%} of its Frobenius norm "
          "off the diagonal in the Kronecker eigenbasis (what EK-FAC's diagonal there cannot hold)")
    vector = np.concatenate([np.ravel(part) for part in v]).astype(np.float64)
    out = {}
    for damping in (0.0, 0.1 * eigenvalues.mean()):
        solution = basis @ ((basis.T @ vector) / (eigenvalues + 2 * l2 + damping))
        out[f"EK-FAC limit: exact Fisher, damping {damping:.3g}"] = [
            tf.constant(solution[:kernel.size].reshape(kernel.shape), tf.float32),
            tf.constant(solution[kernel.size:], tf.float32)]
    return out


# -- the digits demo ----------------------------------------------------------------------


def _load_demo(demo_dir: Path):
    """The demo's model and archives (``python demo.py --out DIR``), its training set in memory,
    the planted label errors' ids and the model's variables."""
    model = keras.models.load_model(demo_dir / "model.keras")
    train = archive.open_train(demo_dir / "train.npz")
    tests = archive.open_test(demo_dir / "test.npz")
    preprocess = models.preprocess_unit
    source = sampling.ArchiveSource(train, preprocess)
    x_train, y_train = preprocess(train.read(np.arange(len(train)))), source.labels
    train_ids = np.asarray(train.ids)
    flipped = {entry["id"] for entry in json.loads((demo_dir / "flipped.json").read_text())["flipped"]}
    variables = params.select(model)
    return model, train, tests, preprocess, source, x_train, y_train, train_ids, flipped, variables


def part_demo(demo_dir: Path, cg_iterations: int, cg_images: int | None) -> None:
    model, train, tests, preprocess, source, x_train, y_train, train_ids, flipped, variables = _load_demo(demo_dir)

    misclassified = []  # (folder, index, image, label)
    for folder in tests.folders:
        test_set = tests.folder(folder)
        images = preprocess(np.asarray(test_set.images))
        predicted = np.argmax(model(images, training=False).numpy(), axis=1)
        for index in np.flatnonzero(predicted != test_set.labels):
            misclassified.append((folder, int(index), images[index:index + 1], int(test_set.labels[index])))

    def all_scores(s_test):
        return np.concatenate([scores.influence_scores(model, variables, s_test, x_train[i:i + 512],
                                                       y_train[i:i + 512]) for i in range(0, len(y_train), 512)])

    # The damping every method but EK-FAC's default shares: LiSSA's automatic rule on the
    # curvature range of the WHOLE training set, so that H + damping I is positive definite
    # and the reference below is well defined.
    curvature = _curvature(model, variables, source)
    estimate = solvers.estimate_curvature(curvature, sample=len(source))
    damping = estimate.auto_damping()
    reference = solvers.ConjugateGradientSolver(damping=damping, max_iterations=cg_iterations).prepare(curvature)
    lissa_solver, lissa_batch, lissa_depth, deflated = _lissa_defaults(variables, damping=damping)
    lissa = lissa_solver.prepare(_curvature(model, variables, source, batch_size=lissa_batch))
    began = time.perf_counter()
    ekfac_default = ekfac.EkfacSolver().prepare(_curvature(model, variables, source), progress=False)
    ekfac_fit = time.perf_counter() - began
    # The same factors at other Tikhonov dampings (a number given as --damping means Tikhonov).
    methods = {f"LiSSA defaults{' (deflated)' if deflated else ''}, damping {damping:.3g}": lissa,
               **{f"EK-FAC {rule} = {prepared.damping:.3g}": prepared
                  for rule, prepared in _ekfac_damping_rules(ekfac_default, damping).items()}}
    count = len(misclassified)
    with_reference = count if cg_images is None else min(cg_images, count)
    found = {name: 0 for name in (*methods, "reference")}
    timing = {name: 0.0 for name in (*methods, "reference")}
    agreement = {name: [] for name in methods}  # (Pearson, top-5 overlap) with the reference, per test image
    residuals, iterations = [], []
    top5 = lambda values: set(np.argsort(values, kind="stable")[:5].tolist())  # noqa: E731 (most harmful)
    for number, (folder, index, image, label) in enumerate(misclassified):
        v = hvp.loss_gradient(model, variables, image, np.array([label]))
        method_scores = {}
        for name, prepared in methods.items():
            began = time.perf_counter()
            s_test = prepared.solve(v, key=(0, number)).s_test
            timing[name] += time.perf_counter() - began
            method_scores[name] = all_scores(s_test)
            found[name] += sum(train_ids[i] in flipped for i in top5(method_scores[name]))
        if number >= with_reference:
            continue
        began = time.perf_counter()
        solution = reference.solve(v)
        timing["reference"] += time.perf_counter() - began
        residuals.append(solution.diagnostics["relative_residual"])
        iterations.append(len(solution.diagnostics["residual_norms"]) - 1)
        reference_scores = all_scores(solution.s_test)
        found["reference"] += sum(train_ids[i] in flipped for i in top5(reference_scores))
        for name in methods:
            agreement[name].append((_pearson(method_scores[name], reference_scores),
                                    len(top5(method_scores[name]) & top5(reference_scores)) / 5))
        print(f"  test image {number + 1}/{count}: CG {iterations[-1]} iterations, residual {residuals[-1]:.1e}; "
              + ", ".join(f"{name.split(',')[0].split(' (')[0]} r={agreement[name][-1][0]:.3f}" for name in methods),
              flush=True)
    print(f"\n== digits demo CNN ({params.count(variables)} weights, {len(y_train)} training images, "
          f"{len(flipped)} planted label errors), {count} misclassified test images")
    print(f"Curvature of the whole training set (Lanczos, {estimate.products} products): eigenvalues from "
          f"{estimate.lambda_min:.4g} to {estimate.lambda_max:.4g}; damping {damping:.4g} (LiSSA's auto rule), "
          f"H + damping I has smallest eigenvalue about {estimate.margin(damping):.4g}")
    print(f"Reference: conjugate gradients on the full-batch Hessian + {damping:.4g} I for {with_reference} of "
          f"the {count}: {min(iterations, default=0)}-{max(iterations, default=0)} iterations, relative residual "
          f"max {max(residuals, default=float('nan')):.1e}, {timing['reference'] / max(with_reference, 1):.1f} s "
          "per image")
    print(f"EK-FAC fit {ekfac_fit:.1f} s ({ekfac_default.diagnostics['sample_size']} images x "
          f"{ekfac_default.diagnostics['label_draws']} label draws), mean eigenvalue "
          f"{ekfac_default.diagnostics['mean_eigenvalue']:.4g}; LiSSA {lissa.solver.repeat} x {lissa_depth} steps x "
          f"{lissa_batch}, deflation {lissa.diagnostics['deflation']}, scale {lissa.scale:.4g}, its own Lanczos "
          f"range {lissa.estimate.lambda_min:.4g} to {lissa.estimate.lambda_max:.4g} ({lissa.estimate.sample} images)")
    print(f"{'method':70s} {'Pearson median':>14s} {'Pearson worst':>14s} {'top-5 overlap':>14s} "
          f"{'planted errors in top-5 harmful':>32s} {'solve s/image':>14s}")
    for name in methods:
        figures = np.asarray(agreement[name]) if agreement[name] else np.full((1, 2), np.nan)
        print(f"{name:70s} {np.median(figures[:, 0]):14.3f} {figures[:, 0].min():14.3f} {figures[:, 1].mean():14.2f} "
              f"{found[name]:>23d} of {5 * count:<4d} {timing[name] / count:14.3f}")
    print(f"{'reference (CG)':70s} {'':14s} {'':14s} {'':14s} {found['reference']:>23d} of {5 * with_reference:<4d} "
          f"{timing['reference'] / max(with_reference, 1):14.3f}")
    random = 5 * count * len(flipped) / len(y_train)
    print(f"(random picks: {random:.1f} planted errors expected among {5 * count})")


def part_demo_samples(demo_dir: Path, sizes=(1000, 500)) -> None:
    """EK-FAC fitted on part of the demo's training set against the fit on all of it.

    For every misclassified test image, all training images' scores from fits on ``sizes``
    images (EkfacSolver(samples=...), default damping and label draws) against those of the
    fit on every image: Pearson, top-5 harmful overlap, planted label errors found."""
    model, train, tests, preprocess, source, x_train, y_train, train_ids, flipped, variables = _load_demo(demo_dir)
    curvature = _curvature(model, variables, source)
    fits = {size: ekfac.EkfacSolver(samples=size).prepare(curvature, progress=False) for size in (None, *sizes)}
    top5 = lambda values: set(np.argsort(values, kind="stable")[:5].tolist())  # noqa: E731 (most harmful)
    figures = {size: [] for size in fits}  # (Pearson, top-5 overlap, planted found) per test image
    for folder in tests.folders:
        test_set = tests.folder(folder)
        images = preprocess(np.asarray(test_set.images))
        predicted = np.argmax(model(images, training=False).numpy(), axis=1)
        for index in np.flatnonzero(predicted != test_set.labels):
            v = hvp.loss_gradient(model, variables, images[index:index + 1], np.array([test_set.labels[index]]))
            found = {size: np.concatenate([scores.influence_scores(model, variables, prepared.solve(v).s_test,
                                                                   x_train[i:i + 512], y_train[i:i + 512])
                                           for i in range(0, len(y_train), 512)]) for size, prepared in fits.items()}
            for size in fits:
                figures[size].append((_pearson(found[size], found[None]), len(top5(found[size]) & top5(found[None])) / 5,
                                      sum(train_ids[i] in flipped for i in top5(found[size]))))
    print(f"\n== digits demo CNN: EK-FAC fitted on a sample of the {len(y_train)} training images, against the fit on "
          f"all; {len(figures[None])} misclassified test images")
    print(f"{'fit sample':>12s} {'label draws':>12s} {'Pearson median':>15s} {'worst':>8s} {'top-5 overlap':>14s} "
          f"{'planted errors in top-5 harmful':>32s}")
    for size, prepared in fits.items():
        rows = np.asarray(figures[size])
        print(f"{prepared.diagnostics['sample_size']:>12d} {prepared.diagnostics['label_draws']:>12d} "
              f"{np.median(rows[:, 0]):15.3f} {rows[:, 0].min():8.3f} {rows[:, 1].mean():14.2f} "
              f"{int(rows[:, 2].sum()):>23d} of {5 * len(rows)}")


# -- VGG16 speed --------------------------------------------------------------------------


def _timed(record: list, fn):
    """``fn`` wrapped so that every call appends its (wall, CPU) seconds to ``record``."""
    def wrapper(*args, **kwargs):
        began = _clock()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(_clock() - began)

    return wrapper


def _clock() -> np.ndarray:
    # Wall and process CPU time both: on a shared machine the wall time depends on the load.
    return np.array([time.perf_counter(), time.process_time()])


def part_vgg16(images: int, label_draws: int, lissa_steps: int, rounds: int) -> None:
    """EK-FAC's fit (measured, phase by phase) and solve against LiSSA's products, on VGG16.

    The fit runs at EkfacSolver's defaults (every training image, minibatch 8,
    max_factor_dim 8192) except ``label_draws``; its passes are linear in images x draws,
    so the per-batch cost measured here extrapolates to any training set. LiSSA's costs are
    extrapolated from the best of ``lissa_steps`` timed products at minibatch 8.
    """
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None)
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 120, size=(images, 224, 224, 3)).astype(np.float32)
    y = rng.integers(0, 1000, size=images)
    variables = params.select(model)
    source = sampling.ArraySource(x, y)
    solver = ekfac.EkfacSolver(label_draws=label_draws)
    print(f"\n== VGG16, random weights, 224x224, all {params.count(variables):,} weights; EK-FAC fit on "
          f"{images} random training images x {label_draws} label draws, minibatch {solver.batch_size}", flush=True)

    phases = {"covariances": [], "eigh": [], "corrections": []}
    originals = (ekfac.batch_covariances, ekfac._eigh, ekfac.batch_corrections)  # noqa: SLF001
    ekfac.batch_covariances = _timed(phases["covariances"], ekfac.batch_covariances)
    ekfac._eigh = _timed(phases["eigh"], ekfac._eigh)  # noqa: SLF001
    ekfac.batch_corrections = _timed(phases["corrections"], ekfac.batch_corrections)
    try:
        began = _clock()
        prepared = solver.prepare(_curvature(model, variables, source))
        prepare = _clock() - began
    finally:
        ekfac.batch_covariances, ekfac._eigh, ekfac.batch_corrections = originals  # noqa: SLF001
    d = prepared.diagnostics
    fitted = sum(params.count([variables[i] for i in (b.kernel_index, b.bias_index) if i is not None])
                 for b in (layer.block for layer in prepared.factors.layers))
    print(f"EK-FAC fitted {len(d['layers_fitted'])} layers ({fitted:,} weights); left out: "
          f"{[e['layer'] + ': ' + e['reason'] for e in d['layers_left_out']]}", flush=True)
    v = hvp.loss_gradient(model, variables, x[:1], y[:1])
    solve_times = []
    for _ in range(rounds):
        began = _clock()
        prepared.solve(v)
        solve_times.append(_clock() - began)
    del prepared

    lissa_fn = hvp.training_hvp(model, variables, sampling.MinibatchSampler(source, min(8, images)))
    h = [tf.identity(part) for part in v]
    step_times = []
    for step in range(lissa_steps + 1):  # the first call compiles
        began = _clock()
        hv = lissa_fn(h)
        h = [vi + 0.99 * hi - hvi / 1e4 for vi, hi, hvi in zip(v, h, hv)]
        _ = float(tf.reduce_sum(h[0]))
        if step:
            step_times.append(_clock() - began)
        print(f"  LiSSA product {step}: {np.round(_clock() - began, 1)} (wall, CPU) s", flush=True)

    step = np.min(step_times, axis=0)  # (wall, cpu), each the best round
    solve = np.min(solve_times, axis=0)
    lissa, batch, depth, deflated = _lissa_defaults(variables)
    if deflated or batch != 8:
        print(f"NOTE: calculate.py's LiSSA here is {'deflated' if deflated else 'plain'} at minibatch {batch}; "
              "the figures below are for plain LiSSA at minibatch 8")
    lissa = dataclasses.replace(lissa, depth=solvers.default_depth_and_batch(False)[0])  # plain, as timed
    per_image = lissa.depth * lissa.repeat  # products per test image
    lanczos_sample = lissa.auto_curvature_sample(8)
    # Lanczos: lanczos_iterations products on lanczos_sample examples (in chunks of 64), counted at
    # the minibatch-8 product's cost per example; then the scale's power iteration at minibatch 8.
    preparation = lissa.lanczos_iterations * lanczos_sample / 8 + ihvp.DEFAULT_SCALE_ITERATIONS
    batches = {name: np.asarray(times) for name, times in phases.items()}
    # A pass's first batch includes tracing; the steady cost per batch is the median of the others.
    steady = {name: np.median(times[1:], axis=0) if len(times) > 1 else times[0]
              for name, times in batches.items() if name != "eigh"}
    eigh = batches["eigh"].sum(axis=0)
    fit = d["fit_seconds"]
    per_draw_batch = steady["covariances"] + steady["corrections"]  # one minibatch x one label draw, both passes
    tracing = sum(batches[name][0] - steady[name] for name in steady)
    print(f"{'':44s} {'wall s':>10s} {'CPU s':>10s}")
    rows = [
        ("EK-FAC solve per test image", solve, f"best of {rounds}"),
        ("LiSSA product (minibatch 8)", step, f"best of {lissa_steps}"),
        (f"LiSSA per test image ({lissa.repeat} x {lissa.depth} products)", per_image * step, "extrapolated"),
        ("EK-FAC fit, pass 1 (covariances), per batch", steady["covariances"],
         f"median of {len(batches['covariances']) - 1} after the first"),
        ("EK-FAC fit, eigendecompositions, all", eigh, f"{len(batches['eigh'])} matrices"),
        ("EK-FAC fit, pass 2 (correction), per batch", steady["corrections"],
         f"median of {len(batches['corrections']) - 1} after the first"),
        ("EK-FAC fit, tracing (first batches)", tracing, "once per process"),
        (f"EK-FAC fit, measured ({images} x {label_draws} draws)", np.array([fit, np.nan]), "wall only"),
        ("EK-FAC prepare, measured (fit + weights hash)", prepare, "once per run"),
        ("LiSSA for 20 test images", 20 * per_image * step, f"{20 * per_image} products, extrapolated"),
        ("LiSSA preparation", preparation * step,
         f"Lanczos {lissa.lanczos_iterations} x {lanczos_sample} examples + scale {ihvp.DEFAULT_SCALE_ITERATIONS} "
         "products, extrapolated"),
    ]
    for name, (wall, cpu), note in rows:
        print(f"{name:44s} {wall:10.1f} {cpu:10.1f}   ({note})")
    print(f"per test image, LiSSA / EK-FAC: {per_image * step[0] / solve[0]:.0f}x wall, "
          f"{per_image * step[1] / solve[1]:.0f}x CPU")
    print(f"fit (measured prepare) / LiSSA for 20 test images: {prepare[0] / (20 * per_image * step[0]):.3f} wall, "
          f"{prepare[1] / (20 * per_image * step[1]):.3f} CPU; with LiSSA's preparation added: "
          f"{prepare[0] / ((20 * per_image + preparation) * step[0]):.3f} wall, "
          f"{prepare[1] / ((20 * per_image + preparation) * step[1]):.3f} CPU")
    # The fit at other sizes: eigendecompositions + tracing once, passes linear in images x draws.
    budget = 20 * per_image * step
    labels = (budget - eigh - tracing) / per_draw_batch * solver.batch_size
    labels_with_prep = ((20 * per_image + preparation) * step - eigh - tracing) / per_draw_batch * solver.batch_size
    print(f"fit extrapolated: {np.round(per_draw_batch / solver.batch_size, 2)} (wall, CPU) s per sampled "
          f"(image, label) pair plus {np.round(eigh + tracing, 0)} s once; it stays within LiSSA's cost for 20 test "
          f"images up to {labels[1]:,.0f} sampled labels by CPU ({labels_with_prep[1]:,.0f} with LiSSA's preparation)")
    for n in (250, 1000, 2000, 10000):
        draws = ekfac.auto_label_draws(n)
        cost = eigh + tracing + n * draws / solver.batch_size * per_draw_batch
        print(f"  default fit on {n:>6,} training images ({draws} draws): {cost[1]:9,.0f} CPU s = "
              f"{cost[1] / budget[1]:.2f} x LiSSA for 20 test images, "
              f"{cost[1] / ((20 * per_image + preparation) * step[1]):.2f} x with its preparation")


def part_vgg16_apply(rounds: int, lissa_steps: int) -> None:
    """The solve alone on VGG16's factor shapes, against one Hessian-vector product (minibatch 8).

    The solve's cost depends on the shapes only, so random matrices stand in for the fitted
    bases here (no fit: see part ``vgg16`` for that); layers above the default
    ``max_factor_dim`` (fc1) are left out as the solver would.
    """
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None)
    variables = params.select(model)
    limit = ekfac.EkfacSolver().max_factor_dim
    blocks = [b for b in ekfac.layer_blocks(model, variables) if max(b.d_a, b.d_out) <= limit]
    rng = np.random.default_rng(0)
    layers = [ekfac.LayerFactors(b, rng.normal(size=(b.d_a, b.d_a)).astype(np.float32),
                                 rng.normal(size=(b.d_out, b.d_out)).astype(np.float32),
                                 rng.uniform(1, 2, size=(b.d_a, b.d_out)).astype(np.float32), None, None)
              for b in blocks]
    x = rng.uniform(-120, 120, size=(8, 224, 224, 3)).astype(np.float32)
    y = rng.integers(0, 1000, size=8)
    v = [tf.constant(rng.normal(size=tuple(w.shape)).astype(np.float32)) for w in variables]
    clock = lambda: np.array([time.perf_counter(), time.process_time()])  # noqa: E731
    solves, products = [], []
    for _ in range(rounds):
        began = clock()
        for layer in layers:
            ekfac._apply_inverse(layer, ekfac._matrix_form(v, layer.block), damping=0.1)  # noqa: SLF001
        solves.append(clock() - began)
    product = hvp.training_hvp(model, variables, sampling.MinibatchSampler.from_arrays(x, y, 8))
    for step in range(lissa_steps + 1):  # the first call compiles
        began = clock()
        _ = float(tf.reduce_sum(product(v)[0]))
        if step:
            products.append(clock() - began)
    solve, step = np.min(solves, axis=0), np.min(products, axis=0)
    fitted = sum(params.count([variables[i] for i in (b.kernel_index, b.bias_index) if i is not None])
                 for b in blocks)
    print(f"\n== VGG16 solve alone: {len(blocks)} layers, {fitted:,} of {params.count(variables):,} weights "
          f"(left out: layers above max_factor_dim={limit})")
    print(f"{'':40s} {'wall s':>10s} {'CPU s':>10s}")
    print(f"{'EK-FAC solve per test image':40s} {solve[0]:10.2f} {solve[1]:10.2f}   (best of {rounds})")
    print(f"{'Hessian-vector product, minibatch 8':40s} {step[0]:10.2f} {step[1]:10.2f}   (best of {lissa_steps})")
    lissa, _, _, deflated = _lissa_defaults(variables)
    if deflated:
        print("NOTE: calculate.py's LiSSA here is deflated; the figures below are for plain LiSSA at minibatch 8")
    lissa = dataclasses.replace(lissa, depth=solvers.default_depth_and_batch(False)[0])  # plain, as timed
    per_image = lissa.depth * lissa.repeat  # products per test image at LiSSA's defaults
    print(f"{f'LiSSA per test image ({lissa.repeat} x {lissa.depth} products)':40s} {per_image * step[0]:10.1f} "
          f"{per_image * step[1]:10.1f}   ({per_image} x product)")
    print(f"per test image, LiSSA / EK-FAC: {per_image * step[0] / solve[0]:.0f}x wall, "
          f"{per_image * step[1] / solve[1]:.0f}x CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["loo", "demo", "vgg16"],
                        choices=["loo", "demo", "demo-samples", "vgg16", "vgg16-apply"])
    parser.add_argument("--demo-dir", type=Path, default=Path("/work/baseline_demo"))
    parser.add_argument("--cg-iterations", type=int, default=1000, help="conjugate-gradient iterations at most")
    parser.add_argument("--cg-images", type=int, default=None,
                        help="misclassified test images with a CG reference (default: all)")
    parser.add_argument("--vgg-images", type=int, default=24, help="random training images EK-FAC is fitted on")
    parser.add_argument("--vgg-label-draws", type=int, default=2, help="EK-FAC label draws on VGG16")
    parser.add_argument("--lissa-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    if "loo" in args.parts:
        part_loo()
    if "demo" in args.parts:
        part_demo(args.demo_dir, args.cg_iterations, args.cg_images)
    if "demo-samples" in args.parts:
        part_demo_samples(args.demo_dir)
    if "vgg16" in args.parts:
        part_vgg16(args.vgg_images, args.vgg_label_draws, args.lissa_steps, args.rounds)
    if "vgg16-apply" in args.parts:
        part_vgg16_apply(args.rounds, args.lissa_steps)


if __name__ == "__main__":
    main()
