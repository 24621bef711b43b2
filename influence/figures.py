"""The harmful / useful figures: a test image beside its most influential training images.

One row of tiles, ``TILE`` pixels wide: the test image first, framed in blue and marked
"test image" underneath, then the training images in rank order, each in a thin dark frame.
Every panel's title (a few short lines) stands above its tile and the heading is centred on
top. Images of any size are fitted, frame included, into a ``TILE`` x ``TILE`` square keeping their aspect, with
nearest-neighbour resampling, so small images (8x8 digits) show their pixels as blocks; the row
is as tall as its tallest image.

Text never leaves the figure: the heading wraps at the figure's width, and a title line wider
than its tile keeps its end (the file name) behind an ellipsis (both with room to spare for the
SVG's font, ``FONT_SPREAD``).

Formats (from the path's suffix):

- ``png``, ``jpg``: the raster drawing (``DPI`` pixels per inch).
- ``pdf``: that raster drawing as one PDF page at ``DPI`` (JPEG-compressed, as Pillow writes
  PDF images): the text is pixels, not selectable.
- ``svg``: the same layout with vector text (``<text>``, font-family sans-serif, each line's
  ``textLength`` pinned to the width measured for the raster; a viewer that ignores it still
  has ``FONT_SPREAD`` room) and each panel embedded as a PNG at its tile size, rendered
  pixelated when zoomed.

Both drawings come from one :func:`_layout` (positions of tiles, frames and text lines), so
they cannot disagree. The text is set in DejaVu Sans where the system has it (``SYSTEM_FONT``,
found by Pillow in the usual font folders; it covers accented Latin, Greek and Cyrillic), else in
Pillow's built-in font (Aileron), which covers ASCII and a few symbols: other characters then
show as a box in the raster formats (the SVG keeps them). Without FreeType, Pillow's small
bitmap font is used instead.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from influence.outputs import atomic_path

SAVE_FORMATS = ("png", "pdf", "svg", "jpg")

DPI = 150  # pixels per inch of the raster formats; the sizes below are pixels at this scale
TILE = 360  # side of the square each image (with its frame) is fitted into
GAP = 30  # between neighbouring tiles
MARGIN = 15  # around everything
HEADING_SIZE, TITLE_SIZE, LABEL_SIZE = 20, 16, 18  # font sizes (px): about 9, 7.5 and 8.5 pt at DPI
HEADING_GAP, TITLE_GAP, LABEL_GAP = 12, 6, 6  # below the heading, below a title, above "test image"
TEST_FRAME = ("#1f77b4", 4)  # (colour, width): matplotlib's tab:blue, 2 pt
TRAIN_FRAME = ("#000000", 2)
FRAME_ROOM = max(TEST_FRAME[1], TRAIN_FRAME[1])  # kept free around every image in its tile
# Lines are fitted into 1/FONT_SPREAD of their room: an SVG viewer that ignores textLength sets
# them in its own sans-serif, up to this much wider than the font they were measured in (DejaVu
# Sans against Pillow's built-in font: 1.02-1.19x).
FONT_SPREAD = 1.2
SYSTEM_FONT = "DejaVuSans.ttf"  # preferred where installed (most Linux systems): wide character coverage

# zlib level 1 instead of 6: the PNG written ~3x faster, ~2% larger (6 noise images, 1.1 MB)
_RASTER_OPTIONS = {
    "png": {"format": "PNG", "compress_level": 1, "dpi": (DPI, DPI)},
    "jpg": {"format": "JPEG", "quality": 90, "dpi": (DPI, DPI)},  # 90: frames and text without halos
    "pdf": {"format": "PDF", "resolution": DPI, "quality": 90},  # Pillow stores the page as a JPEG
}
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # no XML 1.0 document may hold these


@dataclass(frozen=True)
class Panel:
    image: np.ndarray  # (H, W, 3) uint8, as stored on disk
    title: str


@dataclass(frozen=True)
class _Font:
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    size: int
    ascent: int  # from the top of a line to its baseline
    line_height: int
    ellipsis: str
    latin1_only: bool  # the bitmap font cannot even measure other characters

    def printable(self, text: str) -> str:
        return text.encode("latin-1", "replace").decode("latin-1") if self.latin1_only else text

    def width(self, text: str) -> int:
        return math.ceil(self.font.getlength(text))


@functools.lru_cache(maxsize=None)
def _font(size: int) -> _Font:
    if features.check("freetype2"):
        try:
            font = ImageFont.truetype(SYSTEM_FONT, size)
        except OSError:  # not installed: the built-in font, ASCII and a few symbols
            font = ImageFont.load_default(size=size)
        ascent, descent = font.getmetrics()
        return _Font(font, size, ascent, ascent + descent, "\u2026", latin1_only=False)
    font = ImageFont.load_default()  # a fixed-size bitmap font: smaller than asked, but legible
    bottom = font.getbbox("Ag")[3]
    return _Font(font, bottom, bottom, bottom + 3, "...", latin1_only=True)


@dataclass(frozen=True)
class _Line:
    """One line of text; ``top`` is the y of its line box, ``baseline`` that of its baseline."""

    text: str
    font: _Font
    left: int
    top: int
    width: int

    @property
    def baseline(self) -> int:
        return self.top + self.font.ascent


@dataclass(frozen=True)
class _Tile:
    """A panel's image, fitted, at (left, top), with a frame of ``frame`` pixels around it."""

    image: Image.Image
    left: int
    top: int
    colour: str
    frame: int

    @property
    def frame_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1 and y1 exclusive: the frame's outer edge."""
        return (self.left - self.frame, self.top - self.frame,
                self.left + self.image.width + self.frame, self.top + self.image.height + self.frame)


