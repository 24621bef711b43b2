"""The built-in demo: handwritten digits with planted label errors, through the real scripts.

``python demo.py`` (``make demo``) runs the whole pipeline on a fresh machine with
no download:

1. scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) are written
   in the suite's folder layout under ``<out>/data/``: ``train/<digit>/``, and two
   test folders ``orig/<label>/`` and ``noisy/<label>/`` (the same test scans with
   Gaussian noise, so that the classifier gets some of them wrong);
2. a few percent of the training images are put in the folder of another digit on
   purpose (label errors), listed in ``<out>/flipped.json`` with their true digit;
3. a small Keras CNN is trained on the (partly mislabelled) training folder on the
   CPU and saved as ``<out>/model.keras``;
4. ``prepare_data.py``, ``prepare_only_test.py`` and ``calculate.py`` run as a user
   would run them, each in its own process;
5. the report: of the top harmful training images of every misclassified test
   image, how many are planted label errors, against what a random pick finds;
   and, for contrast, how many sit among the top useful images.

Everything goes under one directory (``--out``, default ``demo/``). Running the
demo again with the same settings reuses the data and the model and lets
``calculate.py`` resume; other settings redo the demo's files cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from influence import cli
from influence.errors import UserError

ROOT = Path(__file__).resolve().parents[1]  # the checkout: where the three scripts live
NUM_CLASSES = 10
TEST_FOLDERS = ("orig", "noisy")

# What the demo writes under --out; only these are ever deleted by a re-run.
DATA_DIR = "data"
MODEL_FILE = "model.keras"
FLIPPED_FILE = "flipped.json"
SETTINGS_FILE = "demo_settings.json"
REPORT_FILE = "report.json"
CALC_DIR = "calc_output"
ARCHIVES = ("train.npz", "test.npz")


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run depends on; a change of any of these redoes the demo's files."""

    train_per_class: int | None = None  # None: every digit scan not used for testing
    test_per_class: int = 5  # test scans per digit in each test folder
    flip_fraction: float = 0.05  # share of training images put in a wrong digit's folder
    image_size: int = 16  # the 8x8 scans are upscaled to image_size x image_size
    noise: float = 0.35  # std of the Gaussian noise of the "noisy" folder, as a share of 255
    epochs: int = 30
    depth: int = 50  # LiSSA depth, calculate.py -i
    batch_size: int = 64  # calculate.py -b
    top: int = 5  # calculate.py --top, and the k of the report's top-k harmful images
    seed: int = 0


# ---------------------------------------------------------------------------------------
# The images


