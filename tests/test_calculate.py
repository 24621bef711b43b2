"""calculate.py end to end, on generated folders and a tiny model: through the real script where
the process is part of what is checked (console, start-up noise, a kill, two runs at once), else
through its main in this process (inprocess.py), which saves TensorFlow's start-up per run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from h5files import assert_same_h5
from imagegen import make_class_folders
from inprocess import run_main

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CLASSES = {"alpha": 6, "beta": 5, "gamma": 6}  # labels 0, 1, 2 (natural sort order)
SIZE = 8
# Plain LiSSA (--deflation 0): test_scores_equal_the_engine recomputes its recursion independently.
CALCULATE_ARGS = ["-i", "6", "-b", "4", "--deflation", "0", "--score-batch-size", "4", "--preprocess", "unit", "--seed", "3"]


def run_script(script, *args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def save_tiny_classifier(path, images, labels, *, input_size=SIZE, classes=3):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((input_size, input_size, 3)),
            keras.layers.Conv2D(3, 3, activation="tanh"),
            keras.layers.Flatten(name="flatten"),  # a fixed name, whatever ran before in the process
            keras.layers.Dense(classes, activation="softmax", kernel_regularizer=keras.regularizers.L2(1e-3)),
        ]
    )
    if images is not None:
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
        model.fit(images / 255.0, labels, epochs=15, batch_size=8, verbose=0)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """train.npz / test.npz from prepare_data.py and a tiny softmax CNN trained on them."""
    from influence import archive

    root = tmp_path_factory.mktemp("calc")
    make_class_folders(root / "train", TRAIN_CLASSES, size=(SIZE, SIZE))
    make_class_folders(root / "orig", {"0": 2, "1": 1}, size=(SIZE, SIZE), class_indices={"0": 0, "1": 1})
    make_class_folders(root / "noisy", {"2": 1}, size=(SIZE, SIZE), class_indices={"2": 2}, suffix=".jpg")
    prepared = run_script(
        "prepare_data.py", "-tr", root / "train", "-ts", root / "orig", root / "noisy",
        "-o", root, "--image-size", str(SIZE), "-bs", "4",
    )
    assert prepared.returncode == 0, prepared.stderr
    with archive.open_train(root / "train.npz") as train:
        images = train.read(np.arange(len(train))).astype("float32")
        labels = np.asarray(train.labels)
    save_tiny_classifier(root / "model.keras", images, labels)
    return root


def calculate(workspace, output_dir, *extra, timeout=300):
    return run_script(
        "calculate.py", "--train", workspace / "train.npz", "--test", workspace / "test.npz",
        "--model", workspace / "model.keras", "--output-dir", output_dir, *CALCULATE_ARGS, *extra,
        timeout=timeout,
    )


def calculate_main(argv, capfd, monkeypatch):
    """calculate.py's exit status and output for ``argv``, run in this process (see inprocess.py)."""
    import calculate as script

    return run_main(script.main, argv, prog="calculate.py", capfd=capfd, monkeypatch=monkeypatch)


def calculate_here(workspace, output_dir, *extra, capfd, monkeypatch):
    """:func:`calculate` without a process of its own."""
    return calculate_main(["--train", workspace / "train.npz", "--test", workspace / "test.npz",
                           "--model", workspace / "model.keras", "--output-dir", output_dir, *CALCULATE_ARGS, *extra],
                          capfd, monkeypatch)


EXPECTED_ITEMS = [("orig", 0, 1), ("orig", 0, 2), ("orig", 1, 1), ("noisy", 2, 1)]


STORE_OUTPUTS = ("results.h5", "index.html", "parts", "html")  # tests/test_store.py checks these


def result_files(output_dir):
    """The per-image files of a tree (the consolidated store and its pages left out)."""
    return sorted(str(p.relative_to(output_dir)) for p in Path(output_dir).rglob("*")
                  if p.is_file() and p.relative_to(output_dir).parts[0] not in STORE_OUTPUTS)


def load_scores(output_dir):
    return {
        (folder, label, n): np.load(Path(output_dir) / folder / str(label) / f"{n}.npy", allow_pickle=True).item()
        for folder, label, n in EXPECTED_ITEMS
    }


