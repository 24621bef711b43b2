"""The harmful / useful figure: the test image first, then the training images in rank order."""

import numpy as np
from PIL import Image

from influence.figures import Panel, plot_influence_row

COLOURS = [(0, 0, 255), (255, 0, 0), (0, 160, 0), (255, 200, 0), (160, 0, 160), (0, 200, 200)]


def solid(colour):
    return np.tile(np.array(colour, dtype=np.uint8), (8, 8, 1))


def test_panels_appear_left_to_right_with_their_images(tmp_path):
    path = plot_influence_row(
        tmp_path / "harmful_1.png", heading="Top 5 harmful",
        test=Panel(solid(COLOURS[0]), "test"), train=[Panel(solid(c), f"{i}") for i, c in enumerate(COLOURS[1:])],
    )
    with Image.open(path) as figure:
        pixels = np.asarray(figure.convert("RGB")).astype(int)
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
    assert not any(path.parent.glob(".*tmp-*"))  # written atomically, nothing left behind
