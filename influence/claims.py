"""Who may write an output tree: one set of settings per tree, one process per test image.

Runs of the same settings (the shards of one job, or a copy started by accident) may share
a tree; a run of other settings is refused, because its results would silently replace the
others'. And no test image is computed by two processes at once.

- The tree: ``<output_dir>/.influence-tree.json`` holds the settings fingerprint of the run
  that created it. A run with another fingerprint stops before any work, unless it was given
  ``--overwrite``, which takes the tree over; a run whose tree was taken over stops before its
  next test image (:func:`check_tree`).
- A test image: ``<n>.claim`` next to its record, created before the work starts and removed
  when the record is written or the run stops. A process that finds an image claimed skips it.

Both files are created exclusively by writing a temporary file and hard-linking it to the final
name: ``link`` fails when the name exists, atomically, also on NFS (where ``O_EXCL`` was long
unreliable and ``flock`` may be a no-op), and readers never see a half-written claim. Where hard
links are not supported, ``O_CREAT | O_EXCL`` is used instead.

A claim left by a killed process is *stale*: on the same host, when its process no longer
exists; from another host, which cannot be asked, when it is older than :data:`STALE_AFTER_S`.
A stale claim is moved aside (a rename, so that two processes cannot both break it and then
both compute) and the image is claimed anew.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from influence import outputs
from influence.errors import UserError

TREE_FILE = ".influence-tree.json"
CLAIM_SUFFIX = ".claim"
STALE_AFTER_S = 24 * 3600  # a claim from another host older than this is taken for a dead process's
_UNREADABLE_GRACE_S = 60  # an unreadable claim younger than this may still be being written (O_EXCL fallback)


def _host() -> str:
    return socket.gethostname() or "host"


def _holder() -> dict:
    return {"host": _host(), "pid": os.getpid(), "since": time.time()}


def _read(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def create_exclusively(path: Path, payload: dict) -> bool:
    """Create ``path`` holding ``payload`` (JSON) if no file has that name; False if one has."""
    path = Path(path)
    text = json.dumps(payload, indent=1)
    temporary = outputs.temporary_path(path)  # swept up by outputs.remove_stale_temporaries after a kill
    try:
        with open(temporary, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
        try:  # no hard links here (some FUSE and SMB mounts)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _comparable(fingerprint: dict) -> dict:
    return json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back from the file


def claim_tree(output_dir: Path, fingerprint: dict, *, overwrite: bool = False) -> None:
    """Make ``output_dir`` this run's, or find it already of the same settings; else a UserError."""
    from influence.plan import describe_differences

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs.remove_stale_temporaries(output_dir)  # of a run killed while it claimed the tree
    path = output_dir / TREE_FILE
    mine = {"fingerprint": _comparable(fingerprint), "created_by": _holder()}
    for _ in range(50):  # an unreadable file may be one being created by the O_EXCL fallback
        if create_exclusively(path, mine):
            return
        existing = _read(path)
        if existing is not None:
            break
        time.sleep(0.1)
    else:
        raise UserError(f"{path} is unreadable; delete it if no other run is writing into {output_dir}")
    theirs = existing.get("fingerprint")
    if theirs == mine["fingerprint"]:
        return
    if overwrite:
        outputs.write_json(path, mine)
        return
    changed = describe_differences(theirs if isinstance(theirs, dict) else {}, mine["fingerprint"])
    raise UserError(f"{output_dir} holds the results of a run with other settings ({', '.join(changed)} differ); "
                    f"one output tree holds one set of settings: use another --output-dir, or --overwrite to "
                    f"replace those results")


def check_tree(output_dir: Path, fingerprint: dict) -> None:
    """A UserError if another run has taken ``output_dir`` over since this one claimed it."""
    existing = _read(Path(output_dir) / TREE_FILE)
    if existing is not None and existing.get("fingerprint") != _comparable(fingerprint):
        raise UserError(f"a run with other settings took over {output_dir} (--overwrite); stopping here: "
                        f"the test images this run completed are kept, but now mix with that run's")


@dataclass(frozen=True)
class Claim:
    path: Path

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def claim_path(record: Path) -> Path:
    return Path(record).with_suffix(CLAIM_SUFFIX)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_stale(holder: dict | None, age_s: float) -> bool:
    """Whether a claim by ``holder`` (its file ``age_s`` seconds old) belongs to a dead process."""
    if holder is None:
        return age_s > _UNREADABLE_GRACE_S
    pid = holder.get("pid")
    if holder.get("host") == _host() and isinstance(pid, int):
        return pid != os.getpid() and not _alive(pid)
    return age_s > STALE_AFTER_S


def describe(holder: dict | None) -> str:
    if holder is None:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')}"


def claim_item(record: Path) -> tuple[Claim | None, dict | None]:
    """(the claim, None) if this process may compute the image whose record is ``record``,
    else (None, the holder's description as read from its claim)."""
    path = claim_path(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        if create_exclusively(path, _holder()):
            return Claim(path), None
        holder = _read(path)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue  # released meanwhile: try again
        if not is_stale(holder, age):
            return None, holder
        aside = outputs.temporary_path(path)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        if _read(aside) != holder:  # someone else broke it first and claimed anew: give theirs back
            with contextlib.suppress(OSError):
                os.link(aside, path)
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()
            return None, _read(path)
        aside.unlink()
    return None, _read(path)
