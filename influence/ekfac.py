"""EK-FAC: a curvature fitted once per run, then applied to every test gradient.

Eigenvalue-corrected Kronecker-factored approximate curvature (George et al. 2018), as
Grosse et al. (2023) use it for influence functions. What it approximates is the
**Gauss-Newton matrix** (for cross-entropy on softmax outputs it equals the Fisher) of the
training objective, one block per layer, never the Hessian: it is positive semi-definite
by construction, even where the Hessian is not (away from an optimum, or along flat
directions), so its damped inverse always exists.

For a Dense or Conv2D layer with weights ``W`` (the kernel reshaped to ``(d_in, d_out)``,
the bias appended as a last row, ``d_a = d_in + 1``), example ``i``'s gradient is

    G_i = sum_t a_it g_it^T                     # (d_a, d_out)

where ``a_it`` is the layer's input (a patch of it for a convolution, position ``t``; with
a trailing 1 for the bias) and ``g_it = dL_i/ds_it`` the gradient of the example's loss
with respect to the layer's pre-activation output. Labels are **drawn from the model's own
predictive distribution** (one per training example, the "true Fisher"), so that the
second moment of ``G_i`` is the Gauss-Newton matrix rather than the empirical Fisher.

Fit (:func:`fit_factors`), two passes over a sample of the training set:

1. ``A = mean_{i,t} a_it a_it^T`` and ``S = mean_i sum_t g_it g_it^T``; their
   eigenvectors ``Q_A``, ``Q_S``. K-FAC would use ``A (x) S``; EK-FAC keeps only the basis.
2. The eigenvalue correction: ``Lambda[j, m] = mean_i ((Q_A^T G_i Q_S)[j, m])^2``, the
   second moment of the per-example gradients in that basis (same labels as pass 1).

The layer's curvature block is then ``G = (Q_A (x) Q_S) diag(Lambda) (Q_A (x) Q_S)^T``.

Apply (:class:`PreparedEkfac`): per layer, with ``V`` the test gradient in matrix form,

    (G + R + damping I)^-1 V = Q_A [(Q_A^T V Q_S) / (Lambda + 2 l2 + damping)] Q_S^T

``R`` is the exact Hessian of the model's L2 weight penalties (``2 l2`` per weight; the
basis is orthonormal, so it adds to every eigenvalue). When the bias's L2 differs from the
kernel's, the difference is a rank-``d_out`` term on the bias row, inverted exactly by the
Woodbury identity (its capacitance matrix is diagonal in ``Q_S``).

Damping (``EkfacSolver.damping``): Tikhonov ``damping * I`` added to the whole
block-diagonal curvature; with ``damping_mode="relative"`` (default) the number given is
multiplied by the mean corrected eigenvalue over all fitted layers, i.e. by
``trace(G) / n_parameters``, the average Fisher diagonal, which does not depend on the
basis. ``diagnostics["effective_damping"]`` is the Tikhonov damping actually used.

Layers whose factor would have a side above ``max_factor_dim`` (VGG16's ``fc1``: an input
covariance of 25,089 x 25,089, 5 GB in float64 and about half an hour of eigendecomposition
on two cores) are **left out**: their part of ``s_test`` is zero, so the scores are the
influence through the other layers only. The run says so and records which.

Layers cross-talk nowhere (the approximation is block-diagonal by layer), exactly as in
Kronfluence. Only Dense and Conv2D layers (channels last, one group) are supported; any
other layer among the selected weights is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from influence import losses, outputs, params
from influence.errors import UserError
from influence.graphs import graph_function
from influence.progress import progress_bar
from influence.solvers import Solution, TrainingCurvature

FACTORS_FORMAT = 1  # bump when the file layout or the fit's definition changes
FIT_STREAM = 0xEFAC  # the fit's sample and pseudo-labels, apart from every other random stream
# Training images the factors are fitted on by default (EkfacSolver.samples): the fit's passes
# cost a forward and backward pass per image and draw (VGG16: ~10 CPU s each), so without a cap
# the fit would grow with the training set; factor statistics are averages, and a few thousand
# examples estimate them well (docs/ekfac.md, "the fit sample").
DEFAULT_SAMPLES = 2000
DAMPING_MODES = ("relative", "absolute")
DTYPES = ("float32", "float64")


# -- which layers, and how their weights map to the (d_a, d_out) matrix form ----------------


@dataclass(frozen=True)
class LayerBlock:
    """One Dense or Conv2D layer among the selected weights.

    ``kernel_index`` / ``bias_index``: positions in the selected variables (``bias_index``
    None when the layer has no bias or its bias is not selected, which then stays fixed).
    ``d_in``: kernel rows (``kh * kw * c_in`` for a convolution); ``d_a`` adds the bias row.
    ``l2_kernel`` / ``l2_bias``: the L2 penalty coefficients (``l2 * sum(w^2)``).
    """

    name: str
    kind: str  # "dense" | "conv2d"
    kernel_index: int
    bias_index: int | None
    d_in: int
    d_out: int
    l2_kernel: float = 0.0
    l2_bias: float = 0.0

    @property
    def d_a(self) -> int:
        return self.d_in + (self.bias_index is not None)

    def describe(self) -> dict:
        return {"layer": self.name, "kind": self.kind, "activation_dim": self.d_a, "gradient_dim": self.d_out}


def _l2_coefficient(regulariser, where: str) -> float:
    """The ``l2`` of ``l2 * sum(w^2)``; L1 terms have a zero Hessian almost everywhere."""
    if regulariser is None:
        return 0.0
    if isinstance(regulariser, (keras.regularizers.L2, keras.regularizers.L1L2)):
        return float(regulariser.l2)
    if isinstance(regulariser, keras.regularizers.L1):
        return 0.0
    raise UserError(f"{where} has a {type(regulariser).__name__} regulariser; EK-FAC knows the Hessian of "
                    "L1 and L2 penalties only (use --method lissa for this model)")


def _supported(layer) -> str | None:
    """"dense" / "conv2d" for layers whose call EK-FAC reproduces, else None."""
    for kind, cls in (("dense", keras.layers.Dense), ("conv2d", keras.layers.Conv2D)):
        # A subclass that overrides call computes something else than x @ W + b.
        if isinstance(layer, cls) and type(layer).call is cls.call:
            return kind
    return None


def layer_blocks(model: keras.Model, variables) -> list[LayerBlock]:
    """The selected ``variables`` grouped by layer, refusing anything EK-FAC cannot fit.

    Raises UserError for a selected weight of a layer other than Dense/Conv2D, a bias
    selected without its kernel, a grouped or channels-first convolution, a LoRA or
    quantised layer, an activity regulariser (its Hessian involves the activations) or a
    weight regulariser other than L1/L2.
    """
    position = {id(variable): index for index, variable in enumerate(variables)}
    blocks, covered = [], set()
    for layer in params.weighted_layers(model):
        if getattr(layer, "activity_regularizer", None) is not None:
            raise UserError(f"layer {layer.name!r} has an activity regulariser, whose Hessian EK-FAC does "
                            "not model; use --method lissa for this model")
        chosen = [variable for variable in layer.trainable_weights if id(variable) in position]
        if not chosen:
            continue
        kind = _supported(layer)
        if kind is None:
            raise UserError(f"EK-FAC supports Dense and Conv2D layers only, and layer {layer.name!r} "
                            f"({type(layer).__name__}) has selected weights; choose other layers with "
                            "--layers, or use --method lissa")
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise UserError(f"layer {layer.name!r} is LoRA-enabled or quantised; EK-FAC needs a plain kernel")
        if kind == "conv2d" and (layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1):
            raise UserError(f"Conv2D layer {layer.name!r} is channels-first or grouped; EK-FAC supports "
                            "channels_last convolutions with groups=1")
        kernel, bias = layer.kernel, layer.bias if layer.use_bias else None
        if id(kernel) not in position:
            raise UserError(f"layer {layer.name!r}: its bias is selected without its kernel; EK-FAC fits "
                            "whole layers (kernel, or kernel and bias)")
        bias_index = position.get(id(bias)) if bias is not None else None
        shape = tuple(int(dim) for dim in kernel.shape)
        blocks.append(LayerBlock(
            name=layer.name, kind=kind, kernel_index=position[id(kernel)], bias_index=bias_index,
            d_in=int(np.prod(shape[:-1])), d_out=shape[-1],
            l2_kernel=_l2_coefficient(layer.kernel_regularizer, f"layer {layer.name!r}'s kernel"),
            l2_bias=(_l2_coefficient(layer.bias_regularizer, f"layer {layer.name!r}'s bias")
                     if bias_index is not None else 0.0),
        ))
        covered.update(id(variable) for variable in chosen)
    stray = [variable.path for variable in variables if id(variable) not in covered]
    if stray:
        raise UserError(f"EK-FAC cannot place the selected weights {', '.join(stray[:3])} in a Dense or Conv2D "
                        "layer; choose whole layers with --layers")
    return blocks


def _layers_by_name(model: keras.Model, blocks) -> list:
    by_name = {layer.name: layer for layer in params.weighted_layers(model)}
    return [by_name[block.name] for block in blocks]


# -- layer inputs and pre-activation outputs, captured from the model's own forward pass ----


def conv_patches(inputs: tf.Tensor, layer) -> tf.Tensor:
    """(B, H, W, C) layer input -> (B, H', W', kh*kw*C) the patches the kernel sees, in the
    kernel's own (kh, kw, C) order, with the layer's padding, strides and dilation."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    return tf.image.extract_patches(inputs, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                    rates=[1, dh, dw, 1], padding=layer.padding.upper())


