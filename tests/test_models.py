"""Classifier loading: VGG16 from the weights file Keras downloads, saved Keras models, preprocessing.

The VGG16 weights file is written here with h5py in the layout of the real
``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` (saved by Keras 1: root attribute
``layer_names`` only, one group per layer with a ``weight_names`` attribute, datasets
``<layer>_W_1:0`` and ``<layer>_b_1:0`` directly in the layer's group), filled with
seeded values a fresh initialisation cannot produce, and must come back exactly.
VGG16 is built once for the file and once per load (a few seconds each at 224x224).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import re

import h5py
import keras
import numpy as np
import pytest

from influence import models
from influence.errors import UserError

TINY_SIZE = (8, 8)


@functools.lru_cache(maxsize=None)  # drawn once for the file and both checks (VGG16: 138 M values, ~3 s)
def _seeded_values(index: int, shape) -> np.ndarray:
    # Nonzero everywhere (biases start at zero) and unlike any initialiser's draw.
    rng = np.random.default_rng(7000 + index)
    values = rng.standard_normal(shape, dtype=np.float32) * 0.05 + 0.01
    values.flags.writeable = False  # shared between callers
    return values


def _weighted_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if layer.weights]


def _names_attribute(names) -> np.ndarray:
    # Old Keras stored name lists as NumPy fixed-width byte strings (float64 when empty).
    return np.asarray([name.encode("utf8") for name in names])


def _write_keras1_weights(path, layer_specs) -> None:
    """Write weights as Keras 1 saved VGG16's: flat ``<layer>_W_1:0`` datasets, no version attrs.

    ``layer_specs``: [(layer name, [weight shapes])] in model order; weightless layers have [].
    """
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = _names_attribute(name for name, _ in layer_specs)
        index = 0
        for name, shapes in layer_specs:
            group = h5.create_group(name)
            weight_names = [f"{name}_{kind}_1:0" for kind in ("W", "b")][: len(shapes)]
            group.attrs["weight_names"] = _names_attribute(weight_names)
            for weight_name, shape in zip(weight_names, shapes):
                group.create_dataset(weight_name, data=_seeded_values(index, shape))
                index += 1


def _write_keras2_weights(path, model: keras.Model) -> None:
    """Write ``model``'s shapes as Keras 2's save_weights did: ``<layer>/<layer>/kernel:0``, versioned."""
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = _names_attribute(layer.name for layer in model.layers)
        h5.attrs["backend"] = b"tensorflow"
        h5.attrs["keras_version"] = b"2.4.3"
        index = 0
        for layer in sorted(model.layers, key=lambda layer: layer.name):
            group = h5.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights
            weight_names = [f"{layer.name}/{w.name}:0" for w in weights]
            group.attrs["weight_names"] = _names_attribute(weight_names)
            for weight_name, weight in zip(weight_names, weights):
                # A name with a slash makes a nested group, as in Keras 2's files.
                group.create_dataset(weight_name, data=_seeded_values(index, tuple(weight.shape)))
                index += 1


def _assert_seeded(model: keras.Model, keras1_order=True) -> None:
    """Every weight equals what the writer put there, in model order."""
    index = 0
    layers = _weighted_layers(model)
    if not keras1_order:  # the Keras 2 writer numbered layers in name order
        layers = sorted(layers, key=lambda layer: layer.name)
    for layer in layers:
        for weight in layer.trainable_weights + layer.non_trainable_weights:
            loaded, expected = np.asarray(weight.numpy()), _seeded_values(index, tuple(weight.shape))
            if not np.array_equal(loaded, expected):  # assert_array_equal alone takes ~4 s on VGG16's weights
                np.testing.assert_array_equal(loaded, expected, err_msg=weight.path)  # says where they differ
            index += 1
    assert index == len(model.weights)


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- VGG16 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16_weights(tmp_path_factory):
    """(explicit weights path, KERAS_HOME holding the same file in Keras's cache layout)."""
    model = keras.applications.VGG16(weights=None)
    specs = [(layer.name, [tuple(w.shape) for w in layer.weights]) for layer in model.layers]
    del model
    gc.collect()
    # The real file calls the input layer input_1; weightless layers are matched by nothing.
    specs[0] = ("input_1", specs[0][1])
    root = tmp_path_factory.mktemp("vgg16")
    path = root / "vgg16_random.h5"
    _write_keras1_weights(path, specs)
    keras_home = root / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    os.link(path, keras_home / "models" / models.VGG16_WEIGHTS_FILE)
    yield path, keras_home
    _seeded_values.cache_clear()  # 528 MB


def test_vgg16_loads_the_keras1_layout_weights_file(vgg16_weights):
    path, _ = vgg16_weights
    with h5py.File(path, "r") as h5:  # the layout really is the old one
        assert set(h5.attrs) == {"layer_names"}
        assert list(h5["block1_conv1"].attrs["weight_names"]) == [b"block1_conv1_W_1:0", b"block1_conv1_b_1:0"]
        assert h5["fc1"]["fc1_W_1:0"].shape == (25088, 4096)
    loaded = models.load_classifier(weights=path)
    _assert_seeded(loaded.model)
    assert loaded.source == str(path)
    assert loaded.sha256 == _sha256(path)
    assert loaded.files == {str(path): loaded.sha256}
    # Not Keras's genuine file (its MD5 differs), so not called ImageNet weights.
    assert loaded.description == "VGG16 (weights vgg16_random.h5)"
    assert loaded.input_size == (224, 224)
    assert loaded.num_classes == 1000 and loaded.is_imagenet
    assert loaded.from_logits is False
    assert loaded.preprocess_name == "vgg16" and loaded.preprocess is models.preprocess_vgg16
    # The softmax output: one image in, a probability row out.
    probabilities = loaded.model(loaded.preprocess(np.zeros((1, 224, 224, 3), np.uint8))).numpy()
    assert probabilities.shape == (1, 1000)
    np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-5)


