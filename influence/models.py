"""The classifier whose predictions are explained: VGG16 by default, or any saved Keras model.

:func:`load_classifier` returns a :class:`LoadedModel`: the Keras model, the pixel
preprocessing it expects, its input size and class count, and the file its parameters
came from with that file's SHA-256, so a run's settings say exactly what was explained.

Nothing here touches the network. Keras's ``VGG16(weights="imagenet")`` downloads 528 MB
when its cache is empty (and hangs where there is no network); this module instead builds
``VGG16(weights=None)`` and loads the weights file Keras would have downloaded, from
Keras's cache or from a path the user gives, and says where to get it when it is missing.

Importing this module imports TensorFlow: scripts quiet TensorFlow first
(:func:`influence.cli.quiet_tensorflow`), then import it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import keras
import tensorflow as tf

from influence import losses
from influence.archive import format_image_size
from influence.errors import UserError

VGG16_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
VGG16_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + VGG16_WEIGHTS_FILE
)
# keras.applications.vgg16 checks its download against this MD5; matching it is how we
# know a weights file is the genuine ImageNet one and not, say, a fine-tuned copy.
VGG16_WEIGHTS_MD5 = "64373286793e3c8b2b4e3219cbf3544b"
VGG16_INPUT_SIZE = (224, 224)
IMAGENET_CLASSES = 1000

# Files Keras.Model.load_weights understands; anything else it rejects by name alone.
WEIGHTS_SUFFIXES = (".h5", ".hdf5", ".keras")
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")

_HASH_CHUNK_BYTES = 1 << 20


# --- preprocessing: (B, H, W, 3) uint8 pixels -> float32 model input -------------------------


def _as_float32(images) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(images), tf.float32)


def preprocess_vgg16(images) -> tf.Tensor:
    """Keras's VGG16 preprocessing ("caffe" mode): RGB -> BGR, minus the ImageNet channel means.

    Pixels keep their 0..255 scale. Works on a float32 copy: Keras's function edits
    NumPy arrays in place, and on uint8 it would wrap around.
    """
    return keras.applications.vgg16.preprocess_input(_as_float32(images))


def preprocess_none(images) -> tf.Tensor:
    """Pixels as they are, 0..255, in float32: for models that preprocess inside themselves."""
    return _as_float32(images)


def preprocess_unit(images) -> tf.Tensor:
    """Pixels scaled to 0..1."""
    return _as_float32(images) / 255.0


def preprocess_tf(images) -> tf.Tensor:
    """Pixels scaled to -1..1 (MobileNet, Inception, Xception style)."""
    return _as_float32(images) / 127.5 - 1.0


_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def preprocess_torch(images) -> tf.Tensor:
    """Pixels scaled to 0..1, then standardised per channel with the ImageNet RGB mean and std."""
    return (_as_float32(images) / 255.0 - _TORCH_MEAN) / _TORCH_STD


PREPROCESSORS: dict[str, Callable[..., tf.Tensor]] = {
    "vgg16": preprocess_vgg16,
    "caffe": preprocess_vgg16,  # the same transform under Keras's mode name
    "none": preprocess_none,
    "unit": preprocess_unit,
    "tf": preprocess_tf,
    "torch": preprocess_torch,
}


def _preprocessor(name: str) -> Callable[..., tf.Tensor]:
    if name not in PREPROCESSORS:
        raise UserError(f"unknown preprocessing {name!r}; valid: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name]


# --- the loaded classifier -------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A classifier ready for the influence engine, and where it came from."""

    model: keras.Model
    preprocess: Callable[..., tf.Tensor]  # (B, H, W, 3) uint8 -> (B, H, W, 3) float32
    preprocess_name: str
    input_size: tuple[int | None, int | None]  # (H, W); None where the model takes any size
    num_classes: int
    description: str  # "VGG16 (ImageNet weights)", "model classifier.keras"
    source: str  # the file the parameters came from: the weights file if one was given
    sha256: str  # of ``source``
    is_imagenet: bool  # outputs are the 1000 ILSVRC-2012 classes in Keras's order
    from_logits: bool  # outputs are logits; False when the model ends in a softmax
    files: dict[str, str] = field(default_factory=dict)  # every file read -> its SHA-256


