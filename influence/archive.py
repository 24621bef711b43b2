"""The train and test archive format: the only code that knows its member names.

An archive is an *uncompressed* ``.npz`` (a zip of ``.npy`` members, stored
with ZIP64 headers), written member by member so that the writer holds one
batch at a time, and read by computing each member's byte offset so that the
reader fetches only the images it is asked for. ``np.load`` still opens it for
inspection. docs/formats.md documents the layout.

Train archive (``kind: "train"``)::

    meta.npy            (M,) uint8     UTF-8 JSON: sources, image size, classes, counts, skipped files, ...
    labels.npy          (N,) int32     label of image i (global index order)
    ids.npy             (L,) uint8     UTF-8 paths relative to the train folder, NUL-separated, in index order
    batch_start.npy     (B+1,) int64   batch b holds images batch_start[b] <= i < batch_start[b+1]
    batch_label.npy     (B,) int32     the one label of every image in batch b
    batch_000000.npy    (n_b, H, W, 3) uint8, one member per batch

Test archive (``kind: "test"``), folder k in command-line order::

    meta.npy            (M,) uint8     UTF-8 JSON, incl. folders[k].name
    test_000_images.npy (n, H, W, 3) uint8
    test_000_labels.npy (n,) int32
    test_000_ids.npy    (L,) uint8     paths relative to that test folder, NUL-separated

Writing goes to ``<name>.partial-<pid>`` in the same directory; :meth:`commit`
fsyncs and renames it over the final name, :meth:`abort` deletes it, so an
interrupted run leaves the previous archive untouched. :func:`commit_together`
puts several archives in place all or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from influence import interrupts
from influence.errors import UserError

FORMAT = "influence-archive"
FORMAT_VERSION = 1
TRAIN, TEST = "train", "test"
LABELINGS = ("imagenet", "natural")  # how train class folders became labels (influence.folders)
MAX_LABEL = np.iinfo(np.int32).max  # labels are stored as int32

META = "meta"
LABELS = "labels"
IDS = "ids"
BATCH_START = "batch_start"
BATCH_LABEL = "batch_label"

# Fixed member timestamps: the same folders and seed give a byte-identical archive.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
_COPY_CHUNK = 16 << 20


def batch_member(batch: int) -> str:
    return f"batch_{batch:06d}"


def test_member(position: int, field: str) -> str:
    return f"test_{position:03d}_{field}"


def partial_path(path: Path) -> Path:
    """Where an archive is written before it is renamed to ``path``."""
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def encode_ids(ids: Iterable[str]) -> np.ndarray:
    """Paths -> (L,) uint8, NUL-separated UTF-8 (NUL cannot occur in a path)."""
    return np.frombuffer("\0".join(ids).encode("utf-8"), dtype=np.uint8)


def decode_ids(blob: np.ndarray, count: int) -> np.ndarray:
    """(L,) uint8 -> (count,) object array of str."""
    ids = bytes(blob).decode("utf-8").split("\0") if count else []
    if len(ids) != count:
        raise ValueError(f"{len(ids)} ids for {count} images")
    out = np.empty(count, dtype=object)
    out[:] = ids
    return out


# --------------------------------------------------------------------------- writing


class ArchiveWriter:
    """An uncompressed npz built member by member under a temporary name."""

    def __init__(self, path: Path, *, kind: str, image_size: tuple[int, int]):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.kind = kind
        self.image_size = tuple(image_size)  # (H, W)
        self._committed = False
        self.bytes_written = 0
        try:
            self._file = open(self.partial, "xb")  # "x": never take over another writer's file
        except FileExistsError:
            raise
        except BaseException:
            self.partial.unlink(missing_ok=True)  # Ctrl-C right after the file was created
            raise
        try:
            self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        except BaseException:
            self._file.close()
            self.partial.unlink(missing_ok=True)
            raise

    def _open_member(self, name: str):
        info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        # Every member gets ZIP64 headers: a member's size is not known when its
        # header is written, and one over 2 GiB would otherwise be refused.
        return self._zip.open(info, "w", force_zip64=True)

    def add_array(self, name: str, array: np.ndarray) -> None:
        with self._open_member(name) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)

    def add_stream(self, name: str, *, shape: tuple[int, ...], source) -> None:
        """A uint8 member whose bytes are copied from the binary file ``source``."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        with self._open_member(name) as member:
            np.lib.format.write_array_header_1_0(member, header)
            source.seek(0)
            while chunk := source.read(_COPY_CHUNK):  # a test folder of ImageNet's size is gigabytes
                interrupts.checkpoint()
                member.write(chunk)

    def _add_meta(self, meta: dict) -> dict:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
                "image_size": list(self.image_size), **meta}
        self.add_array(META, np.frombuffer(json.dumps(meta, indent=1).encode("utf-8"), dtype=np.uint8))
        return meta

    def close(self) -> None:
        """Finish the zip and make it durable; the archive is still under its temporary name."""
        self._zip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.bytes_written = self._file.tell()
        self._file.close()

    def commit(self) -> None:
        """Rename the finished archive over the final name (atomic on POSIX)."""
        os.replace(self.partial, self.path)
        self._committed = True
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Delete the temporary file; the previous archive, if any, stays as it was."""
        if self._committed:
            return
        try:
            self._zip.close()
        except Exception:  # noqa: BLE001 - we are already cleaning up after a failure
            pass
        self._file.close()
        self.partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.abort()  # a no-op after commit()
        return False


def commit_together(writers: list[ArchiveWriter]) -> None:
    """Rename every closed writer's archive into place: all of them, or none.

    Each archive being replaced is first kept under ``<name>.previous-<pid>`` (a hard link,
    so the final name never goes missing where links work); if any rename fails, the
    archives already put in place are replaced by those kept copies again (or removed
    where there was none) and the error is raised. Signals wait until it is done.
    """
    pid = os.getpid()
    with interrupts.deferred():
        kept: dict[Path, Path] = {}
        placed: list[ArchiveWriter] = []
        try:
            for writer in writers:
                if writer.path.exists():
                    backup = writer.path.with_name(f"{writer.path.name}.previous-{pid}")
                    backup.unlink(missing_ok=True)
                    try:
                        os.link(writer.path, backup)
                    except OSError:  # a file system without hard links
                        shutil.copy2(writer.path, backup)
                    kept[writer.path] = backup
            for writer in writers:
                os.replace(writer.partial, writer.path)
                placed.append(writer)
        except BaseException:
            for writer in reversed(placed):
                if writer.path in kept:
                    os.replace(kept.pop(writer.path), writer.path)
                else:
                    writer.path.unlink(missing_ok=True)
            for backup in kept.values():
                backup.unlink(missing_ok=True)
            raise
        for writer in writers:
            writer._committed = True
        for backup in kept.values():
            backup.unlink(missing_ok=True)
        for directory in {writer.path.parent for writer in writers}:
            _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TrainWriter(ArchiveWriter):
    """Writes a train archive one batch at a time.

    ``with TrainWriter(path, image_size=(H, W)) as writer: writer.add_batch(...); ...;
    writer.finish(meta); writer.close(); writer.commit()``. Leaving the ``with``
    block without :meth:`commit` (an exception, Ctrl-C) deletes the partial file.
    """

    def __init__(self, path: Path, *, image_size: tuple[int, int]):
        super().__init__(path, kind=TRAIN, image_size=image_size)
        self._labels: list[np.ndarray] = []
        self._ids: list[str] = []
        self._batch_start = [0]
        self._batch_label: list[int] = []

    @property
    def n_batches(self) -> int:
        return len(self._batch_label)

    def add_batch(self, label: int, images: np.ndarray, ids: list[str]) -> None:
        """Store ``images`` (n, H, W, 3) uint8, all of class ``label``, as the next batch."""
        height, width = self.image_size
        if images.dtype != np.uint8 or images.shape[1:] != (height, width, 3) or len(images) != len(ids) or not ids:
            raise ValueError(f"batch of shape {images.shape} {images.dtype} with {len(ids)} ids, "
                             f"expected (n>0, {height}, {width}, 3) uint8")
        self.add_array(batch_member(self.n_batches), images)
        self._labels.append(np.full(len(ids), label, dtype=np.int32))
        self._ids.extend(ids)
        self._batch_start.append(self._batch_start[-1] + len(ids))
        self._batch_label.append(int(label))

    def finish(self, meta: dict) -> dict:
        """Write the index and ``meta`` (counts are added here); returns the stored meta."""
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int32)
        self.add_array(LABELS, labels)
        self.add_array(IDS, encode_ids(self._ids))
        self.add_array(BATCH_START, np.asarray(self._batch_start, dtype=np.int64))
        self.add_array(BATCH_LABEL, np.asarray(self._batch_label, dtype=np.int32))
        counts = {"images": len(labels), "batches": self.n_batches, **meta.pop("counts", {})}
        return self._add_meta({**meta, "counts": counts})


class TestWriter(ArchiveWriter):
    """Writes a test archive one folder at a time; images are spilled to a
    temporary file while a folder is decoded, so memory stays flat."""

    __test__ = False  # not a pytest class

    def __init__(self, path: Path, *, image_size: tuple[int, int]):
        super().__init__(path, kind=TEST, image_size=image_size)
        self.folders: list[dict] = []

    def add_folder(self, name: str, records: Iterable[tuple[np.ndarray, int, str]]) -> int:
        """Store one test folder from ``(image (H, W, 3) uint8, label, id)`` records; returns the count."""
        height, width = self.image_size
        labels: list[int] = []
        ids: list[str] = []
        position = len(self.folders)
        # Unnamed temporary file next to the archive: nothing is left behind on a crash.
        with tempfile.TemporaryFile(dir=self.path.parent) as spill:
            for image, label, image_id in records:
                if image.dtype != np.uint8 or image.shape != (height, width, 3):
                    raise ValueError(f"image of shape {image.shape} {image.dtype}, expected ({height}, {width}, 3) uint8")
                spill.write(np.ascontiguousarray(image).data)
                labels.append(int(label))
                ids.append(image_id)
            self.add_stream(test_member(position, "images"), shape=(len(ids), height, width, 3), source=spill)
        self.add_array(test_member(position, "labels"), np.asarray(labels, dtype=np.int32))
        self.add_array(test_member(position, "ids"), encode_ids(ids))
        self.folders.append({"name": name, "count": len(ids)})
        return len(ids)

    def finish(self, meta: dict) -> dict:
        """Write ``meta``; ``meta["folders"][k]`` (if given) is merged into folder k's entry."""
        extra = meta.pop("folders", [{} for _ in self.folders])
        folders = [{**written, **more} for written, more in zip(self.folders, extra)]
        return self._add_meta({**meta, "folders": folders})


