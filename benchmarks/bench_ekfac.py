"""EK-FAC against LiSSA at its defaults, side by side in one process (no assertions).

Three parts, each printing a table:

- ``loo``: the L2-regularised softmax regression of ``tests/test_loo.py`` (500 training
  points), trained to its optimum by Newton's method; every training point is removed in
  turn and the model retrained (warm start, converged), and the actual change of the worst
  test point's loss is compared with ``score / n_train`` of each method (Pearson over all
  500, and over the 30 largest actual changes). Methods: the exact solve (no damping),
  LiSSA at calculate.py's defaults (depth 100, minibatch 8, damping 0.01, scale auto) and
  EK-FAC (relative damping 0.1, all training points) with 1 and with the automatic 4 label
  draws; three seeds each.
- ``demo``: the digits demo's CNN and archives (``--demo-dir``, made by ``python demo.py
  --out DIR``). For every misclassified test image: scores of all training images from
  LiSSA at defaults and from EK-FAC at defaults; for the first ``--cg-images`` of them also
  the converged answer LiSSA aims at, ``(H + effective damping I)^-1 v`` on the full-batch
  Hessian, by MINRES (the matrix is indefinite there, so CG stops). Reported: Pearson with
  that reference (mean over test images), overlap of the top-5 harmful with its top-5, and
  how many planted label errors are among each method's top-5 harmful.
- ``vgg16``: keras.applications.VGG16(weights=None), 224x224, all weights, a handful of
  random training images. EK-FAC's fit (one label draw; both passes and the
  eigendecompositions) and its solve per test gradient, against LiSSA steps at minibatch 8;
  LiSSA at depth 100 is extrapolated from the best of ``--lissa-steps`` timed steps
  (100 x that step).

- ``vgg16-apply``: the solve alone on VGG16's factor shapes (random matrices for the bases:
  the cost depends on the shapes only) against one Hessian-vector product at minibatch 8.

    python benchmarks/bench_ekfac.py --parts loo demo vgg16 --demo-dir /work/baseline_demo
    python benchmarks/bench_ekfac.py --parts vgg16-apply --rounds 2 --lissa-steps 2
"""

from __future__ import annotations

import argparse
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

from influence import archive, ekfac, hvp, ihvp, losses, models, params, sampling, scores, solvers  # noqa: E402

QUIET = dict(echo=lambda *a, **k: None)


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64), np.asarray(b, np.float64))[0, 1])


def _curvature(model, variables, source, batch_size=8, seed=0):
    sampler = sampling.MinibatchSampler(source, batch_size, seed=seed)
    return solvers.TrainingCurvature.build(model, variables, sampler, seed=seed, **QUIET)


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
    methods = {
        "exact (damping 0)": lambda seed: solvers.ExactSolver(damping=0.0),
        "LiSSA defaults (depth 100, bs 8, damping 0.01, auto scale)": lambda seed: solvers.LissaSolver(),
        "EK-FAC, 1 label draw": lambda seed: ekfac.EkfacSolver(label_draws=1),
        "EK-FAC defaults (relative damping 0.1, auto: 4 label draws)": lambda seed: ekfac.EkfacSolver(),
        "EK-FAC defaults, relative damping 0.01": lambda seed: ekfac.EkfacSolver(damping=0.01),
    }
    top = np.argsort(-np.abs(actual))[:30]
    print(f"\n== leave-one-out: softmax regression, {n} training points, L2 {l2}, worst test point; "
          f"{n} retrainings in {retrain_seconds:.0f} s. Seeds {list(seeds)}: mean [min, max]")
    print(f"{'method':62s} {'Pearson all':>22s} {'Pearson top 30':>22s} {'slope':>6s} {'solve s':>8s}")
    for name, make in methods.items():
        figures = []
        for seed in seeds:
            solver = make(seed)
            curvature = _curvature(model, variables, source, seed=seed)
            if isinstance(solver, ekfac.EkfacSolver):
                prepared = solver.prepare(curvature, progress=False)
            else:
                prepared = solver.prepare(curvature)
            began = time.perf_counter()
            s_test = prepared.solve(v, key=(seed, 1)).s_test
            seconds = time.perf_counter() - began
            predicted = scores.influence_scores(model, variables, s_test, x, y) / n
            figures.append((_pearson(predicted, actual), _pearson(predicted[top], actual[top]),
                            np.polyfit(predicted, actual, 1)[0], seconds))
        figures = np.asarray(figures)
        def spread(column):
            values = figures[:, column]
            return f"{values.mean():.4f} [{values.min():.3f}, {values.max():.3f}]"

        print(f"{name:62s} {spread(0):>22s} {spread(1):>22s} {figures[:, 2].mean():6.2f} {figures[:, 3].mean():8.2f}")