def keras_home() -> Path:
    """Keras's cache root, by Keras's own rule: $KERAS_HOME, else ~/.keras (/tmp/.keras if ~ is read-only)."""
    if "KERAS_HOME" in os.environ:
        return Path(os.environ["KERAS_HOME"]).expanduser()
    home = Path("~").expanduser()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def default_weights_path() -> Path:
    """Where Keras caches the VGG16 ImageNet weights, and so where we look for them."""
    return keras_home() / "models" / VGG16_WEIGHTS_FILE


def _cached_weights_candidates() -> list[Path]:
    # Keras's downloader saves under /tmp/.keras instead when its cache root is not writable.
    candidates = [default_weights_path()]
    if not os.access(keras_home(), os.W_OK):
        candidates.append(Path("/tmp/.keras/models") / VGG16_WEIGHTS_FILE)
    return candidates


def missing_weights_message(expected: Path) -> str:
    """What to do when the VGG16 weights are nowhere: where to get the file, where to put it."""
    return (
        f"no VGG16 weights at {expected}: this is Keras's {VGG16_WEIGHTS_FILE} (528 MB), which is "
        f"never downloaded at run time; download it on a machine with network access from "
        f"{VGG16_WEIGHTS_URL} and put it at {expected}, or pass --weights PATH "
        f"(or use --model PATH for another classifier)"
    )


def file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(SHA-256, MD5) hex digests of a file, read in 1 MiB chunks: weights files run to 528 MB."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


class _BackgroundHash:
    """:func:`file_hashes` of one file on a daemon thread, started now: file reads and hashlib
    release the GIL, so hashing a 528 MB weights file overlaps building the model and loading
    those weights instead of following them. ``result()`` waits for it."""

    def __init__(self, path: str | os.PathLike):
        self._hashes: tuple[str, str] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), name="file-hashes", daemon=True)
        self._thread.start()

    def _run(self, path) -> None:
        try:
            self._hashes = file_hashes(path)
        except BaseException as error:  # noqa: BLE001 - handed to the caller by result()
            self._error = error

    def result(self) -> tuple[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashes


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _existing_file(path: str | os.PathLike, what: str, suffixes: Sequence[str]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what} {path} not found")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a file")
    if not path.name.lower().endswith(tuple(suffixes)):
        raise UserError(f"{what} {path} should end in {' or '.join(suffixes)}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path} is not readable")
    return path


def _check_hdf5(path: Path, what: str) -> None:
    """Fail fast, before building a 528 MB model, on a file that is not readable HDF5."""
    if not path.name.lower().endswith((".h5", ".hdf5")):
        return
    if not h5py.is_hdf5(path):
        raise UserError(f"{what} {path} is not an HDF5 file (corrupt or incomplete download?)")
    try:
        with h5py.File(path, "r") as h5:
            dict(h5.attrs)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(
            f"{what} {path} cannot be read (truncated or corrupt?): {_first_line(error)}"
        ) from error


def _load_weights(model: keras.Model, path: Path) -> None:
    """Load a weights file into ``model``, or raise a UserError naming the file and the problem.

    Legacy HDF5 files, including the one Keras downloads for VGG16 (written by Keras 1:
    root attribute ``layer_names``, one group per layer with ``weight_names``), go through
    Keras's own loader, which matches layers that have weights in order.
    """
    try:
        model.load_weights(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"cannot load weights from {path} into {model.name}: {_first_line(error)}"
        ) from error