def _positions(tensor: tf.Tensor) -> tf.Tensor:
    """(B, ..., d) -> (B, T, d): every spatial (or sequence) position of one example on axis 1."""
    count = int(np.prod(tensor.shape[1:-1]))  # static: T = 1 for a Dense layer on vectors
    return tf.reshape(tensor, [-1, count, tensor.shape[-1]])


def layer_activations(inputs: tf.Tensor, layer, block: LayerBlock) -> tf.Tensor:
    """(B, T, d_a) the inputs ``a_it`` the layer's weights multiply, a trailing 1 for the bias."""
    rows = conv_patches(inputs, layer) if block.kind == "conv2d" else inputs
    rows = _positions(tf.cast(rows, tf.float32))
    if block.bias_index is None:
        return rows
    return tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)


@contextlib.contextmanager
def _capturing(layers):
    """While active, every call of ``layers`` records its input and its pre-activation output.

    The layer's ``call`` and ``activation`` are shadowed by recording wrappers on the
    instance and restored afterwards; used only while a ``tf.function`` is traced.
    """
    records = [{"inputs": [], "preactivations": []} for _ in layers]
    saved = []
    for layer, record in zip(layers, records):
        saved.append((layer, layer.__dict__.get("call"), layer.activation))

        def call(inputs, *args, _call=layer.call, _record=record, **kwargs):
            _record["inputs"].append(inputs)
            return _call(inputs, *args, **kwargs)

        def activation(x, _activation=layer.activation, _record=record):
            _record["preactivations"].append(x)
            return _activation(x)

        object.__setattr__(layer, "call", call)
        object.__setattr__(layer, "activation", activation)
    try:
        yield records
    finally:
        for layer, own_call, own_activation in saved:
            if own_call is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", own_call)
            object.__setattr__(layer, "activation", own_activation)


