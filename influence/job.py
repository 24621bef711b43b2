"""The batch job behind ``calculate.py``: the influence of training images on every test image.

For each test folder, each label and each test image with that label, in archive order:

1. the gradient of the test loss, ``v = grad L(z_test)``;
2. ``s_test = H^-1 v`` by LiSSA (:func:`influence.ihvp.lissa`), with the training
   Hessian sampled on random minibatches from the whole training set;
3. ``score(z) = s_test . grad L(z)`` for every training image of the label (or of the
   whole set with ``all_labels``), in batches (:func:`influence.scores.influence_scores`);
4. the figures, the full score table and a JSON record, written atomically, the record last.

A test image whose record and files are all present is skipped, so a killed run
resumes where it stopped. Work that is the same for every test image (model, archive
index, the ``auto`` scale) is done once per process. Every random draw for a test image
is seeded by ``(seed, folder, label, number)``, so its scores do not depend on which
shard computed it or whether the run was resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from influence import outputs
from influence.errors import UserError
from influence.figures import Panel, plot_influence_row
from influence.progress import EstimateBar, progress_bar

if TYPE_CHECKING:
    from influence import archive

RECORD_VERSION = 1


@dataclass(frozen=True)
class Settings:
    """What decides the scores; recorded with every result."""

    depth: int = 100  # LiSSA steps J per repeat
    batch_size: int = 8  # training minibatch for each Hessian-vector product
    score_batch_size: int = 32  # training images per scoring pass
    damping: float = 0.01  # LiSSA damping; the effective Tikhonov damping is damping * scale
    scale: float | None = None  # None: estimated once per process ("auto")
    repeat: int = 1  # independent LiSSA runs averaged
    layers: tuple[str, ...] | None = None  # parameters: these layers' weights only
    last_layers: int | None = None  # parameters: the last k layers with weights only
    seed: int = 0
    top: int = 5
    all_labels: bool = False  # score the whole training set, not only the test image's label
    save_format: str = "png"

    def fingerprint(self) -> dict:
        """The settings that change the scores (format and top-k only change the files).

        The scoring batch size is included: float32 rounding differs between batch sizes,
        which can move a score near a ReLU or max-pool tie by a visible amount."""
        fields = dataclasses.asdict(self)
        for presentation_only in ("save_format", "top"):
            fields.pop(presentation_only)
        fields["layers"] = list(self.layers) if self.layers else None
        return fields


@dataclass(frozen=True)
class WorkItem:
    folder: str
    label: int
    number: int  # 1-based position among the folder's test images with this label
    row: int  # index into the folder's arrays


@dataclass(frozen=True)
class ItemFiles:
    directory: Path
    harmful: Path
    useful: Path
    scores: Path
    record: Path

    @property
    def results(self) -> tuple[Path, ...]:
        return (self.harmful, self.useful, self.scores)


@dataclass
class Summary:
    computed: int = 0
    skipped: int = 0
    planned: int = 0
    scale: float | None = None
    output_dir: Path = field(default_factory=Path)


# -- planning -------------------------------------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UserError(f"--shard {text!r} is not of the form i/n (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text}: need n >= 1 and 0 <= i < n (shards are numbered 0 to n-1)")
    return index, count


def plan_work(test: archive.TestArchive, *, folders=None, labels=None) -> list[WorkItem]:
    """Every (folder, label, test image) selected, in a fixed order: folders as archived,
    labels ascending, images as archived."""
    if folders:
        unknown = [name for name in folders if name not in test.folders]
        if unknown:
            raise UserError(f"unknown test folder {', '.join(unknown)}; the test archive has {', '.join(test.folders)}")
        if len(set(folders)) != len(folders):
            raise UserError(f"--folders names a folder twice: {' '.join(folders)}")
    chosen_folders = [name for name in test.folders if not folders or name in folders]
    items = []
    found_labels: set[int] = set()
    for name in chosen_folders:
        folder_labels = np.asarray(test.folder(name).labels)
        found_labels.update(int(label) for label in folder_labels)
        for label in sorted(set(int(label) for label in folder_labels)):
            if labels is not None and label not in labels:
                continue
            rows = np.flatnonzero(folder_labels == label)
            items.extend(WorkItem(name, label, number, int(row)) for number, row in enumerate(rows, start=1))
    if labels is not None:
        missing = sorted(set(labels) - found_labels)
        if missing:
            raise UserError(
                f"no test images with label {', '.join(map(str, missing))} in {', '.join(chosen_folders)}; "
                f"labels present: {_compact(sorted(found_labels))}"
            )
    return items


def select_shard(items: list[WorkItem], index: int, count: int) -> list[WorkItem]:
    """Round-robin split: shard i takes items i, i+n, i+2n, ... of the full plan."""
    return items[index::count]


def _compact(values: list[int], limit: int = 20) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def item_files(output_dir: Path, item: WorkItem, save_format: str) -> ItemFiles:
    directory = Path(output_dir) / item.folder / str(item.label)
    return ItemFiles(
        directory=directory,
        harmful=directory / f"harmful_{item.number}.{save_format}",
        useful=directory / f"useful_{item.number}.{save_format}",
        scores=directory / f"{item.number}.npy",
        record=directory / f"{item.number}.json",
    )


def read_record(files: ItemFiles) -> dict | None:
    """The item's JSON record if it is there and parses, else None."""
    try:
        return json.loads(files.record.read_text())
    except (OSError, ValueError):
        return None


