"""Compute the frozen layers once: the cut, the head and trunk models, and scoring on features.

When influence is taken with respect to the top layers only (``fc2,predictions`` of VGG16),
everything below them is a fixed function of the image. If one tensor ``t`` lies on every
path from the input to those layers and to the output (a *cut*), the classifier factors as

    model(x) = head(trunk(x)),   trunk: x -> t (frozen),   head: t -> class scores

and the loss, its gradient and its Hessian w.r.t. the selected weights depend on ``x`` only
through ``t = trunk(x)``. So ``trunk`` runs once per image (:mod:`influence.feature_cache`
keeps the result on disk) and every Hessian-vector product, test gradient and score runs
on ``head`` alone. The head is built from the model's own layer objects, so its weights ARE
the selected variables: the engine takes gradients and products w.r.t. the same variables
with the same code (:func:`influence.hvp.training_hvp` on ``head`` and a
:class:`FeatureSource`).

:func:`find_cut` looks for the deepest such tensor in the Keras functional graph
(Sequential and functional models; nested models are opened up); in a branched model it
is an articulation tensor below every selected layer, and where there is none (the
selected layers read the input, or a branch goes around every candidate) it says why and
the caller runs on the whole model.

:func:`influence.scores.influence_scores_many` scores many test images at once on a block of training features.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

from influence import archive, feature_cache, hvp
from influence.errors import UserError
from influence.graphs import graph_function

# -- the graph, nested models opened ------------------------------------------------------

Key = tuple  # (scope, id(KerasTensor)): one tensor of the flattened graph


@dataclass
class _Step:
    operation: object  # a keras Layer (or Operation)
    arguments: object  # keras SymbolicArguments of the call
    scope: str  # "" at the top, "vgg16/" inside a nested model
    inputs: tuple[Key, ...]
    outputs: tuple[Key, ...]

    @property
    def name(self) -> str:
        return self.scope + self.operation.name


class _NoGraph(Exception):
    pass


def _functional(model) -> Functional | None:
    """The functional graph behind a model: itself, or a Sequential's inner Functional."""
    if isinstance(model, Functional):
        return model
    inner = getattr(model, "_functional", None)  # a built keras.Sequential
    return inner if isinstance(inner, Functional) else None


def _expandable(node, inner: Functional) -> bool:
    # A plain call model(x): positional tensors only (a None mask is how Keras records it).
    extra = {name: value for name, value in node.arguments.kwargs.items() if value is not None}
    return not extra and len(node.arguments.keras_tensors) == len(inner.inputs) == len(node.arguments.args)


