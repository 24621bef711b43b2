"""LiSSA accuracy against cost: the old defaults, plain LiSSA and the deflated defaults, side by side in one process.

For each model, on its misclassified test images: the converged answer (conjugate gradients
on the full-batch Hessian, chunked, at the same Tikhonov damping, to a 1e-6 relative
residual), then every candidate estimator with two seeds. Printed per candidate:

- ``pearson``: Pearson correlation of all training scores with the converged answer
  (median and worst over the test images);
- ``top5``: how many of the 5 most harmful training images match the converged answer
  (mean over test images and seeds);
- ``seeds``: how many of the 5 most harmful the two seeds share (mean);
- ``halves``: how many of the 5 most harmful the two chains of one solve share (the
  stability report; candidates with 2 chains only);
- ``s/image``: seconds per test image, solve plus scoring the training set (best of the
  two seeds' mean), and the one-off preparation (scale, curvature range) per run.

Models: the demo's CNN (``--demo DIR``, default /work/baseline_demo: model.keras,
train.npz, test.npz), and a different CNN trained here on scikit-learn's 8x8 digits with 5%
of the training labels flipped. ``--vgg16`` adds the timing of one VGG16 (random weights,
fc2 and predictions) preparation and solve on a few random 224x224 images.

    python benchmarks/bench_lissa.py               # both CNNs, about 10 minutes on 2 CPU cores
    python benchmarks/bench_lissa.py --images 4 --only new,today,timing
    python benchmarks/bench_lissa.py --vgg16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from influence import hvp, ihvp, params, scores, solvers  # noqa: E402
from influence.sampling import ArraySource, MinibatchSampler  # noqa: E402

BATCH = 8


# -- models -----------------------------------------------------------------------------------

def demo_model(root: Path):
    model = keras.models.load_model(root / "model.keras")
    train = np.load(root / "train.npz")
    names = sorted(k for k in train.files if k.startswith("batch_0") and train[k].ndim == 4)
    x = np.concatenate([train[k] for k in names]).astype(np.float32) / 255.0
    y = train["labels"].astype(np.int64)
    test = np.load(root / "test.npz")
    folders = sorted({k.rsplit("_", 1)[0] for k in test.files if k.endswith("_images")})
    tx = np.concatenate([test[f"{f}_images"] for f in folders]).astype(np.float32) / 255.0
    ty = np.concatenate([test[f"{f}_labels"] for f in folders]).astype(np.int64)
    return "demo CNN", model, x, y, tx, ty


def digits_model(seed: int = 0):
    """A different CNN: two 3x3 convolutions, global average pooling, a tanh hidden layer,
    on sklearn's 8x8 digits (1,437 training images, 5% of the labels flipped)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    train, test = slice(0, 1437), slice(1437, None)
    noisy = y.copy()
    flip = rng.choice(1437, size=72, replace=False)
    noisy[flip] = (noisy[flip] + rng.integers(1, 10, size=72)) % 10
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(1e-4)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(12, 3, padding="same", activation="relu", kernel_regularizer=reg),
        keras.layers.Conv2D(16, 3, activation="relu", kernel_regularizer=reg),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(24, activation="tanh", kernel_regularizer=reg),
        keras.layers.Dense(10, activation="softmax", kernel_regularizer=reg),
    ], name="digits8_cnn")
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x[train], noisy[train], epochs=40, batch_size=64, verbose=0)
    return "digits 8x8 CNN", model, x[train], noisy[train], x[test], y[test]


# -- candidates -----------------------------------------------------------------------------

def today_solver():
    """The defaults before this benchmark: damping 0.01 as LiSSA's coefficient (Tikhonov
    0.01 * scale), scale 1.5 x power iteration on uniform minibatches, last iterate, 1 chain."""
    return "today", None