@dataclass(frozen=True)
class _Layout:
    width: int
    height: int
    tiles: list[_Tile]
    lines: list[_Line]


def _longest(fits: Callable[[int], bool], n: int) -> int:
    """The largest k in [0, n] with ``fits(k)``, for ``fits`` true up to some k and false after."""
    low, high = 0, n
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _shortened(text: str, font: _Font, width: int) -> str:
    """``text``, or an ellipsis and as much of its end as fits in ``width``."""
    if font.width(text) <= width:
        return text
    keep = _longest(lambda k: font.width(font.ellipsis + text[len(text) - k:]) <= width, len(text))
    return font.ellipsis + text[len(text) - keep:]


def _wrapped(text: str, font: _Font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width``: broken at spaces, a longer word broken anywhere."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.width(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.width(word) > width:
                cut = max(1, _longest(lambda k: font.width(word[:k]) <= width, len(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _fitted(image: np.ndarray, side: int) -> Image.Image:
    """``image`` (H, W, 3) uint8 scaled to fit a ``side`` x ``side`` square, aspect kept, blocky."""
    picture = Image.fromarray(np.asarray(image)).convert("RGB")
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.NEAREST)


def _centred(text: str, font: _Font, *, centre: float, top: int) -> _Line:
    width = font.width(text)
    return _Line(text, font, round(centre - width / 2), top, width)


def _layout(*, heading: str, panels: list[Panel]) -> _Layout:
    """Where everything goes: the one description that both the raster and the SVG draw."""
    heading_font, title_font, label_font = _font(HEADING_SIZE), _font(TITLE_SIZE), _font(LABEL_SIZE)
    width = 2 * MARGIN + len(panels) * TILE + (len(panels) - 1) * GAP
    lines = []
    top = MARGIN
    for text in _wrapped(heading_font.printable(heading), heading_font, int((width - 2 * MARGIN) / FONT_SPREAD)):
        if text:
            lines.append(_centred(text, heading_font, centre=width / 2, top=top))
        top += heading_font.line_height
    titles = [[_shortened(text, title_font, int(TILE / FONT_SPREAD))
               for text in title_font.printable(panel.title).split("\n")] for panel in panels]
    titles_bottom = top + HEADING_GAP + max(map(len, titles)) * title_font.line_height
    images = [_fitted(panel.image, TILE - 2 * FRAME_ROOM) for panel in panels]
    band_top = titles_bottom + TITLE_GAP  # the band of images, as tall as the tallest
    band_height = max(image.height for image in images) + 2 * FRAME_ROOM
    tiles = []
    for column, (title, image) in enumerate(zip(titles, images)):
        left = MARGIN + column * (TILE + GAP)
        for row, text in enumerate(title):  # bottom-aligned: the last line right above the band
            if text:
                lines.append(_centred(text, title_font, centre=left + TILE / 2,
                                      top=titles_bottom - (len(title) - row) * title_font.line_height))
        colour, frame = TEST_FRAME if column == 0 else TRAIN_FRAME
        tiles.append(_Tile(image, left + (TILE - image.width) // 2, band_top + (band_height - image.height) // 2,
                           colour, frame))
    label_top = tiles[0].frame_box[3] + LABEL_GAP
    lines.append(_centred("test image", label_font, centre=MARGIN + TILE / 2, top=label_top))
    height = max(band_top + band_height, label_top + label_font.line_height) + MARGIN
    return _Layout(width, height, tiles, lines)


def _raster(layout: _Layout) -> Image.Image:
    canvas = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(canvas)
    for tile in layout.tiles:
        canvas.paste(tile.image, (tile.left, tile.top))
        x0, y0, x1, y1 = tile.frame_box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=tile.colour, width=tile.frame)  # drawn inwards
    for line in layout.lines:
        draw.text((line.left, line.top), line.text, font=line.font.font, fill="black")
    return canvas


def _xml_text(text: str) -> str:
    """``text`` as XML character data (escaped here: xml.sax.saxutils would import urllib.request,
    ~40 ms of start-up)."""
    return _XML_INVALID.sub("?", text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _svg(layout: _Layout) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{layout.width}" height="{layout.height}" viewBox="0 0 {layout.width} {layout.height}">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for tile in layout.tiles:
        png = io.BytesIO()
        tile.image.save(png, format="PNG", compress_level=1)
        x0, y0, x1, y1 = tile.frame_box
        half = tile.frame / 2  # an SVG stroke is centred on its path
        parts += [
            f'<image x="{tile.left}" y="{tile.top}" width="{tile.image.width}" height="{tile.image.height}" '
            f'preserveAspectRatio="none" image-rendering="optimizeSpeed" style="image-rendering:pixelated" '
            f'xlink:href="data:image/png;base64,{base64.b64encode(png.getvalue()).decode("ascii")}"/>',
            f'<rect x="{x0 + half:g}" y="{y0 + half:g}" width="{x1 - x0 - tile.frame}" height="{y1 - y0 - tile.frame}" '
            f'fill="none" stroke="{tile.colour}" stroke-width="{tile.frame}"/>',
        ]
    for line in layout.lines:
        parts.append(
            f'<text x="{line.left + line.width / 2:g}" y="{line.baseline}" font-family="sans-serif" '
            f'font-size="{line.font.size}" text-anchor="middle" textLength="{line.width}" '
            f'lengthAdjust="spacingAndGlyphs" xml:space="preserve">{_xml_text(line.text)}</text>'
        )
    parts.append("</svg>\n")
    return "\n".join(parts)


def plot_influence_row(path: str | os.PathLike, *, heading: str, test: Panel, train: list[Panel]) -> Path:
    """Save the test image and ``train`` panels in one row to ``path`` (format from its suffix,
    one of ``SAVE_FORMATS``), atomically."""
    path = Path(path)
    file_format = path.suffix.lstrip(".").lower().replace("jpeg", "jpg")
    if file_format not in SAVE_FORMATS:
        raise ValueError(f"Cannot write a figure as {path.name!r}: its suffix must be one of {', '.join(SAVE_FORMATS)}")
    layout = _layout(heading=heading, panels=[test, *train])
    with atomic_path(path) as temporary:
        if file_format == "svg":
            temporary.write_text(_svg(layout), encoding="utf-8")
        else:
            _raster(layout).save(temporary, **_RASTER_OPTIONS[file_format])
    return path
