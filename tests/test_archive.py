"""The archive format: round trips, random access, reading one label's batches only,
atomic writes, ZIP64, and the errors for files that are not our archives."""

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from influence import archive
from influence.errors import UserError

SIZE = (5, 4)  # (H, W): not square, so a transposed shape would show


def write_train(path, batches, *, image_size=SIZE, meta=None):
    """``batches``: list of (label, images (n, H, W, 3)); ids are ``"<label>/<batch>_<row>"``."""
    expected = {}
    with archive.TrainWriter(path, image_size=image_size) as writer:
        for label, images in batches:
            ids = [f"{label}/{writer.n_batches}_{row}" for row in range(len(images))]
            writer.add_batch(label, images, ids)
            expected.update(zip(ids, images))
        writer.finish(dict(meta or {"classes": [{"label": label, "name": f"class {label}"}
                                                 for label in sorted({label for label, _ in batches})]}))
        writer.close()
        writer.commit()
    return expected


def random_batches(rng, spec):
    """spec: list of (label, n) -> list of (label, random images)."""
    return [(label, rng.integers(0, 256, size=(n, *SIZE, 3), dtype=np.uint8)) for label, n in spec]


SPEC = [(2, 4), (2, 4), (2, 1), (5, 3), (9, 4), (9, 2)]


@pytest.fixture
def train_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "train.npz"
    expected = write_train(path, random_batches(rng, SPEC))
    return path, expected


def test_round_trip_index_and_pixels(train_path):
    path, expected = train_path
    with archive.open_train(path) as train:
        assert len(train) == 18
        assert train.image_size == SIZE
        assert train.labels.tolist() == [2] * 9 + [5] * 3 + [9] * 6
        assert train.class_names == {2: "class 2", 5: "class 5", 9: "class 9"}
        assert train.meta["kind"] == "train" and train.meta["counts"] == {"images": 18, "batches": 6}
        assert train.ids[0] == "2/0_0" and train.ids[17] == "9/5_1"
        every = train.read(np.arange(len(train)))
        for i, image_id in enumerate(train.ids):
            np.testing.assert_array_equal(every[i], expected[image_id])
        assert train.label_indices(5).tolist() == [9, 10, 11]
        assert train.label_indices(3).tolist() == []  # a label with no images
        assert train.label_indices(9).dtype == np.int64


def test_read_any_order_and_repeats(train_path):
    path, expected = train_path
    rng = np.random.default_rng(1)
    with archive.open_train(path) as train:
        for _ in range(5):
            indices = rng.integers(0, len(train), size=7)  # with repeats, across labels, any order
            images = train.read(indices)
            assert images.shape == (7, *SIZE, 3) and images.dtype == np.uint8
            for j, i in enumerate(indices):
                np.testing.assert_array_equal(images[j], expected[train.ids[i]])
        assert train.read([]).shape == (0, *SIZE, 3)
        with pytest.raises(IndexError, match="18"):
            train.read([3, 18])
        with pytest.raises(IndexError):
            train.read([-1])


def test_iterators_cover_exactly(train_path):
    path, expected = train_path
    with archive.open_train(path) as train:
        for label in (2, 5, 9):
            seen = []
            for indices, images in train.iter_label(label, batch_size=4):
                assert len(indices) <= 4 and len(images) == len(indices)
                assert set(train.labels[indices]) == {label}
                for i, image in zip(indices, images):
                    np.testing.assert_array_equal(image, expected[train.ids[i]])
                seen.extend(indices.tolist())
            assert seen == train.label_indices(label).tolist()
        assert list(train.iter_label(7, 4)) == []
        seen = [i for indices, _ in train.iter_all(batch_size=5) for i in indices]
        assert seen == list(range(18))


def member_ranges(path):
    """member name -> (first byte, end) of its whole zip entry, local header included."""
    with zipfile.ZipFile(path) as zf:
        infos = sorted(zf.infolist(), key=lambda info: info.header_offset)
        ends = [info.header_offset for info in infos[1:]] + [zf.start_dir]
        return {info.filename[:-4]: (info.header_offset, end) for info, end in zip(infos, ends)}