@pytest.fixture(scope="module")
def full_run(workspace):
    output_dir = workspace / "calc_output"
    result = calculate(workspace, output_dir)
    assert result.returncode == 0, result.stderr
    return output_dir, result


def test_output_tree_is_complete(full_run):
    output_dir, _ = full_run
    expected = []
    for folder, label, n in EXPECTED_ITEMS:
        expected += [f"{folder}/{label}/{name}" for name in (f"{n}.json", f"{n}.npy", f"harmful_{n}.png", f"useful_{n}.png")]
    assert result_files(output_dir) == sorted(expected + [".influence-tree.json"])  # no claim left behind


def test_console_output_follows_the_older_suite(full_run):
    output_dir, result = full_run
    out = result.stdout
    assert "Create label subset for 0 class... finished" in out
    assert out.count("Test image #1 in process") == 3 and out.count("Test image #2 in process") == 1
    assert f"Top 5 harmful -> {output_dir}/orig/0/harmful_1.png" in out
    assert f"Top 5 useful -> {output_dir}/orig/0/useful_1.png" in out
    assert f"All influences dict -> {output_dir}/orig/0/1.npy" in out
    assert "IHVP calculation |" in result.stderr and " est. | 100% |" in result.stderr
    assert "Batch influences" in result.stderr
    assert "Traceback" not in result.stderr


def test_each_dictionary_holds_every_training_image_of_its_label(workspace, full_run):
    from influence import archive

    output_dir, _ = full_run
    with archive.open_train(workspace / "train.npz") as train:
        ids_of = {label: set(np.asarray(train.ids)[train.label_indices(label)]) for label in range(3)}
    for (folder, label, n), scores in load_scores(output_dir).items():
        assert set(scores) == ids_of[label], (folder, label, n)
        assert all(np.isfinite(list(scores.values())))
        assert len(set(scores.values())) == len(scores)  # real, distinct scores


def test_record_top_rows_are_the_dictionary_extremes(workspace, full_run):
    output_dir, _ = full_run
    for (folder, label, n), scores in load_scores(output_dir).items():
        record = json.loads((output_dir / folder / str(label) / f"{n}.json").read_text())
        ranked = sorted(scores, key=scores.get)
        assert [row["id"] for row in record["harmful"]] == ranked[:5]
        assert [row["id"] for row in record["useful"]] == ranked[::-1][:5]
        assert [row["score"] for row in record["harmful"]] == [scores[i] for i in ranked[:5]]
        assert record["label"] == label and record["folder"] == folder and record["number"] == n
        assert record["test_id"].startswith(f"{label}/")
        solver, settings = record["solver"], record["settings"]
        assert settings["solver"]["depth"] == 6 and settings["solver"]["batch_size"] == 4
        assert settings["solver"]["seed"] == 3
        assert solver["method"] == "lissa"
        assert solver["scale_used"] > 0 and solver["effective_damping"] > 0
        assert solver["lissa_damping"] == pytest.approx(solver["effective_damping"] / solver["scale_used"])
        assert len(settings["model_sha256"]) == 64
        norms = np.asarray(solver["lissa_norms"])
        assert norms.shape == (2, 6) and np.all(np.isfinite(norms)) and np.all(norms > 0)
        assert set(record["versions"]) >= {"tensorflow", "keras", "numpy", "python"}


def test_figures_show_the_test_image_and_the_top_five(full_run):
    output_dir, _ = full_run
    with Image.open(output_dir / "orig" / "0" / "harmful_1.png") as figure:
        pixels = np.asarray(figure.convert("RGB")).astype(int)  # (height, width, 3)
    height, width, _ = pixels.shape
    assert 4 < width / height < 7  # one row of square panels with titles above
    ink = np.any(pixels < 250, axis=2)
    band = ink[int(np.argmax(ink.sum(axis=1)))]  # a row through every panel
    edges = np.flatnonzero(np.diff(np.concatenate([[0], band.astype(int), [0]])))  # starts and ends of panels
    assert len(edges) == 2 * 6  # the test image and five training images, side by side
    blue = np.flatnonzero(np.all(np.abs(pixels - (0x1F, 0x77, 0xB4)) <= 8, axis=2).any(axis=0))
    assert edges[0] <= blue[0] and blue[-1] < edges[1]  # only the first, the test image, framed in blue


