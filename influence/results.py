"""The output tree of ``calculate.py``: the only module that writes or reads it.

For each test folder, label and test image number ``n`` (1-based among the folder's test
images with that label)::

    <output_dir>/<folder>/<label>/harmful_<n>.<fmt>   the test image and its top harmful training images
    <output_dir>/<folder>/<label>/useful_<n>.<fmt>    ... and its top useful ones
    <output_dir>/<folder>/<label>/<n>.npy             every score: {training id: score}, a pickled dict
    <output_dir>/<folder>/<label>/<n>.json            the record, written last: its presence marks the item complete

Every file is written atomically (:mod:`influence.outputs`). ``docs/formats.md`` describes
the record's fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from influence import outputs

if TYPE_CHECKING:  # the figure drawing (Pillow) is imported only where figures are written (write_item)
    from influence.figures import Panel

RECORD_VERSION = 2
COMPLETE = "complete"
FAILED = "failed"  # the record says why in "reason"; no figures or score table
SIGN_CONVENTION = (
    "score = s_test . grad L(z); positive: removing z would raise the test loss (useful); "
    "negative: harmful; score / n_train predicts the leave-one-out change in test loss"
)


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


def item_files(output_dir: Path, folder: str, label: int, number: int, save_format: str) -> ItemFiles:
    directory = Path(output_dir) / folder / str(label)
    return ItemFiles(
        directory=directory,
        harmful=directory / f"harmful_{number}.{save_format}",
        useful=directory / f"useful_{number}.{save_format}",
        scores=directory / f"{number}.npy",
        record=directory / f"{number}.json",
    )


def read_record(files: ItemFiles) -> dict | None:
    """The item's JSON record if it is there and parses, else None."""
    try:
        return json.loads(files.record.read_text())
    except (OSError, ValueError):
        return None


def results_present(files: ItemFiles) -> bool:
    """Every result file (figures and score table) present and non-empty."""
    return all(path.is_file() and path.stat().st_size > 0 for path in files.results)


def load_scores(path: str | Path) -> dict[str, float]:
    """``{training id: score}`` from a ``<n>.npy`` score table."""
    return np.load(path, allow_pickle=True).item()


def degeneracy(scores: np.ndarray, *, gradient_norm: float) -> str | None:
    """Why ``scores`` (k,) rank nothing, or None when they do.

    A zero test gradient makes every score zero whatever the training image; scores that are
    not finite, all exactly zero (``s_test`` underflowed, e.g. with a huge ``--scale``) or all
    equal order the training images arbitrarily. Such an image gets no ranking: its record says
    why (``degenerate``) and its figures show the test image alone.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(gradient_norm):
        return "the test gradient is not finite (the test loss overflowed)"
    if gradient_norm == 0:
        return "the test gradient is zero (the loss cannot change at this image), so every score is zero"
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if bad:
        return f"{bad} of {len(scores)} scores are not finite (the solver diverged: raise --scale or --damping)"
    if len(scores) and not np.any(scores):
        return "every score is exactly zero (s_test underflowed, e.g. a --scale so large that 1/scale vanishes)"
    if len(scores) > 1 and np.all(scores == scores[0]):
        return f"every score equals {scores[0]:.6g}: no training image stands out"
    return None


def ranked(scores: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``top`` most harmful (most negative first) and most useful (most
    positive first) scores; ties keep the scored order."""
    order = np.argsort(scores, kind="stable")
    return order[:top], order[::-1][:top]


@dataclass(frozen=True)
class TrainingRow:
    """One scored training image as shown in a figure and listed in the record."""

    image: np.ndarray  # (H, W, 3) uint8
    id: str
    label: int
    score: float