# Every candidate spends about 800 example-products per test image, as the old defaults did
# (100 products of 8): (solver knobs, minibatch).
CANDIDATES = {
    "today": None,  # 0.01 x scale damping, last iterate, uniform minibatches: the old recipe, through ihvp
    "auto damping, uniform, last iterate, 1x100 b8": (dict(sampling="uniform", average=0.0, repeat=1, depth=100,
                                                          deflation=0), 8),
    "plain: curvature sampling, averaged, 2x50 b8": (dict(deflation=0), 8),
    "deflated (12), 2x12 b32, averaged 1/2": (dict(average=0.5), 32),
    "new defaults: deflated (12), 2x12 b64, averaged 3/4": ({}, 64),
}


class Bench:
    def __init__(self, name, model, x, y, tx, ty, *, images: int, echo=print):
        self.name, self.model = name, model
        self.variables = params.select(model)
        self.x, self.y = x, y
        predicted = np.argmax(model.predict(tx, verbose=0), axis=-1)
        wrong = np.flatnonzero(predicted != ty)[:images]
        self.tx, self.ty = tx[wrong], ty[wrong]
        self.source = ArraySource(x, y)
        self.echo = echo
        self.full_hvp = hvp.dataset_hvp(model, self.variables, self.source, chunk_size=256)
        self._curvatures = {}
        self.curvature = self.curvature_for(BATCH)
        self.tests = [hvp.loss_gradient(model, self.variables, self.tx[i:i + 1], self.ty[i:i + 1])
                      for i in range(len(self.tx))]
        self._references = {}
        echo(f"\n== {name}: {sum(int(np.prod(v.shape)) for v in self.variables)} weights, {len(x)} training "
             f"images, {len(self.tx)} misclassified test images")

    def curvature_for(self, batch: int) -> solvers.TrainingCurvature:
        """The training curvature with minibatches of ``batch`` (one per size: its Lanczos is cached)."""
        if batch not in self._curvatures:
            sampler = MinibatchSampler(self.source, batch, seed=0)
            curvature = solvers.TrainingCurvature.build(self.model, self.variables, sampler, seed=0,
                                                        echo=lambda *a, **k: None)
            curvature.full_hvp_fn = self.full_hvp
            self._curvatures[batch] = curvature
        return self._curvatures[batch]

    def score(self, s_test) -> np.ndarray:
        parts = [scores.influence_scores(self.model, self.variables, s_test, self.x[i:i + 512], self.y[i:i + 512])
                 for i in range(0, len(self.x), 512)]
        return np.concatenate(parts).astype(np.float64)

    def reference(self, damping: float):
        key = round(damping, 12)
        if key not in self._references:
            cg = solvers.ConjugateGradientSolver(damping=damping, max_iterations=500).prepare(self.curvature)
            began = time.perf_counter()
            self._references[key] = [self.score(cg.solve(v).s_test) for v in self.tests]
            self.echo(f"   converged answer (CG, damping {damping:.4g}): "
                      f"{(time.perf_counter() - began) / len(self.tests):.2f} s/image")
        return self._references[key]


def top5(scores_vector) -> set:
    return set(np.argsort(scores_vector, kind="stable")[:5].tolist())


def run_today(bench: Bench, seed: int):
    sampler = MinibatchSampler(bench.source, BATCH, seed=(seed, solvers.SCALE_STREAM))
    fn = hvp.training_hvp(bench.model, bench.variables, sampler)
    began = time.perf_counter()
    scale = ihvp.estimate_scale(fn, like=bench.curvature.zeros(), damping=0.01)
    prep = time.perf_counter() - began
    out, times = [], []
    for index, v in enumerate(bench.tests):
        sampler.reseed(seed, index)
        began = time.perf_counter()
        result = ihvp.lissa(fn, v, depth=100, damping=0.01, scale=scale)
        s = bench.score(result.s_test)
        times.append(time.perf_counter() - began)
        out.append((s, None))
    return out, 0.01 * scale, prep, float(np.mean(times))