def test_scores_equal_the_engine(workspace, full_run):
    """Recompute one test image's scores with the engine directly: the job's plumbing
    (image, label, preprocessing, minibatch seeding, id alignment) must not change them."""
    import keras
    import tensorflow as tf

    from influence import archive, hvp, ihvp, params, scores

    output_dir, _ = full_run
    record = json.loads((output_dir / "orig" / "1" / "1.json").read_text())
    model = keras.models.load_model(workspace / "model.keras", compile=False)
    preprocess = lambda images: tf.convert_to_tensor(np.asarray(images, dtype="float32") / 255.0)  # noqa: E731
    with archive.open_train(workspace / "train.npz") as train, archive.open_test(workspace / "test.npz") as test:
        orig = test.folder("orig")
        row = int(np.flatnonzero(np.asarray(orig.labels) == 1)[0])
        variables = params.select(model)
        v = hvp.loss_gradient(model, variables, preprocess(orig.images[row][None]), np.array([1]))
        # The minibatches the job must draw, recomputed here from the documented key
        # (seed, crc32(folder), label, number; chain r > 0 appends r) and the documented
        # curvature sampling (q_i = 0.9 c_i / sum c + 0.1 / N with c_i = 1 - sum_k p_k^2,
        # weights 1 / (B N q_i)) with NumPy alone, not with the job's sampler.
        labels = np.asarray(train.labels)
        p = np.asarray(model(preprocess(train.read(np.arange(len(train)))), training=False), dtype=np.float64)
        c = 1.0 - np.sum(p * p, axis=1)
        q = 0.9 * c / c.sum() + 0.1 / len(c)
        batches = []
        for key in ([3, zlib.crc32(b"orig"), 1, 1], [3, zlib.crc32(b"orig"), 1, 1, 1]):
            rng = np.random.default_rng(key)
            for _ in range(6):
                index = np.sort(rng.choice(len(train), size=4, replace=True, p=q))
                weights = (1.0 / (4 * len(train) * q[index])).astype(np.float32)
                batches.append((preprocess(train.read(index)), labels[index], weights))
        hvp_fn = hvp.training_hvp(model, variables, iter(batches))
        result = ihvp.lissa(hvp_fn, v, depth=6, damping=record["solver"]["lissa_damping"],
                            scale=record["solver"]["scale_used"], repeat=2, average=0.5)
        indices = train.label_indices(1)
        expected = scores.influence_scores(
            model, variables, result.s_test, preprocess(train.read(indices)), np.asarray(train.labels)[indices]
        )
        expected = dict(zip(np.asarray(train.ids)[indices], np.asarray(expected, dtype=float)))
    written = load_scores(output_dir)[("orig", 1, 1)]
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert written[key] == pytest.approx(value, rel=1e-4, abs=1e-7)


def test_shards_cover_all_work_once_with_identical_scores(workspace, full_run, capfd, monkeypatch):
    output_dir, _ = full_run
    sharded = workspace / "sharded"
    for index in (0, 1):
        result = calculate_here(workspace, sharded, "--shard", f"{index}/2", capfd=capfd, monkeypatch=monkeypatch)
        assert result.returncode == 0, result.stderr
        assert f"of {2} in this shard" in result.stdout
        if index == 0:  # shard 1/2 has not run yet: nothing to assemble
            assert "results.h5 and the pages not rebuilt: 2 of 4 planned test images have no result" in result.stdout
    assert result_files(sharded) == result_files(output_dir)
    full, parts = load_scores(output_dir), load_scores(sharded)
    for key in EXPECTED_ITEMS:
        assert parts[key] == full[key]  # same seed, same machine: identical, whichever shard
    # The last shard assembled the consolidated store: the unsharded run's, dataset for dataset.
    assert "4 results, 0 failed, 0 missing, from 2 parts of 2" in result.stdout
    assert_same_h5(sharded / "results.h5", output_dir / "results.h5")