# -- the digits demo ----------------------------------------------------------------------


def _minres(hvp_fn, v, *, damping: float, iterations: int):
    """``(H + damping I)^-1 v`` by MINRES on the full-batch Hessian (symmetric, possibly indefinite)."""
    from scipy.sparse.linalg import LinearOperator, minres

    like = list(v)
    size = ihvp.flatten(like).size

    def matvec(x):
        return ihvp.flatten(hvp_fn(ihvp.unflatten(np.asarray(x, np.float32), like))).astype(np.float64) + damping * x

    rhs = ihvp.flatten(like).astype(np.float64)
    solution, _ = minres(LinearOperator((size, size), matvec=matvec, dtype=np.float64), rhs, rtol=1e-5,
                         maxiter=iterations)
    residual = np.linalg.norm(matvec(solution) - rhs) / np.linalg.norm(rhs)
    return ihvp.unflatten(solution.astype(np.float32), like), float(residual)



def part_demo(demo_dir: Path, cg_iterations: int, cg_images: int) -> None:
    model = keras.models.load_model(demo_dir / "model.keras")
    train = archive.open_train(demo_dir / "train.npz")
    tests = archive.open_test(demo_dir / "test.npz")
    preprocess = models.preprocess_unit
    source = sampling.ArchiveSource(train, preprocess)
    x_train, y_train = preprocess(train.read(np.arange(len(train)))), source.labels
    train_ids = np.asarray(train.ids)
    flipped = {entry["id"] for entry in json.loads((demo_dir / "flipped.json").read_text())["flipped"]}
    variables = params.select(model)

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

    lissa = solvers.LissaSolver().prepare(_curvature(model, variables, source))
    damping = lissa.diagnostics["effective_damping"]
    began = time.perf_counter()
    ekfac_prepared = ekfac.EkfacSolver().prepare(_curvature(model, variables, source), progress=False)
    ekfac_fit = time.perf_counter() - began
    full = hvp.training_hvp(model, variables, hvp.minibatches(x_train, y_train, len(y_train)))
    methods = ("LiSSA defaults", "EK-FAC defaults")
    found = {name: 0 for name in methods}
    timing = {name: 0.0 for name in (*methods, "reference")}
    agreement = {name: [] for name in methods}  # (Pearson, top-5 overlap) with CG, per test image
    residuals = []
    for number, (folder, index, image, label) in enumerate(misclassified):
        v = hvp.loss_gradient(model, variables, image, np.array([label]))
        began = time.perf_counter()
        s_lissa = lissa.solve(v, key=(0, number)).s_test
        timing["LiSSA defaults"] += time.perf_counter() - began
        began = time.perf_counter()
        s_ekfac = ekfac_prepared.solve(v).s_test
        timing["EK-FAC defaults"] += time.perf_counter() - began
        method_scores = {"LiSSA defaults": all_scores(s_lissa), "EK-FAC defaults": all_scores(s_ekfac)}
        for name in methods:
            found[name] += sum(train_ids[i] in flipped for i in np.argsort(method_scores[name])[:5])
        if number >= cg_images:
            continue
        began = time.perf_counter()
        s_reference, residual = _minres(full, v, damping=damping, iterations=cg_iterations)
        timing["reference"] += time.perf_counter() - began
        residuals.append(residual)
        reference = all_scores(s_reference)
        for name in methods:
            agreement[name].append((_pearson(method_scores[name], reference),
                                    len(set(np.argsort(method_scores[name])[:5]) & set(np.argsort(reference)[:5])) / 5))
    count = len(misclassified)
    print(f"\n== digits demo CNN ({params.count(variables)} weights, {len(y_train)} training images, "
          f"{len(flipped)} planted label errors), {count} misclassified test images")
    print(f"MINRES reference (H + damping I is indefinite here: CG meets negative curvature) on the first "
          f"{len(residuals)} of them, at LiSSA's "
          f"effective damping {damping:.4g}: relative residual max {max(residuals, default=float('nan')):.1e}, "
          f"{timing['reference'] / max(len(residuals), 1):.1f} s per image")
    print(f"EK-FAC fit {ekfac_fit:.1f} s ({ekfac_prepared.diagnostics['sample_size']} images), effective damping "
          f"{ekfac_prepared.diagnostics['effective_damping']:.4g}; LiSSA scale {lissa.scale:.4g}")
    print(f"{'method':16s} {'Pearson vs ref':>13s} {'top-5 harmful overlap':>22s} "
          f"{'planted errors in top-5 harmful':>32s} "
          f"{'solve s/image':>14s}")
    for name in methods:
        pearson, overlap = np.mean(agreement[name], axis=0) if agreement[name] else (float("nan"),) * 2
        print(f"{name:16s} {pearson:13.3f} {overlap:22.2f} {found[name]:>23d} of {5 * count:<4d}"
              f"{timing[name] / count:14.3f}")
    random = 5 * count * len(flipped) / len(y_train)
    print(f"(random picks: {random:.1f} planted errors expected among {5 * count})")


