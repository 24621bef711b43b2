"""The harmful / useful figure: the test image first, then the training images in rank order."""

import base64
import io
import re
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from PIL import Image, ImageFont

from influence import figures
from influence.figures import Panel, plot_influence_row

COLOURS = [(0, 0, 255), (255, 0, 0), (0, 160, 0), (255, 200, 0), (160, 0, 160), (0, 200, 200)]
SVG = "{http://www.w3.org/2000/svg}"


def solid(colour, size=8):
    return np.tile(np.array(colour, dtype=np.uint8), (size, size, 1))


def figure_of(path, *, heading="Top 5 harmful", titles=None, train=None):
    """The test image in blue, then ``train`` images (default: solid COLOURS[1:])."""
    train = [solid(c) for c in COLOURS[1:]] if train is None else train
    titles = titles or [f"{-0.5 * (i + 1):+.3g}\n3/train_{i}.png" for i in range(len(train))]
    return plot_influence_row(path, heading=heading, test=Panel(solid(COLOURS[0]), "orig/x.png\nlabel 3"),
                              train=[Panel(image, title) for image, title in zip(train, titles)])


def pixels_of(path):
    with Image.open(path) as figure:
        return np.asarray(figure.convert("RGB")).astype(int)  # (height, width, 3)


def panel_columns(pixels):
    """Which columns the panels (images and frames) cover: those non-white in the row with the
    most non-white pixels, a row through every solid-coloured image."""
    ink = np.any(pixels < 250, axis=2)  # (height, width)
    return ink[int(np.argmax(ink.sum(axis=1)))], ink


