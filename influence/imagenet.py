"""The 1000 ILSVRC-2012 classes, shipped as package data (no network at run time).

Keras's ImageNet models (VGG16 and friends) output the classes in the sorted
order of their WordNet ids, so a class's label is its wnid's position in that
sorted list: ``n01440764`` (tench) is 0, ``n04146614`` (school bus) is 779.
The list lives in ``influence/data/imagenet_classes.tsv``, one
``<wnid> TAB <name>`` line per label.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

N_CLASSES = 1000
DATA_FILE = "imagenet_classes.tsv"
_WNID = re.compile(r"n\d{8}")


@functools.lru_cache(maxsize=1)
def classes() -> tuple[tuple[str, str], ...]:
    """``((wnid, name), ...)``, index = label; checked to be the 1000 sorted, unique wnids."""
    text = resources.files("influence").joinpath("data").joinpath(DATA_FILE).read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    table = tuple((wnid, name) for wnid, name in rows)
    wnids = [wnid for wnid, _ in table]
    # A broken install must fail loudly: every label of every ImageNet run depends on this.
    if len(table) != N_CLASSES or wnids != sorted(set(wnids)) or not all(map(_WNID.fullmatch, wnids)):
        raise RuntimeError(f"influence/data/{DATA_FILE} is damaged: expected {N_CLASSES} sorted unique wnids")
    return table


@functools.lru_cache(maxsize=1)
def _label_of() -> dict[str, int]:
    return {wnid: label for label, (wnid, _) in enumerate(classes())}


def wnids() -> list[str]:
    """The 1000 wnids, index = label."""
    return [wnid for wnid, _ in classes()]


def label_of(wnid: str) -> int | None:
    """The label of an ILSVRC-2012 wnid (``"n01440764"`` -> 0), or None if it is not one."""
    return _label_of().get(wnid)


def is_wnid(name: str) -> bool:
    """True if ``name`` is one of the 1000 ILSVRC-2012 wnids."""
    return name in _label_of()


def looks_like_wnid(name: str) -> bool:
    """True if ``name`` has the shape of a WordNet id (``n`` + 8 digits), known or not."""
    return _WNID.fullmatch(name) is not None


def class_name(label: int) -> str:
    """Human name of an ImageNet label (``0`` -> ``"tench"``)."""
    return classes()[label][1]


@functools.lru_cache(maxsize=1)
def names() -> dict[int, str]:
    """``{label: human name}`` for all 1000 classes."""
    return {label: name for label, (_, name) in enumerate(classes())}
