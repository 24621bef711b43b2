#!/usr/bin/env python3
"""Influence of every training image on every test image: figures and full score tables.

Reads train.npz and test.npz (from prepare_data.py), loads the classifier (VGG16 by
default), and for each test folder, label and test image writes, under
calc_output/<folder>/<label>/, harmful_<n>.<fmt>, useful_<n>.<fmt>, <n>.npy and <n>.json.
See the README for the sign convention, docs/method.md for how to pick depth, scale and damping.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from influence import cli
from influence.errors import UserError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _auto_or_number(text: str, *, auto, zero_allowed: bool):
    """``auto`` for the word 'auto', else a finite number > 0 (or >= 0 where ``zero_allowed``)."""
    if text == "auto":
        return auto
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 if zero_allowed else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither 'auto' nor a finite number {'>=' if zero_allowed else '>'} 0")
    return value


def ekfac_samples_value(text: str) -> int:
    """A whole number of training images, or 'all' (= 0: every image)."""
    if text == "all":
        return 0
    try:
        return cli.whole_number(text)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'all' nor a whole number >= 0") from None


def damping_value(text: str) -> float | str:
    return _auto_or_number(text, auto="auto", zero_allowed=True)


def scale_value(text: str) -> float | None:
    return _auto_or_number(text, auto=None, zero_allowed=False)


def build_parser() -> cli.ArgumentParser:
    from influence.figures import SAVE_FORMATS

    parser = cli.ArgumentParser(
        prog="calculate.py",
        description="For every test image: the training images that helped its prediction most (useful) "
        "and hurt it most (harmful), by influence functions (Koh & Liang, 2017).",
        epilog="Sign: score = s_test . grad L(z); positive = useful (removing z would raise the test loss), "
        "negative = harmful. Exit status: 0 done, 2 bad input, 3 some test images failed (their records say why; "
        "a rerun retries them), 130 interrupted. Example: python calculate.py -i 20 -b 8 -sf pdf",
    )
    lissa = parser.add_argument_group("LiSSA and scoring")
    lissa.add_argument(
        "--method", choices=("lissa", "cg", "ekfac"), default="lissa",
        help="lissa (default): stochastic, any size; cg: conjugate gradients on the full-batch Hessian, exact, "
        "for training sets whose full-batch product is cheap (docs/lissa.md); ekfac: Kronecker-factored "
        "Gauss-Newton curvature fitted once per training archive, then cheap for every test image "
        "(Dense and Conv2D layers; docs/ekfac.md)",
    )
    lissa.add_argument(
        "-i", "--depth", type=positive_int, default=None,
        help="LiSSA steps per chain (default 12 when deflated, 50 when not; docs/lissa.md)",
    )
    lissa.add_argument(
        "-b", "-bs", "--batch-size", type=positive_int, default=None,
        help="training minibatch per Hessian-vector product (default 64 for deflated LiSSA, else 8)",
    )
    lissa.add_argument(
        "--deflation", type=cli.whole_number, default=12, metavar="K",
        help="LiSSA: solve the top K eigen-directions of the Hessian exactly, from the run's Lanczos, and iterate "
        "on the rest (default 12; 0: plain LiSSA; off by itself when the basis would pass 1 GiB)",
    )
    lissa.add_argument(
        "--ekfac-samples", type=ekfac_samples_value, default=2000, metavar="N|all",
        help="ekfac: training images its factors are fitted on, at most, drawn from --seed (default 2000: the fit "
        "costs a forward and backward pass per image, and its statistics are averages that a few thousand "
        "images estimate well; 0 or 'all': every image)",
    )
    lissa.add_argument(
        "--score-batch-size", type=positive_int, default=32, help="training images per scoring pass (default 32)"
    )
    lissa.add_argument(
        "--damping", type=damping_value, default="auto", metavar="auto|D",
        help="the Hessian inverted is H + D*I; 'auto' (default): the least D that makes it positive definite "
        "with a margin, from the curvature range estimated once per run (ekfac: 0.1 x its mean eigenvalue)",
    )
    lissa.add_argument(
        "--scale", type=scale_value, default=None, metavar="auto|S",
        help="LiSSA scale, larger than the Hessian's top eigenvalue; 'auto' (default) estimates it once per run",
    )
    lissa.add_argument(
        "--repeat", type=positive_int, default=2,
        help="independent LiSSA chains averaged (default 2; two or more also measure the top-5's stability)",
    )
    lissa.add_argument(
        "--layers", default=None, metavar="NAMES",
        help="only these layers' weights, comma-separated (e.g. fc2,predictions); default: all trainable",
    )
    lissa.add_argument(
        "--last-layers", type=positive_int, default=None, metavar="K", help="only the last K layers with weights"
    )
    lissa.add_argument("--seed", type=cli.whole_number, default=0, help="seed of the random minibatches (default 0)")
    lissa.add_argument(
        "--feature-cache", choices=("auto", "on", "off"), default="auto",
        help="with --layers/--last-layers: compute the frozen layers below them once per image and keep the result "
        "in feature-cache/ beside the archive (auto: whenever a single tensor separates them; on: require it; "
        "off: run the whole model every time)",
    )
    lissa.add_argument(
        "--all-labels", action="store_true",
        help="score the whole training set, not only the training images of the test image's label",
    )

    data = parser.add_argument_group("input and output")
    data.add_argument("--train", type=Path, default=Path("train.npz"), help="train archive (default ./train.npz)")
    data.add_argument("--test", type=Path, default=Path("test.npz"), help="test archive (default ./test.npz)")
    data.add_argument(
        "--output-dir", type=Path, default=Path("calc_output"), help="output root (default ./calc_output)"
    )
    data.add_argument(
        "-sf", "--save-format", choices=SAVE_FORMATS, default="png", help="figure format (default png)"
    )
    data.add_argument("--top", type=positive_int, default=5, help="training images per figure (default 5)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", type=Path, default=None, help="a saved Keras classifier (.keras or .h5); default VGG16")
    model.add_argument(
        "--weights", type=Path, default=None,
        help="VGG16 weights file (default: Keras's cache, ~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels.h5)",
    )
    model.add_argument(
        "--outputs", choices=("auto", "logits", "probabilities"), default="auto",
        help="what the model outputs: logits, or probabilities after a softmax; 'auto' (default) reads it off "
        "the model and refuses a model where it cannot tell",
    )
    model.add_argument(
        "--preprocess", default=None,
        help="input preprocessing: vgg16, none, unit (x/255), tf (x/127.5-1); default vgg16 for VGG16, none for --model",
    )

    work = parser.add_argument_group("batch jobs")
    work.add_argument("--folders", nargs="+", default=None, metavar="NAME", help="only these test folders")
    work.add_argument("--labels", nargs="+", type=int, default=None, metavar="LABEL", help="only these labels")
    work.add_argument(
        "--shard", default=None, metavar="i/n",
        help="take every n-th test image starting at i (0 <= i < n), for n parallel processes",
    )
    work.add_argument("--overwrite", action="store_true", help="recompute test images whose outputs exist")
    work.add_argument(
        "--skip-failed", action="store_true",
        help="leave test images that failed in an earlier run as they are (default: retry them)",
    )
    work.add_argument("-v", "--verbose", action="store_true", help="show TensorFlow's start-up messages")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.quiet_tensorflow(args.verbose)
    if args.layers is not None and args.last_layers is not None:
        raise UserError("--layers and --last-layers choose the parameters two ways; give one of them")
    from influence import job, plan
    from influence.settings import PresentationSettings, ScoringSettings, Settings, SolverSettings

    plan.parse_shard(args.shard)  # a bad --shard fails before the archives are opened
    settings = Settings(
        solver=SolverSettings(
            method=args.method,
            depth=args.depth,
            batch_size=args.batch_size,
            damping=args.damping,
            scale=args.scale,
            repeat=args.repeat,
            deflation=args.deflation,
            ekfac_samples=args.ekfac_samples,
            seed=args.seed,
        ),
        scoring=ScoringSettings(
            layers=tuple(name.strip() for name in args.layers.split(",") if name.strip()) if args.layers else None,
            last_layers=args.last_layers,
            all_labels=args.all_labels,
            score_batch_size=args.score_batch_size,
            feature_cache=args.feature_cache,
        ),
        presentation=PresentationSettings(top=args.top, save_format=args.save_format),
    )
    summary = job.calculate(
        train_path=args.train,
        test_path=args.test,
        output_dir=args.output_dir,
        settings=settings,
        model_path=args.model,
        weights=args.weights,
        preprocess=args.preprocess,
        model_outputs=args.outputs,
        folders=args.folders,
        labels=args.labels,
        shard=args.shard,
        overwrite=args.overwrite,
        retry_failed=not args.skip_failed,
        echo=lambda text, end="\n": print(text, end=end, flush=True),
    )
    return cli.EXIT_SOME_FAILED if summary.failed else 0


if __name__ == "__main__":
    cli.exit_process(cli.run(main, on_interrupt="finished test images are kept; run the same command again to resume"))