# -- VGG16 speed --------------------------------------------------------------------------


def part_vgg16(images: int, lissa_steps: int, rounds: int) -> None:
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None)
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 120, size=(images, 224, 224, 3)).astype(np.float32)
    y = rng.integers(0, 1000, size=images)
    variables = params.select(model)
    source = sampling.ArraySource(x, y)
    print(f"\n== VGG16, random weights, 224x224, all {params.count(variables):,} weights, {images} training images")

    # Wall and process CPU time both: on a shared machine the wall time depends on the load.
    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
    began = clock()
    # One label draw: the fit's cost is linear in images x draws (auto would take 8 for 8 images).
    prepared = ekfac.EkfacSolver(batch_size=4, label_draws=1).prepare(_curvature(model, variables, source))
    fit = np.subtract(clock(), began)
    d = prepared.diagnostics
    fitted = sum(params.count([variables[i] for i in (b.kernel_index, b.bias_index) if i is not None])
                 for b in (layer.block for layer in prepared.factors.layers))
    print(f"EK-FAC fit on {d['sample_size']} images (layers fitted: {len(d['layers_fitted'])}, "
          f"{fitted:,} weights; left out: {[e['layer'] for e in d['layers_left_out']]})")
    v = hvp.loss_gradient(model, variables, x[:1], y[:1])
    solve_times = []
    for _ in range(rounds):
        began = clock()
        prepared.solve(v)
        solve_times.append(np.subtract(clock(), began))
    del prepared

    lissa_fn = hvp.training_hvp(model, variables, sampling.MinibatchSampler(source, min(8, images)))
    h = [tf.identity(part) for part in v]
    step_times = []
    for step in range(lissa_steps + 1):  # the first call compiles
        began = clock()
        hv = lissa_fn(h)
        h = [vi + 0.99 * hi - hvi / 1e4 for vi, hi, hvi in zip(v, h, hv)]
        _ = float(tf.reduce_sum(h[0]))
        if step:
            step_times.append(np.subtract(clock(), began))
    step = np.min(step_times, axis=0)  # (wall, cpu), each the best round
    solve = np.min(solve_times, axis=0)
    print(f"{'':34s} {'wall s':>10s} {'CPU s':>10s}")
    rows = [("EK-FAC solve per test image", solve, f"best of {rounds}"),
            ("LiSSA step (minibatch 8)", step, f"best of {lissa_steps}"),
            ("LiSSA depth 100 per test image", 100 * step, "100 x step, extrapolated"),
            ("EK-FAC fit", fit, "once per run"),
            ("LiSSA for 20 test images", 2000 * step, "2000 x step, extrapolated; scale estimate not counted")]
    for name, (wall, cpu), note in rows:
        print(f"{name:34s} {wall:10.2f} {cpu:10.2f}   ({note})")
    print(f"per test image, LiSSA / EK-FAC: {100 * step[0] / solve[0]:.0f}x wall, {100 * step[1] / solve[1]:.0f}x CPU; "
          f"fit / LiSSA-for-20: {fit[0] / (2000 * step[0]):.3f} wall, {fit[1] / (2000 * step[1]):.3f} CPU")


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
    print(f"{'LiSSA depth 100 per test image':40s} {100 * step[0]:10.1f} {100 * step[1]:10.1f}   (100 x product)")
    print(f"per test image, LiSSA / EK-FAC: {100 * step[0] / solve[0]:.0f}x wall, {100 * step[1] / solve[1]:.0f}x CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["loo", "demo", "vgg16"],
                        choices=["loo", "demo", "vgg16", "vgg16-apply"])
    parser.add_argument("--demo-dir", type=Path, default=Path("/work/baseline_demo"))
    parser.add_argument("--cg-iterations", type=int, default=300, help="MINRES iterations at most")
    parser.add_argument("--cg-images", type=int, default=4, help="misclassified test images with a MINRES reference")
    parser.add_argument("--vgg-images", type=int, default=8)
    parser.add_argument("--lissa-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    if "loo" in args.parts:
        part_loo()
    if "demo" in args.parts:
        part_demo(args.demo_dir, args.cg_iterations, args.cg_images)
    if "vgg16" in args.parts:
        part_vgg16(args.vgg_images, args.lissa_steps, args.rounds)
    if "vgg16-apply" in args.parts:
        part_vgg16_apply(args.rounds, args.lissa_steps)


if __name__ == "__main__":
    main()
