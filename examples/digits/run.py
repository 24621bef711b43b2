"""The demo's run: settings from the command line, the data and the model, the three
scripts run as a user runs them, then the report.

Everything goes under one directory (``--out``, default ``demo/``). Running the
demo again with the same settings reuses the data and the model and lets
``calculate.py`` resume; other settings redo the demo's files cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Sequence

from examples.digits.data import folder_ids, split_scans, write_demo_data
from examples.digits.report import build_report, format_report
from examples.digits.settings import (
    ARCHIVES,
    CALC_DIR,
    DATA_DIR,
    FLIPPED_FILE,
    MODEL_FILE,
    REPORT_FILE,
    SETTINGS_FILE,
    TEST_FOLDERS,
    DemoSettings,
)
from examples.digits.train import train_classifier
from influence import cli
from influence.errors import UserError
from influence.outputs import remove_stale_temporaries, write_json

ROOT = Path(__file__).resolve().parents[2]  # the checkout: where the three scripts live


class StepFailed(Exception):
    """One of the three scripts exited with a non-zero status."""


def run_script(script: str, args: Sequence[str]) -> float:
    """Run ``python <script> <args>`` from the checkout as a user would; stream its output.

    Returns the wall time in seconds.
    """
    relative = os.path.relpath(ROOT / script)
    shown = str(ROOT / script) if relative.startswith("..") else relative  # as typed from here
    print(f"\n$ python {shown} {' '.join(args)}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(ROOT / script), *args])
    if completed.returncode != 0:
        raise StepFailed(f"{script} exited with status {completed.returncode}")
    return time.perf_counter() - started


def owned_paths(out_dir: Path) -> list[Path]:
    """Everything the demo writes under ``out_dir``; a re-run deletes nothing else."""
    names = [DATA_DIR, MODEL_FILE, FLIPPED_FILE, SETTINGS_FILE, REPORT_FILE, CALC_DIR, *ARCHIVES]
    return [out_dir / name for name in names]


def reuse_or_clear(out_dir: Path, settings: DemoSettings, *, fresh: bool) -> bool:
    """True when ``out_dir`` holds this demo's complete data and model for these settings.

    Otherwise the demo's own files there are removed, so that no result of other
    settings (or of another model) is resumed by ``calculate.py``. The settings file
    marks a directory as the demo's: without it, nothing is deleted, and names the
    demo would overwrite (someone's own ``train.npz``, say) make it refuse.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a directory")
    settings_path = out_dir / SETTINGS_FILE
    if not settings_path.is_file():
        taken = [path.name for path in owned_paths(out_dir) if path.exists()]
        if taken:
            raise UserError(
                f"--out {out_dir} already holds {', '.join(taken)} but no {SETTINGS_FILE}, so the demo did not "
                "write them; give another --out"
            )
        return False
    recorded = json.loads(settings_path.read_text())
    complete = recorded.pop("complete", False) and all((out_dir / name).exists() for name in (DATA_DIR, MODEL_FILE, FLIPPED_FILE))
    recorded.pop("training", None)  # what training reported, not a setting
    if not fresh and complete and recorded == asdict(settings):
        return True
    for path in owned_paths(out_dir):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return False


def build_parser() -> cli.ArgumentParser:
    defaults = DemoSettings()
    parser = cli.ArgumentParser(
        prog="demo.py",
        description="The whole pipeline on scikit-learn's handwritten digits, with label errors "
        "planted on purpose: does influence find them?",
    )
    parser.add_argument("--out", default="demo", type=Path, help="directory for everything the demo writes (default: demo)")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class,
                        help="training scans per digit (default: all not used for testing, about 175)")
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class,
                        help=f"test scans per digit in each test folder (default {defaults.test_per_class})")
    parser.add_argument("--flip-fraction", type=float, default=defaults.flip_fraction,
                        help=f"share of training images given a wrong label (default {defaults.flip_fraction})")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help=f"side of the upscaled scans in pixels (default {defaults.image_size})")
    parser.add_argument("--noise", type=float, default=defaults.noise,
                        help=f"noise std of the 'noisy' test folder, share of 255 (default {defaults.noise})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"training epochs (default {defaults.epochs})")
    parser.add_argument("-i", "--depth", type=int, default=defaults.depth, help="LiSSA depth (default: calculate.py's)")
    parser.add_argument("-b", "--batch-size", type=int, default=defaults.batch_size,
                        help="calculate.py batch size (default: calculate.py's)")
    parser.add_argument("--top", type=int, default=defaults.top,
                        help=f"k of the top-k harmful images, in the figures and the report (default {defaults.top})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed of every random choice (default {defaults.seed})")
    parser.add_argument("--fresh", action="store_true", help="redo everything, even when the settings are unchanged")
    return parser


def settings_from(args) -> DemoSettings:
    """The run settings, checked: each bad value is one line naming it."""
    positive = {
        "--test-per-class": args.test_per_class,
        "--epochs": args.epochs,
        "--depth": args.depth,
        "--batch-size": args.batch_size,
        "--top": args.top,
    }
    for option, value in positive.items():
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: must be at least 1")
    if args.train_per_class is not None and args.train_per_class < 2:
        raise UserError(f"--train-per-class {args.train_per_class}: must be at least 2")
    if not 0 < args.flip_fraction < 1:
        raise UserError(f"--flip-fraction {args.flip_fraction}: must be between 0 and 1 (exclusive)")
    if args.image_size < 8:
        raise UserError(f"--image-size {args.image_size}: must be at least 8 (the scans are 8x8)")
    if args.noise < 0:
        raise UserError(f"--noise {args.noise}: must not be negative")
    settings = DemoSettings(**{field.name: getattr(args, field.name) for field in fields(DemoSettings)})
    from sklearn.datasets import load_digits

    # Before anything is written: are there enough scans of every digit?
    train_index, _ = split_scans(
        load_digits().target,
        train_per_class=settings.train_per_class,
        test_per_class=settings.test_per_class,
        seed=settings.seed,
    )
    if settings.top > len(train_index):
        raise UserError(f"--top {settings.top}: more than the {len(train_index)} training images")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    out_dir: Path = args.out
    data_dir, calc_dir = out_dir / DATA_DIR, out_dir / CALC_DIR
    timings: dict[str, float] = {}

    reused = reuse_or_clear(out_dir, settings, fresh=args.fresh)
    started = time.perf_counter()
    if reused:
        print(f"Reusing the digit folders and the model in {out_dir} (same settings; --fresh redoes them)")
        training = json.loads((out_dir / SETTINGS_FILE).read_text()).get("training", {})
    else:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--out {out_dir}: cannot create it ({error.strerror})") from None
        remove_stale_temporaries(out_dir)  # a killed run's half-saved model, say
        # First, so that a run interrupted from here on is known as the demo's and redone.
        write_json(out_dir / SETTINGS_FILE, {**asdict(settings), "complete": False})
        print(f"Write the digit scans to {data_dir}/{{train,orig,noisy}}...", end=" ", flush=True)
        flipped_record = write_demo_data(out_dir, settings)
        write_json(out_dir / FLIPPED_FILE, flipped_record)
        print(f"finished: {flipped_record['n_train']} training images, {flipped_record['n_flipped']} of them "
              f"in a wrong digit's folder")
        print(f"Train a small CNN on {data_dir / 'train'} ({settings.epochs} epochs)...", end=" ", flush=True)
        training = train_classifier(data_dir / "train", out_dir / MODEL_FILE, epochs=settings.epochs, seed=settings.seed)
        print(f"finished: {training['parameters']} parameters, training accuracy "
              f"{training['train_accuracy_on_given_labels']:.3f} on the labels as given -> {out_dir / MODEL_FILE}")
        write_json(out_dir / SETTINGS_FILE, {**asdict(settings), "complete": True, "training": training})
    timings["data and model"] = time.perf_counter() - started
    flipped_record = json.loads((out_dir / FLIPPED_FILE).read_text())

    test_dirs = [str(data_dir / folder) for folder in TEST_FOLDERS]
    size = str(settings.image_size)
    try:
        timings["prepare_data.py"] = run_script(
            "prepare_data.py",
            ["-tr", str(data_dir / "train"), "-ts", *test_dirs, "-o", str(out_dir), "--image-size", size,
             "--seed", str(settings.seed)],
        )
        timings["prepare_only_test.py"] = run_script(
            "prepare_only_test.py", ["-ts", *test_dirs, "-o", str(out_dir)]  # image size: train.npz's
        )
        timings["calculate.py"] = run_script(
            "calculate.py",
            ["--train", str(out_dir / "train.npz"), "--test", str(out_dir / "test.npz"),
             "--model", str(out_dir / MODEL_FILE), "--preprocess", "unit", "--all-labels",
             "--output-dir", str(calc_dir),
             *(["-i", str(settings.depth)] if settings.depth is not None else []),
             *(["-b", str(settings.batch_size)] if settings.batch_size is not None else []),
             "--top", str(settings.top), "--seed", str(settings.seed)],
        )
    except StepFailed as failure:
        print(f"demo.py: {failure}; the demo stops here (its output above says why)", file=sys.stderr)
        return 1

    train_ids = folder_ids(data_dir / "train")
    test_counts = {folder: len(list((data_dir / folder).glob("*/*.png"))) for folder in TEST_FOLDERS}
    report = build_report(
        calc_dir=calc_dir, flipped_record=flipped_record, train_ids=train_ids, test_counts=test_counts,
        top=settings.top,
    )
    report["settings"] = asdict(settings)
    report["training"] = training
    report["timings_s"] = {step: round(seconds, 1) for step, seconds in timings.items()}
    write_json(out_dir / REPORT_FILE, report)
    print(format_report(report, out_dir=out_dir, calc_dir=calc_dir, timings=timings))
    return 0