class _Graph:
    """The model's layer calls in topological order, with nested graph models expanded in place."""

    def __init__(self, model):
        graph = _functional(model)
        if graph is None:
            raise _NoGraph(f"model {model.name!r} has no functional graph to read (a subclassed model, "
                           "or a Sequential model built without keras.Input)")
        self.steps: list[_Step] = []
        self.tensors: dict[Key, object] = {}  # key -> KerasTensor (shape, dtype)
        self._alias: dict[Key, Key] = {}
        self._scopes: set[str] = set()
        self.inputs = [self.key("", tensor) for tensor in graph.inputs]
        for tensor in graph.inputs:
            self.tensors[self.key("", tensor)] = tensor
        self._expand(graph, "")
        self.outputs = [self.key("", tensor) for tensor in graph.outputs]

    def key(self, scope: str, tensor) -> Key:
        key = (scope, id(tensor))
        while key in self._alias:
            key = self._alias[key]
        return key

    def _expand(self, graph: Functional, scope: str) -> None:
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                operation = node.operation
                inputs = tuple(self.key(scope, tensor) for tensor in node.arguments.keras_tensors)
                inner = _functional(operation) if isinstance(operation, keras.Model) else None
                if inner is not None and _expandable(node, inner):
                    inner_scope = f"{scope}{operation.name}/"
                    while inner_scope in self._scopes:  # a nested model called twice
                        inner_scope = inner_scope[:-1] + "'/"
                    self._scopes.add(inner_scope)
                    for tensor, outer in zip(inner.inputs, inputs):
                        self._alias[(inner_scope, id(tensor))] = outer
                    self._expand(inner, inner_scope)
                    for tensor, inner_output in zip(node.output_tensors, inner.outputs):
                        self._alias[(scope, id(tensor))] = self.key(inner_scope, inner_output)
                    continue
                outputs = tuple(self.key(scope, tensor) for tensor in node.output_tensors)
                for key, tensor in zip(outputs, node.output_tensors):
                    self.tensors[key] = tensor
                self.steps.append(_Step(operation, node.arguments, scope, inputs, outputs))

    def producers(self) -> dict[Key, int]:
        return {key: index for index, step in enumerate(self.steps) for key in step.outputs}

    def ancestors(self, keys, producers) -> set[int]:
        """Indices of the steps that ``keys`` are computed from (their own producers included)."""
        found, stack = set(), list(keys)
        while stack:
            index = producers.get(stack.pop())
            if index is not None and index not in found:
                found.add(index)
                stack.extend(self.steps[index].inputs)
        return found

    def replay(self, indices, start: dict[Key, object]) -> dict[Key, object]:
        """Call the steps ``indices`` (in order) again on new symbolic tensors, same layer objects."""
        values = dict(start)
        for index in sorted(indices):
            step = self.steps[index]

            def fill(value, scope=step.scope):
                if isinstance(value, keras.KerasTensor):
                    return values[self.key(scope, value)]
                return value

            args = keras.tree.map_structure(fill, step.arguments.args)
            kwargs = keras.tree.map_structure(fill, step.arguments.kwargs)
            results = keras.tree.flatten(step.operation(*args, **kwargs))
            for key, result in zip(step.outputs, results):
                values[key] = result
        return values


