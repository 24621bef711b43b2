"""Influence-engine benchmark: Hessian-vector products, LiSSA steps and scoring, side by side.

Runs in one process on VGG16 at 224x224 with random weights and on a small CNN, and prints
one table per model (no assertions):

- one Hessian-vector product in both forms (forward-over-backward, summed gradient),
  for all weights and for the top layers only;
- one LiSSA step (the product in the ``auto`` form plus the update);
- scoring throughput in images/s: the engine's batched forward-mode pass against the
  older suite's method (one gradient per training image, flattened and dotted with
  ``s_test``), both compiled with ``tf.function`` and as an eager loop with a NumPy dot;
- one forward pass of the same batch, for reference;
- peak resident memory (RSS): of this process during each candidate's first call (which
  depends on what ran before, since freed memory stays with the process), and with
  ``--memory`` of a fresh process that builds the model and runs only that candidate once.

    python benchmarks/bench_engine.py            # both models, about 6 minutes on 2 CPU cores
    python benchmarks/bench_engine.py --quick    # small CNN only, seconds
    python benchmarks/bench_engine.py --rounds 5 --memory   # the table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from influence import hvp, ihvp, losses, params, scores  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident memory while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak, self._running = rss_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *_):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(candidates: dict, rounds: int) -> dict:
    """Time each callable ``rounds`` times, interleaved, after one warm-up call each.

    Interleaving (A B C, A B C, ...) exposes every candidate to the same background load;
    the best and the median of the rounds are reported. The warm-up call (which also
    compiles) runs alone and its peak RSS is the memory figure.
    """
    results = {}
    for name, fn in candidates.items():
        with PeakRss() as memory:
            fn()
        results[name] = {"peak_gib": memory.peak / 2**30, "times": []}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            results[name]["times"].append(time.perf_counter() - start)
    for result in results.values():
        result["best"] = float(np.min(result["times"]))
        result["median"] = float(np.median(result["times"]))
    return results


def finish(result):
    """Force the value out of TensorFlow so that the timing includes the work."""
    if isinstance(result, (list, tuple)):
        for part in result:
            np.asarray(part)
    else:
        np.asarray(result)


def small_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    hidden = keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="conv1")(inputs)
    hidden = keras.layers.MaxPooling2D(2)(hidden)
    hidden = keras.layers.Conv2D(64, 3, activation="relu", padding="same", name="conv2")(hidden)
    hidden = keras.layers.MaxPooling2D(2)(hidden)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(128, activation="relu", name="fc")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax", name="predictions")(hidden)
    return keras.Model(inputs, outputs, name="small_cnn")


def vgg16() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(weights=None)  # random weights: no download


def _per_image_loss(model, x, y):
    outputs = model(x, training=False)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.math.log(tf.maximum(outputs, 1e-30)))[0]


def old_method_scores(model, variables, s_test):
    """The older suite's scoring, compiled: per image, a full gradient, flattened, dotted with s_test."""
    watched = hvp.tf_variables(variables)
    flat_s_test = tf.concat([tf.reshape(part, [-1]) for part in s_test], axis=0)

    @tf.function
    def one_image(x, y):
        with tf.GradientTape() as tape:
            loss = _per_image_loss(model, x, y)
        gradient = tape.gradient(loss, watched)
        return tf.tensordot(tf.concat([tf.reshape(g, [-1]) for g in gradient], axis=0), flat_s_test, 1)

    def run(x, y):
        return np.array([float(one_image(x[i:i + 1], y[i:i + 1])) for i in range(len(y))])

    return run


def old_method_scores_eager(model, variables, s_test):
    """The same as a TF 2.3-era loop: eager tape, gradient copied to NumPy, ``np.dot``."""
    watched = hvp.tf_variables(variables)
    flat_s_test = np.concatenate([np.asarray(part).ravel() for part in s_test])

    def run(x, y):
        result = []
        for i in range(len(y)):
            with tf.GradientTape() as tape:
                loss = _per_image_loss(model, x[i:i + 1], y[i:i + 1])
            gradient = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, watched)])
            result.append(float(np.dot(gradient, flat_s_test)))
        return np.array(result)

    return run


