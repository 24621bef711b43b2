"""prepare_data / prepare_only_test through the package: labels, image modes, skipped
files, batches, atomicity, test-folder resolution. Generated images, 8-16 px."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen import image_array, make_class_folders
from influence import archive, prepare
from influence.errors import UserError
from influence.folders import natural_key

SIZE = (16, 16)


def run_prepare(tmp_path, train, tests, *, out="out", **settings):
    settings = {"image_size": SIZE, "batch_size": 4, "workers": 1, **settings}
    return prepare.prepare_data(train=train, tests=tests, out_dir=tmp_path / out, **settings)


def listing(path: Path):
    return sorted(os.listdir(path)) if path.exists() else None


# --------------------------------------------------------------------------- labels


def test_wnid_subset_gets_imagenet_labels(tmp_path):
    counts = {"n04146614": 3, "n01440764": 5, "n01443537": 2}  # school bus, tench, goldfish
    train = make_class_folders(tmp_path / "train", counts)
    test = make_class_folders(tmp_path / "orig", {"779": 1, "n01440764": 2, "1": 1})
    run_prepare(tmp_path, train, [test])
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert t.meta["labeling"] == "imagenet"
        assert t.class_names == {0: "tench", 1: "goldfish", 779: "school_bus"}
        assert sorted(set(t.labels.tolist())) == [0, 1, 779]
        for label, folder in [(0, "n01440764"), (1, "n01443537"), (779, "n04146614")]:
            ids = t.ids[t.label_indices(label)]
            assert len(ids) == counts[folder] and all(i.startswith(folder + "/") for i in ids)
        assert [(c["folder"], c["label"], c["count"]) for c in t.meta["classes"]] == [
            ("n01440764", 0, 5), ("n01443537", 1, 2), ("n04146614", 779, 3)]
    with archive.open_test(tmp_path / "out/test.npz") as t:
        orig = t.folder("orig")
        # class folders in natural order: 1, 779, n01440764; index and wnid resolve alike
        assert orig.labels.tolist() == [1, 779, 0, 0]
        assert orig.ids.tolist() == ["1/img_0000.png", "779/img_0000.png", "n01440764/img_0000.png",
                                     "n01440764/img_0001.png"]
        assert t.class_names == {0: "tench", 1: "goldfish", 779: "school_bus"}


def test_other_names_get_natural_order_labels(tmp_path):
    names = ["10", "2", "cat", "Dog", "1"]
    train = make_class_folders(tmp_path / "train", {name: 2 for name in names})
    test = make_class_folders(tmp_path / "test", {"2": 1, "Dog": 1})
    run_prepare(tmp_path, train, [test])
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert t.meta["labeling"] == "natural"
        assert t.class_names == {0: "1", 1: "2", 2: "10", 3: "cat", 4: "Dog"}
        for label, name in t.class_names.items():
            assert {i.split("/")[0] for i in t.ids[t.label_indices(label)]} == {name}
    with archive.open_test(tmp_path / "out/test.npz") as t:
        assert t.folder("test").labels.tolist() == [1, 4]  # by name: "2" is the folder 2, label 1


def test_natural_key():
    names = ["img10.png", "img2.png", "Img1.png", "a", "10", "9", "b2c10", "b2c9", "img02.png"]
    assert sorted(names, key=natural_key) == ["9", "10", "a", "b2c9", "b2c10", "Img1.png", "img02.png",
                                              "img2.png", "img10.png"]


def test_index_names_resolve_for_non_numbered_classes(tmp_path):
    train = make_class_folders(tmp_path / "train", {"cat": 1, "dog": 1, "emu": 1})
    test = make_class_folders(tmp_path / "test", {"2": 1, "cat": 1})
    run_prepare(tmp_path, train, [test])
    with archive.open_test(tmp_path / "out/test.npz") as t:
        assert t.folder("test").labels.tolist() == [2, 0]
        assert t.class_names == {0: "cat", 2: "emu"}


def test_mixed_wnid_and_other_names_is_an_error(tmp_path):
    train = make_class_folders(tmp_path / "train", {"n01440764": 1, "n01440765": 1, "cat": 1})
    with pytest.raises(UserError, match=r"train class folders mix ILSVRC-2012 WordNet ids \(n01440764\) with other names "
                                          r"\(cat, n01440765\)"):
        run_prepare(tmp_path, train, [train])
    assert listing(tmp_path / "out") is None


@pytest.mark.parametrize("train_names, test_name, expected", [
    (["cat", "dog"], "2", r"test class folder .*test/2 matches no class: expected one of the train class "
                          r"folders cat, dog or a label index 0-1"),
    (["cat", "dog"], "cow", r"matches no class: expected one of the train class folders cat, dog or a label"),
    (["1", "5"], "0", r"matches no class: expected one of the train class folders 1, 5$"),
    (["n01440764"], "1000", r"matches no class: expected an ILSVRC-2012 wnid \(train has n01440764\) "
                            r"or a label index 0-999"),
    (["n01440764"], "tench", r"matches no class"),
])
def test_unknown_test_class_lists_what_was_expected(tmp_path, train_names, test_name, expected):
    train = make_class_folders(tmp_path / "train", {name: 1 for name in train_names})
    test = make_class_folders(tmp_path / "test", {test_name: 1})
    with pytest.raises(UserError, match=expected):
        run_prepare(tmp_path, train, [test])
    assert listing(tmp_path / "out") is None


# --------------------------------------------------------------------------- image modes


def save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def over_white(rgb, alpha):
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a))


def mode_files(root: Path):
    """Write one file per image mode into ``root/<class>/``; returns {id: expected (16, 16, 3) uint8}
    where the expected pixels come from the pixels written (exact for lossless formats)."""
    rgb = image_array(0, 0, SIZE)  # (16, 16, 3) uint8 noise around a class colour
    expected = {}

    def lossless(name, image, want, **options):
        save(root / name, image, **options)
        expected[name] = np.asarray(want, dtype=np.uint8)

    lossless("a/rgb.png", Image.fromarray(rgb), rgb)
    grey = rgb[..., 0]
    lossless("a/grey.png", Image.fromarray(grey, "L"), np.stack([grey] * 3, -1))
    sixteen = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    lossless("a/grey16.png", Image.fromarray(sixteen), np.stack([np.arange(256).reshape(16, 16)] * 3, -1))
    alpha = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    lossless("a/alpha.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), over_white(rgb, alpha))
    palette = Image.fromarray(rgb).quantize(colors=16)
    lossless("a/palette.png", palette, np.asarray(palette.convert("RGB")))
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    want = np.asarray(palette.convert("RGB")).copy()
    want[np.asarray(palette) == 0] = 255
    lossless("a/palette_transparent.png", transparent, want, transparency=0)
    lossless("b/bitmap.bmp", Image.fromarray(rgb), rgb)
    lossless("b/lossless.webp", Image.fromarray(rgb), rgb, lossless=True)
    lossless("b/page.tiff", Image.fromarray(rgb), rgb)
    # GIF: two frames of few colours (exact in a palette); the first frame is taken
    first = np.zeros((16, 16, 3), np.uint8)
    first[:8] = (200, 30, 40)
    first[8:] = (10, 120, 250)
    second = np.full((16, 16, 3), 90, np.uint8)
    lossless("b/anim.gif", Image.fromarray(first), first, save_all=True, append_images=[Image.fromarray(second)])
    # JPEG is lossy: compare with the source within a tolerance (checked by the caller)
    save(root / "c/photo.jpg", Image.fromarray(rgb), quality=95)
    save(root / "c/cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): a wide image displayed tall
    wide = np.zeros((8, 32, 3), np.uint8)
    wide[:, :16] = 250  # left half bright -> after the rotation, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    save(root / "c/rotated.jpg", Image.fromarray(wide), quality=95, exif=exif.tobytes())
    return expected, rgb


def test_every_image_mode_decodes_to_its_source_pixels(tmp_path):
    expected, rgb = mode_files(tmp_path / "train")
    run_prepare(tmp_path, tmp_path / "train", [tmp_path / "train"])
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert t.meta["skipped"] == [] and len(t) == len(expected) + 3
        images = dict(zip(t.ids, t.read(np.arange(len(t)))))
    for image_id, want in expected.items():
        np.testing.assert_allclose(images[image_id], want, atol=1, err_msg=image_id)  # alpha: rounding only
        if not image_id.endswith("alpha.png"):
            np.testing.assert_array_equal(images[image_id], want, err_msg=image_id)
    for image_id in ("c/photo.jpg", "c/cmyk.jpg"):
        with Image.open(tmp_path / "train" / image_id) as source:  # lossy: what the JPEG decodes to
            np.testing.assert_array_equal(images[image_id], np.asarray(source.convert("RGB")))
        # and the colours are the ones written, not inverted (CMYK) or clipped
        colour_error = images[image_id].reshape(-1, 3).mean(0) - rgb.reshape(-1, 3).mean(0)
        assert np.abs(colour_error).max() < 4, (image_id, colour_error)
    rotated = images["c/rotated.jpg"].astype(int)  # 8x32 shown tall, then resized to 16x16
    assert rotated[:7].mean() > 200 and rotated[9:].mean() < 50


def test_resize_to_width_x_height(tmp_path):
    assert prepare.parse_image_size("224") == (224, 224)
    assert prepare.parse_image_size("64x48") == (48, 64)  # width x height -> (H, W)
    for bad in ("0", "12x", "x", "-3", "4x0", "big"):
        with pytest.raises(ValueError):
            prepare.parse_image_size(bad)
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, 15:] = 255  # right half white
    save(tmp_path / "train/a/wide.png", Image.fromarray(pixels))
    run_prepare(tmp_path, tmp_path / "train", [tmp_path / "train"], image_size=(6, 12))
    with archive.open_train(tmp_path / "out/train.npz") as t:
        image = t.read([0])[0]
    assert image.shape == (6, 12, 3)
    want = np.asarray(Image.fromarray(pixels).resize((12, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(image, want)
    assert image[:, :5].max() == 0 and image[:, 7:].min() == 255


def test_non_images_and_hidden_files_are_ignored(tmp_path):
    train = make_class_folders(tmp_path / "train", {"cat": 2, "dog": 1})
    (train / "cat/notes.txt").write_text("not an image")
    (train / "cat/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "cat/._img_0000.png").write_bytes(b"AppleDouble")  # macOS metadata with an image name
    (train / "README.md").write_text("top-level files are not classes")
    save(train / "dog/.hidden/img.png", Image.fromarray(image_array(1, 9)))
    save(train / "dog/more/img_0009.png", Image.fromarray(image_array(1, 9)))  # sub-folders count
    run_prepare(tmp_path, train, [train])
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert sorted(t.ids) == ["cat/img_0000.png", "cat/img_0001.png", "dog/img_0000.png",
                                 "dog/more/img_0009.png"]
        assert t.meta["counts"]["ignored"] == 4 and t.meta["skipped"] == []


# --------------------------------------------------------------------------- corrupt files


def corrupt_files(root: Path, folder="cat"):
    jpeg = io.BytesIO()
    Image.fromarray(image_array(0, 99, (64, 64))).save(jpeg, "JPEG")
    (root / folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / folder / "garbage.png").write_bytes(b"this is not a png")


def test_corrupt_files_are_skipped_recorded_and_counted(tmp_path, capsys):
    train = make_class_folders(tmp_path / "train", {"cat": 3, "dog": 2})
    corrupt_files(train)
    run_prepare(tmp_path, train, [train])
    captured = capsys.readouterr()
    for name in ("truncated.jpg", "garbage.png"):
        assert f"warning: skipped {train}/cat/{name}: " in captured.err
    assert "truncated" in captured.err
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert len(t) == 5 and "cat/truncated.jpg" not in set(t.ids)
        assert sorted(record["path"] for record in t.meta["skipped"]) == ["cat/garbage.png", "cat/truncated.jpg"]
        assert all(record["reason"] for record in t.meta["skipped"])
        assert t.meta["counts"]["skipped"] == 2
        assert [(c["folder"], c["count"], c["skipped"]) for c in t.meta["classes"]] == [("cat", 3, 2), ("dog", 2, 0)]
    with archive.open_test(tmp_path / "out/test.npz") as t:  # the same folder as a test set skips them too
        assert t.meta["counts"] == {"folders": 1, "images": 5, "skipped": 2}
        assert sorted(r["path"] for r in t.meta["folders"][0]["skipped"]) == ["cat/garbage.png", "cat/truncated.jpg"]
    assert "2 skipped" in captured.out and "Done: train.npz 5 images, 2 classes" in captured.out


def test_strict_makes_a_corrupt_file_an_error_and_writes_nothing(tmp_path):
    train = make_class_folders(tmp_path / "train", {"cat": 3, "dog": 2})
    corrupt_files(train)
    with pytest.raises(UserError, match=r"cannot read image .*cat/(garbage\.png|truncated\.jpg): .*--strict"):
        run_prepare(tmp_path, train, [train], strict=True)
    assert listing(tmp_path / "out") == []


def test_class_of_only_corrupt_files_is_an_error(tmp_path):
    train = make_class_folders(tmp_path / "train", {"cat": 1})
    (train / "dog").mkdir()
    (train / "dog/broken.png").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"class folder .*dog has no readable images \(1 skipped\)"):
        run_prepare(tmp_path, train, [train])
    assert listing(tmp_path / "out") == []


# --------------------------------------------------------------------------- batches, shuffle, parallel


def test_batches_hold_one_label_shuffled_by_seed(tmp_path):
    train = make_class_folders(tmp_path / "train", {"a": 10, "b": 3, "c": 5})
    run_prepare(tmp_path, train, [train], batch_size=4, seed=1)
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert np.diff(t.batch_start).tolist() == [4, 4, 2, 3, 4, 1]  # short batch at each label's end
        assert t.batch_label.tolist() == [0, 0, 0, 1, 2, 2]
        assert t.meta["batch_size"] == 4 and t.meta["seed"] == 1
        first = t.ids.tolist()
        assert sorted(first) == sorted(f"{c}/img_{i:04d}.png" for c, n in [("a", 10), ("b", 3), ("c", 5)]
                                       for i in range(n))
        assert first[:10] != sorted(first[:10])  # shuffled within the label
    run_prepare(tmp_path, train, [train], batch_size=4, seed=1, out="again")
    run_prepare(tmp_path, train, [train], batch_size=4, seed=2, out="other")
    with archive.open_train(tmp_path / "again/train.npz") as t:
        assert t.ids.tolist() == first
    with archive.open_train(tmp_path / "other/train.npz") as t:
        assert t.ids.tolist() != first and sorted(t.ids) == sorted(first)


def test_read_gives_the_source_pixels_of_each_id(tmp_path):
    counts = {"a": 7, "b": 6}
    train = make_class_folders(tmp_path / "train", counts)
    run_prepare(tmp_path, train, [train], batch_size=3)
    rng = np.random.default_rng(0)
    with archive.open_train(tmp_path / "out/train.npz") as t:
        indices = rng.permutation(len(t))
        for index, image in zip(indices, t.read(indices)):
            folder, name = t.ids[index].split("/")
            source = image_array(list(counts).index(folder), int(name[4:8]), SIZE)
            np.testing.assert_array_equal(image, source)


def test_parallel_decoding_gives_the_same_archives(tmp_path):
    train = make_class_folders(tmp_path / "train", {"a": 40, "b": 25})
    corrupt_files(make_class_folders(tmp_path / "test", {"b": 20}), "b")
    run_prepare(tmp_path, train, [tmp_path / "test"], workers=1, out="serial")
    run_prepare(tmp_path, train, [tmp_path / "test"], workers=2, out="parallel")
    for name in ("train.npz", "test.npz"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()


# --------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("stage", ["train batch", "test folder"])
@pytest.mark.parametrize("failure", [RuntimeError("injected"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_previous_archives(tmp_path, monkeypatch, stage, failure):
    train = make_class_folders(tmp_path / "train", {"a": 12, "b": 9})
    test = make_class_folders(tmp_path / "test", {"a": 4, "b": 4})
    run_prepare(tmp_path, train, [test])
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("train.npz", "test.npz")}
    make_class_folders(tmp_path / "train", {"a": 20, "b": 20})  # new content for the second run
    calls = []
    if stage == "train batch":
        original = archive.TrainWriter.add_batch

        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                assert self.partial.exists()
                raise failure
            return original(self, *args, **kwargs)

        monkeypatch.setattr(archive.TrainWriter, "add_batch", failing)
    else:
        original = archive.TestWriter.add_folder

        def failing(self, name, records):
            calls.append(1)
            next(records)
            raise failure

        monkeypatch.setattr(archive.TestWriter, "add_folder", failing)
    with pytest.raises(type(failure)):
        run_prepare(tmp_path, train, [test])
    assert calls
    assert sorted(os.listdir(tmp_path / "out")) == ["test.npz", "train.npz"]  # no partial files
    for name, content in before.items():
        assert (tmp_path / "out" / name).read_bytes() == content, name


# --------------------------------------------------------------------------- prepare_only_test


def test_prepare_only_test_uses_train_classes_and_never_touches_train(tmp_path):
    train = make_class_folders(tmp_path / "train", {"cat": 2, "dog": 2, "emu": 2})
    run_prepare(tmp_path, train, [train], image_size=(8, 12))
    train_npz = tmp_path / "out/train.npz"
    before = (train_npz.read_bytes(), train_npz.stat().st_mtime_ns, train_npz.stat().st_ino)
    orig = make_class_folders(tmp_path / "orig", {"emu": 1, "0": 2}, size=(20, 20))
    styled = make_class_folders(tmp_path / "styled", {"dog": 1}, size=(20, 20))
    prepare.prepare_only_test(tests=[orig, styled], out_dir=tmp_path / "out", workers=1)
    assert (train_npz.read_bytes(), train_npz.stat().st_mtime_ns, train_npz.stat().st_ino) == before
    with archive.open_test(tmp_path / "out/test.npz") as t:
        assert t.folders == ["orig", "styled"]
        assert t.image_size == (8, 12)  # the train archive's size by default
        assert t.folder("orig").labels.tolist() == [0, 0, 2] and t.folder("styled").labels.tolist() == [1]
        assert t.folder("orig").images.shape == (3, 8, 12, 3)
        assert t.meta["train_archive"] == "train.npz" and t.meta["labeling"] == "natural"
        assert t.class_names == {0: "cat", 1: "dog", 2: "emu"}
    with pytest.raises(UserError, match=r"--image-size 16 differs from .*train.npz's 12x8"):
        prepare.prepare_only_test(tests=[orig], out_dir=tmp_path / "out", image_size=(16, 16), workers=1)


def test_prepare_only_test_without_train_archive(tmp_path):
    orig = make_class_folders(tmp_path / "orig", {"779": 1, "n01440764": 1})
    prepare.prepare_only_test(tests=[orig], out_dir=tmp_path / "out", workers=1)
    assert listing(tmp_path / "out") == ["test.npz"]
    with archive.open_test(tmp_path / "out/test.npz") as t:
        assert t.image_size == (224, 224)
        assert t.folder("orig").labels.tolist() == [779, 0]
        assert t.class_names == {0: "tench", 779: "779"}
        assert t.meta["train_archive"] is None
    cats = make_class_folders(tmp_path / "cats", {"cat": 1})
    with pytest.raises(UserError, match=r"cats/cat matches no class: without a train.npz in the output directory"):
        prepare.prepare_only_test(tests=[cats], out_dir=tmp_path / "out", workers=1)


def test_meta_records_sources_and_settings(tmp_path):
    train = make_class_folders(tmp_path / "train", {"a": 3})
    test = make_class_folders(tmp_path / "orig", {"0": 1})
    run_prepare(tmp_path, train, [test], seed=7, batch_size=2)
    meta = archive.read_meta(tmp_path / "out/train.npz")
    assert meta["source"] == str(train) and meta["image_size"] == [16, 16] and meta["resize"] == "bilinear"
    assert (meta["seed"], meta["batch_size"], meta["format_version"]) == (7, 2, archive.FORMAT_VERSION)
    assert meta["counts"] == {"images": 3, "batches": 2, "classes": 1, "skipped": 0, "ignored": 0}
    meta = archive.read_meta(tmp_path / "out/test.npz")
    assert meta["folders"][0]["source"] == str(test) and meta["folders"][0]["classes"] == [{"folder": "0", "label": 0}]
    json.dumps(meta)  # plain JSON all the way down


# --------------------------------------------------------------------------- output directory


def test_unwritable_output_directory_is_refused_before_reading_images(tmp_path, monkeypatch):
    """The permission check as root cannot be provoked with chmod, so the probe's failure is simulated
    (tests/test_prepare_cli.py runs the real chmod case for other users)."""
    import errno
    import tempfile

    train = make_class_folders(tmp_path / "train", {"a": 1})
    (tmp_path / "out").mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match=r"output directory .*out is not writable: Permission denied"):
        run_prepare(tmp_path, train, [train])
    assert listing(tmp_path / "out") == []


def test_disk_full_while_writing_is_one_line_and_keeps_previous_archives(tmp_path, monkeypatch):
    import errno

    train = make_class_folders(tmp_path / "train", {"a": 9, "b": 9})
    run_prepare(tmp_path, train, [train])
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("train.npz", "test.npz")}
    original = archive.ArchiveWriter.add_array
    calls = []

    def filling_up(self, name, array):
        calls.append(name)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, array)

    monkeypatch.setattr(archive.ArchiveWriter, "add_array", filling_up)
    with pytest.raises(UserError, match=r"cannot write in .*out: No space left on device"):
        run_prepare(tmp_path, train, [train], seed=5)
    assert sorted(os.listdir(tmp_path / "out")) == ["test.npz", "train.npz"]
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("failing", ["train.npz", "test.npz"])
def test_final_renames_are_all_or_nothing(tmp_path, monkeypatch, failing):
    """When one archive cannot be put in place, the other is not replaced either."""
    import errno

    train = make_class_folders(tmp_path / "train", {"a": 4, "b": 4})
    run_prepare(tmp_path, train, [train])
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("train.npz", "test.npz")}
    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        if Path(target).name == failing and ".partial-" in Path(source).name:
            raise OSError(errno.EIO, "Input/output error", str(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match="Input/output error"):
        run_prepare(tmp_path, train, [train], seed=9, batch_size=3)
    assert listing(tmp_path / "out") == ["test.npz", "train.npz"]
    assert {name: (tmp_path / "out" / name).read_bytes() for name in before} == before


# --------------------------------------------------------------------------- archive pairing


@pytest.mark.parametrize("recorded", [True, False], ids=["fingerprint", "older archives"])
def test_test_archive_prepared_against_another_train_archive_is_refused(tmp_path, monkeypatch, recorded):
    """A class folder added to the train folder shifts every natural-order label: a test archive
    prepared before names other classes with the new train archive, and must be refused."""
    import shutil

    from influence import job
    from influence.settings import Settings

    if not recorded:  # archives written before the fingerprint existed
        monkeypatch.setattr(prepare, "train_fingerprint", lambda *args: None)
    make_class_folders(tmp_path / "train", {"cat": 3, "dog": 3})
    make_class_folders(tmp_path / "test", {"cat": 1, "dog": 1})
    run_prepare(tmp_path, tmp_path / "train", [tmp_path / "test"], out="old")
    shutil.copytree(tmp_path / "train", tmp_path / "train2")
    make_class_folders(tmp_path / "train2", {"aardvark": 3})  # sorts first: cat becomes label 1
    run_prepare(tmp_path, tmp_path / "train2", [tmp_path / "test"], out="new")
    with archive.open_train(tmp_path / "new/train.npz") as train, archive.open_test(tmp_path / "old/test.npz") as test:
        assert test.folder("test").labels.tolist() == [0, 1]  # cat, dog under the old labelling
        assert train.class_names[0] == "aardvark"
        with pytest.raises(UserError, match=r"old/test\.npz .*label.* differently|labelled with another class list"):
            archive.check_pairing(train, test)
    with archive.open_train(tmp_path / "new/train.npz") as train, archive.open_test(tmp_path / "new/test.npz") as test:
        archive.check_pairing(train, test)  # the matching pair passes
    # calculate.py refuses the pair before it loads any model.
    with pytest.raises(UserError, match=r"old/test\.npz"):
        job.calculate(train_path=tmp_path / "new/train.npz", test_path=tmp_path / "old/test.npz",
                      output_dir=tmp_path / "calc", settings=Settings(), model_path=tmp_path / "absent.keras")
    assert not (tmp_path / "calc").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_or_dangling_link_in_a_class_folder_is_skipped_and_counted(tmp_path):
    """Opening a FIFO named like an image waits forever for a writer: the scan must pass it by."""
    from influence.folders import image_files

    train = make_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    os.mkfifo(train / "a" / "pipe.jpg")
    (train / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    files, ignored = image_files(train / "a", "a")
    assert files == ["a/img_0000.png", "a/img_0001.png"] and ignored == 1
    run_prepare(tmp_path, train, [train])
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert len(t) == 4 and t.meta["counts"]["ignored"] == 2


def test_huge_batch_size_holds_no_more_than_the_largest_class(tmp_path):
    train = make_class_folders(tmp_path / "train", {"a": 3, "b": 2})
    run_prepare(tmp_path, train, [train], batch_size=10**9)  # one batch per class, not 10**9 images of memory
    with archive.open_train(tmp_path / "out/train.npz") as t:
        assert np.diff(t.batch_start).tolist() == [3, 2] and t.meta["batch_size"] == 10**9