def test_resume_after_kill_ends_with_the_same_complete_outputs(workspace, full_run, capfd, monkeypatch):
    output_dir, _ = full_run
    first_record_name = Path("orig") / "0" / "1.json"
    # Kill as soon as the first test image is complete; on a loaded machine the run may
    # finish everything before the kill lands, so that case is retried in a fresh tree.
    for attempt in range(3):
        resumed = workspace / f"resumed{attempt}"
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "calculate.py"), "--train", str(workspace / "train.npz"),
             "--test", str(workspace / "test.npz"), "--model", str(workspace / "model.keras"),
             "--output-dir", str(resumed), *CALCULATE_ARGS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 240
        while not (resumed / first_record_name).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert (resumed / first_record_name).exists()
        finished_before_kill = len(list(resumed.glob("*/*/*.json")))  # records, not the tree's claim
        if finished_before_kill < len(EXPECTED_ITEMS):
            break
    assert finished_before_kill < len(EXPECTED_ITEMS), "the kill came too late to test resuming, three times"

    result = calculate_here(workspace, resumed, capfd=capfd, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert f"{finished_before_kill} of 4 test images already complete" in result.stdout
    assert result_files(resumed) == result_files(output_dir)  # no temporaries left either
    full, after = load_scores(output_dir), load_scores(resumed)
    for key in EXPECTED_ITEMS:
        assert after[key] == full[key]


def test_rerun_skips_everything_and_overwrite_redoes_it(workspace, full_run, capfd, monkeypatch):
    output_dir, _ = full_run
    again = calculate_here(workspace, output_dir, "--folders", "noisy", capfd=capfd, monkeypatch=monkeypatch)
    assert again.returncode == 0, again.stderr
    assert "1 of 1 test images already complete" in again.stdout and "Test image #" not in again.stdout
    redo = calculate_here(workspace, output_dir, "--folders", "noisy", "--overwrite", capfd=capfd, monkeypatch=monkeypatch)
    assert redo.returncode == 0 and redo.stdout.count("Test image #1 in process") == 1


def test_changed_settings_are_refused_without_overwrite(workspace, full_run, capfd, monkeypatch):
    output_dir, _ = full_run
    before = result_files(output_dir)
    result = calculate_here(workspace, output_dir, "-i", "3", capfd=capfd, monkeypatch=monkeypatch)
    assert result.returncode == 2
    assert "other settings (solver.depth differ" in result.stderr and "--overwrite" in result.stderr
    assert result_files(output_dir) == before


@pytest.fixture(scope="module")
def bad_inputs(workspace):
    (workspace / "foreign.npz").write_bytes(b"PK\x03\x04 not an archive")
    save_tiny_classifier(workspace / "wide.keras", None, None, input_size=10)
    (workspace / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    return workspace


# These run the script itself, start to exit: an argument mistake, and a refusal after TensorFlow's
# import and the model's load (the start-up noise must not reach the terminal). The rest run in
# this process (inprocess.py), with the same checks.
IN_ITS_OWN_PROCESS = {"10x10", "argument --seed: '-1' is negative"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train", "{ws}/missing.npz"], "missing.npz"),
        (["--train", "{ws}/foreign.npz"], "foreign.npz"),
        (["--train", "{ws}/test.npz"], "test.npz"),
        (["--model", "{ws}/wide.keras"], "10x10"),
        (["-sf", "gif"], "invalid choice: 'gif'"),
        (["--shard", "3/2"], "--shard 3/2"),
        (["--deflation", "40"], "--deflation 40: a whole number from 0 to 29"),
        (["--folders", "styled"], "unknown test folder styled"),
        (["--labels", "7"], "no test images with label 7"),
        (["--layers", "nonesuch"], "nonesuch"),
        (["-i", "0"], "'0' is not a positive integer"),
        (["--scale", "-1"], "neither 'auto' nor a finite number > 0"),
        (["--damping", "x"], "'x' is neither 'auto' nor a finite number >= 0"),
        (["--damping", "-0.5"], "'-0.5' is neither 'auto' nor a finite number >= 0"),
        (["--seed", "-1"], "argument --seed: '-1' is negative"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(bad_inputs, args, message, capfd, monkeypatch):
    output_dir = bad_inputs / "never"
    full = ["--train", "{ws}/train.npz", "--test", "{ws}/test.npz", "--model", "{ws}/model.keras"]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in full:
            full[full.index(flag) + 1] = value
        else:
            full += [flag, value]
    argv = [*[a.format(ws=bad_inputs) for a in full], "--output-dir", output_dir]
    if message in IN_ITS_OWN_PROCESS:
        result = run_script("calculate.py", *argv)
    else:
        result = calculate_main(argv, capfd, monkeypatch)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not output_dir.exists()


def test_unreadable_vgg16_weights_fail_fast(bad_inputs, capfd, monkeypatch):
    workspace = bad_inputs
    output_dir = workspace / "never"
    result = calculate_main(["--train", workspace / "train.npz", "--test", workspace / "test.npz",
                             "--weights", workspace / "broken.h5", "--output-dir", output_dir], capfd, monkeypatch)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "broken.h5" in result.stderr
    assert not output_dir.exists()


def test_an_indefinite_damping_is_one_warning_line(workspace, tmp_path, capfd, monkeypatch):
    """The WARNING line on stdout, not a Python warning with its source line on stderr as well."""
    from influence import solvers

    monkeypatch.setattr(solvers.CurvatureEstimate, "margin", lambda self, damping: -1.0)  # as if indefinite
    result = calculate_here(workspace, tmp_path / "out", "--damping", "0.5", "--folders", "noisy",
                            capfd=capfd, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert sum(line.startswith("WARNING: damping 0.5 leaves H + damping I indefinite")
               for line in result.stdout.splitlines()) == 1
    assert "Warning" not in result.stderr and "resolve_damping" not in result.stderr


def test_all_labels_scores_the_whole_training_set(workspace, full_run, capfd, monkeypatch):
    from influence import archive

    output_dir, _ = full_run
    everything = workspace / "all_labels"
    result = calculate_here(workspace, everything, "--all-labels", "--folders", "noisy", capfd=capfd,
                            monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Create label subset for all 3 classes... finished") == 1
    scores = np.load(everything / "noisy" / "2" / "1.npy", allow_pickle=True).item()
    with archive.open_train(workspace / "train.npz") as train:
        assert set(scores) == set(train.ids)
        own_label = set(np.asarray(train.ids)[train.label_indices(2)])
    # The same s_test: the label's own images score as in the per-label run.
    per_label = load_scores(output_dir)[("noisy", 2, 1)]
    for key in own_label:
        assert scores[key] == pytest.approx(per_label[key], rel=1e-5, abs=1e-8)


def test_test_label_without_training_images_is_refused(tmp_path, workspace, capfd, monkeypatch):
    # ImageNet labelling accepts any of the 1000 classes in a test folder; label 5 has no
    # training images here, so there is nothing to score for it.
    make_class_folders(tmp_path / "train", {"n01440764": 2, "n01443537": 2}, size=(SIZE, SIZE))
    make_class_folders(tmp_path / "orig", {"5": 1}, size=(SIZE, SIZE), class_indices={"5": 0})
    prepared = run_script("prepare_data.py", "-tr", tmp_path / "train", "-ts", tmp_path / "orig",
                          "-o", tmp_path, "--image-size", str(SIZE))
    assert prepared.returncode == 0, prepared.stderr
    result = calculate_main(["--train", tmp_path / "train.npz", "--test", tmp_path / "test.npz",
                             "--model", workspace / "model.keras", "--output-dir", tmp_path / "out"], capfd, monkeypatch)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no training images with label 5 (electric_ray)" in lines[0]
    assert "--all-labels" in lines[0]
    assert not (tmp_path / "out").exists()


def test_feature_cache_gives_the_whole_models_scores_and_is_reused(workspace, tmp_path, capfd, monkeypatch):
    top = ["--last-layers", "1", "--all-labels", "--folders", "orig"]  # one pass scores both test images of label 0
    here = dict(capfd=capfd, monkeypatch=monkeypatch)
    cached = calculate_here(workspace, tmp_path / "cached", *top, "--feature-cache", "on", **here)
    assert cached.returncode == 0, cached.stderr
    assert "Feature cache: cut at the output of 'flatten'" in cached.stdout
    assert "(built in" in cached.stdout and str(workspace / "feature-cache") in cached.stdout
    whole = calculate_here(workspace, tmp_path / "whole", *top, "--feature-cache", "off", **here)
    assert whole.returncode == 0, whole.stderr
    assert "Feature cache" not in whole.stdout
    for folder, label, number in [item for item in EXPECTED_ITEMS if item[0] == "orig"]:
        path = Path(folder) / str(label) / f"{number}.npy"
        got = np.load(tmp_path / "cached" / path, allow_pickle=True).item()
        expected = np.load(tmp_path / "whole" / path, allow_pickle=True).item()
        assert got.keys() == expected.keys()
        largest = max(abs(value) for value in expected.values())
        assert largest > 0
        assert max(abs(got[key] - expected[key]) for key in expected) <= 1e-4 * largest
        record = json.loads((tmp_path / "cached" / path.with_suffix(".json")).read_text())["settings"]["feature_cache"]
        assert Path(record["path"]).parent == workspace / "feature-cache" and Path(record["path"]).is_file()
        assert record["cut"]["layer"] == "flatten"
        assert json.loads((tmp_path / "whole" / path.with_suffix(".json")).read_text())["settings"]["feature_cache"] is None
    again = calculate_here(workspace, tmp_path / "again", *top, **here)  # auto: the same cut, the cache reused
    assert again.returncode == 0, again.stderr
    assert "(reused)" in again.stdout and "(built in" not in again.stdout


def test_ekfac_method_fits_once_per_archive_and_records_its_damping(workspace, tmp_path, capfd, monkeypatch):
    here = dict(capfd=capfd, monkeypatch=monkeypatch)
    first = calculate_here(workspace, tmp_path / "a", "--method", "ekfac", "--folders", "noisy", **here)
    assert first.returncode == 0, first.stderr
    assert "EK-FAC factors written to" in first.stdout
    record = json.loads((tmp_path / "a" / "noisy" / "2" / "1.json").read_text())
    assert record["solver"]["method"] == "ekfac" and record["settings"]["solver"]["method"] == "ekfac"
    assert record["solver"]["effective_damping"] > 0
    scores = np.load(tmp_path / "a" / "noisy" / "2" / "1.npy", allow_pickle=True).item()
    assert all(np.isfinite(list(scores.values()))) and len(set(scores.values())) > 1
    # Another output tree on the same archive and model: the factor file is reused, same scores.
    second = calculate_here(workspace, tmp_path / "b", "--method", "ekfac", "--folders", "noisy", **here)
    assert second.returncode == 0, second.stderr
    assert "EK-FAC factors reused from" in second.stdout
    assert np.load(tmp_path / "b" / "noisy" / "2" / "1.npy", allow_pickle=True).item() == scores


def test_every_record_says_how_far_to_trust_its_top_five(full_run):
    output_dir, result = full_run
    for folder, label, n in EXPECTED_ITEMS:
        solver = json.loads((output_dir / folder / str(label) / f"{n}.json").read_text())["solver"]
        stability = solver["stability"]  # two chains by default: their scores' top-5 agreement
        assert stability["k"] == 5 and 0 <= stability["harmful_shared"] <= 5 and 0 <= stability["useful_shared"] <= 5
        assert stability["stable"] == (stability["harmful_shared"] >= 4 and stability["useful_shared"] >= 4)
        assert isinstance(solver["converged"], bool) and isinstance(solver["well_posed"], bool)
    assert result.stdout.count("Trust: ") == len(EXPECTED_ITEMS) + 1  # one per image and the run's summary


def test_an_unstable_or_unconverged_answer_is_flagged():
    from influence import job

    unstable = {"stability": {"k": 5, "harmful_shared": 2, "useful_shared": 5, "stable": False}, "converged": True}
    assert job._trust(unstable).startswith("unstable top-5 (the two halves share 2/5 harmful, 5/5 useful)")
    assert "not converged" in job._trust({"converged": False})
    assert job._trust({"stability": {"k": 5, "harmful_shared": 5, "useful_shared": 4, "stable": True},
                       "converged": True, "well_posed": True}).startswith("stable top-5")


# --------------------------------------------------------------------------- one writer, right answers


def run_job(workspace, output_dir, *, test_path=None, scale=None, echo=None):
    """calculate.py's job in this process (no TensorFlow start-up per run), CALCULATE_ARGS's settings."""
    from influence import job
    from influence.settings import ScoringSettings, Settings, SolverSettings

    settings = Settings(solver=SolverSettings(depth=6, batch_size=4, deflation=0, seed=3, scale=scale),
                        scoring=ScoringSettings(score_batch_size=4))
    lines = []
    job.calculate(train_path=workspace / "train.npz", test_path=test_path or workspace / "test.npz",
                  output_dir=output_dir, settings=settings, model_path=workspace / "model.keras", preprocess="unit",
                  echo=echo or (lambda text, end="\n": lines.append(text)))
    return "\n".join(lines)


def test_resume_recomputes_outputs_of_another_test_image(tmp_path, workspace, full_run):
    """An image added before the first one shifts every number: 1.json then describes the old first
    image. Resume must see that, recompute, and score the new image, not skip 'complete' files."""
    import shutil

    output_dir, _ = full_run
    tree = tmp_path / "calc_output"
    shutil.copytree(output_dir, tree)
    shutil.copytree(workspace / "orig", tmp_path / "orig")
    Image.open(workspace / "orig/0/img_0001.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        tmp_path / "orig/0/a_new.png")  # sorts first in class 0
    shutil.copy(workspace / "train.npz", tmp_path / "train.npz")
    prepared = run_script("prepare_only_test.py", "-ts", tmp_path / "orig", workspace / "noisy", "-o", tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    out = run_job(workspace, tree, test_path=tmp_path / "test.npz")
    assert "2 earlier outputs describe other test images" in out and "(e.g. orig/0/1.json was computed for 0/img_0000.png)" in out
    assert out.count("in process") == 3  # orig/0 #1 (new), #2 (shifted), #3 (shifted); orig/1 and noisy kept
    records = {n: json.loads((tree / f"orig/0/{n}.json").read_text()) for n in (1, 2, 3)}
    assert [records[n]["test_id"] for n in (1, 2, 3)] == ["0/a_new.png", "0/img_0000.png", "0/img_0001.png"]
    before = json.loads((output_dir / "orig/0/1.json").read_text())  # img_0000, then the first
    assert records[2]["test_loss"] == before["test_loss"] and records[2]["identity"] == before["identity"]
    assert json.loads((tree / "noisy/2/1.json").read_text()) == json.loads((output_dir / "noisy/2/1.json").read_text())


def test_two_runs_of_different_settings_on_one_tree(tmp_path, workspace):
    """Started together into one tree: one run owns it, the other is refused before any work."""
    tree = tmp_path / "shared"
    command = [sys.executable, str(ROOT / "calculate.py"), "--train", str(workspace / "train.npz"),
               "--test", str(workspace / "test.npz"), "--model", str(workspace / "model.keras"),
               "--output-dir", str(tree), "--folders", "noisy", *CALCULATE_ARGS]
    runs = [subprocess.Popen([*command, "--damping", damping], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for damping in ("0.01", "0.02")]
    finished = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in finished)
    assert codes == [0, 2], finished
    winner = 0 if finished[0][0] == 0 else 1
    refused = finished[1 - winner][2]
    assert "holds the results of a run with other settings (solver.damping differ)" in refused, refused
    assert "Traceback" not in refused and "Test image #" not in finished[1 - winner][1]
    record = json.loads((tree / "noisy/2/1.json").read_text())
    assert record["settings"]["solver"]["damping"] == (0.01, 0.02)[winner]


def test_scores_that_rank_nothing_are_reported_not_drawn(tmp_path, workspace):
    """A scale so large that 1/scale underflows makes every score 0: no 'top five' of ties."""
    lines = []
    run_job(workspace, tmp_path / "out", scale=1e300, echo=lambda text, end="\n": lines.append(text))
    record = json.loads((tmp_path / "out/noisy/2/1.json").read_text())
    assert "every score is exactly zero" in record["degenerate"]
    assert record["harmful"] == [] and record["useful"] == []
    assert not any(np.load(tmp_path / "out/noisy/2/1.npy", allow_pickle=True).item().values())
    assert any(line.startswith("No ranking for 4 test images") for line in lines)


def test_write_error_is_one_line(tmp_path, workspace, capfd, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/noisy").write_text("a file where a folder should go")
    result = calculate_here(workspace, tmp_path / "out", "--folders", "noisy", capfd=capfd, monkeypatch=monkeypatch)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calculate.py: error: cannot write into "), result.stderr
