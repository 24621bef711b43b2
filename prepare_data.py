#!/usr/bin/env python3
"""Image folders -> train.npz (batched, shuffled, traceable training images) and test.npz.

    python prepare_data.py -tr train -ts orig wb texture styled -bs 150

See docs/scripts.md for the folder layout and labels, docs/formats.md for the archive format.
"""

from __future__ import annotations

import argparse
import signal
import sys

from influence import cli


def image_size(text: str) -> tuple[int, int]:
    from influence.prepare import parse_image_size

    try:
        return parse_image_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared with prepare_only_test.py."""
    parser.add_argument("-ts", "--test", nargs="+", required=True, metavar="FOLDER",
                        help="test folders, each with class folders named by label index (779) or train class name")
    parser.add_argument("-o", "--out-dir", default=".", metavar="DIR",
                        help="where train.npz and test.npz go (default: the current directory)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable image instead of skipping it with a warning")
    parser.add_argument("--workers", type=whole_number, default=None, metavar="N",
                        help="decoding processes (default: all cores)")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="prepare_data.py",
        description="Turn a train folder (one sub-folder per class, named by ImageNet WordNet id or anything) "
        "and test folders into train.npz and test.npz for calculate.py.",
        epilog="Example: python prepare_data.py -tr train -ts orig wb texture styled -bs 150",
    )
    parser.add_argument("-tr", "--train", required=True, metavar="FOLDER",
                        help="train folder: one sub-folder per class (ImageNet wnids, or names in natural order)")
    add_common_arguments(parser)
    parser.add_argument("-bs", "--batch-size", type=whole_number, default=150, metavar="N",
                        help="training images per stored batch (default 150); a batch never mixes labels")
    parser.add_argument("--image-size", type=image_size, default=(224, 224), metavar="N|WxH",
                        help="resize every image to N x N, or W wide x H high, e.g. 64x48 (default 224)")
    parser.add_argument("--seed", type=whole_number, default=0,
                        help="seed of the shuffle of the training images within each label (default 0)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # A batch scheduler's SIGTERM cleans up like Ctrl-C: partial files go, previous archives stay.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from influence.prepare import prepare_data

    written = prepare_data(train=args.train, tests=args.test, out_dir=args.out_dir, image_size=args.image_size,
                           batch_size=args.batch_size, seed=args.seed, strict=args.strict, workers=args.workers)
    print(f"Wrote {written['train']} and {written['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
