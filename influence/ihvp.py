"""Inverse-Hessian-vector products: ``s_test = H^-1 v`` for ``v = grad L(z_test)``.

Every solver sees only ``hvp_fn(vec) -> H vec`` (lists of tensors in and out) and the
vector ``v``; the model, the loss and the data live in the closure that built ``hvp_fn``
(``hvp.training_hvp``). That is why they can be checked on a 3x3 matrix.

- :func:`lissa`: the stochastic recursion, the only one that scales to VGG16 and ImageNet;
- :func:`conjugate_gradient`: for a deterministic (full-batch) ``hvp_fn`` on small models;
- :func:`exact_solve`: builds ``H`` column by column and calls ``np.linalg.solve``.

Damping, once and for all. LiSSA's ``damping`` is the coefficient in its recursion, and
its fixed point is ``(H + damping * scale * I)^-1 v``: the Tikhonov damping it applies is
``damping * scale`` (``LissaResult.effective_damping``). CG and the exact solve take the
Tikhonov damping itself: ``conjugate_gradient(..., damping=d)`` solves ``(H + d I) x = v``.
To reproduce a LiSSA result with them, pass ``damping=result.effective_damping``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from influence.errors import UserError
from influence.graphs import graph_function

Vector = Sequence[tf.Tensor]  # one tensor per parameter variable
HvpFn = Callable[[Vector], Vector]

DEFAULT_SCALE_MARGIN = 1.5
DEFAULT_SCALE_ITERATIONS = 20
# The bound on ||h_j|| is this many times the largest norm a contracting recursion can
# reach (see _norm_bound); a diverging one grows geometrically and crosses it fast.
NORM_BOUND_FACTOR = 10.0


class LissaDivergedError(UserError):
    """LiSSA's estimate became non-finite or grew past its bound; the message says what to change."""


@dataclass
class LissaResult:
    """What :func:`lissa` returns.

    ``s_test``: the estimate of ``(H + effective_damping * I)^-1 v``, shaped like ``v``;
    ``norms``: (repeat, depth) ``||h_j||`` after every step, to inspect convergence;
    ``scale``, ``damping``, ``depth``, ``repeat``, ``averaged``: the settings used (``scale``
    as a number even when ``"auto"`` was asked for); ``effective_damping = damping * scale``;
    ``runs``: each run's own estimate (``s_test`` is their mean), for stability checks.
    """

    s_test: list[tf.Tensor]
    norms: np.ndarray
    scale: float
    damping: float
    depth: int
    repeat: int
    averaged: int = 1
    runs: list = field(default_factory=list)

    @property
    def effective_damping(self) -> float:
        return self.damping * self.scale

    @property
    def relative_change(self) -> float:
        """``| ||h_J|| - ||h_{J-1}|| | / ||h_J||`` averaged over runs: near 0 once converged."""
        if self.depth < 2:
            return float("nan")
        last, before = self.norms[:, -1], self.norms[:, -2]
        return float(np.mean(np.abs(last - before) / np.maximum(last, 1e-30)))


@dataclass
class SolveResult:
    """What :func:`conjugate_gradient` and :func:`exact_solve` return.

    ``s_test`` solves ``(H + damping * I) s_test = v``; ``residual_norms`` holds
    ``||v - (H + damping I) x_k||`` per CG iteration (one entry for the exact solve).
    """

    s_test: list[tf.Tensor]
    damping: float
    residual_norms: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def effective_damping(self) -> float:
        return self.damping


# -- small vector algebra on lists of tensors -------------------------------------------

def _graph_dot(a: Vector, b: Vector) -> tf.Tensor:
    """``a . b`` as a float64 scalar tensor: products and partial sums over the last axis in the
    vectors' own precision, the rest in float64 (each partial sums at most one kernel row,
    4,096 terms on VGG16, and no float64 copy of a VGG16-sized vector is made). Eager, or
    traced into a compiled step."""
    return tf.add_n([tf.reduce_sum(tf.cast(tf.reduce_sum(x * y, axis=-1) if x.shape.rank else x * y, tf.float64))
                     for x, y in ((tf.convert_to_tensor(x), tf.convert_to_tensor(y)) for x, y in zip(a, b))])