# -- the cut ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Where the frozen part ends: ``model(x) == head(trunk(x))``.

    ``layer``: the layer (``outer/inner`` inside nested models) whose output is cut;
    ``shape``: one image's features there; ``head`` shares the model's layer objects, so
    ``params.select``'s variables are its weights; ``head_layers``: the layers it calls.
    """

    layer: str
    shape: tuple[int, ...]
    dtype: str
    trunk: keras.Model
    head: keras.Model
    head_layers: tuple[str, ...] = field(default=())

    def identity(self) -> dict:
        """What the cached features depend on besides the model, preprocessing and images."""
        return {"layer": self.layer, "shape": list(self.shape), "dtype": self.dtype}

    def describe(self) -> str:
        return f"output of {self.layer!r} ({'x'.join(map(str, self.shape))})"


def _owned_ids(operation) -> set[int]:
    weights = getattr(operation, "trainable_weights", None) or []
    return {id(weight) for weight in weights} | {id(w) for w in hvp.tf_variables(weights)}


def _tensor_name(graph: _Graph, producers, key: Key) -> str:
    if key in graph.inputs:
        return "the model's input"
    step = graph.steps[producers[key]]
    return step.name if len(step.outputs) == 1 else f"{step.name}:{step.outputs.index(key)}"


def search_cut(model: keras.Model, variables) -> tuple[Cut | None, str]:
    """``(cut, how)`` for the deepest cut below every selected layer, or ``(None, why not)``.

    A cut is a tensor ``t`` such that (1) every path from the model's input to its output
    passes through ``t`` and (2) no layer owning a selected weight is used to compute ``t``.
    The candidates satisfying (1) lie one after another on every path, so the deepest one
    satisfying (2) keeps the most layers frozen. The model's input itself is not a cut
    (nothing would be saved).
    """
    try:
        graph = _Graph(model)
    except _NoGraph as reason:
        return None, str(reason)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return None, (f"model {model.name!r} has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
                      "features are cached for one image input and one output")
    wanted = {id(v) for v in variables} | {id(v) for v in hvp.tf_variables(variables)}
    producers = graph.producers()
    sink = graph.outputs[0]
    needed = graph.ancestors([sink], producers)  # the steps the output depends on
    selected = {index for index in needed if _owned_ids(graph.steps[index].operation) & wanted}
    if not selected:
        return None, "none of the selected weights is used to compute the model's output"
    source = graph.inputs[0]
    consumers: dict[Key, list[int]] = {}
    for index in needed:
        for key in graph.steps[index].inputs:
            consumers.setdefault(key, []).append(index)

    def output_reachable_avoiding(blocked: Key) -> bool:
        seen, stack = {source}, [source]
        while stack:
            key = stack.pop()
            if key == sink:
                return True
            for index in consumers.get(key, ()):
                for produced in graph.steps[index].outputs:
                    if produced != blocked and produced not in seen:
                        seen.add(produced)
                        stack.append(produced)
        return False

    best = None
    for index in sorted(needed):
        for key in graph.steps[index].outputs:
            if key == sink or graph.ancestors([key], producers) & selected:
                continue
            if not output_reachable_avoiding(key):
                best = key  # steps are in topological order: later is deeper
    lowest = graph.steps[min(selected)].name
    if best is None:
        if any(source in graph.steps[index].inputs for index in selected):
            return None, (f"the selected layer {lowest!r} reads the model's input: no frozen layers below it "
                          "to compute once")
        return None, (f"no single tensor below the selected layers (the lowest is {lowest!r}) lies on every "
                      f"path from the input: model {model.name!r} branches around each of them")
    head_steps = sorted(index for index in needed if index not in graph.ancestors([best], producers))
    trunk_steps = sorted(graph.ancestors([best], producers))
    tensor = graph.tensors[best]
    shape = tuple(int(d) for d in tensor.shape[1:])
    features = keras.Input(shape=shape, dtype=tensor.dtype, name="features")
    head = keras.Model(features, graph.replay(head_steps, {best: features})[sink], name=f"{model.name}_head")
    image = keras.Input(shape=graph.tensors[source].shape[1:], dtype=graph.tensors[source].dtype, name="image")
    trunk = keras.Model(image, graph.replay(trunk_steps, {source: image})[best], name=f"{model.name}_trunk")
    cut = Cut(layer=_tensor_name(graph, producers, best), shape=shape, dtype=str(tensor.dtype), trunk=trunk,
              head=head, head_layers=tuple(graph.steps[index].name for index in head_steps))
    return cut, (f"cut at the {cut.describe()}: {len(trunk_steps)} frozen layer calls run once per image, "
                 f"{len(head_steps)} in the head")


def find_cut(model: keras.Model, variables) -> Cut | None:
    """The deepest cut below every layer owning one of ``variables``, or None (:func:`search_cut` says why)."""
    return search_cut(model, variables)[0]


MODES = ("auto", "on", "off")


def choose_cut(mode: str, model: keras.Model, variables, *, echo: Callable[..., None] = print) -> Cut | None:
    """The cut to run on for ``--feature-cache mode``: ``auto`` (the cut if there is one, else
    the whole model, saying why), ``on`` (a cut or a :class:`UserError`), ``off`` (None)."""
    if mode not in MODES:
        raise UserError(f"--feature-cache {mode!r}: valid: {', '.join(MODES)}")
    if mode == "off":
        return None
    cut, how = search_cut(model, variables)
    if cut is None and mode == "on":
        raise UserError(f"--feature-cache on: {how}; select only layers above a single tensor "
                        "(e.g. --last-layers 2) or use --feature-cache auto")
    echo(f"Feature cache: {how}" if cut is not None else f"Feature cache off: {how}; running on the whole model")
    return cut


# -- features on disk ------------------------------------------------------------------------


def model_identity(model: keras.Model) -> str:
    """SHA-256 of a model's architecture and every weight (for models that are not files)."""
    digest = hashlib.sha256(model.to_json().encode())
    for weight in model.weights:
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return "weights-sha256:" + digest.hexdigest()


def default_cache_dir(archive_path: str | os.PathLike, kind: str = "features") -> Path:
    """``<kind>-cache/`` beside the archive (where every run and shard on it looks), or, if that
    folder cannot be written, ``$XDG_CACHE_HOME/influence/<kind>``."""
    beside = Path(archive_path).absolute().parent / ("feature-cache" if kind == "features" else f"{kind}-cache")
    existing = beside if beside.exists() else beside.parent
    if os.access(existing, os.W_OK | os.X_OK):
        return beside
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "influence" / kind


