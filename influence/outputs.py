"""Atomic writes for everything the suite puts on disk.

A file appears under its final name only when it is complete: it is written to a
hidden temporary file in the same directory, flushed to disk, then renamed over
the final name (``os.replace`` is atomic on POSIX and Windows). A crash or a kill
leaves at worst a ``.<name>.tmp-<host>-<pid>`` file, which :func:`remove_stale_temporaries`
sweeps up on the next run. Host and pid in the name keep processes on several machines
that share one output tree (``--shard``) from ever touching each other's files.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import socket
import tempfile

import numpy as np

from influence.errors import UserError

TEMPORARY_MARK = ".tmp-"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{_host()}-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    On any exception (KeyboardInterrupt included) the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_with(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Atomically write ``path`` by calling ``write(file_object)``."""
    with atomic_path(path) as temporary, open(temporary, mode) as file:
        write(file)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    return write_with(path, lambda f: json.dump(payload, f, indent=2, sort_keys=False), mode="w")


def write_pickled_dict(path: str | os.PathLike, mapping: dict) -> Path:
    """Save a dict as ``.npy``, loadable with ``np.load(path, allow_pickle=True).item()``."""
    return write_with(path, lambda f: np.save(f, np.array(mapping, dtype=object), allow_pickle=True))


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete temporaries that killed processes of this host left in ``directory``; return how many.

    Temporaries of live processes and of other hosts are left alone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    prefix = f"{_host()}-"
    for leftover in directory.glob(f".*{TEMPORARY_MARK}{prefix}*"):
        pid_text = leftover.name.rsplit(prefix, 1)[-1]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


def check_writable_dir(out_dir: str | os.PathLike) -> None:
    """A :class:`UserError` unless ``out_dir`` is, or can be created as, a writable folder."""
    existing = Path(os.path.abspath(out_dir))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output directory {out_dir} cannot be created: {existing} is not a folder")
    if existing != Path(os.path.abspath(out_dir)):
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"output directory {out_dir} cannot be created: {existing} is not writable")
        return
    try:
        # Trying is the only test that also holds for root and read-only file systems.
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise UserError(f"output directory {out_dir} is not writable: {error.strerror}") from None