def digit_scans(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as dark ink on white paper, upscaled.

    Returns ``(images, labels)``: (1797, S, S) uint8 and (1797,) int64.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images / 16.0  # (1797, 8, 8) float in [0, 1], 1 = full ink
    paper = np.round(255 * (1 - ink)).astype(np.uint8)
    if image_size == 8:
        return paper, digits.target.astype(np.int64)
    upscaled = np.stack(
        [np.asarray(Image.fromarray(scan).resize((image_size, image_size), Image.Resampling.BILINEAR)) for scan in paper]
    )
    return upscaled, digits.target.astype(np.int64)


def split_scans(
    labels: np.ndarray, *, train_per_class: int | None, test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the test scans: a random, class-balanced split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        if test_per_class + (train_per_class or 1) > len(members):
            raise UserError(
                f"digit {digit} has {len(members)} scans; --test-per-class {test_per_class} plus "
                f"--train-per-class {train_per_class} must not exceed that"
            )
        test.extend(members[:test_per_class])
        rest = members[test_per_class:]
        train.extend(rest if train_per_class is None else rest[:train_per_class])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def plant_label_errors(
    train_labels: np.ndarray, *, flip_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``round(flip_fraction * N)`` training images and give each a wrong label.

    Returns ``(given_labels, flipped_positions)``: the labels the training folder
    will show, and the positions (into ``train_labels``) whose label is wrong. The
    wrong label is drawn uniformly from the other nine digits.
    """
    rng = np.random.default_rng([seed, 1])
    count = int(round(flip_fraction * len(train_labels)))
    flipped = np.sort(rng.choice(len(train_labels), size=count, replace=False))
    given = train_labels.copy()
    shifts = rng.integers(1, NUM_CLASSES, size=count)  # never 0: never the true digit
    given[flipped] = (train_labels[flipped] + shifts) % NUM_CLASSES
    return given, flipped


def add_noise(images: np.ndarray, *, noise: float, seed: int) -> np.ndarray:
    """(N, S, S) uint8 images plus Gaussian noise of std ``noise * 255``, clipped."""
    rng = np.random.default_rng([seed, 2])
    noisy = images.astype(np.float64) + rng.normal(0.0, noise * 255.0, size=images.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def scan_name(index: int) -> str:
    """The file name of digit scan ``index`` (its position in ``load_digits``)."""
    return f"digit_{index:04d}.png"


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path)


def write_demo_data(out_dir: Path, settings: DemoSettings) -> dict:
    """Write ``<out>/data/{train,orig,noisy}`` and return the flipped-label record.

    Training class folders are named ``0``..``9`` (natural sort order: label = digit);
    test class folders are named by label index, which resolves to the same label.
    The data appear under ``<out>/data`` only when complete.
    """
    images, labels = digit_scans(settings.image_size)  # (1797, S, S) uint8, (1797,)
    train_index, test_index = split_scans(
        labels,
        train_per_class=settings.train_per_class,
        test_per_class=settings.test_per_class,
        seed=settings.seed,
    )
    given, flipped_positions = plant_label_errors(
        labels[train_index], flip_fraction=settings.flip_fraction, seed=settings.seed
    )
    noisy = add_noise(images[test_index], noise=settings.noise, seed=settings.seed)

    partial = out_dir / f".{DATA_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for index, label in zip(train_index, given):
        _write_png(partial / "train" / str(label) / scan_name(index), images[index])
    for position, index in enumerate(test_index):
        _write_png(partial / "orig" / str(labels[index]) / scan_name(index), images[index])
        _write_png(partial / "noisy" / str(labels[index]) / scan_name(index), noisy[position])
    final = out_dir / DATA_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)

    flipped = [
        {
            "id": f"{given[position]}/{scan_name(train_index[position])}",
            "true_label": int(labels[train_index[position]]),
            "given_label": int(given[position]),
        }
        for position in flipped_positions
    ]
    return {
        "n_train": int(len(train_index)),
        "n_flipped": len(flipped),
        "flip_fraction": settings.flip_fraction,
        "seed": settings.seed,
        "train_dir": str(final / "train"),
        "flipped": flipped,
    }


def folder_ids(folder: Path) -> list[str]:
    """The ids (``<class folder>/<file>``, relative to ``folder``) of a tree the demo wrote."""
    return [f"{path.parent.name}/{path.name}" for path in sorted(folder.glob("*/*.png"))]


def read_folder_images(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a class-folder tree the demo wrote: ids, (N, S, S, 3) uint8 RGB, (N,) labels.

    The demo's folder names are digits, so a folder's label is its name.
    """
    from PIL import Image

    ids, images, labels = folder_ids(folder), [], []
    for path in sorted(folder.glob("*/*.png")):
        images.append(np.asarray(Image.open(path).convert("RGB")))
        labels.append(int(path.parent.name))
    return ids, np.stack(images), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------------------
# The classifier


def build_classifier(image_size: int, *, l2: float = 1e-4):
    """A small CNN for (S, S, 3) inputs in [0, 1]; softmax over the ten digits.

    The L2 penalty is part of the training objective (``model.losses``), which is
    also what the influence Hessian differentiates: it keeps that Hessian positive
    definite in directions the data leave flat.
    """
    import keras

    regularizer = keras.regularizers.L2(l2)
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", kernel_regularizer=regularizer),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", kernel_regularizer=regularizer),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", kernel_regularizer=regularizer),
        ],
        name="digits_cnn",
    )