def record_reads(train):
    """Wrap the one function every image read goes through; returns the list of (offset, length)."""
    reads = []
    original = train._pread_into

    def recording(buffer, offset):
        reads.append((offset, len(buffer)))
        return original(buffer, offset)

    train._pread_into = recording
    return reads


def members_touched(reads, ranges):
    touched = set()
    for offset, length in reads:
        owners = [name for name, (start, end) in ranges.items() if start <= offset and offset + length <= end]
        assert len(owners) == 1, f"read at {offset} of {length} bytes is not inside one member"
        touched.add(owners[0])
    return touched


def test_iter_label_reads_only_that_labels_batches(train_path):
    path, _ = train_path
    ranges = member_ranges(path)
    for label, batches in [(2, {0, 1, 2}), (5, {3}), (9, {4, 5})]:
        with archive.open_train(path) as train:
            reads = record_reads(train)
            images = [images for _, images in train.iter_label(label, batch_size=3)]
            assert sum(len(chunk) for chunk in images) == len(train.label_indices(label))
            assert members_touched(reads, ranges) == {archive.batch_member(b) for b in batches}
            # and no more bytes than that label's images plus each batch's zip and npy headers
            label_bytes = len(train.label_indices(label)) * SIZE[0] * SIZE[1] * 3
            assert sum(length for _, length in reads) <= label_bytes + (30 + 4096) * len(batches)


def test_random_read_touches_only_the_images_asked_for(train_path):
    path, _ = train_path
    ranges = member_ranges(path)
    with archive.open_train(path) as train:
        reads = record_reads(train)
        train.read([10, 1])  # batch 3 row 1, batch 0 row 1
        assert members_touched(reads, ranges) == {"batch_000003", "batch_000000"}
        image = SIZE[0] * SIZE[1] * 3
        assert sorted(length for _, length in reads if length == image) == [image, image]


def test_np_load_can_inspect_an_archive(train_path):
    path, expected = train_path
    with np.load(path) as data:  # pickle stays off: every member is a plain array
        assert set(data.files) >= {"meta", "labels", "ids", "batch_start", "batch_label", "batch_000000"}
        meta = json.loads(bytes(data["meta"]).decode())
        assert meta["format"] == archive.FORMAT and meta["kind"] == "train"
        assert data["batch_start"].tolist() == [0, 4, 8, 9, 12, 16, 18]
        assert data["batch_label"].tolist() == [2, 2, 2, 5, 9, 9]
        np.testing.assert_array_equal(data["batch_000003"][1], expected["5/3_1"])
    with zipfile.ZipFile(path) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}


def test_same_content_gives_byte_identical_archive(tmp_path):
    rng = np.random.default_rng(3)
    batches = random_batches(rng, SPEC)
    write_train(tmp_path / "a.npz", batches)
    write_train(tmp_path / "b.npz", batches)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_test_archive_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    folders = {"orig": 3, "wb": 0, "styled": 2}
    expected = {}
    with archive.TestWriter(tmp_path / "test.npz", image_size=SIZE) as writer:
        for name, n in folders.items():
            records = [(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), 7 + k, f"{7 + k}/{name}_{k}.png")
                       for k in range(n)]
            expected[name] = records
            assert writer.add_folder(name, iter(records)) == n
        writer.finish({"classes": [{"label": 7, "name": "seven"}], "folders": [{"source": "/x"}, {}, {}]})
        writer.close()
        writer.commit()
    with archive.open_test(tmp_path / "test.npz") as test:
        assert test.folders == ["orig", "wb", "styled"]
        assert test.image_size == SIZE and test.class_names == {7: "seven"}
        assert test.meta["folders"][0] == {"name": "orig", "count": 3, "source": "/x"}
        for name, records in expected.items():
            folder = test.folder(name)
            assert folder.name == name
            assert folder.images.shape == (len(records), *SIZE, 3) and folder.images.dtype == np.uint8
            assert folder.labels.tolist() == [label for _, label, _ in records]
            assert folder.ids.tolist() == [image_id for _, _, image_id in records]
            for image, (source, _, _) in zip(folder.images, records):
                np.testing.assert_array_equal(image, source)
        with pytest.raises(UserError, match="no test folder 'texture'.*orig, wb, styled"):
            test.folder("texture")


# --------------------------------------------------------------------------- atomic writes