def feature_key(*, model: str | list, cut: Cut, preprocess: str, archive_digest: str, images: str,
                dtype: str) -> dict:
    """The cache key (:mod:`influence.feature_cache`): everything the stored features depend on.

    ``model``: the model's file SHA-256s (``LoadedModel.files``) or :func:`model_identity`;
    ``images``: which of the archive's image sets (``"train"``, ``"test/<folder>"``).
    """
    return {"model": model, "cut": cut.identity(), "preprocess": preprocess, "images": images,
            "dtype": dtype, "archive": archive_digest}


def compiled_trunk(trunk: keras.Model) -> Callable:
    """``trunk(x, training=False)`` as one ``tf.function`` with the batch dimension left open,
    compiled once per trunk model (:func:`influence.hvp.compiled`): the training set's batches,
    its last partial batch and every test image share one trace (VGG16's trunk takes ~0.5 s)."""
    spec = tf.TensorSpec((None, *trunk.inputs[0].shape[1:]), trunk.inputs[0].dtype)
    return hvp.compiled(trunk, [], "trunk", lambda model_ref, _: graph_function(
        lambda x: model_ref()(x, training=False), input_signature=[spec]))


def trunk_features_fn(cut: Cut, preprocess: Callable) -> Callable:
    """``(k, H, W, 3) uint8 -> (k, *cut.shape) float32``: the preprocessing and the trunk, compiled."""
    trunk = compiled_trunk(cut.trunk)
    dtype = cut.trunk.inputs[0].dtype
    return lambda images: np.asarray(trunk(tf.cast(preprocess(images), dtype)), dtype=np.float32)


def train_features(train, *, cut: Cut, preprocess: Callable, preprocess_name: str, model: str | list,
                   directory: str | os.PathLike | None = None, dtype: str = "float32", batch_size: int = 32,
                   echo: Callable[..., None] = print) -> feature_cache.FeatureCache:
    """The cached features of every image of the train archive ``train``, built if needed."""
    key = feature_key(model=model, cut=cut, preprocess=preprocess_name, dtype=dtype, images="train",
                      archive_digest=archive.content_digest(train.path))
    path = feature_cache.cache_path(directory or default_cache_dir(train.path), stem=train.path.stem, key=key)
    return feature_cache.open_or_build(path, key, labels=train.labels, feature_shape=cut.shape,
                                       read_images=train.read, features_fn=trunk_features_fn(cut, preprocess),
                                       batch_size=batch_size, dtype=dtype, echo=echo)


def test_features(test, folder: str, *, cut: Cut, preprocess: Callable, preprocess_name: str, model: str | list,
                  directory: str | os.PathLike | None = None, dtype: str = "float32", batch_size: int = 32,
                  echo: Callable[..., None] = print) -> feature_cache.FeatureCache:
    """The cached features of one test folder of the test archive ``test`` (row i = its image i)."""
    images = test.folder(folder)
    key = feature_key(model=model, cut=cut, preprocess=preprocess_name, dtype=dtype, images=f"test/{folder}",
                      archive_digest=archive.content_digest(test.path))
    path = feature_cache.cache_path(directory or default_cache_dir(test.path), stem=f"{test.path.stem}-{folder}",
                                    key=key)
    return feature_cache.open_or_build(path, key, labels=images.labels, feature_shape=cut.shape,
                                       read_images=lambda indices: np.asarray(images.images[indices]),
                                       features_fn=trunk_features_fn(cut, preprocess),
                                       batch_size=batch_size, dtype=dtype, echo=echo)


test_features.__test__ = False  # not a pytest test


class FeatureSource:
    """A :class:`influence.sampling.Source` over cached features: ``MinibatchSampler`` minibatches
    of features for the head (``hvp.training_hvp(cut.head, variables, sampler)``)."""

    def __init__(self, cache: feature_cache.FeatureCache):
        self.cache = cache
        self.labels = cache.labels  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices) -> np.ndarray:
        return self.cache.take(indices)  # (k, *cut.shape) float32


# -- scoring many test images at once ---------------------------------------------------------