def _graph_norm(a: Vector) -> tf.Tensor:
    """``||a||`` as a float64 scalar tensor (:func:`_graph_dot`)."""
    return tf.sqrt(tf.maximum(_graph_dot(a, a), 0.0))


def _dot(a: Vector, b: Vector) -> float:
    return float(_graph_dot(a, b))


def _norm(a: Vector) -> float:
    return float(_graph_norm(a))


def _axpy(alpha: float, x: Vector, y: Vector) -> list[tf.Tensor]:
    """``alpha * x + y``."""
    return [alpha * xi + yi for xi, yi in zip(x, y)]


def _scaled(alpha: float, x: Vector) -> list[tf.Tensor]:
    return [alpha * xi for xi in x]


def _random_unit(like: Vector, seed: int) -> list[tf.Tensor]:
    """A random unit vector shaped like ``like``: a power iteration's or a Lanczos start.
    Drawn by TensorFlow's counter-based (stateless) generator, part ``i`` from ``(seed, i)``:
    the same vector in every run, without NumPy's single-threaded float64 draw (seconds on VGG16)."""
    parts = [tf.random.stateless_normal(tuple(part.shape), seed=[seed, index], dtype=part.dtype)
             for index, part in enumerate(like)]
    return _scaled(1.0 / _norm(parts), parts)


def flatten(vector: Vector) -> np.ndarray:
    """One (N,) float64 array from a list of tensors."""
    return np.concatenate([np.asarray(part, dtype=np.float64).ravel() for part in vector])


def unflatten(flat: np.ndarray, like: Vector) -> list[tf.Tensor]:
    """The inverse of :func:`flatten`, with the shapes and dtypes of ``like``."""
    parts, start = [], 0
    for part in like:
        size = int(np.prod(part.shape))
        parts.append(tf.constant(flat[start:start + size].reshape(part.shape), dtype=part.dtype))
        start += size
    return parts


def _lissa_update(h, hv, v, keep, inv_scale, tail):
    """``h_new = v + keep * h - inv_scale * hv``, ``tail + h_new`` (None without a ``tail``) and
    ``||h_new||``: one LiSSA step after its product ``hv = H_j h`` (traced into a compiled call)."""
    updated = [vi + keep * hi - inv_scale * hvi for vi, hi, hvi in zip(v, h, hv)]
    # In the vectors' own precision: the norm only watches convergence, and a float64 copy
    # of every VGG16-sized vector would cost more than the update itself.
    norm = tf.linalg.global_norm(updated)
    if tail is None:
        return updated, None, norm
    return updated, [ti + ui for ti, ui in zip(tail, updated)], norm


_lissa_step = graph_function(_lissa_update)


def _power_update(u, hu):
    """A power-iteration step after its product ``hu = H_j u``: ``hu / ||hu||`` (zero for a zero
    ``hu``) and ``||hu||`` (float64 across float32 partial sums)."""
    magnitude = _graph_norm(hu)
    return [tf.math.divide_no_nan(part, tf.cast(magnitude, part.dtype)) for part in hu], magnitude


_power_step = graph_function(_power_update)


@graph_function
def _lanczos_update(q, w, q_prev, beta):
    """After the product ``w = H q``: ``alpha = q.w``, ``w - alpha q - beta q_prev`` (no
    ``q_prev`` at the first step) and its norm, in one compiled call (a third fewer passes
    over the vectors than the same operations one by one)."""
    alpha = _graph_dot(q, w)
    w = [wi - tf.cast(alpha, wi.dtype) * qi for wi, qi in zip(w, q)]
    if q_prev is not None:
        w = [wi - tf.cast(beta, wi.dtype) * pi for wi, pi in zip(w, q_prev)]
    return w, alpha, _graph_norm(w)


# -- scale -------------------------------------------------------------------------------

