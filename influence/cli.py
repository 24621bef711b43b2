"""What the three command-line scripts share.

Every script is ``sys.exit(cli.run(main))``: a :class:`~influence.errors.UserError`
or an argument mistake becomes one line on stderr and exit status 2, Ctrl-C
becomes exit status 130, and nothing prints a traceback for the user's mistakes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable, Sequence

from influence.errors import UserError

EXIT_USAGE = 2
EXIT_SOME_FAILED = 3  # calculate.py: the run finished, but some test images failed (see their records)
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (``prog: error: ...``) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def quiet_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and Keras without their start-up noise, unless ``verbose``.

    TensorFlow's C++ side writes "oneDNN custom operations are on" and absl's
    pre-initialisation warning straight to file descriptor 2 during import, whatever
    ``TF_CPP_MIN_LOG_LEVEL`` says, so the import runs with that descriptor on /dev/null.
    """
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
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
    SIGTERM one line (``on_interrupt`` says what became of the work) and exit status 130."""
    prog = os.path.basename(sys.argv[0]) or "influence"
    try:
        return main(argv) or 0
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {on_interrupt}", file=sys.stderr)
        return EXIT_INTERRUPTED
