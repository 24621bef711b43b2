"""Image files -> (H, W, 3) uint8 RGB arrays, decoded in parallel in input order.

Whatever Pillow opens is accepted: JPEG (incl. CMYK), PNG (palette, alpha,
16-bit), greyscale, BMP, GIF (first frame), WebP, TIFF. The EXIF orientation
is applied, transparency is composited over white, 16-bit greyscale is scaled
to 8 bits, and the result is resized (bilinear) to the target size unless it
already has it.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from influence import interrupts

# Suffixes (lower case) of the files taken as images; everything else is ignored.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
})
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_EXIF_ORIENTATION = 0x0112
# Images handed to a worker at a time, and chunks in flight per worker: enough
# to hide the inter-process overhead, few enough to keep memory flat.
CHUNK = 8
CHUNKS_PER_WORKER = 2


@dataclass
class Decoded:
    """The result for one file: ``image`` (H, W, 3) uint8, or ``None`` and the ``error``."""

    path: Path
    image: np.ndarray | None
    error: str | None = None


def is_image_file(name: str) -> bool:
    """An image by its name: a known suffix and not hidden (``._x.jpg`` is macOS metadata)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (a white image); scale instead.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: the image at ``path`` in RGB at ``image_size`` = (H, W)."""
    height, width = image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's per-file warnings would flood the console
        with Image.open(path) as image:
            image.seek(0)  # first frame of animations
            if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can identify"
    text = str(error).replace("\n", " ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def decode_one(path: Path, image_size: tuple[int, int]) -> Decoded:
    """Decode one file; a file that cannot be decoded gives ``Decoded(path, None, reason)``."""
    try:
        return Decoded(path, load_rgb(path, image_size))
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this file"
        return Decoded(path, None, _reason(error))


def _decode_chunk(paths: Sequence[Path], image_size: tuple[int, int]) -> list[Decoded]:
    return [decode_one(path, image_size) for path in paths]


def default_workers() -> int:
    """Every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def decode_images(paths: Iterable[Path], *, image_size: tuple[int, int], workers: int) -> Iterator[Decoded]:
    """Yield one :class:`Decoded` per path, in input order.

    ``workers > 1`` decodes in that many processes with a bounded number of
    chunks in flight, so memory stays at a few images per worker whatever the
    number of files; ``workers == 1`` decodes in this process.
    """
    paths = iter(paths)
    if workers <= 1:
        for path in paths:
            yield decode_one(path, image_size)
        return
    # Ctrl-C and SIGTERM, also when sent to the whole process group, are handled once, by
    # this process, which then stops the workers: they ignore both from their first instant.
    # Starting and stopping the pool is never interrupted halfway (a pool stopped before its
    # manager thread started would leave its workers running).
    with interrupts.deferred():
        pool = ProcessPoolExecutor(max_workers=workers, initializer=interrupts.ignore_in_worker)
    in_flight: deque = deque()
    try:
        while True:
            chunk = [path for _, path in zip(range(CHUNK), paths)]
            if chunk:
                with interrupts.deferred():  # the first submit forks the workers
                    in_flight.append(pool.submit(_decode_chunk, chunk, image_size))
            if in_flight and (not chunk or len(in_flight) >= workers * CHUNKS_PER_WORKER):
                yield from in_flight.popleft().result()
            elif not chunk:
                return
    finally:
        with interrupts.deferred():
            pool.shutdown(wait=True, cancel_futures=True)