def run_new(bench: Bench, knobs: dict, batch: int, seed: int):
    curvature = bench.curvature_for(batch)
    curvature.seed = seed
    began = time.perf_counter()
    prepared = solvers.LissaSolver(**knobs).prepare(curvature)
    bench.last_prepared = prepared
    prep = time.perf_counter() - began
    out, times = [], []
    for index, v in enumerate(bench.tests):
        began = time.perf_counter()
        solution = prepared.solve(v, key=(seed, index))
        s = bench.score(solution.s_test)
        halves = None
        if solution.parts:
            halves = (bench.score(solution.parts[0]), bench.score(solution.parts[1]))
        times.append(time.perf_counter() - began)
        out.append((s, halves, solution.diagnostics))
    return out, prepared.damping, prep, float(np.mean(times))


def evaluate(bench: Bench, label: str, runs):
    """runs: [(outputs, damping, prep, seconds)] for seeds 0 and 1."""
    damping = runs[0][1]
    line = f"   {label:<42} damping {damping:7.4g}"
    try:
        reference = bench.reference(damping)
    except ihvp.LissaDivergedError as error:
        reference = None
        line += "  (no converged answer: " + str(error).split(":")[0] + ")"
    pearsons, matches = [], []
    if reference is not None:
        for outputs, *_ in runs:
            for (s, *_), ref in zip(outputs, reference):
                pearsons.append(np.corrcoef(s, ref)[0, 1])
                matches.append(len(top5(s) & top5(ref)))
    seeds = [len(top5(a[0]) & top5(b[0])) for a, b in zip(runs[0][0], runs[1][0])]
    halves = [len(top5(o[1][0]) & top5(o[1][1])) for outputs, *_ in runs for o in outputs if o[1] is not None]
    converged = [o[2]["converged"] for outputs, *_ in runs for o in outputs if len(o) > 2]
    drifts = [o[2]["drift"] for outputs, *_ in runs for o in outputs if len(o) > 2]
    figures = {
        "pearson_median": float(np.median(pearsons)) if pearsons else float("nan"),
        "pearson_worst": float(np.min(pearsons)) if pearsons else float("nan"),
        "top5": float(np.mean(matches)) if matches else float("nan"),
        "seeds": float(np.mean(seeds)),
        "halves": float(np.mean(halves)) if halves else float("nan"),
        "seconds": min(r[3] for r in runs),
        "prepare": min(r[2] for r in runs),
        "converged": f"{sum(converged)}/{len(converged)}" if converged else "-",
        "drift": float(np.median(drifts)) if drifts else float("nan"),
    }
    bench.echo(line + "  pearson {pearson_median:.4f} (worst {pearson_worst:.3f})  top5 {top5:.2f}  "
               "seeds {seeds:.2f}  halves {halves:.2f}  {seconds:.2f} s/image  prepare {prepare:.1f} s  "
               "converged {converged} (drift median {drift:.3f})".format(**figures))
    return figures


