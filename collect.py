#!/usr/bin/env python3
"""Gather an output tree of calculate.py into one table and rebuild the pages to browse it.

Writes <output_dir>/results.h5 from the parts that sharded runs left in <output_dir>/parts/
(checking that they share their settings and that every planned test image is there exactly
once), or from the per-image records when there are no parts, then <output_dir>/index.html
and one page per test folder under <output_dir>/html/. See docs/results-store.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from influence import cli


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="collect.py",
        description="Assemble calculate.py's results into <output_dir>/results.h5 and rebuild <output_dir>/index.html.",
        epilog="Example: python collect.py calc_output --train train.npz --test test.npz",
    )
    parser.add_argument("output_dir", type=Path, help="calculate.py's --output-dir")
    parser.add_argument("--train", type=Path, default=Path("train.npz"), help="the run's train archive (default ./train.npz)")
    parser.add_argument("--test", type=Path, default=Path("test.npz"), help="the run's test archive (default ./test.npz)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="assemble even if planned test images have no result yet (listed as missing)")
    parser.add_argument("--from-records", action="store_true",
                        help="build from every per-image record in the tree, ignoring the parts")
    parser.add_argument("--top", type=positive_int, default=5, help="training images per list on the pages (default 5)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from influence import archive, pages, store
    from influence.errors import UserError

    if not args.output_dir.is_dir():
        raise UserError(f"{args.output_dir} is not a folder (give calculate.py's --output-dir)")
    with archive.open_train(args.train) as train, archive.open_test(args.test) as test:
        store.assemble(args.output_dir, train=train, test=test, allow_missing=args.allow_missing,
                       from_records=args.from_records, echo=print)
        front = pages.build(args.output_dir, train=train, test=test, top=args.top)
    print(f"Browse the results: {front}")
    return 0


if __name__ == "__main__":
    cli.exit_process(cli.run(main))
