"""The two scripts as users run them: console output, and every bad input ending in one
line on stderr, exit status 2, no traceback and nothing written."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imagegen import make_class_folders
from influence import archive

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, timeout=120)
    # Decoded by hand: text mode would turn the progress bars' carriage returns into newlines.
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def terminal_lines(text: str):
    """The non-blank lines a terminal would show: each carriage return starts the line over."""
    return [shown for line in text.split("\n") if (shown := line.split("\r")[-1].strip())]


def tree(path: Path):
    """Every file under ``path`` with its size: what a failed run must leave as it was."""
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


@pytest.fixture
def folders(tmp_path):
    make_class_folders(tmp_path / "train", {"n01440764": 6, "n01443537": 5}, size=(12, 12))
    make_class_folders(tmp_path / "orig", {"0": 2, "n01443537": 1}, size=(12, 12))
    make_class_folders(tmp_path / "wb", {"1": 2}, size=(12, 12))
    (tmp_path / "train/n01440764/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return tmp_path


def test_prepare_data_console_output_and_archives(folders):
    result = run_script("prepare_data.py", "-tr", "train", "-ts", "orig", "wb", "-bs", "4", "--image-size", "8x6",
                        "-o", "out", "--seed", "3", "--workers", "2", cwd=folders)
    assert result.returncode == 0, result.stderr
    out_lines = result.stdout.splitlines()
    assert out_lines[:2] == ["Create train archive... finished", "Create test archive... finished"]
    assert out_lines[2].startswith("Done: train.npz 11 images, 2 classes, 4 batches, 1 skipped, ")
    assert "; test.npz 5 images in 2 folders, 0 skipped, " in out_lines[2]
    assert out_lines[3] == "Wrote out/train.npz and out/test.npz"
    err = result.stderr
    for bar in ("Parse train: 100%", "Pack batches: 100%", "Parse orig: 100%", "Parse wb: 100%"):
        assert bar in err
    assert "warning: skipped train/n01440764/broken.jpg: " in err
    assert err.index("Parse train") < err.index("Pack batches") < err.index("Parse orig") < err.index("Parse wb")
    with archive.open_train(folders / "out/train.npz") as train:
        assert train.image_size == (6, 8) and len(train) == 11 and train.meta["seed"] == 3
        assert np.diff(train.batch_start).tolist() == [4, 2, 4, 1]
    with archive.open_test(folders / "out/test.npz") as test:
        assert test.folders == ["orig", "wb"]
        assert test.folder("orig").labels.tolist() == [0, 0, 1] and test.folder("wb").labels.tolist() == [1, 1]


def test_prepare_only_test_rewrites_test_only(folders):
    assert run_script("prepare_data.py", "-tr", "train", "-ts", "orig", "--image-size", "8", cwd=folders).returncode == 0
    train_before = (folders / "train.npz").read_bytes()
    result = run_script("prepare_only_test.py", "-ts", "wb", "orig", cwd=folders)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Create test archive... finished",
        f"Done: test.npz 5 images in 2 folders, 0 skipped, {(folders / 'test.npz').stat().st_size:,} bytes "
        f"(in {folders})",
        "Wrote test.npz",
    ]
    assert (folders / "train.npz").read_bytes() == train_before
    with archive.open_test(folders / "test.npz") as test:
        assert test.folders == ["wb", "orig"] and test.image_size == (8, 8)


def make_bad_inputs(root: Path):
    """Folders for each bad-input case."""
    (root / "empty_train").mkdir()
    make_class_folders(root / "train_hole", {"a": 1}, size=(8, 8))
    (root / "train_hole/b").mkdir()
    (root / "train_hole/b/readme.txt").write_text("no images here")
    make_class_folders(root / "test_ab", {"0": 1, "b": 1}, size=(8, 8))
    make_class_folders(root / "test_unknown", {"1000": 1}, size=(8, 8))
    make_class_folders(root / "other/orig", {"0": 1}, size=(8, 8))
    (root / "a_file").write_text("x")


BAD_INPUTS = {
    "missing train folder": (["-tr", "nowhere", "-ts", "orig"], r"train folder nowhere does not exist"),
    "train is a file": (["-tr", "a_file", "-ts", "orig"], r"train folder a_file is not a folder"),
    "missing test folder": (["-tr", "train", "-ts", "orig", "nothere"], r"test folder nothere does not exist"),
    "empty train folder": (["-tr", "empty_train", "-ts", "orig"],
                           r"train folder empty_train has no class folders \(expected one sub-folder per class\)"),
    "class folder without images": (["-tr", "train_hole", "-ts", "test_ab"],
                                    r"class folder train_hole/b has no images"),
    "batch size 0": (["-tr", "train", "-ts", "orig", "-bs", "0"], r"batch size 0 is invalid: it must be at least 1"),
    "batch size not a number": (["-tr", "train", "-ts", "orig", "-bs", "many"],
                                r"argument -bs/--archive-batch-size(/--batch-size)?: 'many' is not a whole number"),
    "unknown test class": (["-tr", "train", "-ts", "test_unknown"],
                           r"test class folder test_unknown/1000 matches no class: expected an ILSVRC-2012 wnid "
                           r"\(train has n01440764, n01443537\) or a label index 0-999"),
    "two test folders with one name": (["-tr", "train", "-ts", "orig", "other/orig"],
                                       r"two test folders are named 'orig' \(orig and other/orig\)"),
    "output directory is a file": (["-tr", "train", "-ts", "orig", "-o", "a_file"],
                                   r"output directory a_file cannot be created: .*a_file is not a folder"),
    "output directory below a file": (["-tr", "train", "-ts", "orig", "-o", "a_file/out"],
                                      r"output directory a_file/out cannot be created: .*a_file is not a folder"),
    "bad image size": (["-tr", "train", "-ts", "orig", "--image-size", "64x"],
                       r"argument --image-size: image size '64x' is not N or WIDTHxHEIGHT"),
    "no test folders": (["-tr", "train"], r"the following arguments are required: -ts/--test"),
    "negative seed": (["-tr", "train", "-ts", "orig", "--seed", "-1"], r"argument --seed: '-1' is negative"),
    "batch too large for memory": (["-tr", "train", "-ts", "orig", "-bs", "100000000000"],
                                   r"argument -bs/--archive-batch-size: 100000000000 images of 224x224 make a "
                                   r"batch over 4 GiB"),
    # calculate.py's -b is its Hessian minibatch; here it must not quietly mean -bs.
    "-b is not an abbreviation": (["-tr", "train", "-ts", "orig", "-b", "4"], r"-b is not an option of prepare_data.py .*-bs/--archive-batch-size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_nothing_written(folders, case):
    make_bad_inputs(folders)
    args, message = BAD_INPUTS[case]
    before = tree(folders)
    result = run_script("prepare_data.py", *args, cwd=folders)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = terminal_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prepare_data.py: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert tree(folders) == before


def test_strict_corrupt_file_is_exit_2_and_nothing_written(folders):
    before = tree(folders)
    result = run_script("prepare_data.py", "-tr", "train", "-ts", "orig", "--strict", "--workers", "1", cwd=folders)
    assert result.returncode == 2
    *finished, error = terminal_lines(result.stderr)
    assert finished == [line for line in finished if line.startswith("Parse train: 100%")]  # completed work only
    assert error.startswith("prepare_data.py: error: cannot read image train/n01440764/broken.jpg: ")
    assert "Traceback" not in result.stderr and "warning" not in result.stderr
    assert tree(folders) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_directory(folders):
    (folders / "locked").mkdir(mode=0o500)
    result = run_script("prepare_data.py", "-tr", "train", "-ts", "orig", "-o", "locked", cwd=folders)
    assert result.returncode == 2 and "output directory locked is not writable" in result.stderr
    assert list((folders / "locked").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["-ts", "orig", "orig"], r"two test folders are named 'orig'"),
    (["-ts", "nowhere"], r"test folder nowhere does not exist"),
    (["-ts", "cats"], r"test class folder cats/cat matches no class: without a train.npz"),
    (["-ts", "orig", "--image-size", "0"], r"image size '0' must be at least 1x1"),
    (["-ts", "huge"], r"test class folder huge/99999999999: label 99999999999 is too large"),
])
def test_prepare_only_test_bad_input(folders, args, message):
    make_class_folders(folders / "cats", {"cat": 1}, size=(8, 8))
    make_class_folders(folders / "huge", {"99999999999": 1}, size=(8, 8))
    before = tree(folders)
    result = run_script("prepare_only_test.py", *args, cwd=folders)
    assert result.returncode == 2 and result.stdout == ""
    lines = terminal_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("prepare_only_test.py: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert tree(folders) == before


def test_prepare_only_test_refuses_a_foreign_train_npz(folders):
    (folders / "train.npz").write_text("not ours")
    before = tree(folders)
    result = run_script("prepare_only_test.py", "-ts", "orig", cwd=folders)
    assert result.returncode == 2
    assert result.stderr.strip() == "prepare_only_test.py: error: train.npz is not an archive written by prepare_data.py"
    assert tree(folders) == before


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the decoding workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """Enough images that decoding them at 128 px outlasts the time a signal takes to land."""
    root = tmp_path_factory.mktemp("many")
    make_class_folders(root / "train", {"a": 1500, "b": 1500})
    return root / "train"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize("script, signal_name, target", [
    ("prepare_data.py", "SIGINT", "process"),
    ("prepare_data.py", "SIGTERM", "process"),
    ("prepare_data.py", "SIGINT", "group"),
    ("prepare_data.py", "SIGTERM", "group"),
    ("prepare_only_test.py", "SIGINT", "group"),
    ("prepare_only_test.py", "SIGTERM", "group"),
])
def test_interrupt_while_decoding_ends_promptly_and_cleanly(tmp_path, many_images, script, signal_name, target):
    """Ctrl-C, or a scheduler's SIGTERM, to the process or to its whole group (workers included)
    while the workers decode: exit 130 within seconds, one line, no worker traceback, no partial
    file, and the archives of the previous run byte for byte."""
    import signal
    import time

    make_class_folders(tmp_path / "small", {"a": 2, "b": 2}, size=(8, 8))
    assert run_script("prepare_data.py", "-tr", "small", "-ts", "small", "-o", "out", "--image-size", "128",
                      cwd=tmp_path).returncode == 0
    before = {name: (tmp_path / "out" / name).read_bytes() for name in ("train.npz", "test.npz")}
    (tmp_path / "train").symlink_to(many_images)
    args = ["-ts", "train"] if script == "prepare_only_test.py" else ["-tr", "train", "-ts", "small"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args, "-o", "out", "--image-size", "128", "--workers", "2"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (list((tmp_path / "out").glob("*.partial-*")) and child_pids(process.pid)):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.005)
        number = getattr(signal, signal_name)
        if target == "group":
            os.killpg(process.pid, number)
        else:
            process.send_signal(number)
        _, err = process.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a failed run
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 130, err
    assert terminal_lines(err)[-1].startswith(f"{script}: interrupted"), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert sorted(os.listdir(tmp_path / "out")) == ["test.npz", "train.npz"]
    for name, content in before.items():
        assert (tmp_path / "out" / name).read_bytes() == content