def write_item(files: ItemFiles, *, heading: str, test_panel: Panel, harmful: list[TrainingRow],
               useful: list[TrainingRow], score_table: dict[str, float], record: dict) -> None:
    """The figures, the score table, then the record (last: it marks the item complete).

    A record with ``degenerate`` set (:func:`degeneracy`) gets figures of the test image alone,
    headed by the reason, and no harmful or useful lists."""
    from influence.figures import Panel, plot_influence_row

    degenerate = record.get("degenerate")
    if degenerate:
        harmful, useful = [], []
        heading = f"No ranking: {degenerate}"
    for kind, rows, path in (("harmful", harmful, files.harmful), ("useful", useful, files.useful)):
        plot_influence_row(
            path,
            heading=heading.format(kind=kind) if not degenerate else heading,
            test=test_panel,
            train=[Panel(row.image, f"{row.score:+.3g}\n{row.id}") for row in rows],
        )
    outputs.write_pickled_dict(files.scores, score_table)
    table = lambda rows: [{"id": row.id, "label": row.label, "score": row.score} for row in rows]  # noqa: E731
    outputs.write_json(files.record, {
        "record_version": RECORD_VERSION,
        "status": COMPLETE,
        **record,
        "harmful": table(harmful),
        "useful": table(useful),
        "sign_convention": SIGN_CONVENTION,
        "files": [path.name for path in files.results],
    })


def write_failure(files: ItemFiles, *, reason: str, record: dict) -> None:
    """The record of a test image that could not be explained, in place of its results.

    Result files of an earlier success are removed first, so the tree never shows figures
    that the record does not vouch for."""
    for path in files.results:
        path.unlink(missing_ok=True)
    outputs.write_json(files.record, {"record_version": RECORD_VERSION, "status": FAILED, "reason": reason,
                                      **record, "files": []})


def is_failure(record: dict) -> bool:
    return record.get("status") == FAILED


def iter_folder(output_dir: str | Path, folder: str) -> Iterator[dict]:
    """Every complete result of one test folder, in archive order (label, then number): the
    record with ``number``, ``record_path`` and ``scores`` (the full score table) added.
    Failed test images (:func:`write_failure`) are left out."""
    root = Path(output_dir) / folder
    paths = [p for p in root.glob("*/*.json") if p.stem.isdigit() and p.parent.name.lstrip("-").isdigit()]
    for path in sorted(paths, key=lambda p: (int(p.parent.name), int(p.stem))):
        record = json.loads(path.read_text())
        if is_failure(record):
            continue
        record["number"] = int(path.stem)
        record["record_path"] = str(path)
        record["scores"] = load_scores(path.with_suffix(".npy"))
        yield record


# --------------------------------------------------------------------------- reading for the store


def failure_reason(record: dict) -> str | None:
    """Why the record's test image failed (:func:`write_failure`), or None when it is a result."""
    if not is_failure(record):
        return None
    return str(record.get("reason") or "no reason recorded")


def record_fingerprint(record: dict) -> dict | None:
    """The settings fingerprint a record was computed with (None if it carries none)."""
    return (record.get("settings") or {}).get("fingerprint")


def record_save_format(record: dict) -> str:
    """The figure format of the record's item (its figures' suffix)."""
    return ((record.get("settings") or {}).get("presentation") or {}).get("save_format") or "png"


def read_score_table(files: ItemFiles) -> tuple[np.ndarray, np.ndarray]:
    """``(training ids (k,) object str, scores (k,) float64)`` of a ``<n>.npy`` score table, in the
    order they were scored."""
    table = load_scores(files.scores)
    ids = np.empty(len(table), dtype=object)
    ids[:] = list(table.keys())
    return ids, np.fromiter(table.values(), dtype=np.float64, count=len(table))


def recorded_items(output_dir: str | Path) -> list[tuple[str, int, int]]:
    """``(folder, label, number)`` of every record in the tree (results and failures), sorted."""
    found = []
    for path in Path(output_dir).glob("*/*/*.json"):
        label_text = path.parent.name
        if path.stem.isdigit() and label_text.lstrip("-").isdigit() and not path.name.startswith("."):
            found.append((path.parent.parent.name, int(label_text), int(path.stem)))
    return sorted(found)