def pending_items(
    output_dir: Path, items: list[WorkItem], settings: Settings, fingerprint: dict, *, overwrite: bool = False
) -> list[WorkItem]:
    """The items still to compute, reading each item's record once.

    An item is complete when its record (written last) and every result file are present.
    A record of other settings is refused (unless ``overwrite``): one output tree never
    mixes results of different settings.
    """
    if overwrite:
        return list(items)
    pending = []
    for item in items:
        files = item_files(output_dir, item, settings.save_format)
        record = read_record(files)
        if record is None:
            pending.append(item)
            continue
        previous = record.get("settings", {}).get("fingerprint") or {}
        if previous != fingerprint:
            changed = sorted(k for k in set(fingerprint) | set(previous) if previous.get(k) != fingerprint.get(k))
            raise UserError(
                f"{output_dir} already holds results computed with other settings ({', '.join(changed)} differ, "
                f"e.g. {item.folder}/{item.label}/{item.number}.json); pass --overwrite to replace them "
                f"or --output-dir for a new tree"
            )
        if not all(path.is_file() and path.stat().st_size > 0 for path in files.results):
            pending.append(item)
    return pending


def check_writable(output_dir: Path) -> None:
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output directory {output_dir}: {existing} is not a writable directory")


# -- the training minibatches ---------------------------------------------------------------


class TrainingMinibatches:
    """Random minibatches ``(x, y)`` from the whole training archive, for the Hessian.

    An infinite iterator; :meth:`reseed` restarts its random stream, so each test image
    draws the same minibatches whichever process computes it.
    """

    def __init__(self, train: archive.TrainArchive, preprocess: Callable, batch_size: int):
        self._train = train
        self._preprocess = preprocess
        self._batch_size = min(batch_size, len(train))
        self._labels = np.asarray(train.labels, dtype=np.int64)
        self._rng = np.random.default_rng(0)

    def reseed(self, *key: int) -> None:
        self._rng = np.random.default_rng(list(key))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        # Sorted indices read the archive front to back; the order in a batch does not matter.
        indices = np.sort(self._rng.choice(len(self._labels), size=self._batch_size, replace=False))
        return self._preprocess(self._train.read(indices)), self._labels[indices]


def item_seed(seed: int, item: WorkItem) -> tuple[int, ...]:
    return (seed, zlib.crc32(item.folder.encode()), item.label, item.number)


# -- the job --------------------------------------------------------------------------------


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def class_name(names: dict[int, str], label: int) -> str | None:
    return names.get(int(label))


