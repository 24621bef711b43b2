"""The demo's data: scikit-learn's digit scans as class folders, with planted label errors.

``<out>/data/train/<digit>/`` holds the training scans, a few of them in another
digit's folder on purpose; ``<out>/data/orig/<label>/`` and ``<out>/data/noisy/<label>/``
hold the held-out test scans, clean and with Gaussian noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from examples.digits.settings import DATA_DIR, NUM_CLASSES, DemoSettings
from influence.errors import UserError
from influence.outputs import write_with


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
    """One greyscale scan as a PNG file, written atomically."""
    from PIL import Image

    write_with(path, lambda file: Image.fromarray(pixels, "L").save(file, format="PNG"))


def write_demo_data(out_dir: Path, settings: DemoSettings) -> dict:
    """Write ``<out>/data/{train,orig,noisy}`` and return the flipped-label record.

    Training class folders are named ``0``..``9`` (natural sort order: label = digit);
    test class folders are named by label index, which resolves to the same label.
    Whatever ``<out>/data`` held before is removed first. Every file is written
    atomically; a tree left half-written by an interrupted run is known by the settings
    file, which says ``complete`` only after the model is saved, and is redone.
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

    final = out_dir / DATA_DIR
    shutil.rmtree(final, ignore_errors=True)  # no stale scan of other settings may stay
    for index, label in zip(train_index, given):
        _write_png(final / "train" / str(label) / scan_name(index), images[index])
    for position, index in enumerate(test_index):
        _write_png(final / "orig" / str(labels[index]) / scan_name(index), images[index])
        _write_png(final / "noisy" / str(labels[index]) / scan_name(index), noisy[position])

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