def test_failure_mid_write_keeps_previous_archive(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "train.npz"
    write_train(path, random_batches(rng, SPEC))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with archive.TrainWriter(path, image_size=SIZE) as writer:
            for label, images in random_batches(rng, SPEC):
                if writer.n_batches == 3:
                    assert writer.partial.exists() and writer.partial.stat().st_size > 0
                    raise RuntimeError("disk on fire")
                writer.add_batch(label, images, [f"x{i}" for i in range(len(images))])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["train.npz"]


def test_ctrl_c_mid_write_keeps_previous_archive(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "test.npz"
    with archive.TestWriter(path, image_size=SIZE) as writer:
        writer.add_folder("orig", iter([(np.zeros((*SIZE, 3), np.uint8), 1, "1/a.png")]))
        writer.finish({})
        writer.close()
        writer.commit()
    before = path.read_bytes()

    def interrupted():
        yield rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), 1, "1/b.png"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with archive.TestWriter(path, image_size=SIZE) as writer:
            writer.add_folder("orig", interrupted())
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["test.npz"]


def test_writer_never_clobbers_a_concurrent_partial(tmp_path):
    path = tmp_path / "train.npz"
    archive.partial_path(path).write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        archive.TrainWriter(path, image_size=SIZE)
    assert archive.partial_path(path).read_bytes() == b"someone else's"


# --------------------------------------------------------------------------- ZIP64


def local_extra_ids(path):
    """Header ids of the extra fields in every member's local file header."""
    result = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            raw.seek(info.header_offset)
            fields = struct.unpack("<4s5H3L2H", raw.read(30))
            raw.seek(fields[-2], 1)
            extra = raw.read(fields[-1])
            ids = []
            while extra:
                header_id, size = struct.unpack("<HH", extra[:4])
                ids.append(header_id)
                extra = extra[4 + size:]
            result[info.filename] = ids
    return result


def test_every_member_has_zip64_headers(train_path):
    path, _ = train_path
    extras = local_extra_ids(path)
    assert extras and all(0x0001 in ids for ids in extras.values())


def test_archive_laid_out_as_beyond_4_gib_reads_back(tmp_path, monkeypatch):
    """Lower zipfile's ZIP64 threshold while writing, so that every offset and size in the
    central directory is stored only in ZIP64 fields and the ZIP64 end record is used, exactly
    as in an archive over 4 GiB; the reader (at the normal threshold) must still find every image."""
    rng = np.random.default_rng(7)
    batches = random_batches(rng, SPEC)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 16)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    expected = write_train(tmp_path / "train.npz", batches)
    monkeypatch.undo()
    raw = (tmp_path / "train.npz").read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw  # ZIP64 end record and locator
    central = raw[raw.index(b"PK\x01\x02"):]
    entries = [struct.unpack("<2L", central[i + 20:i + 28]) + struct.unpack("<L", central[i + 42:i + 46])
               for i in range(len(central) - 46) if central[i:i + 4] == b"PK\x01\x02"]
    assert len(entries) == 11
    # (compressed size, size, local header offset): all only in the ZIP64 extra field
    # (the first member's offset, 0, fits in any case)
    assert entries[0] == (0xFFFFFFFF, 0xFFFFFFFF, 0)
    assert all(entry == (0xFFFFFFFF,) * 3 for entry in entries[1:])
    with archive.open_train(tmp_path / "train.npz") as train:
        images = train.read(np.arange(len(train))[::-1])
        for image, image_id in zip(images, train.ids[::-1]):
            np.testing.assert_array_equal(image, expected[image_id])


@pytest.mark.skipif(not os.environ.get("INFLUENCE_BIG_TESTS"), reason="writes 4.3 GB; set INFLUENCE_BIG_TESTS=1")
def test_real_archive_over_4_gib(tmp_path):
    size = (1024, 1024)
    batch = np.zeros((100, *size, 3), dtype=np.uint8)  # 315 MB
    path = tmp_path / "train.npz"
    with archive.TrainWriter(path, image_size=size) as writer:
        for b in range(14):
            batch[:, 0, 0, :] = b
            batch[:, -1, -1, 0] = np.arange(100)
            writer.add_batch(b % 3, batch, [f"{b % 3}/{b}_{row}" for row in range(100)])
        writer.finish({})
        writer.close()
        writer.commit()
    assert path.stat().st_size > 4 * 2**30
    with archive.open_train(path) as train:
        last = train.read([1399, 0, 1301])
        assert last[0, 0, 0].tolist() == [13, 13, 13] and last[0, -1, -1, 0] == 99
        assert last[1, 0, 0, 0] == 0 and last[2, -1, -1, 0] == 1
        assert train.ids[1399] == "1/13_99"


