#!/usr/bin/env python3
"""Test folders -> test.npz only; train.npz is never touched.

    python prepare_only_test.py -ts orig wb texture styled

Class folders are resolved with the classes of train.npz in the output directory
when it exists. See docs/scripts.md, "prepare_only_test.py".
"""

from __future__ import annotations


from influence import cli


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="prepare_only_test.py",
        description="Rewrite test.npz from test folders, leaving train.npz as it is.",
        epilog="Example: python prepare_only_test.py -ts orig wb texture styled",
        allow_abbrev=False,
    )
    cli.add_prepare_arguments(parser)
    parser.add_argument("--image-size", type=cli.image_size, default=None, metavar="N|WxH",
                        help="resize every image to N x N or W x H (default: train.npz's size, else 224)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from influence.prepare import prepare_only_test

    written = prepare_only_test(tests=args.test, out_dir=args.out_dir, image_size=args.image_size,
                                strict=args.strict, workers=args.workers)
    print(f"Wrote {written['test']}")
    return 0


if __name__ == "__main__":
    cli.exit_process(cli.run(main))
