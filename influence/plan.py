"""What a ``calculate.py`` run has to do: the work items, their order, shards and resume state.

A work item is one test image of one test folder, numbered 1, 2, ... among the folder's test
images with its label (the number names its output files). The plan is fixed by the test
archive and the selection alone, so every shard of a job computes the same plan and takes
its own share of it, and every random draw for an item is keyed by the item
(:func:`item_seed`), not by the process that happens to compute it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from influence import results
from influence.errors import UserError

if TYPE_CHECKING:
    from influence import archive


@dataclass(frozen=True)
class WorkItem:
    folder: str
    label: int
    number: int  # 1-based position among the folder's test images with this label
    row: int  # index into the folder's arrays

    def files(self, output_dir: Path, save_format: str) -> results.ItemFiles:
        return results.item_files(output_dir, self.folder, self.label, self.number, save_format)


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


def item_seed(seed: int, item: WorkItem) -> tuple[int, ...]:
    """The key of every random draw made for ``item``: the same in every shard and on resume."""
    return (seed, zlib.crc32(item.folder.encode()), item.label, item.number)


def pending_items(
    output_dir: Path, items: list[WorkItem], save_format: str, fingerprint: dict, *, overwrite: bool = False,
    retry_failed: bool = True,
) -> list[WorkItem]:
    """The items still to compute, reading each item's record once.

    An item is complete when its record (written last) and every result file are present.
    An item whose record says it failed is computed again if ``retry_failed``, else left as it is.
    A record of other settings is refused (unless ``overwrite``): one output tree never
    mixes results of different settings.
    """
    if overwrite:
        return list(items)
    pending = []
    for item in items:
        files = item.files(output_dir, save_format)
        record = results.read_record(files)
        if record is None:
            pending.append(item)
            continue
        previous = record.get("settings", {}).get("fingerprint") or {}
        if previous != fingerprint:
            changed = _differences(previous, fingerprint)
            raise UserError(
                f"{output_dir} already holds results computed with other settings ({', '.join(changed)} differ, "
                f"e.g. {item.folder}/{item.label}/{item.number}.json); pass --overwrite to replace them "
                f"or --output-dir for a new tree"
            )
        if results.is_failure(record):
            if retry_failed:
                pending.append(item)
        elif not results.results_present(files):
            pending.append(item)
    return pending


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two (nested) fingerprints."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed
