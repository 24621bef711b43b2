"""Frozen layers computed once: cut detection, head/trunk, the feature cache file and its
key, concurrent and killed builds, and cached scores against the whole model's."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from cache_builders import cache_key as _key, numpy_trunk as _numpy_trunk, open_cache as _open
from engine_models import image_data, mlp, small_cnn, tabular_data
from influence import archive, feature_cache, features, hvp, models, params, scores, solvers
from influence.errors import UserError
from influence.sampling import ArchiveSource, MinibatchSampler

ROOT = Path(__file__).resolve().parents[1]
SIZE = (8, 8)
TOLERANCE = 1e-4  # of the largest score: cached and uncached agree to float32 rounding


def _same_variables(head, variables) -> bool:
    return all(any(mine is theirs for theirs in head.trainable_weights) for mine in variables)


def _check_factorisation(model, cut, x):
    expected = np.asarray(model(x, training=False))
    got = np.asarray(cut.head(cut.trunk(x, training=False), training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# -- cut detection ---------------------------------------------------------------------------


def test_cut_in_sequential_and_functional_models_is_right_below_the_selected_layers():
    x_tab, _ = tabular_data(6)
    sequential = mlp(softmax=True)
    variables = params.select(sequential, layers="predictions")
    cut = features.find_cut(sequential, variables)
    assert cut.layer == "hidden" and cut.shape == (6,)
    assert _same_variables(cut.head, variables) and len(cut.head.trainable_weights) == 2
    _check_factorisation(sequential, cut, x_tab)

    x_img, _ = image_data(5)
    functional = small_cnn()
    for layers, expected_layer, expected_shape in (("fc,predictions", "flatten", (36,)), ("predictions", "fc", (16,))):
        variables = params.select(functional, layers=layers)
        cut = features.find_cut(functional, variables)
        assert (cut.layer, cut.shape) == (expected_layer, expected_shape)
        assert _same_variables(cut.head, variables)
        _check_factorisation(functional, cut, x_img)


def test_cut_inside_a_nested_model():
    keras.utils.set_random_seed(3)
    base = keras.Sequential([keras.Input((*SIZE, 3)), keras.layers.Conv2D(4, 3, name="conv"),
                             keras.layers.Flatten(name="flatten"), keras.layers.Dense(5, name="inner_fc")],
                            name="base")
    inputs = keras.Input((*SIZE, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="top")(base(inputs)))
    x, _ = image_data(4)
    for layers, expected in (("top", "base/inner_fc"), ("inner_fc,top", "base/flatten")):
        variables = params.select(model, layers=layers)
        cut = features.find_cut(model, variables)
        assert cut.layer == expected and _same_variables(cut.head, variables)
        _check_factorisation(model, cut, x)


def _residual_model():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((5,))
    first = keras.layers.Dense(6, activation="tanh", name="d1")(inputs)
    second = keras.layers.Dense(6, activation="tanh", name="d2")(first)
    added = keras.layers.Add(name="add")([first, second])
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(added), name="residual")


def test_branched_model_cut_is_the_deepest_articulation_below_the_selected_layers():
    model = _residual_model()
    x, _ = tabular_data(4)
    # 'out' alone: the branch rejoins at 'add', whose output every path passes through.
    cut = features.find_cut(model, params.select(model, layers="out"))
    assert cut.layer == "add"
    _check_factorisation(model, cut, x)
    # 'd2' sits inside the branch: the cut must be below the fork, at 'd1'.
    variables = params.select(model, layers="d2,out")
    cut = features.find_cut(model, variables)
    assert cut.layer == "d1" and set(cut.head_layers) == {"d2", "add", "out"}
    assert _same_variables(cut.head, variables)
    _check_factorisation(model, cut, x)


def test_no_cut_when_a_branch_from_the_input_goes_around_every_tensor():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5,))
    trunk = keras.layers.Dense(6, activation="tanh", name="d0")(inputs)
    selected = keras.layers.Dense(4, activation="tanh", name="d1")(trunk)
    bypass = keras.layers.Dense(4, activation="tanh", name="bypass")(inputs)  # input -> output around d0
    joined = keras.layers.Concatenate(name="cat")([selected, bypass])
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(joined), name="bypassed")
    cut, why = features.search_cut(model, params.select(model, layers="d1,out"))
    assert cut is None and "branches" in why and "'d1'" in why
    cut, why = features.search_cut(model, params.select(model, layers="d0,out"))
    assert cut is None and "reads the model's input" in why
    assert features.find_cut(model, params.select(model, layers="out")).layer == "cat"  # above the join


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.hidden = keras.layers.Dense(4, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(3, name="out")

    def call(self, x):
        return self.out(self.hidden(x))


def test_no_cut_in_a_subclassed_model_and_the_reason_says_so():
    model = _Subclassed()
    model(tabular_data(2)[0])
    cut, why = features.search_cut(model, params.select(model, layers="out"))
    assert cut is None and "no functional graph" in why


# -- archives for the cache tests -------------------------------------------------------------


def _images(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, *SIZE, 3), dtype=np.uint8)


def _write_train(path: Path, *, seed: int = 0, counts=(7, 6, 5), change_pixel: bool = False) -> tuple:
    """A train archive with ``counts[c]`` images of label c; returns (images, labels) in index order."""
    images, labels = [], []
    with archive.TrainWriter(path, image_size=SIZE) as writer:
        for label, count in enumerate(counts):
            batch = _images(seed + label, count)
            if change_pixel and label == 0:
                batch[0, 0, 0, 0] ^= 1
            writer.add_batch(label, batch, [f"{label}/{i}.png" for i in range(count)])
            images.append(batch)
            labels.extend([label] * count)
        writer.finish({"classes": [{"label": label, "name": f"class {label}"} for label in range(len(counts))]})
        writer.close()
        writer.commit()
    return np.concatenate(images), np.asarray(labels)


def _write_test(path: Path) -> tuple:
    images = _images(99, 2)
    with archive.TestWriter(path, image_size=SIZE) as writer:
        writer.add_folder("orig", iter([(images[0], 0, "0/a.png"), (images[1], 2, "2/b.png")]))
        writer.finish({"classes": [], "folders": [{"source": "orig"}]})
        writer.close()
        writer.commit()
    return images, np.array([0, 2])


def _unit(images):
    return models.preprocess_unit(images)


# -- cached scores equal the whole model's ----------------------------------------------------


def test_cached_lissa_and_scores_equal_the_whole_models(tmp_path):
    model = small_cnn(softmax=True)
    variables = params.select(model, layers="fc,predictions")
    _write_train(tmp_path / "train.npz")
    test_images, test_labels = _write_test(tmp_path / "test.npz")
    cut = features.find_cut(model, variables)
    solver = solvers.LissaSolver(depth=15)  # deflated, damping and scale auto: all of it must match
    echo = lambda *a, **k: None  # noqa: E731
    with archive.open_train(tmp_path / "train.npz") as train, archive.open_test(tmp_path / "test.npz") as test:
        # The whole model on preprocessed images.
        full = solvers.TrainingCurvature.build(model, variables, MinibatchSampler(ArchiveSource(train, _unit), 4))
        prepared = solver.prepare(full)
        all_images = _unit(train.read(np.arange(len(train))))
        expected = []
        for row in range(2):
            v = hvp.loss_gradient(model, variables, _unit(test_images[row:row + 1]), test_labels[row:row + 1])
            s_test = prepared.solve(v, key=(0, row)).s_test
            expected.append(scores.influence_scores(model, variables, s_test, all_images, train.labels))
        expected = np.asarray(expected)  # (2, N)

        # The head on cached features: same sampler seeds, so the same minibatches.
        identity = features.model_identity(model)
        train_cache = features.train_features(train, cut=cut, preprocess=_unit, preprocess_name="unit",
                                              model=identity, directory=tmp_path / "cache", echo=echo)
        test_cache = features.test_features(test, "orig", cut=cut, preprocess=_unit, preprocess_name="unit",
                                            model=identity, directory=tmp_path / "cache", echo=echo)
        head_curvature = solvers.TrainingCurvature.build(
            cut.head, variables, MinibatchSampler(features.FeatureSource(train_cache), 4))
        prepared = solver.prepare(head_curvature)
        s_tests = [prepared.solve(hvp.loss_gradient(cut.head, variables, test_cache.take([row]), test_labels[row:row + 1]),
                                  key=(0, row)).s_test for row in range(2)]
        stacked = scores.stack_s_tests(s_tests, variables)
        got = np.concatenate([scores.influence_scores_many(cut.head, variables, stacked, block, train_cache.labels[indices])
                              for indices, block in train_cache.blocks(np.arange(len(train_cache)), 7)], axis=1)
    assert got.shape == expected.shape == (2, 18)
    largest = np.abs(expected).max()
    assert largest > 0 and np.std(expected) > 0.1 * largest  # scores that discriminate
    np.testing.assert_array_less(np.abs(got - expected), TOLERANCE * largest)


def test_score_matrix_equals_one_forward_mode_pass_per_test_vector():
    model = _residual_model()
    variables = params.select(model, layers="d2,out")
    cut = features.find_cut(model, variables)
    x, y = tabular_data(9)
    feats = cut.trunk(x)
    rng = np.random.default_rng(7)
    s_tests = [[tf.constant(rng.normal(size=tuple(v.shape)), tf.float32) for v in variables] for _ in range(3)]
    got = scores.influence_scores_many(cut.head, variables, scores.stack_s_tests(s_tests, variables), feats, y)
    for row, s_test in enumerate(s_tests):  # the whole model, one test vector at a time
        np.testing.assert_allclose(got[row], scores.influence_scores(model, variables, s_test, x, y),
                                   rtol=1e-5, atol=1e-6)


# -- the cache key and rebuilds ------------------------------------------------------------------


def test_cache_is_reused_and_rebuilt_when_the_model_preprocessing_or_archive_changes(tmp_path):
    images, labels = _write_train(tmp_path / "train.npz")
    first = _open(tmp_path / "train.npz", tmp_path)
    assert first.status == "built"
    np.testing.assert_array_equal(first.read(0, len(first)), _numpy_trunk(images))
    np.testing.assert_array_equal(first.labels, labels)
    assert _open(tmp_path / "train.npz", tmp_path).status == "reused"
    for change in ({"model": "m2"}, {"preprocess": "vgg16"}):
        other = _open(tmp_path / "train.npz", tmp_path, **change)
        assert other.status == "built" and other.path != first.path
    # One pixel of the archive changes (same size, same labels): the same file name, found stale.
    changed, _ = _write_train(tmp_path / "train.npz", change_pixel=True)
    messages = []
    rebuilt = _open(tmp_path / "train.npz", tmp_path, messages)
    assert rebuilt.status == "built" and rebuilt.path == first.path
    assert any("was built for another archive" in message for message in messages)
    np.testing.assert_array_equal(rebuilt.read(0, len(rebuilt)), _numpy_trunk(changed))
    assert not np.array_equal(rebuilt.read(0, 1), first.read(0, 1))  # the old reader kept its own file


def test_a_truncated_or_foreign_cache_file_is_rebuilt_not_read(tmp_path):
    images, _ = _write_train(tmp_path / "train.npz")
    path = _open(tmp_path / "train.npz", tmp_path).path
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(size - 40)  # the end of the features
    messages = []
    rebuilt = _open(tmp_path / "train.npz", tmp_path, messages)
    assert rebuilt.status == "built" and any("rebuilding" in message for message in messages)
    np.testing.assert_array_equal(rebuilt.read(0, len(rebuilt)), _numpy_trunk(images))
    path.write_bytes(b"not a cache")
    assert _open(tmp_path / "train.npz", tmp_path).status == "built"
    with h5py.File(path, "r+") as h5:  # right key, but the writer never marked it complete
        h5.attrs["complete"] = False
    assert _open(tmp_path / "train.npz", tmp_path).status == "built"


# -- several processes ----------------------------------------------------------------------------

_BUILDER = textwrap.dedent("""
    import hashlib, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from cache_builders import numpy_trunk, open_cache
    go = Path({go!r})
    def held_trunk(images):  # the build stops at its first batch until the test says go
        print("batch", flush=True)
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return numpy_trunk(images)
    cache = open_cache({train!r}, {cache_dir!r}, trunk=held_trunk, echo=lambda *a, **k: print(*a, flush=True))
    data = cache.read(0, len(cache))
    print(cache.status, hashlib.sha256(data.tobytes()).hexdigest(), flush=True)
