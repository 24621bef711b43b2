"""Image folders -> ``train.npz`` and ``test.npz`` (``prepare_data.py``, ``prepare_only_test.py``).

Everything the user could have got wrong is checked before the first byte is
written: folders, class names, test folder names, the output directory. Both
archives are then written under temporary names and renamed into place only
when both are complete, so a failure or Ctrl-C leaves the previous archives
as they were.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from influence import archive, outputs
from influence.decode import CHUNK, Decoded, decode_images, default_workers
from influence.errors import UserError
from influence.folders import (
    ClassFolder,
    Classes,
    check_folder,
    class_folder_names,
    image_files,
    resolve_without_train,
)

TRAIN_ARCHIVE = "train.npz"
TEST_ARCHIVE = "test.npz"
DEFAULT_IMAGE_SIZE = (224, 224)  # (H, W), VGG16's input
DEFAULT_BATCH_SIZE = 150
DEFAULT_SEED = 0
RESIZE = "bilinear"


def parse_image_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"64x48"`` (width x height) -> (48, 64) = (H, W)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdecimal() for part in parts):
        raise ValueError(f"image size {text!r} is not N or WIDTHxHEIGHT (e.g. 224 or 64x48)")
    width, height = (int(parts[0]), int(parts[-1]))
    if width < 1 or height < 1:
        raise ValueError(f"image size {text!r} must be at least 1x1")
    return height, width


@dataclass
class ImageFolder:
    """A train or test folder: its class folders, their labels and image files."""

    name: str  # basename, e.g. "orig"
    path: Path  # as given on the command line
    classes: list[ClassFolder]
    ignored: int = 0
    skipped: list[dict] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return sum(len(entry.files) for entry in self.classes)


def folder_name(path) -> str:
    """The name a folder is known by: its last path component (``data/orig/`` -> ``orig``)."""
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


# --------------------------------------------------------------------------- checks (nothing written)


def check_settings(*, batch_size: int | None = None, workers: int) -> None:
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch size {batch_size} is invalid: it must be at least 1 (default {DEFAULT_BATCH_SIZE})")
    if workers < 1:
        raise UserError(f"--workers {workers} is invalid: it must be at least 1")


def check_test_folder_names(tests: list[Path]) -> list[str]:
    names = [folder_name(path) for path in tests]
    for i, name in enumerate(names):
        if name in names[:i]:
            first = tests[names.index(name)]
            raise UserError(f"two test folders are named {name!r} ({first} and {tests[i]}); "
                            f"test folders need distinct names")
    return names


def train_classes(path: Path) -> tuple[list[str], int, Classes]:
    """(class folder names, other entries ignored, their labels) of the train folder."""
    check_folder(path, "train")
    names, ignored = class_folder_names(path, "train")
    return names, ignored, Classes.from_folders(names)


@contextlib.contextmanager
def progress(total: int, desc: str, unit: str) -> Iterator[tqdm]:
    """A progress bar on stderr that is erased if the work fails, so that an error is one line.

    (Not ``for x in tqdm(...)``: that bar closes itself, and stays, before an error is handled.)
    """
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def scan_train(path: Path, names: list[str], ignored: int, classes: Classes) -> ImageFolder:
    """The image files of every train class, with a ``Parse train`` progress bar."""
    entries = []
    with progress(len(names), "Parse train", "class") as bar:
        for name in names:
            files, n_ignored = image_files(Path(path) / name, name)
            entries.append(ClassFolder(name, classes.folders[name], files, n_ignored))
            ignored += n_ignored
            bar.update()
    entries.sort(key=lambda entry: entry.label)
    return ImageFolder(folder_name(path), Path(path), entries, ignored)


def scan_test(path: Path, name: str, classes: Classes | None) -> ImageFolder:
    """A test folder's class folders, resolved to labels with ``classes`` (or without a train set)."""
    check_folder(path, "test")
    names, ignored = class_folder_names(path, "test")
    entries = []
    for class_name in names:
        where = f"{path}/{class_name}"
        label = classes.resolve(class_name, where=where) if classes else resolve_without_train(class_name, where=where)[0]
        files, n_ignored = image_files(Path(path) / class_name, class_name)
        entries.append(ClassFolder(class_name, label, files, n_ignored))
        ignored += n_ignored
    return ImageFolder(name, Path(path), entries, ignored)