def test_vgg16_weights_found_in_keras_cache(vgg16_weights, monkeypatch):
    path, keras_home = vgg16_weights
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    cached = keras_home / "models" / models.VGG16_WEIGHTS_FILE
    assert models.default_weights_path() == cached
    # Pretend this file is Keras's genuine download: it is then named as ImageNet weights.
    monkeypatch.setattr(models, "VGG16_WEIGHTS_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    loaded = models.load_classifier(preprocess="unit")
    assert loaded.source == str(cached)
    assert loaded.sha256 == _sha256(path)
    assert loaded.description == "VGG16 (ImageNet weights)"
    assert loaded.preprocess_name == "unit"
    _assert_seeded(loaded.model)


def test_vgg16_rejects_weights_of_another_model(tmp_path):
    legacy = tmp_path / "tiny_legacy.h5"
    _write_keras2_weights(legacy, _tiny_classifier())
    with pytest.raises(UserError, match=f"cannot load weights from {re.escape(str(legacy))}.*[Ll]ayer count mismatch"):
        models.load_classifier(weights=legacy)


def test_missing_vgg16_weights_fail_before_building_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def no_build(*args, **kwargs):
        raise AssertionError("VGG16 was built although its weights are missing")

    monkeypatch.setattr(models.keras.applications, "VGG16", no_build)
    expected = tmp_path / "models" / models.VGG16_WEIGHTS_FILE
    with pytest.raises(UserError) as error:
        models.load_classifier()
    message = str(error.value)
    assert str(expected) in message
    assert models.VGG16_WEIGHTS_URL in message
    assert "528 MB" in message and "--weights" in message
    assert "\n" not in message


def test_default_weights_path_without_keras_home(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.default_weights_path() == tmp_path / ".keras" / "models" / models.VGG16_WEIGHTS_FILE


@pytest.mark.parametrize("problem", ["missing", "directory", "garbage", "truncated", "suffix"])
def test_bad_weights_file_is_a_user_error(problem, tmp_path, monkeypatch):
    monkeypatch.setattr(models.keras.applications, "VGG16", lambda **kwargs: pytest.fail("built VGG16"))
    path = tmp_path / "weights.h5"
    if problem == "directory":
        path.mkdir()
    elif problem == "garbage":
        path.write_bytes(b"<html>404 Not Found</html>" * 100)
    elif problem == "truncated":
        good = tmp_path / "good.h5"
        _write_keras2_weights(good, _tiny_classifier())
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif problem == "suffix":
        path = tmp_path / "weights.bin"
        path.write_bytes(b"x")
    expected = {
        "missing": "not found",
        "directory": "is not a file",
        "garbage": "is not an HDF5 file",
        "truncated": "cannot be read",
        "suffix": "should end in .h5",
    }[problem]
    with pytest.raises(UserError, match=f"{re.escape(str(path))}.*{expected}"):
        models.load_classifier(weights=path)


# --- saved Keras classifiers ----------------------------------------------------------------


def _tiny_classifier(activation="softmax", classes=3, seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((*TINY_SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, activation=activation, name="scores")(x)
    return keras.Model(inputs, outputs, name="tiny")


def _images(count=5) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(count, *TINY_SIZE, 3), dtype=np.uint8)  # (5, 8, 8, 3) uint8


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_saved_classifier_loads_and_predicts_like_the_original(suffix, tmp_path):
    original = _tiny_classifier()
    path = tmp_path / f"tiny{suffix}"
    original.save(path)
    loaded = models.load_classifier(model_path=path)
    images = _images()
    np.testing.assert_allclose(
        loaded.model(loaded.preprocess(images)).numpy(),
        original(images.astype(np.float32)).numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
    assert loaded.preprocess_name == "none"
    assert loaded.input_size == TINY_SIZE and loaded.num_classes == 3
    assert loaded.is_imagenet is False and loaded.from_logits is False
    assert loaded.source == str(path) and loaded.sha256 == _sha256(path)
    assert loaded.description == f"model tiny{suffix}"


def test_saved_logits_classifier_is_marked_from_logits(tmp_path):
    path = tmp_path / "logits.keras"
    _tiny_classifier(activation=None).save(path)
    assert models.load_classifier(model_path=path, preprocess="tf").from_logits is True


def test_saved_softmax_layer_classifier_is_marked_probabilities(tmp_path):
    inputs = keras.Input((*TINY_SIZE, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Softmax()(keras.layers.Dense(4)(x))
    path = tmp_path / "softmax_layer.keras"
    keras.Model(inputs, outputs).save(path)
    loaded = models.load_classifier(model_path=path)
    assert loaded.from_logits is False and loaded.num_classes == 4


def test_saved_model_wrapping_a_classifier_loads(tmp_path):
    inner = _tiny_classifier(activation=None)
    outer = keras.Sequential([keras.Input((*TINY_SIZE, 3)), keras.layers.Rescaling(1 / 255), inner])
    path = tmp_path / "wrapped.keras"
    outer.save(path)
    loaded = models.load_classifier(model_path=path)
    images = _images()
    np.testing.assert_allclose(
        loaded.model(loaded.preprocess(images)).numpy(), inner(images / 255.0).numpy(), rtol=1e-5, atol=1e-6
    )
    assert loaded.from_logits is True and loaded.input_size == TINY_SIZE and loaded.num_classes == 3


def test_weights_loaded_into_a_saved_model_in_keras2_layout(tmp_path):
    model_path = tmp_path / "tiny.keras"
    _tiny_classifier(seed=1).save(model_path)
    weights_path = tmp_path / "finetuned.h5"
    _write_keras2_weights(weights_path, _tiny_classifier(seed=2))
    with h5py.File(weights_path, "r") as h5:  # nested <layer>/<layer>/kernel:0 as Keras 2 wrote
        assert h5["scores"]["scores"]["kernel:0"].shape == (4, 3)
    loaded = models.load_classifier(model_path=model_path, weights=weights_path)
    _assert_seeded(loaded.model, keras1_order=False)
    assert loaded.source == str(weights_path) and loaded.sha256 == _sha256(weights_path)
    assert loaded.files == {str(model_path): _sha256(model_path), str(weights_path): _sha256(weights_path)}
    assert loaded.description == "model tiny.keras (weights finetuned.h5)"


def test_thousand_class_saved_model_counts_as_imagenet(tmp_path):
    path = tmp_path / "wide.keras"
    _tiny_classifier(classes=1000).save(path)
    assert models.load_classifier(model_path=path).is_imagenet is True


def _flat_model(output_layer) -> keras.Model:
    inputs = keras.Input((*TINY_SIZE, 3))
    return keras.Model(inputs, output_layer(keras.layers.Flatten()(inputs)))


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: _flat_model(keras.layers.Dense(1, activation="softmax")), r"outputs shape \(None, 1\)"),
        (lambda: _tiny_classifier(activation="sigmoid"), "applies 'sigmoid'"),
        (
            lambda: keras.Model(k := keras.Input((*TINY_SIZE, 3)), keras.layers.Conv2D(3, 1)(k)),
            r"outputs shape \(None, 8, 8, 3\)",
        ),
        (
            lambda: keras.Model(k := keras.Input((*TINY_SIZE, 1)), keras.layers.Dense(3)(keras.layers.Flatten()(k))),
            r"takes input of shape \(None, 8, 8, 1\)",
        ),
    ],
    ids=["one-class", "sigmoid", "image-output", "grey-input"],
)
def test_saved_model_that_is_no_classifier_is_rejected(build, expected, tmp_path):
    path = tmp_path / "odd.keras"
    build().save(path)
    with pytest.raises(UserError, match=f"model {re.escape(str(path))}.*{expected}"):
        models.load_classifier(model_path=path)


def test_bad_model_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=f"model file {tmp_path / 'absent.keras'} not found"):
        models.load_classifier(model_path=tmp_path / "absent.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(UserError, match=f"model file {broken} is not a Keras model file"):
        models.load_classifier(model_path=broken)
    weights_only = tmp_path / "weights_only.h5"
    _write_keras2_weights(weights_only, _tiny_classifier())
    with pytest.raises(UserError, match="holds weights but no model architecture"):
        models.load_classifier(model_path=weights_only)


def test_unknown_preprocessing_is_rejected_before_loading(tmp_path):
    with pytest.raises(UserError) as error:
        models.load_classifier(model_path=tmp_path / "absent.keras", preprocess="imagenet")
    assert "unknown preprocessing 'imagenet'" in str(error.value)
    for name in ("vgg16", "none", "unit", "tf", "torch", "caffe"):
        assert name in str(error.value)


# --- image size -----------------------------------------------------------------------------


def _loaded_stub(input_size) -> models.LoadedModel:
    return models.LoadedModel(
        model=None, preprocess=models.preprocess_none, preprocess_name="none", input_size=input_size,
        num_classes=3, description="model tiny.keras", source="tiny.keras", sha256="0" * 64,
        is_imagenet=False, from_logits=True,
    )  # fmt: skip


def test_check_image_size():
    models.check_image_size(_loaded_stub((224, 224)), (224, 224))
    models.check_image_size(_loaded_stub((None, None)), (31, 17))  # a model that takes any size
    with pytest.raises(UserError) as error:
        models.check_image_size(_loaded_stub((224, 224)), (32, 32))
    message = str(error.value)
    assert "32x32" in message and "224x224" in message and "model tiny.keras" in message
    assert "prepare_data.py --image-size 224 " in message
    # A model of height 64 and width 48: prepare_data.py's --image-size is WIDTHxHEIGHT.
    with pytest.raises(UserError, match="--image-size 48x64") as error:
        models.check_image_size(_loaded_stub((64, 48)), np.array([48, 64]))
    from influence.prepare import parse_image_size

    suggested = str(error.value).split("--image-size ")[1].split()[0]
    assert parse_image_size(suggested) == (64, 48)


# --- preprocessing --------------------------------------------------------------------------


def test_vgg16_preprocessing_is_bgr_minus_imagenet_means():
    images = np.zeros((2, 1, 2, 3), np.uint8)  # (B, H, W, 3) uint8
    images[0, 0, 0] = (10, 20, 30)
    images[1, 0, 1] = (255, 0, 128)
    kept = images.copy()
    out = models.PREPROCESSORS["vgg16"](images)
    assert out.dtype == np.float32 and out.shape == images.shape
    bgr_means = np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(out[0, 0, 0], np.array([30, 20, 10]) - bgr_means, rtol=1e-6)
    np.testing.assert_allclose(out[1, 0, 1], np.array([128, 0, 255]) - bgr_means, rtol=1e-6)  # no uint8 wrap
    np.testing.assert_allclose(out[0, 0, 1], -bgr_means, rtol=1e-6)
    np.testing.assert_allclose(
        out, keras.applications.vgg16.preprocess_input(images.astype(np.float32)), rtol=1e-6
    )
    np.testing.assert_array_equal(images, kept)  # the caller's pixels are left alone
    np.testing.assert_array_equal(models.PREPROCESSORS["caffe"](images), out)


def test_other_preprocessings():
    images = np.array([[[[0, 51, 255]]]], np.uint8)  # (1, 1, 1, 3) uint8
    pixels = np.array([0.0, 51.0, 255.0])
    expected = {
        "none": pixels,
        "unit": pixels / 255,
        "tf": pixels / 127.5 - 1,
        "torch": (pixels / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
    }
    for name, values in expected.items():
        out = models.PREPROCESSORS[name](images)
        assert out.dtype == np.float32, name
        np.testing.assert_allclose(out.numpy()[0, 0, 0], values, rtol=1e-6, atol=1e-6, err_msg=name)


def test_file_hashes_stream_across_chunks(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=(5 << 20) // 2, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.h5"
    path.write_bytes(data)
    assert models.file_hashes(path) == (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