""")


def _builder(tmp_path, name: str) -> tuple[subprocess.Popen, Path]:
    script = _BUILDER.format(root=str(ROOT), tests=str(ROOT / "tests"), go=str(tmp_path / "go"),
                             train=str(tmp_path / "train.npz"), cache_dir=str(tmp_path / "cache"))
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return process, log


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_processes_building_the_same_cache_one_builds_the_other_waits(tmp_path):
    images, _ = _write_train(tmp_path / "train.npz")
    started = [_builder(tmp_path, name) for name in ("first", "second")]  # at once
    logs = [log for _, log in started]
    # One holds the lock and is building (its first batch); the other must be blocked on the lock.
    # ("Waiting for <holder>": the holder's pid, or "another process" if the builder has the lock
    # but has not written its pid into the lock file yet.)
    _wait_for(lambda: any("batch" in log.read_text() for log in logs)
              and any("Waiting for " in log.read_text() for log in logs), "one builder and one waiter")
    (tmp_path / "go").touch()
    results = []
    for process, log in started:
        assert process.wait(timeout=120) == 0, log.read_text()
        results.append(log.read_text().split()[-2:])
    assert sorted(status for status, _ in results) == ["built", "waited"], results
    expected = hashlib.sha256(_numpy_trunk(images).tobytes()).hexdigest()
    assert results[0][1] == results[1][1] == expected


def test_a_killed_build_leaves_nothing_a_later_run_trusts(tmp_path):
    images, _ = _write_train(tmp_path / "train.npz")
    process, log = _builder(tmp_path, "killed")
    _wait_for(lambda: "batch" in log.read_text(), "the build to start")  # its temporary file is open
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    cache_dir = tmp_path / "cache"
    final = feature_cache.cache_path(cache_dir, stem="train", key=_key(tmp_path / "train.npz"))
    assert not final.exists()
    leftovers = [p for p in cache_dir.iterdir() if ".tmp-" in p.name]
    assert leftovers  # the killed builder's temporary, never under the final name
    rebuilt = _open(tmp_path / "train.npz", cache_dir)  # the lock died with the builder: no wait
    assert rebuilt.status == "built"
    np.testing.assert_array_equal(rebuilt.read(0, len(rebuilt)), _numpy_trunk(images))
    assert not any(p.exists() for p in leftovers)  # swept up by the next builder


def test_float16_cache_reads_back_within_float16_precision(tmp_path):
    images, labels = _write_train(tmp_path / "train.npz")
    key = {**_key(tmp_path / "train.npz"), "dtype": "float16"}
    with archive.open_train(tmp_path / "train.npz") as train:
        cache = feature_cache.open_or_build(
            feature_cache.cache_path(tmp_path, stem="train", key=key), key, labels=labels, feature_shape=(3,),
            read_images=train.read, features_fn=lambda im: _numpy_trunk(im) * 1000.0, dtype="float16",
            echo=lambda *a, **k: None)
        exact = _numpy_trunk(images) * 1000.0
        got = cache.take(np.array([0, 3, 4, 17]))
        assert got.dtype == np.float32 and cache.stored_dtype == np.float16
        np.testing.assert_allclose(got, exact[[0, 3, 4, 17]], rtol=2**-11)
        assert not np.array_equal(got, exact[[0, 3, 4, 17]])  # it really is stored in half precision
        with pytest.raises(Exception, match="float16"):  # beyond float16's range: refused, not inf
            feature_cache.build_cache(tmp_path / "big.h5", key, labels=labels, feature_shape=(3,),
                                      read_images=train.read, features_fn=lambda im: _numpy_trunk(im) * 1e6,
                                      dtype="float16")


def test_feature_cache_modes():
    model = small_cnn()
    lines = []
    assert features.choose_cut("off", model, params.select(model, layers="predictions"), echo=lines.append) is None
    assert features.choose_cut("auto", model, params.select(model, layers="predictions"), echo=lines.append).layer == "fc"
    assert features.choose_cut("auto", model, params.select(model, layers="conv"), echo=lines.append) is None
    assert "running on the whole model" in lines[-1]
    with pytest.raises(UserError, match="reads the model's input"):
        features.choose_cut("on", model, params.select(model, layers="conv"))
    with pytest.raises(UserError, match="valid: auto, on, off"):
        features.choose_cut("yes", model, params.select(model))
