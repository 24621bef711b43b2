"""Image sizes as the user writes them: ``224`` (square) or ``64x48`` (width x height).

Arrays and archives hold sizes as (H, W), the order of an image array's axes; the
command line and every message use the photographer's width x height. These two
functions are the only place the two orders meet.
"""

from __future__ import annotations


def parse_image_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"64x48"`` (width x height) -> (48, 64) = (H, W)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdecimal() for part in parts):
        raise ValueError(f"image size {text!r} is not N or WIDTHxHEIGHT (e.g. 224 or 64x48)")
    width, height = (int(parts[0]), int(parts[-1]))
    if width < 1 or height < 1:
        raise ValueError(f"image size {text!r} must be at least 1x1")
    return height, width


def format_image_size(image_size, *, short: bool = True) -> str:
    """(H, W) -> ``"64x48"`` (width x height), as ``--image-size`` takes it; a square size is
    ``"224"`` when ``short``, ``"224x224"`` otherwise (for messages)."""
    height, width = (int(n) for n in image_size)
    return str(width) if short and width == height else f"{width}x{height}"