@contextlib.contextmanager
def _deterministic_ops(tf):
    """TensorFlow's deterministic kernels while training, so that the README's report is
    reproducible; switched off again afterwards for callers that share the process (the
    tests), where this TensorFlow has the (non-public) switch for it."""
    try:
        from tensorflow.python.framework import config
        was_enabled = config.is_op_determinism_enabled()
    except (ImportError, AttributeError):
        config, was_enabled = None, True  # cannot restore: leave it on
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            config.disable_op_determinism()


def train_classifier(train_dir: Path, model_path: Path, *, epochs: int, seed: int) -> dict:
    """Train the CNN on the training folder as written (label errors included); save it.

    Pixels are scaled to [0, 1], i.e. ``calculate.py --preprocess unit``. Seeded and
    deterministic. Returns a summary: parameter count, final loss and accuracy (on
    the labels as given, errors included).
    """
    cli.quiet_tensorflow()
    import keras
    import tensorflow as tf

    from influence.outputs import atomic_path

    _, images, labels = read_folder_images(train_dir)  # (N, S, S, 3) uint8, (N,)
    with _deterministic_ops(tf):
        keras.utils.set_random_seed(seed)
        model = build_classifier(images.shape[1])
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        history = model.fit(images / 255.0, labels, epochs=epochs, batch_size=64, shuffle=True, verbose=0)
    with atomic_path(model_path.with_suffix(".keras")) as temporary:
        # Keras insists on the .keras suffix, so save beside the temporary and move it in.
        staged = temporary.with_name(temporary.name + ".keras")
        model.save(staged)
        os.replace(staged, temporary)
    return {
        "epochs": epochs,
        "parameters": int(model.count_params()),
        "train_accuracy_on_given_labels": float(history.history["accuracy"][-1]),
        "train_loss": float(history.history["loss"][-1]),
    }


# ---------------------------------------------------------------------------------------
# The report


def hypergeometric_pmf(*, draws: int, population: int, marked: int) -> np.ndarray:
    """P(i marked items among ``draws`` drawn without replacement), i = 0..draws."""
    total = math.comb(population, draws)
    return np.array(
        [math.comb(marked, i) * math.comb(population - marked, draws - i) / total for i in range(draws + 1)]
    )


def random_pick_tail(*, found: int, images: int, draws: int, population: int, marked: int) -> float:
    """P(a random pick finds at least ``found`` marked items in all) for ``images`` test images.

    Each test image draws ``draws`` of the ``population`` training images without
    replacement, independently of the others; the total is a sum of ``images``
    independent hypergeometric counts, whose distribution is a convolution.
    """
    single = hypergeometric_pmf(draws=draws, population=population, marked=marked)
    total = np.array([1.0])
    for _ in range(images):
        total = np.convolve(total, single)
    return float(min(1.0, total[found:].sum()))


def ranked_ends(scores: dict, k: int) -> tuple[list[str], list[str]]:
    """The ``k`` most harmful ids (most negative score first) and the ``k`` most useful
    (most positive first); ties broken by id so that the ranking is reproducible."""
    ranked = sorted(scores, key=lambda train_id: (float(scores[train_id]), train_id))
    return ranked[:k], sorted(scores, key=lambda train_id: (-float(scores[train_id]), train_id))[:k]


def read_results(calc_dir: Path, folder: str) -> list[dict]:
    """Every ``<label>/<n>.json`` under ``calc_dir/folder``, with its score table loaded."""
    results = []
    paths = [p for p in (calc_dir / folder).glob("*/*.json") if p.stem.isdigit() and p.parent.name.isdigit()]
    for json_path in sorted(paths, key=lambda p: (int(p.parent.name), int(p.stem))):  # archive order
        record = json.loads(json_path.read_text())
        record["n"] = int(json_path.stem)
        record["json_path"] = str(json_path)
        record["scores"] = np.load(json_path.with_suffix(".npy"), allow_pickle=True).item()
        results.append(record)
    return results


def label_errors_in(ids: list[str], *, flipped: dict, scores: dict, label: int, predicted: int) -> list[dict]:
    """The planted label errors among ``ids``, each with its rank and how it relates to the test image.

    ``shows_test_digit``: its true digit is the test image's label; ``teaches_prediction``:
    the label it was given is the test image's predicted label.
    """
    return [
        {
            **flipped[train_id],
            "rank": rank + 1,
            "score": float(scores[train_id]),
            "shows_test_digit": flipped[train_id]["true_label"] == label,
            "teaches_prediction": flipped[train_id]["given_label"] == predicted,
        }
        for rank, train_id in enumerate(ids)
        if train_id in flipped
    ]