def _from_logits(model: keras.Model, path: Path | str, outputs: str) -> bool:
    """True when the model outputs logits, False when it ends in a softmax; else a UserError.

    ``outputs``: ``"auto"`` (read off the graph, :func:`influence.losses.output_kind`), or
    ``"logits"`` / ``"probabilities"`` as the user declares, which the loss then follows."""
    if outputs != "auto":
        losses.declare_output_kind(model, outputs)
    try:
        return losses.output_kind(model) == losses.LOGITS
    except UserError as error:
        raise UserError(f"model {path}: {error}") from error


def _check_classifier_shapes(model: keras.Model, path: Path) -> tuple[tuple[int | None, int | None], int]:
    """((H, W), C) of a one-image-in, class-scores-out model, or a UserError saying what is wrong."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(
            f"model {path} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            f"expected one image input and one output of class scores"
        )
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) != 4 or input_shape[-1] != 3:
        raise UserError(
            f"model {path} takes input of shape {input_shape}; expected (None, H, W, 3) RGB images"
        )
    output_shape = tuple(model.outputs[0].shape)
    if len(output_shape) != 2 or output_shape[-1] is None or output_shape[-1] < 2:
        raise UserError(
            f"model {path} outputs shape {output_shape}; expected (None, C) class scores with C >= 2"
        )
    return (input_shape[1], input_shape[2]), int(output_shape[-1])


def _load_vgg16(weights: str | os.PathLike | None, preprocess_name: str, outputs: str) -> LoadedModel:
    if weights is None:
        candidates = _cached_weights_candidates()
        found = [path for path in candidates if path.exists()]
        if not found:
            raise UserError(missing_weights_message(candidates[0]))
        path = _existing_file(found[0], "VGG16 weights file", WEIGHTS_SUFFIXES)
    else:
        path = _existing_file(weights, "weights file", WEIGHTS_SUFFIXES)
    _check_hdf5(path, "weights file")
    hashes = _BackgroundHash(path)
    # weights=None: build only; Keras's own "imagenet" option would try to download.
    model = keras.applications.VGG16(weights=None)
    _load_weights(model, path)
    sha256, md5 = hashes.result()
    genuine = md5 == VGG16_WEIGHTS_MD5
    description = "VGG16 (ImageNet weights)" if genuine else f"VGG16 (weights {path.name})"
    return LoadedModel(
        model=model,
        preprocess=_preprocessor(preprocess_name),
        preprocess_name=preprocess_name,
        input_size=VGG16_INPUT_SIZE,
        num_classes=IMAGENET_CLASSES,
        description=description,
        source=str(path),
        sha256=sha256,
        # The architecture fixes the output order to Keras's ILSVRC list, whatever the weights.
        is_imagenet=True,
        from_logits=_from_logits(model, "VGG16", outputs),
        files={str(path): sha256},
    )


def _load_saved_model(
    model_path: str | os.PathLike, weights: str | os.PathLike | None, preprocess_name: str, outputs: str
) -> LoadedModel:
    path = _existing_file(model_path, "model file", MODEL_SUFFIXES)
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        raise UserError(f"model file {path} is not a Keras model file: a .keras file is a zip archive "
                        f"(model.save), and this one is not (corrupt or incomplete copy?)")
    if path.suffix.lower() in (".h5", ".hdf5"):
        _check_hdf5(path, "model file")
        with h5py.File(path, "r") as h5:
            weights_only = "model_config" not in h5.attrs
        if weights_only:
            raise UserError(
                f"model file {path} holds weights but no model architecture; save the whole model "
                f"(model.save), or pass VGG16 weights with --weights instead of --model"
            )
    model_hashes = _BackgroundHash(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # any failure here is the file's: report it, no traceback
        raise UserError(f"cannot load model {path}: {_first_line(error)}") from error
    if not isinstance(model, keras.Model):
        raise UserError(f"model file {path} holds a {type(model).__name__}, not a Keras model")
    input_size, num_classes = _check_classifier_shapes(model, path)
    from_logits = _from_logits(model, path, outputs)
    model_sha256, _ = model_hashes.result()
    files = {str(path): model_sha256}
    source, sha256 = str(path), model_sha256
    description = f"model {path.name}"
    if weights is not None:
        weights_path = _existing_file(weights, "weights file", WEIGHTS_SUFFIXES)
        _check_hdf5(weights_path, "weights file")
        weights_hashes = _BackgroundHash(weights_path)
        _load_weights(model, weights_path)
        sha256, _ = weights_hashes.result()
        files[str(weights_path)] = sha256
        source = str(weights_path)
        description = f"model {path.name} (weights {weights_path.name})"
    return LoadedModel(
        model=model,
        preprocess=_preprocessor(preprocess_name),
        preprocess_name=preprocess_name,
        input_size=input_size,
        num_classes=num_classes,
        description=description,
        source=source,
        sha256=sha256,
        # A saved model does not say what its classes are; 1000 outputs is taken to mean
        # ILSVRC-2012 in Keras's order (every keras.applications classifier), which only
        # affects the class names printed beside labels.
        is_imagenet=num_classes == IMAGENET_CLASSES,
        from_logits=from_logits,
        files=files,
    )


OUTPUTS = ("auto", losses.LOGITS, losses.PROBABILITIES)


def load_classifier(
    model_path: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    preprocess: str | None = None,
    outputs: str = "auto",
) -> LoadedModel:
    """Load the classifier to explain, never downloading anything.

    - ``model_path`` None: Keras's VGG16 (224x224 RGB in, 1000 ImageNet classes out, softmax),
      built without weights, then loaded from ``weights`` or, when that is None, from Keras's
      cache (:func:`default_weights_path`). Preprocessing defaults to ``"vgg16"``.
    - ``model_path`` a saved Keras classifier (``.keras``, or ``.h5`` from ``model.save``):
      loaded without its optimizer. It must take (None, H, W, 3) images and output (None, C)
      class scores, C >= 2, through a softmax or as logits (see ``from_logits``).
      Preprocessing defaults to ``"none"``: the model gets 0..255 float pixels.
      ``weights``, if given, is then loaded into that model (a fine-tuned checkpoint of the
      same architecture, say); ``source`` and ``sha256`` then name the weights file.
    - ``preprocess``: a key of :data:`PREPROCESSORS`.
    - ``outputs``: what the model outputs, ``"logits"`` or ``"probabilities"`` (after a
      softmax); ``"auto"`` (default) reads it off the graph and refuses a model where that
      is unclear (see :mod:`influence.losses`).

    Every problem with the files (missing, unreadable, truncated, the wrong layout, the wrong
    shapes) is a :class:`~influence.errors.UserError` naming the file and the problem, raised
    before any long computation.
    """
    preprocess_name = preprocess or ("vgg16" if model_path is None else "none")
    _preprocessor(preprocess_name)  # an unknown name fails before anything is loaded
    if outputs not in OUTPUTS:
        raise UserError(f"unknown --outputs {outputs!r}; valid: {', '.join(OUTPUTS)}")
    if model_path is None:
        return _load_vgg16(weights, preprocess_name, outputs)
    return _load_saved_model(model_path, weights, preprocess_name, outputs)


def check_image_size(loaded: LoadedModel, image_size: Sequence[int]) -> None:
    """Raise a UserError unless images of ``image_size`` (H, W) fit the model's input."""
    height, width = (int(n) for n in image_size)
    want_height, want_width = loaded.input_size
    if (want_height in (None, height)) and (want_width in (None, width)):
        return
    want_height, want_width = want_height or height, want_width or width
    raise UserError(
        f"the archive's images are {height}x{width} (height x width) but {loaded.description} "
        f"takes {want_height}x{want_width}; prepare the archives again with "
        f"`python prepare_data.py --image-size {format_image_size((want_height, want_width))} ...`"
    )