def same_batch_reverse_mode(model, variables, s_test, x, y) -> np.ndarray:
    """Reference scores: per-image gradients by reverse mode, each taken inside the whole batch.

    Convolutions round differently for a batch of 8 and a batch of 1, and at a ReLU or
    max-pool near-tie that can flip which unit is active: the per-image methods then see a
    slightly different network than any batched one. This reference sees the same one.
    """
    watched = hvp.tf_variables(variables)
    loss_fn = losses.per_example_loss(model)
    result = []
    for index in range(len(y)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(x, y) * tf.one_hot(index, len(y)))
        gradient = tape.gradient(loss, watched)
        result.append(sum(float(tf.reduce_sum(tf.cast(g, tf.float64) * tf.cast(s, tf.float64)))
                          for g, s in zip(gradient, s_test)))
    return np.array(result)


OLD = "old, compiled"
OLD_EAGER = "old, eager + NumPy"
MODELS = {
    "cnn": dict(title="small CNN 32x32", build=small_cnn, top_layers="fc,predictions", lissa_steps=20,
                round_factor=3),
    "vgg16": dict(title="VGG16 224x224", build=vgg16, top_layers="fc2,predictions", lissa_steps=1,
                  round_factor=1),
}


def candidates(key: str, *, batch: int, hvp_batch: int, check: bool = False) -> tuple[dict, dict]:
    """The model's timed callables, as two groups measured one after the other."""
    spec = MODELS[key]
    model = spec["build"]()
    rng = np.random.default_rng(0)
    shape = tuple(model.inputs[0].shape[1:])
    classes = int(model.outputs[0].shape[-1])
    x = tf.constant(rng.uniform(0, 1, size=(batch, *shape)).astype(np.float32))  # (B, H, W, 3)
    y = tf.constant(rng.integers(0, classes, size=batch), tf.int32)
    hx, hy = x[:hvp_batch], y[:hvp_batch]
    forward = tf.function(lambda images: model(images, training=False))
    top_layers = spec["top_layers"]
    selections = {"all": params.select(model), top_layers: params.select(model, layers=top_layers)}
    # A test gradient stands in for s_test: like a real one, it is aligned with the training
    # gradients, so the scores do not cancel down to float32 rounding as a random vector's would.
    x_test = tf.constant(rng.uniform(0, 1, size=(1, *shape)).astype(np.float32))
    s_tests = {label: hvp.loss_gradient(model, variables, x_test, tf.constant([0], tf.int32))
               for label, variables in selections.items()}

    scoring = {f"forward pass, batch {batch}": lambda: finish(forward(x))}
    for label, variables in selections.items():
        batched = lambda v=variables, s=s_tests[label]: scores.influence_scores(model, v, s, x, y)  # noqa: E731
        scoring[f"scores, batched forward-mode, {label}"] = batched
        if check:
            reference = same_batch_reverse_mode(model, variables, s_tests[label], x, y)
            gap = np.abs(reference - batched()) / np.max(np.abs(reference))
            print(f"  {label}: |batched - reverse-mode in the same batch| / max|score|: "
                  f"max {np.max(gap):.1e}", flush=True)
        for kind, build in ((OLD, old_method_scores), (OLD_EAGER, old_method_scores_eager)):
            old = build(model, variables, s_tests[label])
            scoring[f"scores, {kind}, {label}"] = lambda old=old: old(x, y)
            if check:
                reference, ours = old(x, y), batched()
                gap = np.abs(reference - ours) / np.max(np.abs(reference))
                print(f"  {label}: |batched - {kind}| / max|score|: median {np.median(gap):.1e}, "
                      f"max {np.max(gap):.1e}", flush=True)

    products = {}
    for label, variables in selections.items():
        count = params.count(variables)
        for form in hvp.FORMS:
            product = hvp.training_hvp(model, variables, lambda: (hx, hy), form=form)
            products[f"HVP {form}, {label} ({count:,} weights)"] = \
                lambda p=product, s=s_tests[label]: finish(p(s))
        hvp_fn = hvp.training_hvp(model, variables, lambda: (hx, hy))
        steps = spec["lissa_steps"]
        products[f"LiSSA {steps} step{'s' if steps > 1 else ''} ({hvp_fn.form}), {label}"] = \
            lambda f=hvp_fn, s=s_tests[label]: ihvp.lissa(f, s, depth=steps, damping=0.01, scale=1e6)
    return scoring, products


