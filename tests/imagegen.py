"""Generated image folders for the tests: small, deterministic, class-dependent.

Each class gets a base colour so that a tiny model can learn the classes, plus
per-image noise so that no two images are equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def class_colour(index: int) -> np.ndarray:
    """A distinct RGB colour per class index, (3,) float in [40, 215]."""
    rng = np.random.default_rng(1000 + index)
    return rng.uniform(40, 215, size=3)


def image_array(class_index: int, image_index: int, size=(16, 16)) -> np.ndarray:
    """(H, W, 3) uint8: the class colour plus deterministic noise."""
    height, width = size
    rng = np.random.default_rng([class_index, image_index])
    pixels = class_colour(class_index) + rng.normal(0, 25, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray, mode: str = "RGB") -> Path:
    """Write ``pixels`` (H, W, 3) uint8 to ``path`` in Pillow ``mode``; format from the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def make_class_folders(
    root: Path,
    counts: dict[str, int],
    *,
    size=(16, 16),
    suffix: str = ".png",
    class_indices: dict[str, int] | None = None,
) -> Path:
    """Write ``counts[name]`` images into ``root/name/`` for every class name.

    ``class_indices`` maps a folder name to the class whose colour it gets
    (default: the folder's position in ``counts``), so a test folder named
    ``"3"`` can hold images that look like train class ``n0000003``.
    """
    root = Path(root)
    for position, (name, count) in enumerate(counts.items()):
        colour_class = position if class_indices is None else class_indices[name]
        for i in range(count):
            write_image(root / name / f"img_{i:04d}{suffix}", image_array(colour_class, i, size))
    return root