def runs(columns):
    """[(first, last)] of each stretch of True in ``columns``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], columns.astype(int), [0]])))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def test_panels_appear_left_to_right_with_their_images(tmp_path):
    path = figure_of(tmp_path / "harmful_1.png")
    pixels = pixels_of(path)
    height, width, _ = pixels.shape
    assert width / height > 3  # one row
    # The first x at which each panel's colour appears, scanning the figure's middle rows.
    middle = pixels[height // 3: 2 * height // 3]
    first_x = []
    for colour in COLOURS:
        match = np.all(np.abs(middle - np.array(colour)) <= 8, axis=2).any(axis=0)
        assert match.sum() > width / 20, f"panel of colour {colour} missing"
        first_x.append(int(np.argmax(match)))
    assert first_x == sorted(first_x)  # test image, then ranks 1..5 from left to right
    # The test image framed in matplotlib's tab:blue (#1f77b4) on all four sides, no other panel.
    frame = np.all(np.abs(pixels - np.array((0x1F, 0x77, 0xB4))) <= 8, axis=2)
    columns, rows = np.flatnonzero(frame.any(axis=0)), np.flatnonzero(frame.any(axis=1))
    assert columns[-1] < first_x[1] and frame[:, columns[0]].sum() > height / 3 and frame[rows[0]].sum() > width / 8
    assert not any(path.parent.glob(".*tmp-*"))  # written atomically, nothing left behind


def test_svg_has_one_image_per_panel_in_rank_order_and_its_texts(tmp_path):
    path = figure_of(tmp_path / "useful_1.svg", heading="Top 5 useful <for> label 3 & more")
    root = ElementTree.parse(path).getroot()
    images = root.findall(f".//{SVG}image")
    assert len(images) == len(COLOURS)
    for image, colour in zip(sorted(images, key=lambda e: float(e.get("x"))), COLOURS):
        href = image.get("{http://www.w3.org/1999/xlink}href") or image.get("href")
        with Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))) as embedded:
            assert embedded.size == (int(image.get("width")), int(image.get("height")))  # shown at its own size
            assert embedded.width > 8 * 10  # the 8x8 image scaled up to its tile, not left to the viewer
            assert np.all(np.asarray(embedded.convert("RGB")) == colour)
    checker = np.kron(np.indices((4, 4)).sum(axis=0) % 2, np.ones((3, 3), dtype=int))[..., None] * 255  # (12, 12, 1)
    blocks = figure_of(tmp_path / "blocks.svg", train=[np.repeat(checker, 3, axis=2).astype(np.uint8)])
    href = ElementTree.parse(blocks).getroot().findall(f".//{SVG}image")[1].get("{http://www.w3.org/1999/xlink}href")
    with Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))) as embedded:
        values, counts = np.unique(np.asarray(embedded.convert("L")), return_counts=True)
    assert list(values) == [0, 255] and abs(counts[0] - counts[1]) < 0.1 * counts.sum()  # blocky: no blends
    texts = [text.text for text in root.iter(f"{SVG}text")]
    assert "Top 5 useful <for> label 3 & more" in texts
    for expected in ["orig/x.png", "label 3", "test image", "-0.5", "3/train_0.png", "-2.5", "3/train_4.png"]:
        assert expected in texts


def test_pdf_is_a_page_at_150_dpi_and_jpeg_opens(tmp_path):
    width, height = Image.open(figure_of(tmp_path / "harmful_1.png")).size
    pdf = figure_of(tmp_path / "harmful_1.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    box = [float(v) for v in re.search(rb"/MediaBox \[([\d. ]+)\]", pdf).group(1).split()]
    assert box[2:] == pytest.approx([width * 72 / 150, height * 72 / 150], abs=0.5)  # points of a 150 dpi raster
    with Image.open(figure_of(tmp_path / "harmful_1.jpg")) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.size == (width, height)
        blue = np.all(np.abs(np.asarray(jpeg.convert("RGB")).astype(int) - COLOURS[0]) <= 24, axis=2)
        assert blue.sum() > 0.05 * width * height / 6  # the test image is there


def test_long_heading_and_titles_stay_inside_their_room(tmp_path):
    short = pixels_of(figure_of(tmp_path / "short.png"))
    heading = " ".join(["influence"] * 20) + " " + "x" * 100  # 299 characters, one word of 100
    long_id = "d" * 180 + "/train_00001.png"  # 196 characters
    titles = [f"{-0.5 * i:+.3g}\n{long_id}" for i in range(5)]
    for name, kwargs in [("heading", {"heading": heading}), ("titles", {"heading": "", "titles": titles})]:
        pixels = pixels_of(figure_of(tmp_path / f"{name}.png", **kwargs))
        assert pixels.shape[1] == short.shape[1]  # the width that 6 panels need, however long the text
        panels, ink = panel_columns(pixels)
        covered = np.flatnonzero(panels)
        assert covered[-1] - covered[0] > 0.9 * pixels.shape[1]
        # No ink in the margins left of the first panel and right of the last.
        assert not ink[:, :covered[0]].any() and not ink[:, covered[-1] + 1:].any(), name
        if name == "titles":  # no heading: every ink outside a panel's columns would be a title spilling
            assert not ink[:, ~panels].any()
    titles_svg = ElementTree.parse(figure_of(tmp_path / "titles.svg", heading="", titles=titles)).getroot()
    shown = [text.text for text in titles_svg.iter(f"{SVG}text") if "train_00001.png" in text.text]
    assert len(shown) == 5 and all(t.endswith(long_id[-20:]) and len(t) < len(long_id) for t in shown)


def test_degenerate_figure_is_the_test_image_alone(tmp_path):
    reason = "No ranking: every score is exactly zero (s_test underflowed, e.g. a --scale so large that 1/scale vanishes)"
    pixels = pixels_of(figure_of(tmp_path / "harmful_1.png", heading=reason, train=[]))
    panels, ink = panel_columns(pixels)
    assert len(runs(panels)) == 1  # one panel
    covered = np.flatnonzero(panels)
    assert not ink[:, :covered[0]].any() and not ink[:, covered[-1] + 1:].any()  # the reason wraps inside
    middle = pixels[:, covered[len(covered) // 2]]
    assert np.all(np.abs(middle - COLOURS[0]) <= 8, axis=1).sum() > pixels.shape[0] / 3  # the test image


def test_accented_titles_are_drawn_where_the_system_font_is_installed(tmp_path):
    try:
        ImageFont.truetype(figures.SYSTEM_FONT, 16)
    except OSError:
        pytest.skip(f"{figures.SYSTEM_FONT} is not installed")
    # The same figure with an accented letter, then with a character no font has (drawn as a box):
    # a font without the accented letter would draw both alike.
    accented, missing = (pixels_of(figure_of(tmp_path / f"{name}.png", titles=[f"+1\n3/{char}.png"] * 5))
                         for name, char in (("accented", "\u00e9"), ("missing", "\U0010ffff")))
    assert accented.shape == missing.shape and np.any(accented != missing)


@pytest.fixture
def fresh_fonts():
    figures._font.cache_clear()
    yield
    figures._font.cache_clear()


def test_without_freetype_the_bitmap_font_writes_the_figure(tmp_path, monkeypatch, fresh_fonts):
    monkeypatch.setattr(figures.features, "check", lambda feature: False)
    monkeypatch.setattr(figures.ImageFont, "load_default", ImageFont.load_default_imagefont)
    path = figure_of(tmp_path / "harmful_1.png", titles=[f"+1\n3/\u00e9\u65e5{i}.png" for i in range(5)])
    assert isinstance(figures._font(figures.TITLE_SIZE).font, ImageFont.ImageFont)  # the bitmap font was used
    panels, ink = panel_columns(pixels_of(path))
    assert len(runs(panels)) == 6
    first, last = runs(panels)[0]
    rows = np.flatnonzero(ink[:, first:last + 1].any(axis=1))
    assert np.diff(rows).max() > 1  # the test image's title apart above it, or its label below
