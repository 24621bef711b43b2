"""One smoke run of the real default path: VGG16 at 224x224, vgg16 preprocessing, all
parameters, weights from a file (random weights; the ImageNet file cannot be downloaded here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from imagegen import make_class_folders

ROOT = Path(__file__).resolve().parents[1]
SCALE = 1e4
DAMPING = 0.01  # LiSSA's coefficient; the Tikhonov damping passed to calculate.py is DAMPING * SCALE
DEPTH = 2


def reference_scores(model, train_images, train_labels, test_image, test_label, scored):
    """Scores of the training images ``scored`` (indices), recomputed with plain nested
    GradientTapes and per-image reverse-mode gradients.

    ``model``: the VGG16 whose weights were saved for calculate.py, as it was in memory. The
    training set is the whole minibatch (-b 3 with 3 images), so LiSSA's H_j is the full-batch
    Hessian of the mean cross-entropy (VGG16 has no regularisers) at every step.
    """
    import keras
    import tensorflow as tf

    features = keras.Model(model.input, model.get_layer("fc2").output)
    head = model.get_layer("predictions")
    variables = [v.value for v in model.trainable_variables]

    def loss(x, y):  # mean cross-entropy from the logits under the softmax
        logits = tf.matmul(features(x, training=False), head.kernel) + head.bias
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

    def preprocess(images):
        return keras.applications.vgg16.preprocess_input(np.asarray(images, dtype=np.float32).copy())

    def gradient(x, y):
        with tf.GradientTape() as tape:
            value = loss(x, y)
        return tape.gradient(value, variables)

    def hessian_product(vector):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = loss(x_train, y_train)
            grads = inner.gradient(value, variables)
            dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vector)])
        return outer.gradient(dot, variables)

    x_train, y_train = preprocess(train_images), tf.constant(train_labels, tf.int32)
    v = gradient(preprocess(test_image[None]), tf.constant([test_label], tf.int32))
    h = list(v)
    for _ in range(DEPTH):
        h = [vi + (1 - DAMPING) * hi - hv / SCALE for vi, hi, hv in zip(v, h, hessian_product(h))]
    s_test = [hi / SCALE for hi in h]
    return np.array([
        sum(float(tf.reduce_sum(tf.cast(g, tf.float64) * tf.cast(s, tf.float64)))
            for g, s in zip(gradient(x_train[i:i + 1], y_train[i:i + 1]), s_test))
        for i in scored
    ])


def test_vgg16_default_path_end_to_end(tmp_path):
    import keras

    from influence import archive

    keras.utils.set_random_seed(0)
    weights = tmp_path / "vgg16_random.weights.h5"
    model = keras.applications.VGG16(weights=None)  # kept for the reference: no second build and load
    model.save_weights(weights)
    keras.backend.clear_session()

    # Two real ImageNet classes by wnid: labels 0 (tench) and 1 (goldfish). Each training image
    # costs ~2 s per Hessian-vector product at 224x224 (about 20 of them here, with the reference);
    # two of label 1, whose scores are compared one by one, and one of label 0, in the Hessian only.
    make_class_folders(tmp_path / "train", {"n01440764": 1, "n01443537": 2}, size=(40, 40), suffix=".jpg")
    make_class_folders(tmp_path / "orig", {"1": 1}, size=(40, 40), class_indices={"1": 1})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prepared = subprocess.run(
        [sys.executable, str(ROOT / "prepare_data.py"), "-tr", "train", "-ts", "orig", "-bs", "2"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr

    result = subprocess.run(
        [sys.executable, str(ROOT / "calculate.py"), "--weights", str(weights), "-i", str(DEPTH), "--repeat", "1", "-b", "3",
         "--score-batch-size", "2", "--scale", str(SCALE), "--damping", str(DAMPING * SCALE), "-sf", "pdf"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "calc_output" / "orig" / "1"
    assert sorted(p.name for p in directory.iterdir()) == ["1.json", "1.npy", "harmful_1.pdf", "useful_1.pdf"]
    record = json.loads((directory / "1.json").read_text())
    assert record["label"] == 1 and record["label_name"] == "goldfish"
    assert record["settings"]["preprocess"] == "vgg16"
    assert record["settings"]["parameters"] == 138_357_544  # every VGG16 weight
    assert record["settings"]["model"].startswith("VGG16")
    assert (directory / "harmful_1.pdf").read_bytes().startswith(b"%PDF")
    scores = np.load(directory / "1.npy", allow_pickle=True).item()
    assert sorted(scores) == ["n01443537/img_0000.jpg", "n01443537/img_0001.jpg"]

    with archive.open_train(tmp_path / "train.npz") as train, archive.open_test(tmp_path / "test.npz") as test:
        order = np.argsort(train.ids)  # every training image: the full-batch Hessian
        images, labels, ids = train.read(order), np.asarray(train.labels)[order], np.asarray(train.ids)[order]
        scored = np.flatnonzero(labels == 1)
        expected = reference_scores(model, images, labels, np.asarray(test.folder("orig").images[0]), 1, scored)
    expected = dict(zip(ids[scored], expected))
    got = np.array([scores[i] for i in sorted(scores)])
    want = np.array([expected[i] for i in sorted(scores)])
    # float32 sums over 138 M weights: agreement to a small fraction of the largest score.
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