# --------------------------------------------------------------------------- not our archive


def test_open_errors_are_one_line_user_errors(tmp_path, train_path):
    path, _ = train_path
    with pytest.raises(UserError, match=r"missing\.npz does not exist; create it with prepare_data\.py"):
        archive.open_train(tmp_path / "missing.npz")
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(UserError, match="not an archive written by prepare_data.py"):
        archive.open_train(text)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.arange(3))
    with pytest.raises(UserError, match="not an archive written by prepare_data.py"):
        archive.open_test(foreign)
    with pytest.raises(UserError, match="is a train archive, expected a test archive"):
        archive.open_test(path)
    with pytest.raises(UserError, match="is a folder"):
        archive.open_train(tmp_path)


def rewrite_member(source: Path, target: Path, name: str, data: bytes, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", allowZip64=True) as zout:
        for info in zin.infolist():
            content = data if info.filename == name else zin.read(info.filename)
            zout.writestr(info.filename, content,
                          compress_type=compress if info.filename.startswith("batch") else zipfile.ZIP_STORED)


def npy_bytes(array):
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def test_newer_format_and_damaged_archives_are_refused(tmp_path, train_path):
    path, _ = train_path
    meta = archive.read_meta(path)
    newer = tmp_path / "newer.npz"
    future = json.dumps({**meta, "format_version": archive.FORMAT_VERSION + 1}).encode()
    rewrite_member(path, newer, "meta.npy", npy_bytes(np.frombuffer(future, np.uint8)))
    with pytest.raises(UserError, match="archive format 2; this version reads up to 1"):
        archive.open_train(newer)
    inconsistent = tmp_path / "inconsistent.npz"
    rewrite_member(path, inconsistent, "labels.npy", npy_bytes(np.zeros(18, np.int32)))
    with pytest.raises(UserError, match="index is inconsistent"):
        archive.open_train(inconsistent)
    compressed = tmp_path / "compressed.npz"
    rewrite_member(path, compressed, "", b"", compress=zipfile.ZIP_DEFLATED)
    with archive.open_train(compressed) as train, pytest.raises(UserError, match="compressed members"):
        train.read([0])


@pytest.mark.parametrize("kind, edit, message", [
    ("train", lambda meta: meta.pop("image_size"), r"lacks 'image_size'"),
    ("train", lambda meta: meta["classes"][0].pop("label"), r"lacks classes\[0\]\.'label'"),
    ("train", lambda meta: meta["classes"][0].update(label=2**40), r"classes\[0\]\.'label' is 1099511627776"),
    ("test", lambda meta: meta.pop("folders"), r"lacks 'folders'"),
    ("test", lambda meta: meta["folders"][0].pop("name"), r"lacks folders\[0\]\.'name'"),
])
def test_metadata_lacking_a_field_is_refused_when_opened(tmp_path, train_path, kind, edit, message):
    """Every metadata field a reader uses is checked when the archive is opened: one line, not a
    KeyError in the middle of a run."""
    if kind == "train":
        path, _ = train_path
    else:
        path = tmp_path / "test.npz"
        with archive.TestWriter(path, image_size=SIZE) as writer:
            writer.add_folder("orig", [(np.zeros((*SIZE, 3), np.uint8), 7, "7/a.png")])
            writer.finish({"classes": [{"label": 7, "name": "seven"}]})
            writer.close()
            writer.commit()
    meta = archive.read_meta(path)
    edit(meta)
    damaged = tmp_path / "damaged.npz"
    rewrite_member(path, damaged, "meta.npy", npy_bytes(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
    with pytest.raises(UserError, match=rf"damaged\.npz is damaged: its metadata('s)? .*{message}"):
        (archive.open_train if kind == "train" else archive.open_test)(damaged)
