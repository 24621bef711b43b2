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
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (``prog: error: ...``) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def quiet_tensorflow(verbose: bool = False) -> None:
    """Hide TensorFlow's start-up noise unless ``verbose``; call before importing it."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into one line and exit status 2."""
    prog = os.path.basename(sys.argv[0]) or "influence"
    try:
        return main(argv) or 0
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