def calculate(
    *,
    train_path: Path,
    test_path: Path,
    output_dir: Path,
    settings: Settings,
    model_path: Path | None = None,
    weights: Path | None = None,
    preprocess: str | None = None,
    folders: list[str] | None = None,
    labels: list[int] | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    echo: Callable[..., None] = print,
) -> Summary:
    """Run the whole job; every check on the input happens before the first LiSSA step."""
    from influence import archive

    started = time.perf_counter()
    shard_index, shard_count = parse_shard(shard)
    output_dir = Path(output_dir)
    with archive.open_train(train_path) as train, archive.open_test(test_path) as test:
        if tuple(train.image_size) != tuple(test.image_size):
            raise UserError(
                f"{test_path} holds {_size(test.image_size)} images but {train_path} holds {_size(train.image_size)}; "
                f"prepare both at the same --image-size"
            )
        items = select_shard(plan_work(test, folders=folders, labels=labels), shard_index, shard_count)
        names = _class_names(train, test)
        if not settings.all_labels:
            for label in sorted({item.label for item in items}):
                if len(train.label_indices(label)) == 0:
                    raise UserError(
                        f"no training images with label {label} ({class_name(names, label) or 'unnamed'}) "
                        f"in {train_path}; score the whole training set with --all-labels, or leave it out with --labels"
                    )
        check_writable(output_dir)

        from influence import models  # TensorFlow is imported from here on

        loaded = models.load_classifier(model_path=model_path, weights=weights, preprocess=preprocess)
        models.check_image_size(loaded, train.image_size)
        highest = max([int(np.max(train.labels))] + [item.label for item in items])
        if highest >= loaded.num_classes:
            raise UserError(
                f"label {highest} is out of range for {loaded.description}, which has {loaded.num_classes} outputs"
            )
        fingerprint = {
            **settings.fingerprint(),
            "model_sha256": sorted(loaded.files.values()),  # the model file and any weights file
            "preprocess": loaded.preprocess_name,
        }
        todo = pending_items(output_dir, items, settings, fingerprint, overwrite=overwrite)
        summary = Summary(planned=len(items), skipped=len(items) - len(todo), output_dir=output_dir)
        if summary.skipped:
            echo(f"{summary.skipped} of {len(items)} test images already complete in {output_dir}; skipping them")
        if todo:
            context = _prepare_engine(train, loaded, settings, echo)
            summary.scale = context.scale
        if loaded.is_imagenet:
            names = {**_imagenet_names(), **names}
        label_subset = None
        for item in todo:
            files = item_files(output_dir, item, settings.save_format)
            if label_subset is None or label_subset.key != _subset_key(item, settings):
                label_subset = _load_label_subset(train, item, settings, echo)
            echo(f"Test image #{item.number} in process")
            outputs.remove_stale_temporaries(files.directory)
            _compute_item(
                item=item,
                files=files,
                test_set=test.folder(item.folder),
                train=train,
                label_subset=label_subset,
                context=context,
                loaded=loaded,
                settings=settings,
                fingerprint=fingerprint,
                names=names,
                echo=echo,
            )
            summary.computed += 1
    echo(
        f"Done: {summary.computed} test images computed, {summary.skipped} already complete, "
        f"of {summary.planned} in this shard ({time.perf_counter() - started:.0f} s) -> {output_dir}"
    )
    return summary


def _size(size) -> str:
    height, width = size
    return f"{width}x{height}"


def _imagenet_names() -> dict[int, str]:
    from influence import imagenet

    return {label: name for label, (_, name) in enumerate(imagenet.classes())}


def _class_names(train: archive.TrainArchive, test: archive.TestArchive) -> dict[int, str]:
    """Label -> class name, for the labels of both archives (all 1000 with ImageNet labelling)."""
    names = _imagenet_names() if train.meta.get("labeling") == "imagenet" else {}
    names.update(test.class_names)
    names.update(train.class_names)
    return names


@dataclass
class EngineContext:
    variables: list
    minibatches: TrainingMinibatches
    hvp_fn: Callable
    scale: float
    hvp_form: str