def _logits(model: keras.Model, outputs_: tf.Tensor, kind: str) -> tf.Tensor:
    if kind == losses.LOGITS:
        return tf.cast(outputs_, tf.float32)
    logits = losses._softmax_input(outputs_)  # noqa: SLF001 (the engine's own helper)
    if logits is None:
        return tf.math.log(tf.maximum(tf.cast(outputs_, tf.float32), np.finfo(np.float32).tiny))
    return tf.cast(logits, tf.float32)


def _forward(model, layers, blocks, x, labels, seed, *, with_activations=True):
    """Forward and backward pass with pseudo-labels: per layer (B, T, d_a) and (B, T, d_out).

    ``labels``: None to draw them from the model's predictive distribution (stateless,
    from ``seed``); returns the labels used. ``with_activations=False``: the activations
    come back as None (their patches are not built).
    """
    kind = losses.output_kind(model)
    with _capturing(layers) as records:
        with tf.GradientTape() as tape:
            outputs_ = model(x, training=False)  # (B, C)
            if labels is None:
                labels = tf.reshape(tf.random.stateless_categorical(
                    _logits(model, outputs_, kind), 1, seed=seed, dtype=tf.int32), [-1])  # (B,)
            # The sum, not the mean: the gradient at s_i is then example i's own dL_i/ds_i.
            total = tf.reduce_sum(losses.cross_entropy(outputs_, labels, kind=kind))
            for layer, record in zip(layers, records):
                if len(record["inputs"]) != 1 or len(record["preactivations"]) != 1:
                    raise UserError(f"layer {layer.name!r} is called {len(record['inputs'])} times per forward "
                                    "pass; EK-FAC needs each fitted layer used exactly once")
        preactivations = [record["preactivations"][0] for record in records]
        gradients = tape.gradient(total, preactivations, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    activations = ([layer_activations(record["inputs"][0], layer, block)
                    for record, layer, block in zip(records, layers, blocks)] if with_activations else None)
    return labels, activations, [_positions(tf.cast(g, tf.float32)) for g in gradients]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(model, blocks, job: str, build: Callable) -> Callable:
    per_model = _COMPILED.setdefault(model, {})
    key = (job, tuple(blocks))
    if key not in per_model:
        per_model[key] = build(weakref.ref(model), _layers_by_name(model, blocks), list(blocks))
    return per_model[key]


def _build_covariances(model_ref, layers, blocks):
    @graph_function
    def covariances(x, seed):
        labels, activations, gradients = _forward(model_ref(), layers, blocks, x, None, seed)
        sums_a = [tf.einsum("bti,btj->ij", a, a) for a in activations]  # (d_a, d_a) summed over i, t
        sums_s = [tf.einsum("bti,btj->ij", g, g) for g in gradients]  # (d_out, d_out)
        positions = [tf.shape(a)[1] for a in activations]
        return labels, sums_a, sums_s, positions

    return covariances


def _build_gradient_covariances(model_ref, layers, blocks):
    @graph_function
    def gradient_covariances(x, seed):  # another label draw on the same batch: A is already counted
        labels, _, gradients = _forward(model_ref(), layers, blocks, x, None, seed, with_activations=False)
        return labels, [tf.einsum("bti,btj->ij", g, g) for g in gradients]

    return gradient_covariances


def _build_corrections(model_ref, layers, blocks):
    @graph_function
    def corrections(x, labels, bases_a, bases_s):
        _, activations, gradients = _forward(model_ref(), layers, blocks, x, labels, None)
        sums = []
        for a, g, q_a, q_s in zip(activations, gradients, bases_a, bases_s):
            a_rot, g_rot = a @ q_a, g @ q_s  # (B, T, d_a), (B, T, d_out) in the eigenbases
            if a.shape[1] == 1:  # one position: Q_A^T G_i Q_S is an outer product, squared entrywise
                sums.append(tf.transpose(a_rot[:, 0] ** 2) @ (g_rot[:, 0] ** 2))
            else:
                projected = tf.einsum("bti,btm->bim", a_rot, g_rot)  # (B, d_a, d_out) = Q_A^T G_i Q_S
                sums.append(tf.reduce_sum(projected ** 2, axis=0))
        return sums

    return corrections


def _images(x) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    return x if x.dtype.is_floating else tf.cast(x, tf.float32)


def batch_covariances(model, blocks, x, *, seed, with_activations=True) -> tuple[np.ndarray, list | None, list,
                                                                                 list | None]:
    """One batch's pass 1: (B,) pseudo-labels, per layer ``sum a a^T``, ``sum g g^T`` and positions T.

    ``with_activations=False`` (a further label draw on the same batch): only the labels and
    ``sum g g^T``; the activations do not depend on the labels, so ``sum a a^T`` and T come
    back as None and the patches are never built.
    """
    seed = tf.constant(seed, tf.int64)
    if not with_activations:
        labels, sums_s = _compiled(model, blocks, "gradient_covariances", _build_gradient_covariances)(_images(x), seed)
        return labels.numpy(), None, [s.numpy() for s in sums_s], None
    fn = _compiled(model, blocks, "covariances", _build_covariances)
    labels, sums_a, sums_s, positions = fn(_images(x), seed)
    return (labels.numpy(), [s.numpy() for s in sums_a], [s.numpy() for s in sums_s],
            [int(t) for t in positions])


def batch_corrections(model, blocks, x, labels, bases_a, bases_s) -> list[np.ndarray]:
    """One batch's pass 2: per layer ``sum_i (Q_A^T G_i Q_S)^2`` (d_a, d_out)."""
    fn = _compiled(model, blocks, "corrections", _build_corrections)
    sums = fn(_images(x), tf.constant(labels, tf.int32),
              [tf.constant(q, tf.float32) for q in bases_a], [tf.constant(q, tf.float32) for q in bases_s])
    return [s.numpy() for s in sums]


# -- the fitted factors ----------------------------------------------------------------


@dataclass
class LayerFactors:
    """One layer's fitted curvature: ``(Q_A (x) Q_S) diag(eigenvalues) (Q_A (x) Q_S)^T``."""

    block: LayerBlock
    activation_basis: np.ndarray  # (d_a, d_a) Q_A, orthonormal columns
    gradient_basis: np.ndarray  # (d_out, d_out) Q_S
    eigenvalues: np.ndarray  # (d_a, d_out) corrected: Lambda[j, m]
    activation_covariance_eigenvalues: np.ndarray  # (d_a,) K-FAC's, kept for inspection
    gradient_covariance_eigenvalues: np.ndarray  # (d_out,)


@dataclass
class FittedFactors:
    """Every fitted layer, the layers left out (with why), and how the fit was done."""

    layers: list[LayerFactors]
    left_out: list[dict]
    sample_size: int
    fit_seconds: float
    label_draws: int = 1
    pseudo_labels: np.ndarray | None = None  # (label_draws, sample_size) in sample order; not stored in the file
    indices: np.ndarray | None = None  # (sample_size,) sorted training indices of the sample

    @property
    def mean_eigenvalue(self) -> float:
        """Mean corrected eigenvalue over every fitted parameter: ``trace(G) / n_parameters``."""
        total = sum(float(f.eigenvalues.sum(dtype=np.float64)) for f in self.layers)
        count = sum(f.eigenvalues.size for f in self.layers)
        return total / count if count else 0.0


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The covariances are symmetric PSD; symmetrise against float round-off first.
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return np.maximum(values, 0.0), vectors


def fit_factors(model, blocks: list[LayerBlock], source, *, indices: np.ndarray, batch_size: int, seed: int,
                max_factor_dim: int, label_draws: int = 1, dtype: str = "float32",
                echo: Callable[..., None] = print, progress: bool = True) -> FittedFactors:
    """Fit EK-FAC on the training examples ``indices`` (sorted) of ``source``.

    Two passes in minibatches of ``batch_size`` (module docstring); ``seed`` draws the
    pseudo-labels, ``label_draws`` of them per example (each draw costs a forward and a
    backward pass per pass; every moment is a mean over all drawn pairs); layers with a
    side above ``max_factor_dim`` are left out; bases and
    eigenvalues are kept in ``dtype`` (covariances and eigendecompositions in float64).
    """
    began = time.perf_counter()
    fitted, left_out = [], []
    for block in blocks:
        if max(block.d_a, block.d_out) > max_factor_dim:
            left_out.append({**block.describe(), "reason": f"a factor side of {max(block.d_a, block.d_out)} "
                             f"exceeds max_factor_dim={max_factor_dim}"})
            echo(f"EK-FAC leaves out layer {block.name!r}: its {block.d_a} x {block.d_out} factors exceed "
                 f"max_factor_dim={max_factor_dim}; s_test is zero on its weights, so the scores are the "
                 "influence through the other layers only")
        else:
            fitted.append(block)
    if not fitted:
        raise UserError(f"every selected layer has a factor side above max_factor_dim={max_factor_dim}; "
                        "select smaller layers with --layers or raise --max-factor-dim")
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    draws = label_draws * len(indices)  # sampled (example, label) pairs
    bar = progress_bar(total=2 * len(batches) * label_draws + len(fitted), desc="EK-FAC fit", unit="step",
                       disable=not progress)
    try:
        sums_a = [np.zeros((b.d_a, b.d_a)) for b in fitted]
        sums_s = [np.zeros((b.d_out, b.d_out)) for b in fitted]
        positions, labels = 0, np.zeros((label_draws, len(indices)), np.int64)
        for number, (batch, start) in enumerate(zip(batches, range(0, len(indices), batch_size))):
            x = source.take(batch)
            for draw in range(label_draws):
                # A does not depend on the labels: it is summed on the batch's first draw only.
                batch_labels, batch_a, batch_s, batch_positions = batch_covariances(
                    model, fitted, x, seed=(seed, (FIT_STREAM << 40) + number * 1024 + draw),
                    with_activations=draw == 0)
                labels[draw, start:start + len(batch)] = batch_labels
                for total, part in zip(sums_s, batch_s):
                    total += part
                if draw == 0:
                    for total, part in zip(sums_a, batch_a):
                        total += part
                    positions += np.asarray(batch_positions) * len(batch)
                bar.update()
        bases_a, bases_s, values_a, values_s = [], [], [], []
        for block, total_a, total_s, count in zip(fitted, sums_a, sums_s, positions):
            value_a, basis_a = _eigh(total_a / count)  # mean over examples and positions (once, not per draw)
            value_s, basis_s = _eigh(total_s / draws)  # mean over examples, summed over positions
            bases_a.append(basis_a), bases_s.append(basis_s), values_a.append(value_a), values_s.append(value_s)
            bar.update()
        corrections = [np.zeros((b.d_a, b.d_out)) for b in fitted]
        for batch, start in zip(batches, range(0, len(indices), batch_size)):
            x = source.take(batch)
            for draw in range(label_draws):
                parts = batch_corrections(model, fitted, x, labels[draw, start:start + len(batch)], bases_a, bases_s)
                for total, part in zip(corrections, parts):
                    total += part
                bar.update()
    finally:
        bar.close()
    layers = [LayerFactors(block, basis_a.astype(dtype), basis_s.astype(dtype),
                           (correction / draws).astype(dtype), value_a, value_s)
              for block, basis_a, basis_s, correction, value_a, value_s
              in zip(fitted, bases_a, bases_s, corrections, values_a, values_s)]
    return FittedFactors(layers, left_out, len(indices), time.perf_counter() - began, label_draws, labels,
                         np.asarray(indices))


AUTO_DRAWS_TOTAL, AUTO_DRAWS_MAX = 2000, 8


def auto_label_draws(sample_size: int) -> int:
    """Pseudo-labels per example so that the fit sees at least 2,000 sampled labels, 1 to 8.

    On the leave-one-out benchmark (500 training points) one draw left Pearson 0.86-0.94
    across seeds and four draws 0.956-0.963 (docs/ekfac.md): the Monte-Carlo noise of the
    Fisher, not the Kronecker basis, dominated. Large training sets need one draw.
    """
    return int(min(AUTO_DRAWS_MAX, max(1, -(-AUTO_DRAWS_TOTAL // max(sample_size, 1)))))


# -- the factor file: one .npz, keyed, written atomically --------------------------------


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 of every weight of ``model`` (the activations depend on all of them)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(variable.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
    return digest.hexdigest()


def save_factors(path: str | Path, factors: FittedFactors, key: dict) -> Path:
    """Write ``factors`` with their ``key`` (JSON) to ``path`` (.npz) atomically."""
    arrays = {"key": np.array(json.dumps(key, sort_keys=True)),
              "meta": np.array(json.dumps({"left_out": factors.left_out, "sample_size": factors.sample_size,
                                           "fit_seconds": factors.fit_seconds,
                                           "blocks": [layer.block.__dict__ for layer in factors.layers]}))}
    for number, layer in enumerate(factors.layers):
        arrays[f"activation_basis_{number}"] = layer.activation_basis
        arrays[f"gradient_basis_{number}"] = layer.gradient_basis
        arrays[f"eigenvalues_{number}"] = layer.eigenvalues
        arrays[f"activation_covariance_eigenvalues_{number}"] = layer.activation_covariance_eigenvalues
        arrays[f"gradient_covariance_eigenvalues_{number}"] = layer.gradient_covariance_eigenvalues
    return outputs.write_with(path, lambda file: np.savez(file, **arrays))


def load_factors(path: str | Path, key: dict) -> tuple[FittedFactors | None, str]:
    """The factors in ``path`` if they were fitted under exactly ``key``; else (None, why not)."""
    path = Path(path)
    if not path.is_file():
        return None, "no factor file yet"
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_key = json.loads(str(stored["key"]))
            wanted = json.loads(json.dumps(key, sort_keys=True))  # the same JSON round trip as saved
            if stored_key != wanted:
                differing = sorted(name for name in set(stored_key) | set(wanted)
                                   if stored_key.get(name) != wanted.get(name))
                return None, f"it was fitted under other settings (differs in: {', '.join(differing)})"
            meta = json.loads(str(stored["meta"]))
            layers = [LayerFactors(LayerBlock(**block), stored[f"activation_basis_{n}"], stored[f"gradient_basis_{n}"],
                                   stored[f"eigenvalues_{n}"], stored[f"activation_covariance_eigenvalues_{n}"],
                                   stored[f"gradient_covariance_eigenvalues_{n}"])
                      for n, block in enumerate(meta["blocks"])]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"it could not be read ({type(error).__name__}: {error})"
    return FittedFactors(layers, meta["left_out"], meta["sample_size"], meta["fit_seconds"]), ""


# -- the solver ------------------------------------------------------------------------


@dataclass(frozen=True)
class EkfacSolver:
    """EK-FAC (module docstring): fitted once in ``prepare``, then a few matrix products per solve.

    ``damping``: Tikhonov damping; with ``damping_mode="relative"`` a multiple of the mean
    corrected eigenvalue (``trace(G) / n_parameters``), with ``"absolute"`` the number itself.
    ``samples``: training examples the factors are fitted on, at most (default
    :data:`DEFAULT_SAMPLES`; None: all), drawn without replacement from ``seed``; ``label_draws``: pseudo-labels drawn per example (more lowers the
    Monte-Carlo noise of the Fisher, which matters on small training sets; None:
    :func:`auto_label_draws`); ``batch_size``: examples per pass of the fit (memory: a batch's
    convolution patches); ``max_factor_dim``: layers with a larger factor side are left out;
    ``dtype``: precision of the stored bases and eigenvalues and of every solve.
    ``cache_path``: the factor file (.npz) to reuse and to write; ``cache_key``: JSON-ready
    facts the caller vouches for (model file hash, archive identity, layers). Neither
    decides the numbers, so neither is in :meth:`settings`.
    """

    damping: float = 0.1
    damping_mode: str = "relative"
    samples: int | None = DEFAULT_SAMPLES
    label_draws: int | None = None  # None: auto_label_draws(sample size)
    batch_size: int = 8
    max_factor_dim: int = 8192
    dtype: str = "float32"
    seed: int | None = None  # None: the run's seed (TrainingCurvature.seed)
    cache_path: str | None = None
    cache_key: dict | None = field(default=None, hash=False, compare=False)
    name: str = "ekfac"

    def __post_init__(self):
        checks = [
            (isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool) and self.damping >= 0,
             f"damping must be a number of at least 0, not {self.damping!r}"),
            (self.damping_mode in DAMPING_MODES,
             f"damping mode must be one of {', '.join(DAMPING_MODES)}, not {self.damping_mode!r}"),
            (self.samples is None or (isinstance(self.samples, int) and self.samples >= 1),
             f"samples must be a whole number of at least 1 (or None: all), not {self.samples!r}"),
            (self.label_draws is None or (isinstance(self.label_draws, int) and 1 <= self.label_draws <= 1024),
             f"label draws must be a whole number from 1 to 1024, not {self.label_draws!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch size must be a whole number of at least 1, not {self.batch_size!r}"),
            (isinstance(self.max_factor_dim, int) and self.max_factor_dim >= 1,
             f"max_factor_dim must be a whole number of at least 1, not {self.max_factor_dim!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def settings(self) -> dict:
        return {"method": self.name, "damping": self.damping, "damping_mode": self.damping_mode,
                **self.fit_settings()}

    def fit_settings(self) -> dict:
        """What decides the factors (damping does not: it is applied afterwards)."""
        return {"samples": self.samples, "label_draws": self.label_draws, "batch_size": self.batch_size,
                "max_factor_dim": self.max_factor_dim, "dtype": self.dtype, "seed": self.seed}

    def prepare(self, curvature: TrainingCurvature, *, cache_path: str | Path | None = None,
                cache_key: dict | None = None, progress: bool = True) -> "PreparedEkfac":
        began = time.perf_counter()
        model, source = curvature.model, curvature.sampler.source
        blocks = layer_blocks(model, curvature.variables)
        seed = curvature.seed if self.seed is None else self.seed
        count = len(source)
        size = count if self.samples is None else min(self.samples, count)
        indices = np.arange(count) if size == count else np.sort(
            np.random.default_rng([int(seed), FIT_STREAM]).choice(count, size=size, replace=False))
        cache_path = cache_path if cache_path is not None else self.cache_path
        cache_key = cache_key if cache_key is not None else self.cache_key
        key = {"format": FACTORS_FORMAT, "caller": cache_key, "fit": {**self.fit_settings(), "seed": int(seed)},
               "layers": [block.__dict__ for block in blocks], "n_train": count,
               "labels_sha256": hashlib.sha256(np.asarray(source.labels, np.int64).tobytes()).hexdigest(),
               "weights_sha256": weights_fingerprint(model)}
        draws = auto_label_draws(size) if self.label_draws is None else self.label_draws
        key["fit"]["label_draws"] = draws
        factors, reused = None, False
        if cache_path is not None:
            factors, why = load_factors(cache_path, key)
            if factors is not None:
                reused = True
                curvature.echo(f"EK-FAC factors reused from {cache_path}")
                for entry in factors.left_out:
                    curvature.echo(f"EK-FAC leaves out layer {entry['layer']!r} ({entry['reason']}); s_test is zero "
                                   "on its weights")
            elif Path(cache_path).exists():
                curvature.echo(f"EK-FAC factors in {cache_path} not used: {why}; refitting")
        if factors is None:
            factors = fit_factors(model, blocks, source, indices=indices, batch_size=self.batch_size, seed=int(seed),
                                  max_factor_dim=self.max_factor_dim, label_draws=draws, dtype=self.dtype,
                                  echo=curvature.echo, progress=progress)
            if cache_path is not None:
                save_factors(cache_path, factors, key)
                curvature.echo(f"EK-FAC factors written to {cache_path}")
        factors.label_draws = draws
        return PreparedEkfac(self, curvature, factors, reused=reused, prepare_seconds=time.perf_counter() - began,
                             factors_file=None if cache_path is None else str(cache_path))


class PreparedEkfac:
    """Fitted EK-FAC: ``solve(v)`` applies ``(G + R + damping I)^-1`` layer by layer."""

    name = "ekfac"

    def __init__(self, solver: EkfacSolver, curvature: TrainingCurvature, factors: FittedFactors, *,
                 reused: bool, prepare_seconds: float, factors_file: str | None):
        self.solver = solver
        self.curvature = curvature
        self.factors = factors
        mean = factors.mean_eigenvalue
        self.damping = solver.damping * mean if solver.damping_mode == "relative" else float(solver.damping)
        self._like = curvature.zeros()
        self.diagnostics = {
            "method": "ekfac", "damping": solver.damping, "damping_mode": solver.damping_mode,
            "effective_damping": self.damping, "mean_eigenvalue": mean,
            "layers_fitted": [layer.block.name for layer in factors.layers],
            "layers_left_out": factors.left_out,
            "sample_size": factors.sample_size, "label_draws": factors.label_draws, "fit_seconds": factors.fit_seconds,
            "factors_reused": reused, "factors_file": factors_file, "prepare_seconds": prepare_seconds,
        }

    def solve(self, v, *, key=(), callback=None) -> Solution:
        """``s_test`` for the test gradient ``v`` (shaped like the variables); ``key`` is unused
        (the solve is deterministic), ``callback`` is not called (there are no steps)."""
        s_test = [tf.zeros_like(part) for part in self._like]
        for layer in self.factors.layers:
            block = layer.block
            s_kernel, s_bias = _apply_inverse(layer, _matrix_form(v, block), damping=self.damping)
            s_test[block.kernel_index] = tf.reshape(tf.cast(s_kernel, s_test[block.kernel_index].dtype),
                                                    s_test[block.kernel_index].shape)
            if block.bias_index is not None:
                s_test[block.bias_index] = tf.cast(s_bias, s_test[block.bias_index].dtype)
        return Solution(s_test, {"effective_damping": self.damping})


def _matrix_form(v, block: LayerBlock) -> np.ndarray:
    """(d_a, d_out): the kernel's rows, then the bias as the last row."""
    rows = [np.reshape(np.asarray(v[block.kernel_index]), (block.d_in, block.d_out))]
    if block.bias_index is not None:
        rows.append(np.reshape(np.asarray(v[block.bias_index]), (1, block.d_out)))
    return np.concatenate(rows, axis=0)


def _apply_inverse(layer: LayerFactors, matrix: np.ndarray, *, damping: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``(G + R + damping I)^-1 V`` for one layer: (kernel part (d_in, d_out), bias part (d_out,) or None).

    ``R``: ``2 l2_kernel`` on kernel rows, ``2 l2_bias`` on the bias row. The base
    ``B = G + (2 l2_kernel + damping) I`` is diagonal in the eigenbasis; the bias row's
    difference ``c = 2 (l2_bias - l2_kernel)`` enters by Woodbury with ``U = e_bias (x) I``:
    ``U^T B^-1 U = Q_S diag(w) Q_S^T``, ``w_m = sum_j Q_A[bias, j]^2 / D[j, m]``.

    The matrix products run in TensorFlow, which flushes subnormal floats to zero; NumPy's
    BLAS computes them at a hundredth of the speed, and tiny eigenvector entries times small
    gradient entries land there often enough to slow a VGG16 solve tenfold.
    """
    block = layer.block
    dtype = layer.eigenvalues.dtype
    q_a, q_s = tf.constant(layer.activation_basis), tf.constant(layer.gradient_basis)  # (d_a, d_a), (d_out, d_out)
    diagonal = tf.constant(layer.eigenvalues + dtype.type(2 * block.l2_kernel + damping))  # (d_a, d_out) eigenvalues of B

    def from_eigenbasis(rotated):  # Q_A rotated Q_S^T
        return tf.linalg.matmul(tf.linalg.matmul(q_a, rotated), q_s, transpose_b=True)

    rotated = tf.linalg.matmul(tf.linalg.matmul(q_a, tf.constant(matrix.astype(dtype, copy=False)), transpose_a=True), q_s)
    result = from_eigenbasis(rotated / diagonal)  # B^-1 V
    c = 2 * (block.l2_bias - block.l2_kernel)
    if block.bias_index is not None and c != 0:
        q_bias = q_a[-1]  # (d_a,) the bias row of Q_A
        w = tf.linalg.matvec(1.0 / diagonal, q_bias ** 2, transpose_a=True)  # (d_out,)
        z = tf.linalg.matvec(q_s, tf.linalg.matvec(q_s, result[-1], transpose_a=True) * (c / (1 + c * w)))  # (d_out,)
        result = result - from_eigenbasis(q_bias[:, None] * tf.linalg.matvec(q_s, z, transpose_a=True)[None, :] / diagonal)
    result = result.numpy()
    if block.bias_index is None:
        return result, None
    return result[:-1], result[-1]
