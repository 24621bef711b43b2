"""Ctrl-C and SIGTERM: one interrupt, handled once, by the main process, where it is safe.

A batch scheduler, systemd or ``kill -- -PGID`` sends SIGTERM to every process of the
group at once, and a terminal sends Ctrl-C's SIGINT to the whole foreground group too.
So:

- the decoding workers ignore both (the parent stops them), from the instant they are
  forked: they are forked inside :func:`deferred`, so a signal that reaches one before
  its initializer (:func:`ignore_in_worker`) has run is only recorded, never raised;
- only the first signal counts: a second one (the group's SIGTERM after the process's
  own, another Ctrl-C) must not cut short the cleanup that the first one started;
- code that must not stop halfway (starting or stopping a process pool, renaming two
  archives into place) runs inside :func:`deferred`: a signal arriving there is raised
  as :class:`KeyboardInterrupt` at the next :func:`checkpoint` or when the block ends.

:func:`as_keyboard_interrupt` (installed by :func:`influence.cli.run`) turns both signals
into :class:`KeyboardInterrupt`; without it, Python's own Ctrl-C handling applies.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)

_deferring = 0  # depth of nested deferred() blocks in this process
_pending = False  # a signal arrived inside a deferred() block and has not been raised yet
_interrupted = False  # a signal arrived: later ones are ignored


def _interrupt(signum, frame):
    global _pending, _interrupted
    _interrupted = True
    for number in INTERRUPTS:
        signal.signal(number, signal.SIG_IGN)  # only the first signal counts
    if _deferring:
        _pending = True
        return
    raise KeyboardInterrupt


def checkpoint() -> None:
    """Raise :class:`KeyboardInterrupt` here if a signal arrived during a :func:`deferred` block."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a signal is only recorded; it is raised at the next :func:`checkpoint`
    or when the block ends normally. Blocks nest."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        checkpoint()


def ignore_in_worker() -> None:
    """Pool initializer: this worker ignores interrupts; the parent decides and stops it."""
    global _pending
    for number in INTERRUPTS:
        signal.signal(number, signal.SIG_IGN)
    _pending = False  # recorded before this point, inherited or not: the parent's to handle


@contextlib.contextmanager
def as_keyboard_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM both raise :class:`KeyboardInterrupt` (once) while the block runs.

    The previous handlers come back after it, unless a signal arrived: the process is then
    ending, and a second signal must not interrupt what remains of the cleanup.
    """
    global _interrupted
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set signal handlers
        return
    previous = {number: signal.getsignal(number) for number in INTERRUPTS}
    _interrupted = False
    for number in INTERRUPTS:
        signal.signal(number, _interrupt)
    try:
        yield
    finally:
        if not _interrupted:
            for number, handler in previous.items():
                signal.signal(number, handler)