# --------------------------------------------------------------------------- writing


def _skip(folder: ImageFolder, image_id: str, decoded: Decoded, *, strict: bool) -> None:
    shown = os.path.join(folder.path, image_id)
    if strict:
        raise UserError(f"cannot read image {shown}: {decoded.error} (--strict; without it the file is skipped)")
    tqdm.write(f"warning: skipped {shown}: {decoded.error}", file=sys.stderr)
    folder.skipped.append({"path": image_id, "reason": decoded.error})


def _pool_size(workers: int, n_files: int) -> int:
    return max(1, min(workers, math.ceil(n_files / CHUNK)))


def _check_readable(folder: ImageFolder, counts: dict[int, int]) -> None:
    for entry in folder.classes:
        if counts.get(entry.label, 0) == 0 and entry.files:
            raise UserError(f"class folder {Path(folder.path) / entry.folder} has no readable images "
                            f"({len(entry.files)} skipped)")


def write_train(writer: archive.TrainWriter, train: ImageFolder, classes: Classes, *,
                batch_size: int, seed: int, strict: bool, workers: int) -> dict:
    """Decode, shuffle (within each label) and store the train images in batches; returns the meta."""
    rng = np.random.default_rng(seed)
    # Storage order: label by label (ascending), shuffled within each label. Paths (strings shared
    # with the file lists) and a label array: about 120 bytes per image, 150 MB for ImageNet.
    order: list[str] = []
    for entry in train.classes:
        order.extend(entry.files[i] for i in rng.permutation(len(entry.files)))
    order_labels = np.repeat([entry.label for entry in train.classes], [len(entry.files) for entry in train.classes])
    height, width = writer.image_size
    batch = np.empty((batch_size, height, width, 3), dtype=np.uint8)  # the one batch held in memory
    batch_ids: list[str] = []
    batch_label = None
    counts: dict[int, int] = {}

    def flush():
        if batch_ids:
            writer.add_batch(batch_label, batch[:len(batch_ids)], batch_ids.copy())
            batch_ids.clear()

    paths = (Path(train.path) / image_id for image_id in order)
    with contextlib.closing(decode_images(paths, image_size=(height, width),
                                          workers=_pool_size(workers, len(order)))) as decoded_images, \
            progress(len(order), "Pack batches", "img") as bar:
        for label, image_id, decoded in zip((int(label) for label in order_labels), order, decoded_images):
            bar.update()
            if label != batch_label:
                flush()  # a batch never holds two labels
                batch_label = label
            if decoded.image is None:
                _skip(train, image_id, decoded, strict=strict)
                continue
            batch[len(batch_ids)] = decoded.image
            batch_ids.append(image_id)
            counts[label] = counts.get(label, 0) + 1
            if len(batch_ids) == batch_size:
                flush()
        flush()
    _check_readable(train, counts)
    skipped_by_class = {}
    for record in train.skipped:
        folder = record["path"].split("/", 1)[0]
        skipped_by_class[folder] = skipped_by_class.get(folder, 0) + 1
    return writer.finish({
        "created_by": "prepare_data.py",
        "source": os.path.abspath(train.path),
        "labeling": classes.labeling,
        "seed": seed,
        "batch_size": batch_size,
        "resize": RESIZE,
        "classes": [{"label": entry.label, "folder": entry.folder, "name": classes.name(entry.label),
                     "count": counts.get(entry.label, 0), "skipped": skipped_by_class.get(entry.folder, 0)}
                    for entry in train.classes],
        "skipped": train.skipped,
        "counts": {"classes": len(train.classes), "skipped": len(train.skipped), "ignored": train.ignored},
    })


