"""What the three command-line scripts share.

Every script is ``cli.exit_process(cli.run(main))``: a :class:`~influence.errors.UserError`
or an argument mistake becomes one line on stderr and exit status 2, Ctrl-C or SIGTERM
(to the process or to its whole group) becomes exit status 130 after the cleanup, and
nothing prints a traceback for the user's mistakes. The process then ends without the
interpreter's teardown (:func:`exit_process`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Callable, NoReturn, Sequence

from influence import interrupts
from influence.errors import UserError

EXIT_USAGE = 2
EXIT_SOME_FAILED = 3  # calculate.py: the run finished, but some test images failed (see their records)
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (``prog: error: ...``) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def whole_number(text: str) -> int:
    """An argparse type: an integer >= 0 (a seed, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; expected a whole number >= 0")
    return value


def image_size(text: str) -> tuple[int, int]:
    """An argparse type: ``N`` or ``WIDTHxHEIGHT`` -> (H, W)."""
    from influence.prepare import parse_image_size

    try:
        return parse_image_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``prepare_data.py`` and ``prepare_only_test.py`` share."""
    parser.add_argument("-ts", "--test", nargs="+", required=True, metavar="FOLDER",
                        help="test folders, each with class folders named by label index (779) or train class name")
    parser.add_argument("-o", "--out-dir", default=".", metavar="DIR",
                        help="where train.npz and test.npz go (default: the current directory)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable image instead of skipping it with a warning")
    parser.add_argument("--workers", type=whole_number, default=None, metavar="N",
                        help="decoding processes (default: all cores)")


@contextlib.contextmanager
def _without_sklearn():
    """Keras imports scikit-learn (and with it SciPy) at start-up, for estimator wrappers no
    script here uses: about 1 s of every run. While Keras is imported, ``import sklearn``
    fails as if it were not installed (Keras then leaves its wrappers out); afterwards it
    imports as usual."""
    if "sklearn" in sys.modules:  # already loaded: nothing to save
        yield
        return
    sys.modules["sklearn"] = None  # the import system's marker for "not importable"
    try:
        yield
    finally:
        if sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]


def quiet_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and Keras without their start-up noise, unless ``verbose``.

    TensorFlow's C++ side writes "oneDNN custom operations are on" and absl's
    pre-initialisation warning straight to file descriptor 2 during import, whatever
    ``TF_CPP_MIN_LOG_LEVEL`` says, so the import runs with that descriptor on /dev/null.
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if verbose:
        with _without_sklearn():
            import keras  # noqa: F401
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with _without_sklearn():
            import keras  # noqa: F401
        import tensorflow as tf

        tf.get_logger().setLevel(logging.ERROR)
    finally:
        os.dup2(saved_stderr, 2)
        os.close(devnull)
        os.close(saved_stderr)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


def run(
    main: Callable[[Sequence[str] | None], int | None],
    argv: Sequence[str] | None = None,
    *,
    on_interrupt: str = "nothing was written; the previous files are intact",
) -> int:
    """Call ``main(argv)``: user errors become one line and exit status 2, Ctrl-C or
    SIGTERM one line (``on_interrupt`` says what became of the work) and exit status 130.

    SIGTERM unwinds like Ctrl-C (a :class:`KeyboardInterrupt`), so the same cleanup runs:
    partial files go, previous files stay. Only the first of these signals counts.
    """
    prog = os.path.basename(sys.argv[0]) or "influence"
    try:
        with interrupts.as_keyboard_interrupt():
            return main(argv) or 0
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {on_interrupt}", file=sys.stderr)
        return EXIT_INTERRUPTED


def exit_process(status: int) -> NoReturn:
    """End the process with ``status`` once stdout and stderr are flushed, without the
    interpreter's teardown: with TensorFlow and Keras loaded that takes about a second
    (0.9-1.4 s after calculate.py on VGG16, against 0.09 s this way). Nothing is lost by
    skipping it: by the time a script's ``main`` returns, every file it wrote is complete and
    closed (atomic writes, ``with`` blocks) and its decoding workers are stopped (``finally``).
    Only for a script's own process: a caller running ``main`` in-process keeps ``cli.run``.

    Under a profiler or a tracer (``python -m cProfile``, ``coverage run``: ``sys.getprofile()``
    or ``sys.gettrace()`` set), whose reports are written at exit, it is ``sys.exit(status)``.
    As at Python's own exit, a stdout that cannot be flushed (a closed pipe) turns a status of
    0 into 120.
    """
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # a closed pipe (``| head``) or a closed stream
        status = status or 120
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(status)
