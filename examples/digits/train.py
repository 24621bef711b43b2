"""The demo's classifier: a small L2-regularised CNN, trained deterministically on the CPU."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from examples.digits.data import read_folder_images
from examples.digits.settings import NUM_CLASSES
from influence import cli
from influence.outputs import atomic_path


def build_classifier(image_size: int, *, l2: float = 1e-4):
    """A small CNN for (S, S, 3) inputs in [0, 1]; softmax over the ten digits.

    The L2 penalty is part of the training objective (``model.losses``), which is
    also what the influence Hessian differentiates: it keeps that Hessian positive
    definite in directions the data leave flat.
    """
    import keras

    regularizer = keras.regularizers.L2(l2)
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", kernel_regularizer=regularizer),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu", kernel_regularizer=regularizer),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", kernel_regularizer=regularizer),
        ],
        name="digits_cnn",
    )


@contextlib.contextmanager
def _deterministic_ops(tf):
    """TensorFlow's deterministic kernels while training, so that the README's report is
    reproducible; switched off again afterwards for callers that share the process (the
    tests), where this TensorFlow has the (non-public) switch for it."""
    try:
        from tensorflow.python.framework import config
        was_enabled = config.is_op_determinism_enabled()
    except (ImportError, AttributeError):
        config, was_enabled = None, True  # cannot restore: leave it on
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            config.disable_op_determinism()


def train_classifier(train_dir: Path, model_path: Path, *, epochs: int, seed: int) -> dict:
    """Train the CNN on the training folder as written (label errors included); save it.

    Pixels are scaled to [0, 1], i.e. ``calculate.py --preprocess unit``. Seeded and
    deterministic. Returns a summary: parameter count, final loss and accuracy (on
    the labels as given, errors included).
    """
    cli.quiet_tensorflow()
    import keras
    import tensorflow as tf

    _, images, labels = read_folder_images(train_dir)  # (N, S, S, 3) uint8, (N,)
    with _deterministic_ops(tf):
        keras.utils.set_random_seed(seed)
        model = build_classifier(images.shape[1])
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        history = model.fit(images / 255.0, labels, epochs=epochs, batch_size=64, shuffle=True, verbose=0)
    save_model(model, model_path)
    return {
        "epochs": epochs,
        "parameters": int(model.count_params()),
        "train_accuracy_on_given_labels": float(history.history["accuracy"][-1]),
        "train_loss": float(history.history["loss"][-1]),
    }


def save_model(model, model_path: Path) -> None:
    """Save ``model`` as ``model_path`` (a ``.keras`` file), atomically.

    Keras saves only to a path that ends in ``.keras``, which the atomic temporary's
    name does not; so the model is saved into a private scratch directory and its bytes
    are copied into the temporary, which then replaces ``model_path``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "model.keras"
        model.save(staged)
        with atomic_path(model_path) as temporary:
            shutil.copyfile(staged, temporary)