# --------------------------------------------------------------------------- reading


class _NpzReader:
    """Opens an archive, checks it is ours and of the right kind, locates members."""

    def __init__(self, path, kind: str | None):
        self.path = Path(path)
        what = {TRAIN: "a train archive", TEST: "a test archive", None: "an archive"}[kind]
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist; create it with prepare_data.py")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder, expected {what} (.npz) written by prepare_data.py")
        try:
            self._file = open(self.path, "rb")
        except OSError as error:
            raise UserError(f"cannot read {self.path}: {error.strerror}") from None
        try:
            self._zip = zipfile.ZipFile(self._file)
            self.meta = self._read_meta()
        except UserError:
            self._file.close()
            raise
        except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError):
            self._file.close()
            raise UserError(f"{self.path} is not an archive written by prepare_data.py") from None
        if kind is not None and self.meta.get("kind") != kind:
            self._file.close()
            raise UserError(f"{self.path} is a {self.meta.get('kind')} archive, expected {what}")
        try:
            _check_meta(self.meta)
        except UserError as error:
            self._file.close()
            raise UserError(f"{self.path} is damaged: {error}") from None
        height, width = self.meta["image_size"]
        self.image_size = (int(height), int(width))  # (H, W)
        self._lock = threading.Lock()
        self._offsets: dict[str, tuple[int, tuple[int, ...]]] = {}

    def _read_meta(self) -> dict:
        try:
            meta = json.loads(bytes(self._small(META)).decode("utf-8"))
        except KeyError:
            raise UserError(f"{self.path} is not an archive written by prepare_data.py (no metadata)") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{self.path} is not an archive written by prepare_data.py")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"{self.path} has archive format {meta['format_version']}; this version reads up to "
                            f"{FORMAT_VERSION}: update the code or rerun prepare_data.py")
        return meta

    def _small(self, name: str) -> np.ndarray:
        """Read a small member whole (index arrays, metadata)."""
        with self._zip.open(name + ".npy") as member:
            return np.lib.format.read_array(member, allow_pickle=False)

    def _pread_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` from the file at ``offset``; all image reads go through here."""
        done = 0
        while done < len(buffer):
            if hasattr(os, "preadv"):
                got = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv (Windows)
                with self._lock:
                    self._file.seek(offset + done)
                    got = self._file.readinto(buffer[done:])
            if not got:
                raise UserError(f"{self.path} is truncated (reading {len(buffer)} bytes at offset {offset})")
            done += got

    def _array_location(self, name: str) -> tuple[int, tuple[int, ...]]:
        """(byte offset of the array data in the file, shape) of a uint8 member, cached."""
        if name in self._offsets:
            return self._offsets[name]
        try:
            info = self._zip.getinfo(name + ".npy")
        except KeyError:
            raise UserError(f"{self.path} is damaged: member {name} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"{self.path} has compressed members; it was not written by prepare_data.py")
        # The local header's extra field (ZIP64 sizes) can differ from the central directory's.
        local = bytearray(_LOCAL_HEADER.size)
        self._pread_into(memoryview(local), info.header_offset)
        fields = _LOCAL_HEADER.unpack(local)
        if fields[0] != _LOCAL_SIGNATURE:
            raise UserError(f"{self.path} is damaged: bad zip header for {name}")
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        head = bytearray(min(4096, info.file_size))
        self._pread_into(memoryview(head), start)
        stream = io.BytesIO(head)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if dtype != np.uint8 or fortran_order:
            raise UserError(f"{self.path} is damaged: member {name} is {dtype}, expected uint8")
        location = (start + stream.tell(), tuple(shape))
        self._offsets[name] = location
        return location

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def _field(entry: dict, key: str, kinds, where: str):
    """``entry[key]`` if it is one of ``kinds``, else a :class:`UserError` naming what is wrong."""
    if not isinstance(entry, dict) or key not in entry:
        raise UserError(f"its metadata lacks {where}{key!r}")
    value = entry[key]
    if not isinstance(value, kinds) or isinstance(value, bool) and kinds is int:
        raise UserError(f"its metadata's {where}{key!r} is {value!r}")
    return value


def _check_label(entry: dict, where: str) -> None:
    label = _field(entry, "label", int, where)
    if not 0 <= label <= MAX_LABEL:
        raise UserError(f"its metadata's {where}'label' is {label}, outside 0..{MAX_LABEL}")


def _check_meta(meta: dict) -> None:
    """Every metadata field the readers use, present and of the right type (so that a damaged
    or hand-edited archive is refused when it is opened, not in the middle of a run)."""
    _field(meta, "format_version", int, "")
    size = _field(meta, "image_size", list, "")
    if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size):
        raise UserError(f"its metadata's 'image_size' is {size!r}, expected [height, width]")
    kind = meta.get("kind")
    classes = _field(meta, "classes", list, "") if "classes" in meta else []
    for position, entry in enumerate(classes):
        where = f"classes[{position}]."
        _check_label(entry, where)
        _field(entry, "name", str, where)
        if "folder" in entry:
            _field(entry, "folder", str, where)
    labeling = meta.get("labeling")
    if labeling not in (None, *LABELINGS):
        raise UserError(f"its metadata's 'labeling' is {labeling!r}, expected one of {', '.join(LABELINGS)}")
    fingerprint = meta.get("labelling_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise UserError(f"its metadata's 'labelling_fingerprint' is {fingerprint!r}")
    if kind == TEST:
        for position, entry in enumerate(_field(meta, "folders", list, "")):
            where = f"folders[{position}]."
            _field(entry, "name", str, where)
            _field(entry, "count", int, where)
            for index, folder in enumerate(entry.get("classes", [])):
                _field(folder, "folder", str, f"{where}classes[{index}].")
                _check_label(folder, f"{where}classes[{index}].")


def labelling_fingerprint(labeling: str, classes) -> str:
    """The SHA-256 of a train class list: how ``(label, folder, name)`` triples were assigned.

    Written into both archives of a pair; two archives label alike only if theirs match.
    """
    canonical = json.dumps({"labeling": labeling,
                            "classes": sorted([int(label), str(folder), str(name)] for label, folder, name in classes)},
                           separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _class_names(meta: dict) -> dict[int, str]:
    return {int(entry["label"]): entry["name"] for entry in meta.get("classes", [])}


class TrainArchive(_NpzReader):
    """Random access to a train archive; see :func:`open_train`."""

    def __init__(self, path):
        super().__init__(path, TRAIN)
        try:
            self.labels = self._small(LABELS).astype(np.int64)  # (N,)
            self.batch_start = self._small(BATCH_START).astype(np.int64)  # (B+1,)
            self.batch_label = self._small(BATCH_LABEL).astype(np.int64)  # (B,)
        except (KeyError, ValueError, zipfile.BadZipFile):
            self.close()
            raise UserError(f"{self.path} is damaged: its index is missing or unreadable") from None
        sizes = np.diff(self.batch_start)
        if (len(self.batch_start) != len(self.batch_label) + 1 or self.batch_start[0] != 0
                or self.batch_start[-1] != len(self.labels)
                or not np.array_equal(np.repeat(self.batch_label, sizes), self.labels)):
            self.close()
            raise UserError(f"{self.path} is damaged: its index is inconsistent")
        self.class_names = _class_names(self.meta)  # label -> human name
        self.labelling_fingerprint = labelling_fingerprint(
            self.meta.get("labeling"),
            [(entry["label"], entry.get("folder"), entry["name"]) for entry in self.meta.get("classes", [])])
        stored = self.meta.get("labelling_fingerprint")
        if stored is not None and stored != self.labelling_fingerprint:
            self.close()
            raise UserError(f"{self.path} is damaged: its class list does not match its labelling fingerprint")
        self._ids = None
        height, width = self.image_size
        self._image_bytes = height * width * 3

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def ids(self) -> np.ndarray:
        """(N,) str: path of image i relative to the train folder."""
        if self._ids is None:
            self._ids = decode_ids(self._small(IDS), len(self.labels))
        return self._ids

    @property
    def n_batches(self) -> int:
        return len(self.batch_label)

    @property
    def content_fingerprint(self) -> str:
        """SHA-256 of what decides the training side of every score without reading the pixels:
        the labelling, image size and resize, every image's label and path, the batching."""
        digest = hashlib.sha256()
        for part in (self.labelling_fingerprint, json.dumps(list(self.image_size)), str(self.meta.get("resize")),
                     str(self.meta.get("seed")), str(self.meta.get("source"))):
            digest.update(part.encode("utf-8") + b"\0")
        for array in (self.labels.astype(np.int64), self.batch_start, self._small(IDS)):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def label_indices(self, label: int) -> np.ndarray:
        """(k,) int64 global indices of the images with ``label`` (empty if none)."""
        return np.flatnonzero(self.labels == label).astype(np.int64)

    def read(self, indices) -> np.ndarray:
        """(k, H, W, 3) uint8 images at global ``indices``, in that order.

        Only those images' bytes are read: runs of consecutive indices in one
        stored batch with one read call, anything else one image at a time.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"image index {bad} out of range for {len(self)} training images")
        height, width = self.image_size
        out = np.empty((len(indices), height, width, 3), dtype=np.uint8)
        flat = memoryview(out.reshape(-1))
        batches = np.searchsorted(self.batch_start, indices, side="right") - 1
        position = 0
        while position < len(indices):
            batch = batches[position]
            end = position + 1
            while end < len(indices) and batches[end] == batch and indices[end] == indices[end - 1] + 1:
                end += 1
            offset, _ = self._array_location(batch_member(int(batch)))
            row = indices[position] - self.batch_start[batch]
            self._pread_into(flat[position * self._image_bytes: end * self._image_bytes],
                             offset + int(row) * self._image_bytes)
            position = end
        return out

    def iter_label(self, label: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices (k,), images (k, H, W, 3))`` over all images of ``label``,
        reading only the stored batches of that label."""
        yield from self._iter(self.label_indices(label), batch_size)

    def iter_all(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` over the whole training set in index order."""
        yield from self._iter(np.arange(len(self), dtype=np.int64), batch_size)

    def _iter(self, indices: np.ndarray, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            yield chunk, self.read(chunk)


@dataclass
class TestSet:
    """One test folder: ``images`` (n, H, W, 3) uint8 (memory-mapped), ``labels`` (n,), ``ids`` (n,) str."""

    __test__ = False  # not a pytest class

    name: str
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


class TestArchive(_NpzReader):
    """The test folders of a test archive; see :func:`open_test`."""

    __test__ = False  # not a pytest class

    def __init__(self, path):
        super().__init__(path, TEST)
        self.folders = [entry["name"] for entry in self.meta["folders"]]
        self.class_names = _class_names(self.meta)

    def folder(self, name: str) -> TestSet:
        if name not in self.folders:
            raise UserError(f"{self.path} has no test folder {name!r}; it has {', '.join(self.folders)}")
        position = self.folders.index(name)
        offset, shape = self._array_location(test_member(position, "images"))
        if shape[0]:
            images = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
        else:
            images = np.zeros(shape, dtype=np.uint8)
        try:
            labels = self._small(test_member(position, "labels")).astype(np.int64)
            ids = decode_ids(self._small(test_member(position, "ids")), len(labels))
        except (KeyError, ValueError, zipfile.BadZipFile):
            raise UserError(f"{self.path} is damaged: the labels or ids of test folder {name!r} are missing "
                            f"or unreadable") from None
        if len(labels) != shape[0]:
            raise UserError(f"{self.path} is damaged: test folder {name!r} has {shape[0]} images "
                            f"but {len(labels)} labels")
        return TestSet(name=name, images=images, labels=labels, ids=ids)


def check_pairing(train: TrainArchive, test: TestArchive) -> None:
    """A :class:`UserError` unless ``test`` was labelled with ``train``'s class list.

    A test class folder becomes a label through the train archive's classes; a test archive
    prepared against another train archive (a class added or renamed since) carries labels
    that mean other classes here. Archives that record a labelling fingerprint are compared
    by it; older ones by their class lists (names of shared labels, folders of shared names).
    A test archive prepared without any train archive (labels given as ImageNet wnids or label
    indices) pairs with any train archive whose class names agree with its own.
    """
    stored = test.meta.get("labelling_fingerprint")
    hint = (f"prepare the test folders again against this train archive (prepare_only_test.py -o "
            f"{train.path.parent}), or pass the train archive they were prepared with")
    if stored is not None and stored != train.labelling_fingerprint:
        raise UserError(f"{test.path} was labelled with another class list than {train.path} "
                        f"(labelling fingerprints {stored[:12]} and {train.labelling_fingerprint[:12]} differ): "
                        f"its labels would name other classes; {hint}")
    labeling, train_labeling = test.meta.get("labeling"), train.meta.get("labeling")
    if labeling is not None and train_labeling is not None and labeling != train_labeling:
        raise UserError(f"{test.path} has {labeling} labels but {train.path} has {train_labeling} labels; {hint}")
    train_folders = {entry["folder"]: int(entry["label"]) for entry in train.meta.get("classes", []) if "folder" in entry}
    for label, name in sorted(test.class_names.items()):
        # Without a train archive, a folder named by its label index is named by that index.
        if label in train.class_names and train.class_names[label] != name and name != str(label):
            raise UserError(f"{test.path} calls label {label} {name!r} but {train.path} calls it "
                            f"{train.class_names[label]!r}: the two archives label classes differently; {hint}")
    for folder in test.meta["folders"]:
        for entry in folder.get("classes", []):
            if entry["folder"] in train_folders and train_folders[entry["folder"]] != int(entry["label"]):
                raise UserError(f"{test.path} gives class folder {folder['name']}/{entry['folder']} label "
                                f"{entry['label']} but {train.path} gives {entry['folder']} label "
                                f"{train_folders[entry['folder']]}: the two archives label classes differently; {hint}")


def open_train(path) -> TrainArchive:
    """Open a train archive; a missing, foreign or test archive is a :class:`UserError`."""
    return TrainArchive(path)


def open_test(path) -> TestArchive:
    """Open a test archive; a missing, foreign or train archive is a :class:`UserError`."""
    return TestArchive(path)


def format_image_size(image_size, *, short: bool = True) -> str:
    """(H, W) -> ``"64x48"`` (width x height), as ``--image-size`` takes it; a square size is
    ``"224"`` when ``short``, ``"224x224"`` otherwise (for messages)."""
    height, width = (int(n) for n in image_size)
    return str(width) if short and width == height else f"{width}x{height}"


def class_names(train: TrainArchive, test: TestArchive) -> dict[int, str]:
    """Label -> class name from both archives' metadata (all 1000 with ImageNet labelling)."""
    from influence import imagenet

    names = dict(imagenet.names()) if train.meta.get("labeling") == "imagenet" else {}
    names.update(test.class_names)
    names.update(train.class_names)
    return names


def read_meta(path) -> dict:
    """The metadata of a train or test archive, without reading its index."""
    with _NpzReader(path, None) as reader:
        return reader.meta


def content_digest(path) -> str:
    """SHA-256 of an archive's zip central directory and end records: a cheap content identity.

    The central directory lists every member's name, size and CRC-32 of its bytes (written by
    ``zipfile`` as each member is stored), so any change to any image, label or id changes it,
    while reading it costs about 100 bytes per member (under 1 MB for ImageNet) instead of
    hashing every image. It does not depend on the file's path or modification time, so a
    copied archive keeps its identity. Not a defence against deliberate CRC collisions.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            start = zipfile.ZipFile(file).start_dir
            file.seek(start)
            digest = hashlib.sha256(str(os.fstat(file.fileno()).st_size).encode())
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, zipfile.BadZipFile) as error:
        raise UserError(f"cannot read {path} as an archive written by prepare_data.py ({error})") from None
    return digest.hexdigest()