def child_peak(key: str, name: str, *, batch: int, hvp_batch: int) -> None:
    """In a fresh process: build everything, run one candidate once, print the peak RSS in GiB."""
    scoring, products = candidates(key, batch=batch, hvp_batch=hvp_batch)
    setup = _lifetime_peak_gib()
    {**scoring, **products}[name]()
    print(f"{setup} {_lifetime_peak_gib()}")


def peak_in_fresh_process(key: str, name: str, *, batch: int, hvp_batch: int) -> tuple[float, float]:
    """(peak RSS of the set-up alone, peak RSS after running ``name`` once), in a child process."""
    command = [sys.executable, __file__, "--child", key, name, "--batch", str(batch), "--hvp-batch", str(hvp_batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    setup, peak = done.stdout.split()[-2:]
    return float(setup), float(peak)


def bench_model(key, *, batch, hvp_batch, rounds, memory, rows):
    spec = MODELS[key]
    rounds *= spec["round_factor"]
    print(f"{spec['title']}: scoring batch {batch}, HVP minibatch {hvp_batch}, {rounds} rounds", flush=True)
    scoring, products = candidates(key, batch=batch, hvp_batch=hvp_batch, check=True)
    results = {**measure(scoring, rounds), **measure(products, rounds)}
    if memory:
        for name, result in results.items():
            setup, result["fresh_peak_gib"] = peak_in_fresh_process(key, name, batch=batch, hvp_batch=hvp_batch)
        print(f"  set-up alone (model, data, two s_test): peak RSS {setup:.2f} GiB", flush=True)

    forward_best = results[f"forward pass, batch {batch}"]["best"]
    for what, result in results.items():
        note = ""
        if what.startswith("scores"):
            note = f"{batch / result['best']:.1f} img/s, {result['best'] / forward_best:.2f}x forward"
            if "batched" in what:
                compiled, eager = (results[what.replace("batched forward-mode", kind)]["best"] / result["best"]
                                   for kind in (OLD, OLD_EAGER))
                note += f"; {compiled:.2f}x / {eager:.2f}x faster than old (compiled / eager)"
        if what.startswith("LiSSA"):
            note = f"{_ms(result['best'] / spec['lissa_steps'])} per step"
        rows.append((spec["title"], what, result, note))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lifetime_peak_gib() -> float:
    """This process's peak RSS so far (VmHWM: unlike ru_maxrss, not inherited across fork/exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CNN only")
    parser.add_argument("--batch", type=int, default=8, help="scoring batch (default 8)")
    parser.add_argument("--hvp-batch", type=int, default=8, help="HVP minibatch (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per figure (default 3; x3 for the CNN)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each candidate's peak RSS in a fresh process (slower)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_peak(*args.child, batch=args.batch, hvp_batch=args.hvp_batch)
        return 0

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {cpu_name()}, "
          f"{os.cpu_count()} CPUs, auto HVP form = {hvp.AUTO_FORM}", flush=True)
    rows = []
    start = time.perf_counter()
    for key in ("cnn",) if args.quick else ("cnn", "vgg16"):
        bench_model(key, batch=args.batch, hvp_batch=args.hvp_batch, rounds=args.rounds, memory=args.memory,
                    rows=rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s, process peak RSS {_lifetime_peak_gib():.2f} GiB\n")
    memory_header = " peak RSS, fresh process |" if args.memory else ""
    print(f"| model | measurement | best | median | peak RSS, this process |{memory_header} note |")
    print("| --- | --- | ---: | ---: | ---: |" + (" ---: |" if args.memory else "") + " --- |")
    for name, what, result, note in rows:
        fresh = f" {result['fresh_peak_gib']:.2f} GiB |" if args.memory else ""
        print(f"| {name} | {what} | {_ms(result['best'])} | {_ms(result['median'])} | "
              f"{result['peak_gib']:.2f} GiB |{fresh} {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
