"""The feature cache file: a frozen trunk's output for every image of an archive, on disk.

When influence is taken with respect to the top layers only, every image's input to those
layers (the *features* at the cut, :mod:`influence.features`) is the same in every LiSSA
step, every scoring pass, every run and every shard. This module is the only code that
writes or reads the file that keeps them::

    features   (N, *feature_shape) float32 or float16, contiguous, uncompressed, row i = image i
    labels     (N,) int64                              the archive's labels, as a check
    attrs      format, format_version, key (canonical JSON), complete (written last)

**Key.** The JSON ``key`` says what the features are a function of: the model (its file
SHA-256s, or a digest of its weights), the cut, the preprocessing, the stored dtype, and
the archive's content identity (:func:`influence.archive.content_digest`, the SHA-256 of its
zip central directory: every member's CRC-32, cheap and path-independent) plus which of its
image sets. The file name carries a digest of everything but the archive's identity, so a
rewritten archive finds its old cache under the same name, sees the key differ, and rebuilds
it in place; another model or preprocessing gets a file of its own. A file is used only if
its key equals the expected one in full, its labels equal the archive's, and it is long
enough for its data: anything else is rebuilt, never read.

**Building** happens under an exclusive ``flock`` on ``<name>.lock`` (the kernel drops it
when its holder dies, so a lock is never stale): the first process builds, the others
print who holds it and wait, then open what it built. The file is written under a
temporary name and renamed over the final one only when complete
(:func:`influence.outputs.atomic_path`); a killed build leaves only a temporary, swept up by
the next builder. Readers keep their open file if it is replaced.

**Reading** is by ``pread`` of exactly the rows asked for, at the dataset's byte offset in
the file (HDF5 stores a contiguous dataset as one run of bytes): memory stays flat in the
number of images. A memory map would also read lazily, but every page it touches counts
in the process's resident memory until the kernel reclaims it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from influence import outputs
from influence.errors import UserError
from influence.progress import progress_bar

FORMAT = "influence-feature-cache"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
FEATURES, LABELS = "features", "labels"
# Keys left out of the file name: a change there is "stale", found and rebuilt in place.
_CONTENT_KEYS = ("archive",)


class StaleCache(Exception):
    """The cache file is missing (``reason`` None) or must not be used (``reason`` says why)."""

    def __init__(self, reason: str | None):
        super().__init__(reason or "missing")
        self.reason = reason


def canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def cache_path(directory: str | os.PathLike, *, stem: str, key: dict) -> Path:
    """``directory/<stem>-<16 hex digits>.h5``; the digits cover every key field but the archive's content."""
    naming = {name: value for name, value in key.items() if name not in _CONTENT_KEYS}
    digest = hashlib.sha256(canonical(naming).encode()).hexdigest()[:16]
    return Path(directory) / f"{stem}-{digest}.h5"