def _prepare_engine(train, loaded, settings: Settings, echo) -> EngineContext:
    """Parameters, the Hessian-vector product and the scale: once per process."""
    import tensorflow as tf

    from influence import hvp, ihvp, params

    variables = params.select(
        loaded.model, layers=list(settings.layers) if settings.layers else None, last=settings.last_layers
    )
    minibatches = TrainingMinibatches(train, loaded.preprocess, settings.batch_size)
    hvp_fn = hvp.training_hvp(loaded.model, variables, minibatches)
    scale = settings.scale
    if scale is None:
        minibatches.reseed(settings.seed, 0x5CA1E)
        began = time.perf_counter()
        echo("Estimate LiSSA scale...", end="")
        scale = float(
            ihvp.estimate_scale(hvp_fn, like=[tf.zeros_like(v) for v in variables], damping=settings.damping)
        )
        echo(f" {scale:.4g} ({time.perf_counter() - began:.1f} s)")
    return EngineContext(
        variables=variables,
        minibatches=minibatches,
        hvp_fn=hvp_fn,
        scale=scale,
        hvp_form=getattr(hvp_fn, "form", "auto"),
    )


@dataclass
class LabelSubset:
    key: tuple
    indices: np.ndarray  # (k,) global training indices
    images: np.ndarray | None  # (k, H, W, 3) uint8; None with all_labels (streamed instead)


def _subset_key(item: WorkItem, settings: Settings) -> tuple:
    return ("all",) if settings.all_labels else (item.folder, item.label)


def _load_label_subset(train, item: WorkItem, settings: Settings, echo) -> LabelSubset:
    """The training images scored for this label, read once for all its test images
    (one ImageNet class is about 1,300 images, 195 MB as uint8). With ``all_labels``
    the whole set, streamed batch by batch for every test image."""
    key = _subset_key(item, settings)
    if settings.all_labels:
        echo(f"Create label subset for all {len(train.class_names)} classes...", end="")
        subset = LabelSubset(key, np.arange(len(train)), None)
    else:
        echo(f"Create label subset for {item.label} class...", end="")
        indices = train.label_indices(item.label)
        subset = LabelSubset(key, indices, train.read(indices))
    echo(" finished")
    return subset


