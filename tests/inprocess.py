"""A script's ``main`` run in the test process, as ``cli.exit_process(cli.run(main))`` runs it in its own.

Each script spends ~4 s importing TensorFlow before it reads its arguments; the pytest
process has paid that once. What a separate process would add, and how it is kept here:

- the exit status: :func:`influence.cli.run`'s return, or argparse's ``SystemExit``;
- stdout and stderr: captured at the file descriptors (pytest's ``capfd``), so C-level
  writes (TensorFlow, HDF5) count as they would on a terminal;
- the warnings a fresh interpreter prints to stderr (pytest records them instead): recorded
  under Python's default filters and appended to stderr as lines;
- the program name in ``prog: error: ...`` (``sys.argv[0]``), and the signal handlers that
  ``cli.run`` installs and restores.

What only a separate process shows (TensorFlow's start-up noise, the real exit) is covered by
the few cases in each test file that still run the script itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import warnings
from typing import Callable, Sequence

from influence import cli

# The filters a fresh interpreter starts with (sys.warnoptions empty), after pytest.ini's are gone.
DEFAULT_IGNORED = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_main(main: Callable, argv: Sequence, *, prog: str, capfd, monkeypatch,
             before: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``prog``'s exit status, stdout and stderr for ``argv``, as a CompletedProcess.

    ``before`` runs first, inside the same warning filters (demo.py quiets TensorFlow there).
    """
    monkeypatch.setattr(sys, "argv", [prog])
    capfd.readouterr()  # only what this run writes
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        for category in DEFAULT_IGNORED:
            warnings.filterwarnings("ignore", category=category)
        try:
            if before is not None:
                before()
            status = cli.run(main, [str(arg) for arg in argv])
        except SystemExit as exit_:  # argparse: usage errors and --help
            status = exit_.code
    out, err = capfd.readouterr()
    left = [number for number, handler in handlers.items() if signal.getsignal(number) is not handler]
    for number, handler in handlers.items():
        signal.signal(number, handler)
    assert not left, f"{prog} left its handlers for signals {left} installed"
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    return subprocess.CompletedProcess([prog, *map(str, argv)], status, out, err + shown)