def bench_timing(bench: Bench, rounds: int = 5):
    """Seconds per test image, today's recipe against the new defaults, interleaved round by
    round in this process, best of ``rounds``: the solve alone, and the solve plus scoring
    the whole training set as calculate.py does (today: one s_test; new: both chains' halves
    in one vectorised pass, for the stability report); plus each one's per-run preparation."""
    sampler = MinibatchSampler(bench.source, BATCH, seed=(0, solvers.SCALE_STREAM))
    fn = hvp.training_hvp(bench.model, bench.variables, sampler)
    began = time.perf_counter()
    scale = ihvp.estimate_scale(fn, like=bench.curvature.zeros(), damping=0.01)
    today_prepare = time.perf_counter() - began
    curvature = bench.curvature_for(solvers.DEFLATED_BATCH)
    curvature.cache.clear()
    began = time.perf_counter()
    prepared = solvers.LissaSolver().prepare(curvature)  # the defaults: deflated, 2 x 12 x 64
    new_prepare = time.perf_counter() - began
    v = bench.tests[0]

    def score_all(tangents):
        stacked = scores.stack_s_tests(tangents, bench.variables)
        return [scores.influence_scores_many(bench.model, bench.variables, stacked, bench.x[i:i + 32],
                                             bench.y[i:i + 32]) for i in range(0, len(bench.x), 32)]

    best = {key: float("inf") for key in ("today", "new", "today+score", "new+score")}
    for round_ in range(rounds):
        began = time.perf_counter()
        s_test = ihvp.lissa(fn, v, depth=100, damping=0.01, scale=scale).s_test
        best["today"] = min(best["today"], time.perf_counter() - began)
        score_all([s_test])
        best["today+score"] = min(best["today+score"], time.perf_counter() - began)
        began = time.perf_counter()
        solution = prepared.solve(v, key=(0, round_))
        best["new"] = min(best["new"], time.perf_counter() - began)
        score_all(solution.parts)
        best["new+score"] = min(best["new+score"], time.perf_counter() - began)
    bench.echo(f"   time per test image (best of {rounds}, interleaved): solve today {best['today']:.3f} s, "
               f"new defaults {best['new']:.3f} s ({best['new'] / best['today']:.2f}x); with scoring "
               f"{best['today+score']:.3f} s against {best['new+score']:.3f} s "
               f"({best['new+score'] / best['today+score']:.2f}x); preparation once per run: "
               f"today {today_prepare:.1f} s, new {new_prepare:.1f} s")


def bench_model(bench: Bench, only: list[str] | None):
    table = {}
    for label, knobs in CANDIDATES.items():
        if only and not any(word in label for word in only):
            continue
        if knobs is None:
            runs = [run_today(bench, seed) for seed in (0, 1)]
        else:
            runs = [run_new(bench, *knobs, seed) for seed in (0, 1)]
        table[label] = evaluate(bench, label, runs)
    return table


def bench_vgg16(images: int = 4):
    """One preparation and one solve at the defaults on VGG16 (random weights), fc2 and predictions."""
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None)
    variables = params.select(model, layers=["fc2", "predictions"])
    rng = np.random.default_rng(0)
    x = rng.uniform(-120, 150, size=(images, 224, 224, 3)).astype(np.float32)
    y = rng.integers(0, 1000, size=images)
    sampler = MinibatchSampler(ArraySource(x, y), BATCH, seed=0)
    curvature = solvers.TrainingCurvature.build(model, variables, sampler, seed=0)
    began = time.perf_counter()
    prepared = solvers.LissaSolver().prepare(curvature)
    prep = time.perf_counter() - began
    v = hvp.loss_gradient(model, variables, x[:1], y[:1])
    began = time.perf_counter()
    solution = prepared.solve(v, key=(0, 0))
    print(f"   VGG16 fc2+predictions, {images} training images: prepare {prep:.1f} s, "
          f"solve {time.perf_counter() - began:.1f} s, diagnostics "
          f"{ {k: solution.diagnostics[k] for k in ('effective_damping', 'drift', 'converged')} }, "
          f"scale {prepared.scale:.4g}, lambda {prepared.estimate.lambda_min:.4g}..{prepared.estimate.lambda_max:.4g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("/work/baseline_demo"))
    parser.add_argument("--images", type=int, default=8, help="misclassified test images per model")
    parser.add_argument("--only", default=None, help="comma-separated words: only candidates named so")
    parser.add_argument("--models", default="demo,digits")
    parser.add_argument("--vgg16", action="store_true", help="also time VGG16 top layers (minutes)")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    for which in args.models.split(","):
        if which == "demo":
            bench = Bench(*demo_model(args.demo), images=args.images)
        elif which == "digits":
            bench = Bench(*digits_model(), images=args.images)
        else:
            continue
        if only is None or "timing" in only:
            bench_timing(bench)
        bench_model(bench, only)
    if args.vgg16:
        bench_vgg16()
    return 0


if __name__ == "__main__":
    sys.exit(main())