class FeatureCache:
    """An open cache file whose key was checked; rows come back as float32."""

    def __init__(self, path: Path, file, *, key: dict, labels: np.ndarray, shape: tuple[int, ...],
                 stored_dtype: np.dtype, offset: int):
        self.path = path
        self.key = key
        self.labels = labels  # (N,) int64
        self.shape = shape  # one image's features
        self.stored_dtype = stored_dtype
        self.status = "reused"  # or "built" (by this process) or "waited" (built by another)
        self._file = file
        self._offset = offset
        self._row_bytes = int(np.prod(shape, dtype=np.int64)) * stored_dtype.itemsize

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return len(self) * self._row_bytes

    def _pread_into(self, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):
            got = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
            if not got:
                raise UserError(f"feature cache {self.path} is truncated; delete it and rerun")
            done += got

    def take(self, indices) -> np.ndarray:
        """(k, *shape) float32 features of images ``indices`` (sorted indices read in runs)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"feature index out of range for {len(self)} images")
        out = np.empty((len(indices), *self.shape), dtype=self.stored_dtype)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        position = 0
        while position < len(indices):
            end = position + 1
            while end < len(indices) and indices[end] == indices[end - 1] + 1:
                end += 1
            self._pread_into(flat[position * self._row_bytes: end * self._row_bytes],
                             self._offset + int(indices[position]) * self._row_bytes)
            position = end
        return out.astype(np.float32, copy=False)

    def read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, *shape) float32 features of images ``start <= i < stop``."""
        return self.take(np.arange(start, min(stop, len(self)), dtype=np.int64))

    def blocks(self, indices, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(indices, features)`` over ``indices`` in order, ``batch_size`` rows at a time."""
        indices = np.asarray(indices, dtype=np.int64)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            yield chunk, self.take(chunk)

    def describe(self) -> str:
        return (f"{len(self)} x {'x'.join(map(str, self.shape))} {self.stored_dtype.name}, "
                f"{self.nbytes / 2**20:.1f} MiB")

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def _differences(stored: dict, expected: dict) -> str:
    names = sorted(name for name in set(stored) | set(expected) if stored.get(name) != expected.get(name))
    return ", ".join(names) or "the key"


def open_cache(path: str | os.PathLike, key: dict, *, labels) -> FeatureCache:
    """The cache at ``path`` if it is complete and was built for exactly ``key`` and ``labels``;
    otherwise :class:`StaleCache` saying why (reason None: there is no file)."""
    path = Path(path)
    labels = np.asarray(labels, dtype=np.int64)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise StaleCache(None) from None
    try:
        try:
            with h5py.File(file, "r") as h5:
                attrs = h5.attrs
                if attrs.get("format") != FORMAT:
                    raise StaleCache("is not a feature cache")
                if int(attrs.get("format_version", 0)) != FORMAT_VERSION:
                    raise StaleCache(f"has format version {attrs.get('format_version')}, not {FORMAT_VERSION}")
                stored_key = json.loads(attrs.get("key", "{}"))
                if canonical(stored_key) != canonical(key):
                    raise StaleCache(f"was built for another {_differences(stored_key, key)}")
                if not bool(attrs.get("complete", False)):
                    raise StaleCache("is incomplete")
                features = h5[FEATURES]
                if features.dtype.name not in DTYPES or features.chunks is not None or features.compression:
                    raise StaleCache(f"stores {features.dtype} features in a layout this version does not read")
                if features.shape[0] != len(labels) or not np.array_equal(h5[LABELS][...], labels):
                    raise StaleCache(f"holds {features.shape[0]} images whose labels differ from the archive's "
                                     f"{len(labels)}")
                offset = features.id.get_offset()
                shape, dtype = tuple(int(d) for d in features.shape[1:]), np.dtype(features.dtype)
        except StaleCache:
            raise
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise StaleCache(f"is unreadable ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
        row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(labels) and (offset is None or os.fstat(file.fileno()).st_size < offset + len(labels) * row_bytes):
            raise StaleCache("is truncated")
    except BaseException:
        file.close()
        raise
    return FeatureCache(path, file, key=key, labels=labels, shape=shape, stored_dtype=dtype,
                        offset=int(offset or 0))


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def build_lock(path: Path, echo: Callable[..., None] = print) -> Iterator[bool]:
    """Hold ``<path>.lock`` exclusively; yields whether another process held it first (we waited).

    ``flock`` is released by the kernel when the holder exits or is killed, so there is no
    stale lock to clean up. The lock file itself stays (deleting it would let two processes
    lock two different files).
    """
    lock_path = path.with_name(path.name + ".lock")
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 256, 0).decode(errors="replace").strip() or "another process"
            echo(f"Waiting for {holder} to finish building the feature cache {path} ...")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            waited = True
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, _holder().encode(), 0)
        yield waited
    finally:
        os.close(descriptor)


def build_cache(path: Path, key: dict, *, labels, feature_shape: tuple[int, ...], read_images: Callable,
                features_fn: Callable, batch_size: int = 32, dtype: str = "float32",
                echo: Callable[..., None] = print) -> None:
    """Write the cache for ``key`` at ``path`` atomically (call under :func:`build_lock`).

    ``read_images(indices (k,)) -> (k, H, W, 3) uint8``; ``features_fn(images) -> (k,
    *feature_shape)`` float32 (the trunk after the preprocessing). Non-finite features, or
    features too large for float16, are refused: the scores would be silently wrong.
    """
    if dtype not in DTYPES:
        raise UserError(f"feature cache dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    labels = np.asarray(labels, dtype=np.int64)
    count = len(labels)
    limit = float(np.finfo(np.dtype(dtype)).max)
    with outputs.atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as h5:
            h5.attrs["format"] = FORMAT
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["key"] = canonical(key)
            h5.attrs["complete"] = False
            h5.create_dataset(LABELS, data=labels)
            features = h5.create_dataset(FEATURES, shape=(count, *feature_shape), dtype=dtype)  # contiguous
            with progress_bar(total=count, desc="Feature cache", unit="img") as bar:
                for start in range(0, count, batch_size):
                    indices = np.arange(start, min(start + batch_size, count), dtype=np.int64)
                    block = np.asarray(features_fn(read_images(indices)), dtype=np.float32)
                    if block.shape != (len(indices), *feature_shape):
                        raise ValueError(f"features of shape {block.shape}, expected {(len(indices), *feature_shape)}")
                    if not np.all(np.isfinite(block)) or np.abs(block).max(initial=0.0) > limit:
                        raise UserError(f"the frozen layers give non-finite features (or beyond {dtype}'s range) "
                                        f"for images {indices[0]}..{indices[-1]}; "
                                        + ("store float32" if dtype == "float16" else "check the model's weights"))
                    features[start:start + len(indices)] = block.astype(dtype)
                    bar.update(len(indices))
            h5.attrs["complete"] = True


def open_or_build(path: str | os.PathLike, key: dict, *, labels, feature_shape: tuple[int, ...],
                  read_images: Callable, features_fn: Callable, batch_size: int = 32, dtype: str = "float32",
                  echo: Callable[..., None] = print) -> FeatureCache:
    """The valid cache at ``path``, built first if it is missing or stale (see the module docstring).

    ``status`` of the result: ``"reused"``, ``"built"`` by this process, or ``"waited"`` for
    another process that built it. Prints where it is and how large.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache = open_cache(path, key, labels=labels)
    except StaleCache:
        pass
    else:
        echo(f"Feature cache {path}: {cache.describe()} (reused)")
        return cache
    with build_lock(path, echo) as waited:
        try:
            cache = open_cache(path, key, labels=labels)
        except StaleCache as stale:
            if stale.reason:
                echo(f"Feature cache {path} {stale.reason}; rebuilding it")
        else:
            cache.status = "waited" if waited else "reused"
            echo(f"Feature cache {path}: {cache.describe()} ({'built by another process' if waited else 'reused'})")
            return cache
        outputs.remove_stale_temporaries(path.parent)  # left by killed builders
        began = time.perf_counter()
        build_cache(path, key, labels=labels, feature_shape=feature_shape, read_images=read_images,
                    features_fn=features_fn, batch_size=batch_size, dtype=dtype, echo=echo)
        cache = open_cache(path, key, labels=labels)
        cache.status = "built"
    echo(f"Feature cache {path}: {cache.describe()} (built in {time.perf_counter() - began:.1f} s)")
    return cache