def estimate_scale(hvp_fn: HvpFn, *, like: Vector, damping: float = 0.0,
                   iterations: int = DEFAULT_SCALE_ITERATIONS,
                   margin: float = DEFAULT_SCALE_MARGIN, seed: int = 0, statistic: str = "max") -> float:
    """``margin`` times the largest eigenvalue magnitude of the (regularised) training Hessian.

    Power iteration: ``u <- H_j u / ||H_j u||`` from a random start, ``H_j`` on the next
    minibatch each time (so ``hvp_fn`` sees ``iterations`` minibatches); the estimate is the
    largest ``||H_j u||`` over the second half of the iterations, which errs high.
    With ``scale = margin * |mu|_max`` every eigenvalue ``mu`` of ``H`` has ``|mu / scale| <=
    1 / margin``, so the recursion factor ``1 - damping - mu / scale`` lies in ``(-1, 1)`` for
    the positive curvature whenever ``margin > 1 / (2 - damping)``. Negative curvature (a
    Hessian away from a minimum) contracts only if ``damping * scale > |mu|``; the divergence
    guard in :func:`lissa` catches the case where it does not. Call this once per run and pass
    the number to :func:`lissa`; each call costs ``iterations`` Hessian-vector products.
    """
    if iterations < 2:
        raise UserError(f"power iteration needs at least 2 iterations, not {iterations}")
    if not margin * (2.0 - damping) > 1.0:
        raise UserError(f"scale margin {margin} is too small for damping {damping}: "
                        f"the recursion contracts only for a margin above {1.0 / (2.0 - damping):.3g}")
    u = _random_unit(like, seed)
    if hasattr(hvp_fn, "followed_by"):  # the product and the normalisation in one compiled call
        advance = hvp_fn.followed_by(_power_update)
    else:
        advance = lambda u: _power_step(u, hvp_fn(u))  # noqa: E731
    magnitudes = []
    for _ in range(iterations):
        u, magnitude = advance(u)
        magnitude = float(magnitude)
        if not math.isfinite(magnitude):
            raise LissaDivergedError("the Hessian-vector product is not finite (NaN or inf): "
                                     "check the model's weights and the input images")
        magnitudes.append(magnitude)
        if magnitude == 0.0:
            break
    late = magnitudes[len(magnitudes) // 2:]
    top = max(late) if statistic == "max" else float(np.mean(late))
    if top == 0.0:
        raise UserError("the training Hessian is zero for these weights "
                        "(no curvature): influence is undefined; select other layers")
    return margin * top


def curvature_range(hvp_fn: HvpFn, *, like: Vector, iterations: int = 30, seed: int = 0,
                    tolerance: float = 1e-3, settle: float = 0.05, settle_window: int = 4, settle_from: int = 8,
                    details: dict | None = None) -> tuple[float, float]:
    """``(lambda_min, lambda_max)``: the extreme eigenvalues of a symmetric operator, by Lanczos.

    ``hvp_fn`` must be deterministic (a fixed set of examples: :func:`influence.hvp.dataset_hvp`).
    At most ``iterations`` products build the tridiagonal ``T_k = Q^T H Q`` of the Krylov space
    of a random start; its extreme eigenvalues (Ritz values) approach H's extremes from inside,
    the extremes fastest. Each is then pushed outward by its residual bound
    ``beta_k |y_k[-1]|`` (an eigenvalue of H lies within it), so the returned range errs wide,
    the safe side for a damping and a scale. Stops early once both bounds are below
    ``tolerance * max|Ritz value|``, or once the extreme Ritz values have settled: over the
    last ``settle_window`` products (from the ``settle_from``-th on) the largest moved less than ``settle``
    of itself and the smallest less than ``settle`` of ``max(|smallest|, 0.001 largest)``;
    then each is pushed out by its residual bound, at most ``settle`` of that scale. (A
    floor as large as the damping's 1% of the largest would let a smallest Ritz value still
    near zero, before the negative curvature has emerged, pass for settled.) A settled largest
    value can err low: from some starts it stalls for a few products at the next eigenvalue
    down (on the test suite's nonconvex model, 1 of 16 starts ends 6% low, the others 0 to 3%
    wide); plain LiSSA's scale takes the larger of it, the minibatches' own power iteration
    and the damping. On VGG16's top layers (a 21 M-weight Hessian whose extremes converge
    slowly) this stops at 8 products instead of 30. Three vectors in memory (in the variables'
    own dtype, dots in float64): no reorthogonalisation, since lost orthogonality duplicates
    converged Ritz values, it does not move the extremes.
    """
    q = _random_unit(like, seed)
    q_prev = None
    alphas, betas = [], []
    beta = 0.0
    values = vectors = residuals = None
    ritz, settled = [], False
    for step in range(max(2, iterations)):
        w, alpha, beta = _lanczos_update(q, list(hvp_fn(q)), q_prev, tf.constant(beta, tf.float64))
        alpha, beta = float(alpha), float(beta)
        if not math.isfinite(alpha):
            raise LissaDivergedError("the Hessian-vector product is not finite (NaN or inf): "
                                     "check the model's weights and the input images")
        alphas.append(alpha)
        betas.append(beta)
        k = len(alphas)
        tridiagonal = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
        values, vectors = np.linalg.eigh(tridiagonal)
        residuals = abs(beta) * np.abs(vectors[-1, :])
        size = max(abs(values[0]), abs(values[-1]), 1e-30)
        if beta <= 1e-10 * size:
            break  # an invariant subspace: the Ritz values are exact
        if k >= 4 and max(residuals[0], residuals[-1]) <= tolerance * size:
            break
        ritz.append((values[0], values[-1]))
        if k >= max(settle_from, settle_window + 1) and _settled(ritz[-settle_window - 1:], settle):
            settled = True
            break
        q_prev, q = q, _scaled(1.0 / beta, w)
    if details is not None:
        details.update(ritz_min=float(values[0]), ritz_max=float(values[-1]), products=len(alphas),
                       residual_min=float(residuals[0]), residual_max=float(residuals[-1]))
    push_low, push_high = residuals[0], residuals[-1]
    if settled:  # the Ritz values stopped moving: push them out by at most what "settled" allows
        push_low = min(push_low, settle * max(abs(values[0]), 1e-3 * abs(values[-1])))
        push_high = min(push_high, settle * abs(values[-1]))
    return float(values[0] - push_low), float(values[-1] + push_high)


@dataclass
class Lanczos:
    """What :func:`lanczos` found: the operator's extreme eigenvalues, as a range that errs
    wide (``lambda_min``, ``lambda_max``), every Ritz value (``values``, ascending) and the
    top Ritz pairs asked for (``top_values`` descending, ``top_vectors`` (K, n) float32 with
    orthonormal rows, the variables flattened in order)."""

    lambda_min: float
    lambda_max: float
    values: np.ndarray
    top_values: np.ndarray
    top_vectors: tf.Tensor
    products: int


def lanczos(hvp_fn: HvpFn, *, like: Vector, iterations: int = 30, pairs: int = 0, seed: int = 0) -> Lanczos:
    """Lanczos with full reorthogonalisation, keeping its basis: the extreme eigenvalues and
    the top ``pairs`` Ritz pairs of a symmetric operator (``hvp_fn`` deterministic, as for
    :func:`curvature_range`).

    ``iterations`` products build an orthonormal basis ``Q`` (iterations x n, float32) of the
    Krylov space of a random start; the Ritz pairs are the eigenpairs of ``T = Q H Q^T``
    mapped back by ``Q``. The range is the extreme Ritz values pushed outward by their
    residual bounds ``beta_k |y_k[-1]|``, as in :func:`curvature_range`. Memory: the basis,
    ``iterations * n * 4`` bytes (the caller checks it fits). Reorthogonalising against the
    whole basis (twice) keeps the Ritz vectors orthonormal, which the deflation in
    :func:`deflated_lissa` relies on.
    """
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(sum(int(np.prod(part.shape)) for part in like))
    basis = np.zeros((max(2, iterations), start.size), np.float32)
    basis[0] = start / np.linalg.norm(start)
    alphas, betas = [], []
    for step in range(max(2, iterations)):
        w = flatten(hvp_fn(unflatten(basis[step].astype(np.float64), like))).astype(np.float32)
        alpha = float(basis[step].astype(np.float64) @ w)
        if not math.isfinite(alpha):
            raise LissaDivergedError("the Hessian-vector product is not finite (NaN or inf): "
                                     "check the model's weights and the input images")
        alphas.append(alpha)
        done = basis[:step + 1]
        for _ in range(2):  # classical Gram-Schmidt twice, in float32 (no copy of the basis)
            w -= (done @ w) @ done
        beta = float(np.linalg.norm(w))
        betas.append(beta)
        if step + 1 == len(basis) or beta <= 1e-10 * max(abs(a) for a in alphas):
            break  # the last product, or an invariant subspace (the Ritz values are exact)
        basis[step + 1] = w / beta
    k = len(alphas)
    tridiagonal = np.diag(alphas) + np.diag(betas[:k - 1], 1) + np.diag(betas[:k - 1], -1)
    values, vectors = np.linalg.eigh(tridiagonal)  # ascending
    residuals = abs(betas[-1]) * np.abs(vectors[-1, :])
    keep = min(pairs, k)
    top = np.arange(k - 1, k - 1 - keep, -1)
    top_vectors = vectors[:, top].T.astype(np.float32) @ basis[:k] if keep else np.zeros((0, start.size), np.float32)
    return Lanczos(float(values[0] - residuals[0]), float(values[-1] + residuals[-1]), values,
                   values[top], tf.constant(top_vectors), k)


def _settled(ranges: list[tuple[float, float]], settle: float) -> bool:
    """Whether every (smallest, largest) pair in ``ranges`` lies within ``settle`` of the last, end by end."""
    low, high = ranges[-1]
    low_scale = max(abs(low), 1e-3 * abs(high), 1e-30)
    return all(abs(a - low) <= settle * low_scale and abs(b - high) <= settle * max(abs(high), 1e-30)
               for a, b in ranges[:-1])


# -- LiSSA -------------------------------------------------------------------------------

def _norm_bound(v_norm: float, damping: float, depth: int) -> float:
    # A contracting recursion has ||h_j|| <= ||v|| * sum_k (1 - damping)^k <= ||v|| *
    # min(1 / damping, j + 1); a tenfold allowance covers minibatch noise.
    reach = depth + 1.0 if damping <= 0 else min(1.0 / damping, depth + 1.0)
    return NORM_BOUND_FACTOR * v_norm * reach


def averaged_steps(depth: int, average: float) -> int:
    """How many final iterates a run averages: ``ceil(average * depth)``, at least 1."""
    return max(1, min(depth, int(math.ceil(average * depth - 1e-9))))


def lissa(hvp_fn: HvpFn, v: Vector, *, depth: int, damping: float, scale: float | str,
          repeat: int = 1, callback: Callable[[int, int, float], None] | None = None,
          max_norm: float | None = None, scale_margin: float = DEFAULT_SCALE_MARGIN,
          scale_iterations: int = DEFAULT_SCALE_ITERATIONS, average: float = 0.0,
          keep_runs: bool = False, before_run: Callable[[int], None] | None = None) -> LissaResult:
    """Estimate ``s_test = H^-1 v`` by LiSSA (Agarwal et al. 2017; Koh & Liang 2017).

    Each of ``repeat`` independent runs does ``depth`` steps of

        h_0 = v
        h_j = v + (1 - damping) h_{j-1} - H_j h_{j-1} / scale        (j = 1 .. depth)

    with ``H_j`` the training Hessian on the next random minibatch (``hvp_fn``), and the
    result is the mean over runs of ``hbar / scale``, ``hbar`` the mean of the last
    ``A = averaged_steps(depth, average)`` iterates ``h_{J-A+1} .. h_J`` (``average=0``: the
    last iterate alone). Its fixed point is

        s_test = (H + damping * scale * I)^-1 v

    so the Tikhonov damping applied is ``damping * scale`` (``result.effective_damping``),
    not ``damping``.

    - ``depth`` J: steps per run; the error shrinks like ``(1 - damping - mu_min/scale)^J``.
    - ``damping`` in [0, 1): keeps the recursion contracting along flat or negative
      curvature and regularises the solve; larger converges faster but biases ``s_test``.
    - ``scale``: a number larger than the Hessian's top eigenvalue (``H / scale`` must have
      norm below ``2 - damping``), or ``"auto"``: :func:`estimate_scale` with
      ``scale_margin`` and ``scale_iterations`` (costs that many extra products; a caller
      solving for many test points should estimate once and pass the number).
    - ``repeat``: independent runs averaged, which reduces the minibatch noise.
    - ``average`` in [0, 1]: the share of each run's final iterates averaged (tail, or
      Polyak-Ruppert, averaging). Free (no extra products); the iterates' minibatch noise is
      only weakly correlated from step to step, so averaging A of them cuts the variance by
      up to A times, at the price of a bias: along an eigendirection of curvature ``mu`` the
      iterate ``h_j`` has converged up to ``rho^(j+1)``, ``rho = 1 - damping - mu / scale``, so
      averaging back to step ``J - A`` leaves up to ``rho^(J-A+1)`` of the slowest directions.
    - ``keep_runs``: also return each run's estimate (``result.runs``).
    - ``before_run(run)``: called before each run (a caller reseeds its minibatch stream there).
    - ``callback(step_done, total_steps, norm)`` after every step (a progress bar).
    - ``max_norm``: the divergence bound on ``||h_j||``; default ten times the most a
      contracting recursion can reach, ``||v|| * min(1 / damping, depth + 1)``.

    Raises :class:`LissaDivergedError` when ``h_j`` becomes non-finite or its norm passes
    the bound: the run is stopped, never retried here (at a fixed ``damping`` coefficient a
    different scale would change ``effective_damping`` and so the answer; a caller that holds
    the Tikhonov damping fixed may rerun at a larger scale, as ``solvers.PreparedLissa`` does).
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise UserError(f"LiSSA depth must be a positive whole number, not {depth!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, (int, np.integer)) or repeat < 1:
        raise UserError(f"LiSSA repeat must be a positive whole number, not {repeat!r}")
    if not 0.0 <= damping < 1.0:
        raise UserError(f"LiSSA damping must be in [0, 1), not {damping!r}")
    v = [tf.convert_to_tensor(part) for part in v]
    if scale == "auto":
        scale = estimate_scale(hvp_fn, like=v, damping=damping, margin=scale_margin,
                               iterations=scale_iterations)
    elif isinstance(scale, str) or not (isinstance(scale, (int, float, np.floating)) and scale > 0
                                        and math.isfinite(scale)):
        raise UserError(f"LiSSA scale must be a positive number or 'auto', not {scale!r}")
    scale = float(scale)
    v_norm = _norm(v)
    bound = _norm_bound(v_norm, damping, depth) if max_norm is None else float(max_norm)
    keep = tf.constant(1.0 - damping, v[0].dtype)
    inv_scale = tf.constant(1.0 / scale, v[0].dtype)
    if not 0.0 <= average <= 1.0:
        raise UserError(f"LiSSA average must be a share of the iterates in [0, 1], not {average!r}")
    averaged = averaged_steps(depth, average)
    if hasattr(hvp_fn, "followed_by"):  # the product and the update in one compiled call
        advance = hvp_fn.followed_by(_lissa_update)
    else:
        advance = lambda h, *rest: _lissa_step(h, hvp_fn(h), *rest)  # noqa: E731
    norms = np.zeros((repeat, depth))
    total = None
    runs = []
    for run in range(repeat):
        if before_run is not None:
            before_run(run)
        h = list(v)
        tail = None
        for step in range(depth):
            # tail: the sum of the iterates averaged so far (from step depth - averaged on)
            h, summed, norm = advance(h, v, keep, inv_scale, tail)
            norm = float(norm)
            norms[run, step] = norm
            if not math.isfinite(norm) or norm > bound:
                raise LissaDivergedError(_divergence_message(norm, bound, run, step, scale, damping))
            if step >= depth - averaged:
                tail = h if tail is None else summed
            if callback is not None:
                callback(run * depth + step + 1, repeat * depth, norm)
        estimate = _scaled(1.0 / (scale * averaged), tail)  # this run's s_test
        if keep_runs:
            runs.append(estimate)
        total = estimate if total is None else [a + b for a, b in zip(total, estimate)]
    s_test = _scaled(1.0 / repeat, total)
    return LissaResult(s_test=s_test, norms=norms, scale=scale, damping=float(damping),
                       depth=int(depth), repeat=int(repeat), averaged=averaged, runs=runs)


def flat(vector: Vector) -> tf.Tensor:
    """One (n,) tensor from a list of tensors (the order of :func:`flatten`)."""
    return tf.concat([tf.reshape(part, [-1]) for part in vector], axis=0)


def unflat(flat_vector: tf.Tensor, like: Vector) -> list[tf.Tensor]:
    """The inverse of :func:`flat`, shaped like ``like``."""
    sizes = [int(np.prod(part.shape)) for part in like]
    return [tf.reshape(piece, part.shape) for piece, part in zip(tf.split(flat_vector, sizes), like)]


@graph_function
def _deflated_step(v, x, hx, vectors, gain, damping, inv_scale):
    """``x + P (v - (H_j + damping) x)`` with ``P = V^T diag(gain + 1/s) V + (I - V^T V) / s``
    (``gain = 1/(theta + damping) - 1/s``), and the new iterate's norm."""
    residual = v - hx - damping * x
    step = inv_scale * residual + tf.linalg.matvec(vectors, gain * tf.linalg.matvec(vectors, residual),
                                                   transpose_a=True)
    updated = x + step
    return updated, tf.norm(updated)


def deflated_lissa(hvp_fn: HvpFn, v: Vector, *, top_values: np.ndarray, top_vectors: tf.Tensor,
                   damping: float, scale: float, depth: int, repeat: int = 1, average: float = 0.5,
                   keep_runs: bool = False, before_run: Callable[[int], None] | None = None,
                   callback: Callable[[int, int, float], None] | None = None) -> LissaResult:
    """LiSSA preconditioned by the top eigenpairs of ``H``: ``(H + damping I)^-1 v``.

    With ``V`` (K, n) orthonormal Ritz vectors of ``H`` and ``theta`` their Ritz values
    (:func:`lanczos`, once per run), each of ``repeat`` runs iterates

        x_0 = P v,    x_j = x_{j-1} + P (v - (H_j + damping I) x_{j-1})      (j = 1 .. depth)

        P = V^T diag(1 / (theta + damping)) V + (I - V^T V) / scale

    with ``H_j`` the Hessian on the next minibatch, and returns the mean over runs of the
    mean of the last ``averaged_steps(depth, average)`` iterates. Its expected fixed point is
    ``(H + damping I)^-1 v`` (``damping`` is the Tikhonov damping itself). Without
    deflation (K = 0) this is :func:`lissa` with ``h_j = scale * x_j``. The preconditioner
    solves the top K directions in one step, so ``scale`` need only exceed the curvature
    left outside them (the minibatches' largest curvature there, an order of magnitude below
    ``lambda_max`` on the benchmark CNNs): along a remaining direction of curvature ``mu`` the
    error shrinks by ``1 - (damping + mu) / scale`` per step, instead of by ``1 - (damping +
    mu) / lambda_max``. ``norms`` holds ``||x_j||``; the divergence bound is ten times
    the most a contracting iteration reaches, ``(j + 1) ||P|| ||v||``.
    """
    v_flat = flat(v)
    like = list(v)
    values = np.asarray(top_values, np.float64)
    gain = tf.constant(1.0 / (values + damping) - 1.0 / scale, v_flat.dtype)
    vectors = tf.cast(top_vectors, v_flat.dtype)
    inv_scale = tf.constant(1.0 / scale, v_flat.dtype)
    damping_t = tf.constant(damping, v_flat.dtype)
    largest_step = max([1.0 / scale] + [1.0 / (t + damping) for t in values if t + damping > 0])
    bound = NORM_BOUND_FACTOR * (depth + 1) * largest_step * float(tf.norm(v_flat))
    averaged = averaged_steps(depth, average)
    norms = np.zeros((repeat, depth))
    runs, total = [], None
    zero = tf.zeros_like(v_flat)
    for run in range(repeat):
        if before_run is not None:
            before_run(run)
        x, _ = _deflated_step(v_flat, zero, zero, vectors, gain, damping_t, inv_scale)  # P v
        tail = tf.zeros_like(v_flat)
        for step in range(depth):
            x, norm = _deflated_step(v_flat, x, flat(hvp_fn(unflat(x, like))), vectors, gain, damping_t, inv_scale)
            norm = float(norm)
            norms[run, step] = norm
            if not math.isfinite(norm) or norm > bound:
                raise LissaDivergedError(_divergence_message(norm, bound, run, step, scale, damping / scale))
            if step >= depth - averaged:
                tail = tail + x
            if callback is not None:
                callback(run * depth + step + 1, repeat * depth, norm)
        estimate = tail / averaged
        if keep_runs:
            runs.append(unflat(estimate, like))
        total = estimate if total is None else total + estimate
    return LissaResult(s_test=unflat(total / repeat, like), norms=norms, scale=float(scale),
                       damping=float(damping) / float(scale), depth=int(depth), repeat=int(repeat),
                       averaged=averaged, runs=runs)


def _divergence_message(norm, bound, run, step, scale, damping) -> str:
    what = "is not finite" if not math.isfinite(norm) else f"= {norm:.3g} passed the bound {bound:.3g}"
    return (f"LiSSA diverged: ||h_j|| {what} at step {step + 1} of run {run + 1} "
            f"(scale {scale:.4g}, damping {damping:g}). The scale must exceed the Hessian's largest "
            f"eigenvalue and damping * scale its most negative one: use scale 'auto' "
            f"(with a larger margin), a scale of at least {2 * scale:.4g}, or a larger damping; "
            f"restricting to the top layers also helps")


# -- conjugate gradients and the exact solve ---------------------------------------------

def conjugate_gradient(hvp_fn: HvpFn, v: Vector, *, damping: float, max_iterations: int = 100,
                       tolerance: float = 1e-6) -> SolveResult:
    """Solve ``(H + damping I) x = v`` by conjugate gradients.

    ``damping`` here IS the Tikhonov damping (compare LiSSA's ``effective_damping``).
    ``hvp_fn`` must be deterministic (the full training set as its minibatch) and
    ``H + damping I`` positive definite; CG stops when ``||r|| <= tolerance * ||v||`` or
    after ``max_iterations`` and raises :class:`LissaDivergedError` on negative curvature.
    """
    v = [tf.convert_to_tensor(part) for part in v]
    x = [tf.zeros_like(part) for part in v]
    r = list(v)
    p = list(v)
    rr = _dot(r, r)
    stop = tolerance * math.sqrt(rr)
    residuals = [math.sqrt(rr)]
    for _ in range(max_iterations):
        if math.sqrt(rr) <= stop:
            break
        ap = _axpy(damping, p, hvp_fn(p))
        curvature = _dot(p, ap)
        if not curvature > 0:
            raise LissaDivergedError(f"conjugate gradients met non-positive curvature {curvature:.3g}: "
                                     "H + damping I is not positive definite; raise the damping")
        alpha = rr / curvature
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        residuals.append(math.sqrt(rr_new))
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    return SolveResult(s_test=x, damping=float(damping), residual_norms=np.asarray(residuals))


def hessian_matrix(hvp_fn: HvpFn, *, like: Vector, max_parameters: int = 5000) -> np.ndarray:
    """The explicit (N, N) matrix of ``hvp_fn``, one product per column, symmetrised."""
    size = sum(int(np.prod(part.shape)) for part in like)
    if size > max_parameters:
        raise UserError(f"an explicit Hessian of {size} parameters is too large "
                        f"(limit {max_parameters}); use LiSSA or select fewer layers")
    columns = np.empty((size, size))
    for index in range(size):
        unit = np.zeros(size)
        unit[index] = 1.0
        columns[:, index] = flatten(hvp_fn(unflatten(unit, like)))
    return 0.5 * (columns + columns.T)


def exact_solve(hvp_fn: HvpFn, v: Vector, *, damping: float, max_parameters: int = 5000) -> SolveResult:
    """``(H + damping I)^-1 v`` from the explicit Hessian and ``np.linalg.solve``.

    ``damping`` is the Tikhonov damping itself; ``hvp_fn`` should be full-batch.
    For small models and validation only: it costs one product per parameter.
    """
    v = [tf.convert_to_tensor(part) for part in v]
    hessian = hessian_matrix(hvp_fn, like=v, max_parameters=max_parameters)
    flat_v = flatten(v)
    system = hessian + damping * np.eye(len(flat_v))
    try:
        solution = np.linalg.solve(system, flat_v)
    except np.linalg.LinAlgError:
        raise UserError(f"H + {damping:g} I is singular; raise the damping") from None
    residual = np.linalg.norm(system @ solution - flat_v)
    return SolveResult(s_test=unflatten(solution, v), damping=float(damping),
                       residual_norms=np.asarray([residual]))