def write_tests(writer: archive.TestWriter, tests: list[ImageFolder], *, names, strict: bool, workers: int,
                train_archive: str | None, labeling: str | None) -> dict:
    """Decode and store every test folder (class folders in natural order, files in natural order)."""
    height, width = writer.image_size
    for folder in tests:
        items = [(entry.label, image_id) for entry in folder.classes for image_id in entry.files]
        counts: dict[int, int] = {}

        def records(folder=folder, items=items, counts=counts) -> Iterator[tuple[np.ndarray, int, str]]:
            paths = (Path(folder.path) / image_id for _, image_id in items)
            with contextlib.closing(decode_images(paths, image_size=(height, width),
                                                  workers=_pool_size(workers, len(items)))) as decoded_images, \
                    progress(len(items), f"Parse {folder.name}", "img") as bar:
                for (label, image_id), decoded in zip(items, decoded_images):
                    bar.update()
                    if decoded.image is None:
                        _skip(folder, image_id, decoded, strict=strict)
                        continue
                    counts[label] = counts.get(label, 0) + 1
                    yield decoded.image, label, image_id

        writer.add_folder(folder.name, records())
        _check_readable(folder, counts)
    labels = sorted({entry.label for folder in tests for entry in folder.classes})
    return writer.finish({
        "created_by": "prepare_data.py" if train_archive else "prepare_only_test.py",
        "labeling": labeling,
        "train_archive": train_archive,
        "resize": RESIZE,
        "classes": [{"label": label, "name": names(label)} for label in labels],
        "folders": [{"source": os.path.abspath(folder.path),
                     "classes": [{"folder": entry.folder, "label": entry.label} for entry in folder.classes],
                     "skipped": folder.skipped, "ignored": folder.ignored} for folder in tests],
        "counts": {"folders": len(tests), "images": sum(f["count"] for f in writer.folders),
                   "skipped": sum(len(folder.skipped) for folder in tests)},
    })