def _score_batches(train, subset: LabelSubset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, images) batches covering the subset, in its order."""
    if subset.images is None:
        yield from train.iter_all(batch_size)
        return
    for start in range(0, len(subset.indices), batch_size):
        yield subset.indices[start : start + batch_size], subset.images[start : start + batch_size]


@dataclass
class Explanation:
    """One test image's influence scores and what produced them."""

    image: np.ndarray  # (H, W, 3) uint8
    predicted: int
    test_loss: float
    indices: np.ndarray  # (k,) global training indices scored
    scores: np.ndarray  # (k,) float64, aligned with indices
    lissa: object  # ihvp.LissaResult
    timings: dict

    def ranked(self, top: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions into ``indices`` of the ``top`` most harmful (most negative first)
        and most useful (most positive first) training images."""
        order = np.argsort(self.scores, kind="stable")
        return order[:top], order[::-1][:top]


def _explain(*, item, test_set, train, label_subset, context, loaded, settings) -> Explanation:
    """Test gradient, s_test by LiSSA, and the scores of the label subset's training images."""
    from influence import hvp, ihvp, losses, scores

    timings = {}
    image = np.asarray(test_set.images[item.row])  # (H, W, 3) uint8
    x_test = loaded.preprocess(image[None])
    y_test = np.array([item.label])

    began = time.perf_counter()
    predicted = int(np.argmax(loaded.model(x_test, training=False)[0]))
    test_loss = float(losses.per_example_loss(loaded.model)(x_test, y_test)[0])
    v = hvp.loss_gradient(loaded.model, context.variables, x_test, y_test)
    timings["test_gradient_s"] = time.perf_counter() - began

    began = time.perf_counter()
    context.minibatches.reseed(*item_seed(settings.seed, item))
    with EstimateBar(total=settings.depth * settings.repeat, desc="IHVP calculation") as bar:
        lissa = ihvp.lissa(
            context.hvp_fn,
            v,
            depth=settings.depth,
            damping=settings.damping,
            scale=context.scale,
            repeat=settings.repeat,
            callback=lambda done, total, norm: bar.update(done - bar.n),
        )
    timings["lissa_s"] = time.perf_counter() - began

    began = time.perf_counter()
    scored_indices, scored = [], []
    with progress_bar(total=len(label_subset.indices), desc="Batch influences", unit="img") as bar:
        for indices, images in _score_batches(train, label_subset, settings.score_batch_size):
            batch_scores = scores.influence_scores(
                loaded.model, context.variables, lissa.s_test, loaded.preprocess(images), train.labels[indices]
            )
            scored_indices.append(indices)
            scored.append(np.asarray(batch_scores, dtype=np.float64))
            bar.update(len(indices))
    all_scores = np.concatenate(scored)
    if not np.all(np.isfinite(all_scores)):
        raise UserError(
            f"non-finite influence scores for {item.folder}/{item.label} test image #{item.number}; "
            f"LiSSA did not converge: raise --scale or --damping"
        )
    timings["scoring_s"] = time.perf_counter() - began
    return Explanation(image, predicted, test_loss, np.concatenate(scored_indices), all_scores, lissa, timings)


def _compute_item(*, item, files, test_set, train, label_subset, context, loaded, settings, fingerprint, names, echo):
    explanation = _explain(
        item=item, test_set=test_set, train=train, label_subset=label_subset,
        context=context, loaded=loaded, settings=settings,
    )
    began = time.perf_counter()
    ids = train.ids[explanation.indices]
    train_labels = train.labels[explanation.indices]
    harmful, useful = explanation.ranked(settings.top)
    top = len(harmful)

    test_id = str(test_set.ids[item.row])
    label_name, predicted_name = class_name(names, item.label), class_name(names, explanation.predicted)
    test_panel = Panel(
        explanation.image,
        f"{item.folder}/{test_id}\nlabel {item.label}" + (f" ({label_name})" if label_name else "")
        + f"\npredicted {explanation.predicted}" + (f" ({predicted_name})" if predicted_name else ""),
    )
    for kind, rows, path in (("harmful", harmful, files.harmful), ("useful", useful, files.useful)):
        plot_influence_row(
            path,
            heading=f"Top {top} {kind} training images for {item.folder} label {item.label}, test image #{item.number}",
            test=test_panel,
            train=[
                Panel(train.read(explanation.indices[r : r + 1])[0], f"{explanation.scores[r]:+.3g}\n{ids[r]}")
                for r in rows
            ],
        )
    outputs.write_pickled_dict(files.scores, {str(i): float(s) for i, s in zip(ids, explanation.scores)})
    explanation.timings["writing_s"] = time.perf_counter() - began

    def table(rows):
        return [{"id": str(ids[r]), "label": int(train_labels[r]), "score": float(explanation.scores[r])} for r in rows]

    record = {
        "record_version": RECORD_VERSION,
        "test_id": test_id,
        "folder": item.folder,
        "label": item.label,
        "label_name": label_name,
        "number": item.number,
        "predicted": explanation.predicted,
        "predicted_name": predicted_name,
        "test_loss": explanation.test_loss,
        "n_train": len(train),
        "n_scored": len(explanation.indices),
        "harmful": table(harmful),
        "useful": table(useful),
        "sign_convention": "score = s_test . grad L(z); positive: removing z would raise the test loss (useful); "
        "negative: harmful; score / n_train predicts the leave-one-out change in test loss",
        "settings": {
            **dataclasses.asdict(settings),
            "scale_used": context.scale,
            "effective_damping": explanation.lissa.effective_damping,
            "hvp_form": context.hvp_form,
            "parameters": int(sum(int(np.prod(v.shape)) for v in context.variables)),
            "model": loaded.description,
            "model_source": str(loaded.source) if loaded.source else None,
            "model_sha256": loaded.sha256,
            "preprocess": loaded.preprocess_name,
            "fingerprint": fingerprint,
        },
        "lissa_norms": np.asarray(explanation.lissa.norms).tolist(),
        "timings": {name: round(seconds, 4) for name, seconds in explanation.timings.items()},
        "versions": versions(),
        "files": [path.name for path in files.results],
    }
    outputs.write_json(files.record, record)  # last: its presence marks the item complete
    echo(f"Top {top} harmful -> {files.harmful}")
    echo(f"Top {top} useful -> {files.useful}")
    echo(f"All influences dict -> {files.scores}")