def tally(entries: list[dict], *, top: int, population: int, marked: int) -> dict:
    """Label errors among the top harmful and top useful images of ``entries``, against random picks."""
    counts = {"test_images": len(entries), "picks": top * len(entries)}
    for end in ("harmful", "useful"):
        found = [error for entry in entries for error in entry[f"flipped_in_{end}"]]
        counts[end] = {
            "flipped_found": len(found),
            "distinct_flipped_found": len({error["id"] for error in found}),
            "shows_test_digit": sum(error["shows_test_digit"] for error in found),
            "teaches_prediction": sum(error["teaches_prediction"] for error in found),
            "either": sum(error["shows_test_digit"] or error["teaches_prediction"] for error in found),
        }
    counts["random_expected"] = counts["picks"] * marked / population
    counts["random_p_value"] = random_pick_tail(
        found=counts["harmful"]["flipped_found"], images=len(entries), draws=top, population=population, marked=marked
    )
    return counts


def build_report(
    *, calc_dir: Path, flipped_record: dict, train_ids: Sequence[str], test_counts: dict[str, int], top: int,
    save_format: str = "png",
) -> dict:
    """Count the planted label errors among the top-``top`` harmful images of each test image.

    Reads ``calc_dir/<folder>/<label>/<n>.json`` (label, prediction) and ``<n>.npy``
    (the score of every training image), ranks the training images by score itself,
    and compares with a random pick of ``top`` training images per test image
    (hypergeometric: mean ``top * F / N`` per image; the tail probability is exact).
    The top useful images are counted the same way, for contrast.
    """
    flipped = {entry["id"]: entry for entry in flipped_record["flipped"]}
    train_ids = set(train_ids)
    population, marked = len(train_ids), len(flipped)
    if not flipped.keys() <= train_ids:
        raise UserError(f"flipped ids missing from the training set: {sorted(flipped.keys() - train_ids)[:3]}")

    folders, every_image = {}, []
    for folder, expected in test_counts.items():
        results = read_results(calc_dir, folder)
        if len(results) != expected:
            raise UserError(
                f"{calc_dir / folder} holds results for {len(results)} test images, expected {expected}; "
                "calculate.py did not finish"
            )
        for result in results:
            scores = result["scores"]
            if set(scores) != train_ids:
                raise UserError(
                    f"{result['json_path']}: the score table does not cover the whole training set "
                    "(calculate.py needs --all-labels for the demo's report)"
                )
            label, predicted = int(result["label"]), int(result["predicted"])
            harmful, useful = ranked_ends(scores, top)
            relation = {"flipped": flipped, "scores": scores, "label": label, "predicted": predicted}
            every_image.append(
                {
                    "folder": folder,
                    "label": label,
                    "n": result["n"],
                    "test_id": result["test_id"],
                    "predicted": predicted,
                    "test_loss": float(result["test_loss"]),
                    "harmful": harmful,
                    "useful": useful,
                    "flipped_in_harmful": label_errors_in(harmful, **relation),
                    "flipped_in_useful": label_errors_in(useful, **relation),
                    "figure": str(Path(result["json_path"]).with_name(f"harmful_{result['n']}.{save_format}")),
                }
            )
        folders[folder] = {
            "test_images": len(results),
            "misclassified": sum(e["predicted"] != e["label"] for e in every_image if e["folder"] == folder),
        }

    misclassified = [entry for entry in every_image if entry["predicted"] != entry["label"]]
    counting = {"top": top, "population": population, "marked": marked}
    return {
        "n_train": population,
        "n_flipped": marked,
        "top": top,
        "random_model": "hypergeometric: per test image, top training images drawn without replacement "
        "from n_train of which n_flipped are flipped; expected count top * n_flipped / n_train per image",
        "folders": folders,
        "misclassified": tally(misclassified, **counting),
        "all_test_images": tally(every_image, **counting),
        "misclassified_images": misclassified,
        "examples": {
            folder: best_example([entry for entry in misclassified if entry["folder"] == folder])
            for folder in folders
        },
    }


