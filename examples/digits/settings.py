"""What a demo run depends on, and the names of what it writes under ``--out``."""

from __future__ import annotations

from dataclasses import dataclass

NUM_CLASSES = 10
TEST_FOLDERS = ("orig", "noisy")

# What the demo writes under --out; only these are ever deleted by a re-run.
DATA_DIR = "data"
MODEL_FILE = "model.keras"
FLIPPED_FILE = "flipped.json"
SETTINGS_FILE = "demo_settings.json"
REPORT_FILE = "report.json"
CALC_DIR = "calc_output"
ARCHIVES = ("train.npz", "test.npz")


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run depends on; a change of any of these redoes the demo's files."""

    train_per_class: int | None = None  # None: every digit scan not used for testing
    test_per_class: int = 5  # test scans per digit in each test folder
    flip_fraction: float = 0.05  # share of training images put in a wrong digit's folder
    image_size: int = 16  # the 8x8 scans are upscaled to image_size x image_size
    noise: float = 0.35  # std of the Gaussian noise of the "noisy" folder, as a share of 255
    epochs: int = 30
    depth: int | None = None  # LiSSA depth, calculate.py -i; None: calculate.py's default
    batch_size: int | None = None  # calculate.py -b; None: calculate.py's default
    top: int = 5  # calculate.py --top, and the k of the report's top-k harmful images
    seed: int = 0
