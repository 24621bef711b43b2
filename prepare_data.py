#!/usr/bin/env python3
"""Image folders -> train.npz (batched, shuffled, traceable training images) and test.npz.

    python prepare_data.py -tr train -ts orig wb texture styled -bs 150

See docs/scripts.md for the folder layout and labels, docs/formats.md for the archive format.
"""

from __future__ import annotations

import argparse

from influence import cli

# One stored batch is held in memory while the archive is written.
MAX_BATCH_BYTES = 4 << 30


class AmbiguousOption(argparse.Action):
    """``-b``: calculate.py's Hessian minibatch; argparse would otherwise take it for ``-bs``."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not an option of prepare_data.py (calculate.py's -b is its Hessian "
                     f"minibatch); the images per stored batch are -bs/--archive-batch-size")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="prepare_data.py",
        description="Turn a train folder (one sub-folder per class, named by ImageNet WordNet id or anything) "
        "and test folders into train.npz and test.npz for calculate.py.",
        epilog="Example: python prepare_data.py -tr train -ts orig wb texture styled -bs 150",
        # No abbreviations: "-b" is calculate.py's Hessian minibatch, not the stored batch size.
        allow_abbrev=False,
    )
    parser.add_argument("-tr", "--train", required=True, metavar="FOLDER",
                        help="train folder: one sub-folder per class (ImageNet wnids, or names in natural order)")
    cli.add_prepare_arguments(parser)
    parser.add_argument("-bs", "--archive-batch-size", "--batch-size", dest="archive_batch_size",
                        type=cli.whole_number, default=150, metavar="N",
                        help="training images per batch stored in train.npz (default 150); a batch never mixes "
                        "labels. Not calculate.py's -b/--batch-size")
    parser.add_argument("-b", action=AmbiguousOption, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=cli.image_size, default=(224, 224), metavar="N|WxH",
                        help="resize every image to N x N, or W wide x H high, e.g. 64x48 (default 224)")
    parser.add_argument("--seed", type=cli.whole_number, default=0,
                        help="seed of the shuffle of the training images within each label (default 0)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    height, width = args.image_size
    if args.archive_batch_size * height * width * 3 > MAX_BATCH_BYTES:
        parser.error(f"argument -bs/--archive-batch-size: {args.archive_batch_size} images of "
                     f"{width}x{height} make a batch over {MAX_BATCH_BYTES >> 30} GiB, which is held in memory; "
                     f"use a smaller batch (default 150)")
    from influence.prepare import prepare_data

    written = prepare_data(train=args.train, tests=args.test, out_dir=args.out_dir, image_size=args.image_size,
                           batch_size=args.archive_batch_size, seed=args.seed, strict=args.strict,
                           workers=args.workers)
    print(f"Wrote {written['train']} and {written['test']}")
    return 0


if __name__ == "__main__":
    cli.exit_process(cli.run(main))