@contextlib.contextmanager
def _writing(out_dir: Path, names: list[str]) -> Iterator[contextlib.ExitStack]:
    """Create ``out_dir``, turn I/O failures while writing into one-line errors, and make sure
    that no partial file of ours survives a failure, whenever Ctrl-C lands."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            yield stack
    except BaseException as failure:
        for name in names:  # a no-op after commit(): the partial file has become the archive
            archive.partial_path(Path(out_dir) / name).unlink(missing_ok=True)
        if isinstance(failure, OSError):
            where = f" {failure.filename}" if failure.filename else ""
            raise UserError(f"cannot write{where} in {out_dir}: {failure.strerror or failure}") from None
        raise


def _create(writer: archive.ArchiveWriter) -> None:
    print(f"Create {writer.kind} archive...", end=" ", flush=True)
    writer.close()
    print("finished", flush=True)


def _summary(train: dict | None, test: dict, sizes: dict[str, int], out_dir: Path) -> str:
    parts = []
    if train:
        c = train["counts"]
        parts.append(f"{TRAIN_ARCHIVE} {c['images']:,} images, {c['classes']:,} classes, {c['batches']:,} batches, "
                     f"{c['skipped']:,} skipped, {sizes[TRAIN_ARCHIVE]:,} bytes")
    c = test["counts"]
    parts.append(f"{TEST_ARCHIVE} {c['images']:,} images in {c['folders']} folders, {c['skipped']:,} skipped, "
                 f"{sizes[TEST_ARCHIVE]:,} bytes")
    return f"Done: {'; '.join(parts)} (in {os.path.abspath(out_dir)})"


def prepare_data(*, train, tests, out_dir=".", image_size=DEFAULT_IMAGE_SIZE, batch_size=DEFAULT_BATCH_SIZE,
                 seed=DEFAULT_SEED, strict=False, workers=None) -> dict[str, Path]:
    """Write ``out_dir/train.npz`` and ``out_dir/test.npz``; returns their paths.

    ``image_size`` is (H, W); ``workers`` decoding processes (default: all cores).
    """
    workers = default_workers() if workers is None else workers
    tests = [Path(path) for path in tests]
    out_dir = Path(out_dir)
    check_settings(batch_size=batch_size, workers=workers)
    names = check_test_folder_names(tests)
    outputs.check_writable_dir(out_dir)
    class_names, ignored, classes = train_classes(Path(train))
    test_folders = [scan_test(path, name, classes) for path, name in zip(tests, names)]
    train_folder = scan_train(Path(train), class_names, ignored, classes)

    with _writing(out_dir, [TRAIN_ARCHIVE, TEST_ARCHIVE]) as stack:
        train_writer = stack.enter_context(archive.TrainWriter(out_dir / TRAIN_ARCHIVE, image_size=image_size))
        test_writer = stack.enter_context(archive.TestWriter(out_dir / TEST_ARCHIVE, image_size=image_size))
        train_meta = write_train(train_writer, train_folder, classes, batch_size=batch_size, seed=seed,
                                 strict=strict, workers=workers)
        _create(train_writer)
        test_meta = write_tests(test_writer, test_folders, names=classes.name, strict=strict, workers=workers,
                                train_archive=TRAIN_ARCHIVE, labeling=classes.labeling)
        _create(test_writer)
        # Both complete: only now replace the previous archives.
        train_writer.commit()
        test_writer.commit()
    sizes = {TRAIN_ARCHIVE: train_writer.bytes_written, TEST_ARCHIVE: test_writer.bytes_written}
    print(_summary(train_meta, test_meta, sizes, out_dir), flush=True)
    return {"train": train_writer.path, "test": test_writer.path}


def prepare_only_test(*, tests, out_dir=".", image_size=None, strict=False, workers=None) -> dict[str, Path]:
    """Rewrite only ``out_dir/test.npz``, with the classes of ``out_dir/train.npz`` if it exists.

    ``image_size`` (H, W) defaults to the train archive's, or 224x224 without one.
    """
    workers = default_workers() if workers is None else workers
    tests = [Path(path) for path in tests]
    out_dir = Path(out_dir)
    check_settings(workers=workers)
    names = check_test_folder_names(tests)
    outputs.check_writable_dir(out_dir)
    train_path = out_dir / TRAIN_ARCHIVE
    classes = None
    if train_path.exists():
        with archive.open_train(train_path) as train:
            classes = Classes.from_meta(train.meta)
            if image_size is not None and tuple(image_size) != train.image_size:
                raise UserError(f"--image-size {archive.format_image_size(image_size)} differs from {train_path}'s "
                                f"{archive.format_image_size(train.image_size)}: test and train images must match")
            image_size = train.image_size
    image_size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    test_folders = [scan_test(path, name, classes) for path, name in zip(tests, names)]

    def class_name(label: int) -> str:
        if classes:
            return classes.name(label)
        folder = next(entry.folder for tf in test_folders for entry in tf.classes if entry.label == label)
        return resolve_without_train(folder, where=folder)[1]

    with _writing(out_dir, [TEST_ARCHIVE]) as stack:
        test_writer = stack.enter_context(archive.TestWriter(out_dir / TEST_ARCHIVE, image_size=image_size))
        test_meta = write_tests(test_writer, test_folders, names=class_name, strict=strict, workers=workers,
                                train_archive=TRAIN_ARCHIVE if classes else None,
                                labeling=classes.labeling if classes else None)
        _create(test_writer)
        test_writer.commit()
    print(_summary(None, test_meta, {TEST_ARCHIVE: test_writer.bytes_written}, out_dir), flush=True)
    return {"test": test_writer.path}