def best_example(misclassified: list[dict]) -> dict | None:
    """The misclassified test image whose top harmful images hold the most label errors related to it."""
    if not misclassified:
        return None

    def related(entry: dict) -> tuple:
        errors = entry["flipped_in_harmful"]
        on_point = [e for e in errors if e["shows_test_digit"] or e["teaches_prediction"]]
        return (len(on_point), len(errors), -min([e["rank"] for e in on_point] or [99]))

    return max(misclassified, key=related)  # first of equals: archive order


def _describe(entry: dict) -> str:
    errors = ", ".join(
        f"#{e['rank']} {e['id']} (digit {e['true_label']})" for e in entry["flipped_in_harmful"]
    ) or "none"
    return (
        f"{entry['folder']}/{entry['test_id']}, digit {entry['label']} predicted {entry['predicted']}: "
        f"label errors among its top harmful: {errors}"
    )


def format_report(report: dict, *, out_dir: Path, calc_dir: Path, timings: dict | None = None) -> str:
    """The report as the demo prints it."""
    k, wrong, every = report["top"], report["misclassified"], report["all_test_images"]
    share = 100 * report["n_flipped"] / report["n_train"]
    harmful, useful = wrong["harmful"], wrong["useful"]
    lines = [
        "",
        "Demo report",
        f"  training images: {report['n_train']}, of which {report['n_flipped']} ({share:.1f}%) were put in a "
        f"wrong digit's folder on purpose ({out_dir / FLIPPED_FILE})",
        "  test images: "
        + ", ".join(f"{folder} {c['test_images']} ({c['misclassified']} misclassified)" for folder, c in report["folders"].items()),
        f"  top-{k} harmful training images of the {wrong['test_images']} misclassified test images ({wrong['picks']} picks):",
        f"    label errors: {harmful['flipped_found']} ({harmful['distinct_flipped_found']} distinct); "
        f"a random pick finds {wrong['random_expected']:.1f} on average "
        f"(hypergeometric; P(>= {harmful['flipped_found']}) = {wrong['random_p_value']:.1g})",
        f"    of these, {harmful['either']} show the test image's digit ({harmful['shows_test_digit']}) or carry "
        f"the wrongly predicted label ({harmful['teaches_prediction']})",
        f"  their top-{k} useful images, for contrast: {useful['flipped_found']} label errors, {useful['either']} of "
        "them showing the test image's digit or carrying the predicted label",
        f"  all {every['test_images']} test images: {every['harmful']['flipped_found']} label errors in "
        f"{every['picks']} top-{k} harmful picks, {every['useful']['flipped_found']} in the top-{k} useful "
        f"(random {every['random_expected']:.1f})",
    ]
    if useful["flipped_found"] > 2 * wrong["random_expected"]:
        lines.append(
            "  (label errors keep a high training loss, so large gradients: they lead the rankings at both ends)"
        )
    for example in report["examples"].values():
        if example:
            lines.append(f"  e.g. {_describe(example)}")
            lines.append(f"       -> {example['figure']}")
    lines += [
        f"  figures: {calc_dir}/<test folder>/<label>/harmful_<n>.png and useful_<n>.png",
        f"  report: {out_dir / REPORT_FILE}",
    ]
    if timings:
        lines.append("  time: " + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The run


class StepFailed(Exception):
    """One of the three scripts exited with a non-zero status."""


def run_script(script: str, args: Sequence[str]) -> float:
    """Run ``python <script> <args>`` from the checkout as a user would; stream its output.

    Returns the wall time in seconds.
    """
    relative = os.path.relpath(ROOT / script)
    shown = str(ROOT / script) if relative.startswith("..") else relative  # as typed from here
    print(f"\n$ python {shown} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(ROOT / script), *args])
    if completed.returncode != 0:
        raise StepFailed(f"{script} exited with status {completed.returncode}")
    return time.perf_counter() - started


def owned_paths(out_dir: Path) -> list[Path]:
    """Everything the demo writes under ``out_dir``; a re-run deletes nothing else."""
    names = [DATA_DIR, f".{DATA_DIR}.partial", MODEL_FILE, FLIPPED_FILE, SETTINGS_FILE, REPORT_FILE, CALC_DIR, *ARCHIVES]
    return [out_dir / name for name in names]


def reuse_or_clear(out_dir: Path, settings: DemoSettings, *, fresh: bool) -> bool:
    """True when ``out_dir`` holds this demo's complete data and model for these settings.

    Otherwise the demo's own files there are removed, so that no result of other
    settings (or of another model) is resumed by ``calculate.py``. The settings file
    marks a directory as the demo's: without it, nothing is deleted, and names the
    demo would overwrite (someone's own ``train.npz``, say) make it refuse.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory")
    settings_path = out_dir / SETTINGS_FILE
    if not settings_path.is_file():
        taken = [path.name for path in owned_paths(out_dir) if path.exists()]
        if taken:
            raise UserError(
                f"--out {out_dir} already holds {', '.join(taken)} but no {SETTINGS_FILE}, so the demo did not "
                "write them; give another --out"
            )
        return False
    recorded = json.loads(settings_path.read_text())
    complete = recorded.pop("complete", False) and all((out_dir / name).exists() for name in (DATA_DIR, MODEL_FILE, FLIPPED_FILE))
    recorded.pop("training", None)  # what training reported, not a setting
    if not fresh and complete and recorded == asdict(settings):
        return True
    for path in owned_paths(out_dir):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return False


def build_parser() -> cli.ArgumentParser:
    defaults = DemoSettings()
    parser = cli.ArgumentParser(
        prog="demo.py",
        description="The whole pipeline on scikit-learn's handwritten digits, with label errors "
        "planted on purpose: does influence find them?",
    )
    parser.add_argument("--out", default="demo", type=Path, help="directory for everything the demo writes (default: demo)")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class,
                        help="training scans per digit (default: all not used for testing, about 175)")
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class,
                        help=f"test scans per digit in each test folder (default {defaults.test_per_class})")
    parser.add_argument("--flip-fraction", type=float, default=defaults.flip_fraction,
                        help=f"share of training images given a wrong label (default {defaults.flip_fraction})")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help=f"side of the upscaled scans in pixels (default {defaults.image_size})")
    parser.add_argument("--noise", type=float, default=defaults.noise,
                        help=f"noise std of the 'noisy' test folder, share of 255 (default {defaults.noise})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"training epochs (default {defaults.epochs})")
    parser.add_argument("-i", "--depth", type=int, default=defaults.depth, help=f"LiSSA depth (default {defaults.depth})")
    parser.add_argument("-b", "--batch-size", type=int, default=defaults.batch_size,
                        help=f"calculate.py batch size (default {defaults.batch_size})")
    parser.add_argument("--top", type=int, default=defaults.top,
                        help=f"k of the top-k harmful images, in the figures and the report (default {defaults.top})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of every random choice (default {defaults.seed})")
    parser.add_argument("--fresh", action="store_true", help="redo everything, even when the settings are unchanged")
    return parser


def settings_from(args) -> DemoSettings:
    """The run settings, checked: each bad value is one line naming it."""
    positive = {
        "--test-per-class": args.test_per_class,
        "--epochs": args.epochs,
        "--depth": args.depth,
        "--batch-size": args.batch_size,
        "--top": args.top,
    }
    for option, value in positive.items():
        if value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    if args.train_per_class is not None and args.train_per_class < 2:
        raise UserError(f"--train-per-class {args.train_per_class}: must be at least 2")
    if not 0 < args.flip_fraction < 1:
        raise UserError(f"--flip-fraction {args.flip_fraction}: must be between 0 and 1 (exclusive)")
    if args.image_size < 8:
        raise UserError(f"--image-size {args.image_size}: must be at least 8 (the scans are 8x8)")
    if args.noise < 0:
        raise UserError(f"--noise {args.noise}: must not be negative")
    settings = DemoSettings(**{field.name: getattr(args, field.name) for field in fields(DemoSettings)})
    from sklearn.datasets import load_digits

    # Before anything is written: are there enough scans of every digit?
    train_index, _ = split_scans(
        load_digits().target,
        train_per_class=settings.train_per_class,
        test_per_class=settings.test_per_class,
        seed=settings.seed,
    )
    if settings.top > len(train_index):
        raise UserError(f"--top {settings.top}: more than the {len(train_index)} training images")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    out_dir: Path = args.out
    data_dir, calc_dir = out_dir / DATA_DIR, out_dir / CALC_DIR
    timings: dict[str, float] = {}

    reused = reuse_or_clear(out_dir, settings, fresh=args.fresh)
    started = time.perf_counter()
    if reused:
        print(f"Reusing the digit folders and the model in {out_dir} (same settings; --fresh redoes them)")
        training = json.loads((out_dir / SETTINGS_FILE).read_text()).get("training", {})
    else:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out {out_dir}: cannot create it ({error.strerror})") from None
        # First, so that a run interrupted from here on is known as the demo's and redone.
        _write_json(out_dir / SETTINGS_FILE, {**asdict(settings), "complete": False})
        print(f"Write the digit scans to {data_dir}/{{train,orig,noisy}}...", end=" ", flush=True)
        flipped_record = write_demo_data(out_dir, settings)
        _write_json(out_dir / FLIPPED_FILE, flipped_record)
        print(f"finished: {flipped_record['n_train']} training images, {flipped_record['n_flipped']} of them "
              f"in a wrong digit's folder")
        print(f"Train a small CNN on {data_dir / 'train'} ({settings.epochs} epochs)...", end=" ", flush=True)
        training = train_classifier(data_dir / "train", out_dir / MODEL_FILE, epochs=settings.epochs, seed=settings.seed)
        print(f"finished: {training['parameters']} parameters, training accuracy "
              f"{training['train_accuracy_on_given_labels']:.3f} on the labels as given -> {out_dir / MODEL_FILE}")
        _write_json(out_dir / SETTINGS_FILE, {**asdict(settings), "complete": True, "training": training})
    timings["data and model"] = time.perf_counter() - started
    flipped_record = json.loads((out_dir / FLIPPED_FILE).read_text())

    test_dirs = [str(data_dir / folder) for folder in TEST_FOLDERS]
    size = str(settings.image_size)
    try:
        timings["prepare_data.py"] = run_script(
            "prepare_data.py",
            ["-tr", str(data_dir / "train"), "-ts", *test_dirs, "-o", str(out_dir), "--image-size", size,
             "--seed", str(settings.seed)],
        )
        timings["prepare_only_test.py"] = run_script(
            "prepare_only_test.py", ["-ts", *test_dirs, "-o", str(out_dir)]  # image size: train.npz's
        )
        timings["calculate.py"] = run_script(
            "calculate.py",
            ["--train", str(out_dir / "train.npz"), "--test", str(out_dir / "test.npz"),
             "--model", str(out_dir / MODEL_FILE), "--preprocess", "unit", "--all-labels",
             "--output-dir", str(calc_dir), "-i", str(settings.depth), "-b", str(settings.batch_size),
             "--top", str(settings.top), "--seed", str(settings.seed)],
        )
    except StepFailed as failure:
        print(f"demo.py: {failure}; the demo stops here (its output above says why)", file=sys.stderr)
        return 1

    train_ids = folder_ids(data_dir / "train")
    test_counts = {folder: len(list((data_dir / folder).glob("*/*.png"))) for folder in TEST_FOLDERS}
    report = build_report(
        calc_dir=calc_dir, flipped_record=flipped_record, train_ids=train_ids, test_counts=test_counts,
        top=settings.top,
    )
    report["settings"] = asdict(settings)
    report["training"] = training
    report["timings_s"] = {step: round(seconds, 1) for step, seconds in timings.items()}
    _write_json(out_dir / REPORT_FILE, report)
    print(format_report(report, out_dir=out_dir, calc_dir=calc_dir, timings=timings))
    return 0


def _write_json(path: Path, payload) -> None:
    from influence.outputs import write_json

    write_json(path, payload)
