"""Solvers for ``s_test = (H + lambda I)^-1 grad L(z_test)``, in two phases.

A solver is *prepared* once per run, when it may look at the model and the training data
(LiSSA estimates its scale there; a factored method would fit its curvature there), and the
prepared solver is then *applied* to any number of test gradients::

    prepared = LissaSolver(depth=100, damping=0.01).prepare(curvature)
    solution = prepared.solve(v, key=(seed, ...))   # solution.s_test, solution.diagnostics

The algorithms themselves live in :mod:`influence.ihvp` and see only a Hessian-vector
product and a vector; this module wires them to the training data (:class:`TrainingCurvature`)
and says what each run and each solve reports (``diagnostics``: JSON-ready dicts that go into
every record).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import tensorflow as tf

from influence import hvp, ihvp, sampling
from influence.errors import UserError
from influence.sampling import MinibatchSampler

# The Lanczos sample and start and the scale's power iteration draw from this stream, apart from every
# test image's own (keyed by the test image): the damping and the scale are one number per run, whatever the seed.
SCALE_STREAM = 0x5CA1E


@dataclass
class TrainingCurvature:
    """What a solver may look at while it is prepared: the training objective's curvature.

    ``hvp_fn(vec)`` is ``H_j vec`` on the sampler's next minibatch (``hvp.training_hvp``);
    ``full_hvp_fn`` the product on the whole training set in one batch, where the caller
    judged that affordable (else None). ``seed`` is the run's seed; ``echo`` prints a line.
    """

    model: object  # keras.Model
    variables: list  # the keras Variables influence is taken with respect to
    sampler: MinibatchSampler
    hvp_fn: ihvp.HvpFn
    seed: int = 0
    full_hvp_fn: ihvp.HvpFn | None = None
    echo: Callable[..., None] = print
    # What preparing found about this curvature (the Lanczos range, keyed by its settings),
    # so that solvers prepared on the same run share it.
    cache: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model, variables, sampler: MinibatchSampler, *, seed: int = 0, form: str = "auto",
              echo: Callable[..., None] = print) -> "TrainingCurvature":
        return cls(model=model, variables=list(variables), sampler=sampler,
                   hvp_fn=hvp.training_hvp(model, variables, sampler, form=form), seed=seed, echo=echo)

    @property
    def form(self) -> str:
        """The form of ``hvp_fn``'s products (``hvp.FORMS``), for every product a solver makes."""
        return getattr(self.hvp_fn, "form", "auto")

    def zeros(self) -> list[tf.Tensor]:
        return [tf.zeros_like(hvp.tf_variables([v])[0]) for v in self.variables]


@dataclass
class Solution:
    """One solve: ``s_test`` shaped like the variables, and what the solver has to say about it."""

    s_test: list[tf.Tensor]
    diagnostics: dict = field(default_factory=dict)
    # Independent estimates whose mean is s_test (LiSSA's chains), for the stability report;
    # empty for deterministic solvers.
    parts: list = field(default_factory=list)


class PreparedSolver(Protocol):
    name: str
    diagnostics: dict  # run-level, JSON-ready: what every solve of this run shares

    def solve(self, v: ihvp.Vector, *, key: tuple[int, ...] = (), callback=None) -> Solution: ...


class Solver(Protocol):
    name: str

    def settings(self) -> dict: ...  # the knobs that decide the numbers (into the fingerprint)

    def prepare(self, curvature: TrainingCurvature) -> PreparedSolver: ...


# -- LiSSA --------------------------------------------------------------------------------

AUTO = "auto"
# damping "auto" = AUTO_DAMPING_FACTOR * max(-lambda_min, AUTO_DAMPING_FLOOR * lambda_max):
# H + damping I then has smallest eigenvalue >= (factor - 1) * |lambda_min| (a margin), and the
# damping stays below twice the curvature it must cover (docs/lissa.md, "Damping").
AUTO_DAMPING_FACTOR = 1.5
AUTO_DAMPING_FLOOR = 0.01
DEFAULT_CURVATURE_SAMPLE = 4096  # examples in the fixed sample that Lanczos runs on (all, up to this)
# ... and at most what this many test images' LiSSA products cost: on VGG16 with every weight a
# product of 4,096 examples takes over an hour on 2 cores, so the sample follows the solve's cost.
CURVATURE_BUDGET_TEST_IMAGES = 20
DEFAULT_LANCZOS_ITERATIONS = 30
# A solve is "converged" when ||h_j|| moved less than this between the last two quarters
# of its chains (relative, window_drift): a series still growing or shrinking is not at its
# fixed point. Calibrated in benchmarks/bench_lissa.py (docs/lissa.md).
CONVERGED_DRIFT = 0.15
# ... and, for either mode, when the slowest direction's error left where the averaging starts,
# rho^(J - A + 1) with rho = 1 - (damping + lambda_min) / scale, is at most this. It separates
# the benchmark runs (docs/lissa.md): 0.46-0.74 at Pearson >= 0.99 with the converged answer,
# 0.93-0.95 at 0.92-0.96 (the digits CNN plain, the demo deflated at an 8x scale); in
# deflated chains the drift only measures minibatch noise (0.01-0.30, whatever the accuracy).
CONVERGED_SLOWEST_RESIDUAL = 0.85
# Deflation keeps the Lanczos basis (iterations x parameters, float32) while it is built, and the
# top Ritz vectors for the run: allowed up to this many bytes of basis, else plain LiSSA.
DEFLATION_BASIS_BYTES = 2**30
DEFAULT_DEFLATION = 12
SCALE_RETRIES = 2  # a diverging solve (auto scale) is rerun at 2x, then 4x the scale
PLAIN_SCALE_ITERATIONS = 12  # power-iteration products for plain LiSSA's scale (deflated: 20, for its mean)  # top Ritz pairs solved exactly by the preconditioner (0: plain LiSSA)
# Chosen in benchmarks/bench_lissa.py (docs/lissa.md): deflated, 2 chains x 12 steps x 64 examples,
# the last 3/4 of each averaged; plain, 2 chains x 50 steps x 8, the last half averaged.
DEFLATED_DEPTH, DEFLATED_BATCH, DEFLATED_AVERAGE = 12, 64, 0.75
PLAIN_DEPTH, PLAIN_BATCH, PLAIN_AVERAGE = 50, 8, 0.5


def deflation_fits(parameters: int, *, iterations: int = DEFAULT_LANCZOS_ITERATIONS) -> bool:
    """Whether the deflation's Lanczos basis for ``parameters`` weights fits ``DEFLATION_BASIS_BYTES``."""
    return iterations * parameters * 4 <= DEFLATION_BASIS_BYTES


def default_depth_and_batch(deflated: bool) -> tuple[int, int]:
    """LiSSA's default steps per chain and minibatch: fewer, larger steps when deflated (each
    step converges much further, and its smaller step lets more minibatch noise through)."""
    return (DEFLATED_DEPTH, DEFLATED_BATCH) if deflated else (PLAIN_DEPTH, PLAIN_BATCH)


class DampingWarning(UserWarning):
    """A user-given damping leaves H + damping I indefinite: there is no answer to converge to."""


@dataclass(frozen=True)
class CurvatureEstimate:
    """The training Hessian's extreme eigenvalues (Lanczos on a fixed sample of ``sample`` examples)."""

    lambda_min: float
    lambda_max: float
    sample: int
    products: int
    seconds: float
    # With deflation (estimate_curvature(pairs=K)): the top K Ritz pairs of the sample's Hessian,
    # values descending and (K, n) orthonormal vectors, and the largest Ritz value left out.
    top_values: np.ndarray | None = None
    top_vectors: object = None  # tf.Tensor
    next_value: float = 0.0

    def auto_damping(self) -> float:
        return AUTO_DAMPING_FACTOR * max(-self.lambda_min, AUTO_DAMPING_FLOOR * self.lambda_max)

    def margin(self, damping: float) -> float:
        """The smallest eigenvalue of ``H + damping I``: > 0 when the problem is well posed."""
        return self.lambda_min + damping


def estimate_curvature(curvature: TrainingCurvature, *, sample: int = DEFAULT_CURVATURE_SAMPLE,
                       iterations: int = DEFAULT_LANCZOS_ITERATIONS, chunk_size: int = 64,
                       pairs: int = 0) -> CurvatureEstimate:
    """Lanczos (:func:`influence.ihvp.curvature_range`) on a fixed random sample of the training set.

    ``sample`` examples (all of them when the set is smaller), drawn from a fixed stream, not
    the run's seed: the damping chosen from this range is then the same for every seed, so two
    seeds answer the same question and differ only in their minibatches. At most
    ``iterations`` products on that sample (fewer once the range settles), each in chunks of
    ``chunk_size`` (:func:`influence.hvp.dataset_hvp`). The sample's Hessian has a slightly wider spectrum
    than the full set's (sampling noise spreads the extremes), the safe side for a damping.
    ``pairs`` > 0 also keeps that many top Ritz pairs (:func:`influence.ihvp.lanczos`, with
    its basis in memory) for the deflation.
    """
    key = ("curvature_range", sample, iterations, pairs)
    if key in curvature.cache:
        return curvature.cache[key]
    began = time.perf_counter()
    source = curvature.sampler.source
    count = len(source)
    if sample >= count:
        indices = np.arange(count)
    else:
        indices = np.sort(np.random.default_rng(SCALE_STREAM).choice(count, sample, replace=False))
    hvp_fn = hvp.dataset_hvp(curvature.model, curvature.variables, source, indices=indices, chunk_size=chunk_size,
                             form=curvature.form)
    if pairs:
        found = ihvp.lanczos(hvp_fn, like=curvature.zeros(), iterations=iterations, pairs=pairs, seed=SCALE_STREAM)
        left = found.values[:len(found.values) - len(found.top_values)]
        estimate = CurvatureEstimate(found.lambda_min, found.lambda_max, len(indices), found.products,
                                     time.perf_counter() - began, top_values=found.top_values,
                                     top_vectors=found.top_vectors, next_value=float(left[-1]) if len(left) else 0.0)
    else:
        details = {}
        low, high = ihvp.curvature_range(hvp_fn, like=curvature.zeros(), iterations=iterations, seed=SCALE_STREAM,
                                         details=details)
        estimate = CurvatureEstimate(low, high, len(indices), details["products"], time.perf_counter() - began)
    curvature.cache[key] = estimate
    return estimate


@dataclass(frozen=True)
class LissaSolver:
    """LiSSA (:func:`influence.ihvp.lissa`) for ``(H + damping I)^-1 v`` on random minibatches.

    Knobs (docs/lissa.md gives the math and the measurements behind the defaults):

    - ``depth`` J and ``repeat`` R: R independent chains of J steps each (R*J products per
      test image); the answer is their mean, and with R >= 2 the chains' disagreement is the
      stability report (``Solution.parts``).
    - ``damping``: the Tikhonov damping of the problem solved, ``H + damping I`` (the same
      number CG takes), or ``"auto"``: :meth:`CurvatureEstimate.auto_damping`, the least
      damping that makes the problem positive definite with a margin. A number that leaves
      it indefinite is used as given, with a :class:`DampingWarning` naming the numbers.
    - ``deflation`` K: the top K Ritz pairs of the Lanczos run are solved exactly by a
      preconditioner and LiSSA iterates on the rest (:func:`influence.ihvp.deflated_lissa`);
      0, or a basis over ``DEFLATION_BASIS_BYTES``: plain LiSSA. ``depth`` and the
      minibatch default to 12 x 64 deflated and 50 x 8 plain (:func:`default_depth_and_batch`).
    - ``scale``: LiSSA's step ``1 / scale``, above the largest curvature of the minibatches
      it sees (outside the deflated directions); None: ``margin *`` the largest of the
      power-iteration estimate on those very minibatches and the largest curvature left
      (Lanczos's ``lambda_max``, or the largest Ritz value not deflated).
    - ``average``: the share of each chain's final iterates averaged (0: last iterate); None:
      0.75 deflated (its chains converge within a few steps), 0.5 plain.
    - ``sampling``: ``"curvature"`` draws minibatch examples in proportion to their softmax
      curvature (mixed with 10% uniform) and reweights them by ``1 / (N q_i)`` (an unbiased
      Hessian with less variance, :mod:`influence.sampling`); ``"uniform"``: as before.
    - ``curvature_sample``, ``lanczos_iterations``: the Lanczos run behind the curvature range.
    """

    depth: int | None = None  # None: default_depth_and_batch()
    damping: float | str = AUTO
    scale: float | None = None  # None: "auto", estimated once per run
    repeat: int = 2
    average: float | None = None  # None: 0.75 deflated, 0.5 plain
    sampling: str = "curvature"
    curvature_sample: int | None = None  # None: auto_curvature_sample()
    lanczos_iterations: int = DEFAULT_LANCZOS_ITERATIONS
    deflation: int = DEFAULT_DEFLATION
    name: str = "lissa"

    def deflated(self, parameters: int) -> bool:
        return self.deflation > 0 and deflation_fits(parameters, iterations=self.lanczos_iterations)

    def auto_curvature_sample(self, batch_size: int) -> int:
        """The Lanczos sample when none is given: every example up to ``DEFAULT_CURVATURE_SAMPLE``,
        and at most the examples that ``CURVATURE_BUDGET_TEST_IMAGES`` test images' chains touch
        (``depth * repeat * batch_size`` each) spread over the ``lanczos_iterations`` products.
        With the defaults: 20 x 12 x 2 x 64 / 30 = 1,024 examples deflated, 20 x 50 x 2 x 8 / 30 =
        533 plain (docs/lissa.md)."""
        budget = CURVATURE_BUDGET_TEST_IMAGES * self.depth * self.repeat * batch_size // self.lanczos_iterations
        return int(min(DEFAULT_CURVATURE_SAMPLE, max(batch_size, budget)))

    def settings(self) -> dict:
        return {"method": self.name, "depth": self.depth, "damping": self.damping, "scale": self.scale,
                "repeat": self.repeat, "average": self.average, "sampling": self.sampling,
                "curvature_sample": self.curvature_sample, "lanczos_iterations": self.lanczos_iterations,
                "deflation": self.deflation}

    def prepare(self, curvature: TrainingCurvature) -> "PreparedLissa":
        if self.sampling not in ("curvature", "uniform"):
            raise UserError(f"unknown LiSSA sampling {self.sampling!r}; valid: curvature, uniform")
        if isinstance(self.deflation, bool) or not isinstance(self.deflation, int) or not (
                0 <= self.deflation < self.lanczos_iterations):
            raise UserError(f"--deflation {self.deflation!r}: a whole number from 0 to {self.lanczos_iterations - 1} "
                            f"(the Ritz pairs come from {self.lanczos_iterations} Lanczos products)")
        echo = curvature.echo
        from influence import params

        parameters = params.count(curvature.variables)
        pairs = self.deflation if self.deflated(parameters) else 0
        if self.depth is None or self.average is None:  # the defaults for the mode
            return dataclasses.replace(
                self, depth=self.depth or default_depth_and_batch(bool(pairs))[0],
                average=(DEFLATED_AVERAGE if pairs else PLAIN_AVERAGE) if self.average is None else self.average,
            ).prepare(curvature)
        if self.deflation and not pairs:
            echo(f"Deflation off: its Lanczos basis would take {self.lanczos_iterations * parameters * 4 / 2**30:.1f} GiB "
                 f"(limit {DEFLATION_BASIS_BYTES / 2**30:.0f} GiB); plain LiSSA")
        sampler = curvature.sampler
        if self.sampling == "curvature" and not sampler.full_batch:
            began = time.perf_counter()
            echo("Per-example curvature for the minibatch sampling...", end="")
            traces = sampling.softmax_curvature(curvature.model, sampler.source)
            sampler = sampler.with_probabilities(sampling.importance_probabilities(traces))
            echo(f" done ({time.perf_counter() - began:.1f} s)")
        hvp_fn = curvature.hvp_fn if sampler is curvature.sampler else hvp.training_hvp(
            curvature.model, curvature.variables, sampler, form=curvature.form)

        echo("Curvature of the training Hessian (Lanczos)...", end="")
        sample = self.curvature_sample or self.auto_curvature_sample(curvature.sampler.batch_size)
        estimate = estimate_curvature(curvature, sample=sample, iterations=self.lanczos_iterations, pairs=pairs)
        echo(f" eigenvalues from {estimate.lambda_min:.4g} to {estimate.lambda_max:.4g} "
             f"({estimate.products} products on {estimate.sample} examples, {estimate.seconds:.1f} s)")
        if pairs:
            echo(f"Deflation: the top {len(estimate.top_values)} Ritz pairs ({estimate.top_values[0]:.4g} down to "
                 f"{estimate.top_values[-1]:.4g}) solved exactly; largest curvature left {estimate.next_value:.4g}")
        damping = resolve_damping(self.damping, estimate, echo=echo)

        scale = self.scale
        if scale is None:
            sampler.reseed(SCALE_STREAM)  # not the run seed: the scale, like the damping, is the same for every seed
            began = time.perf_counter()
            echo("Estimate LiSSA scale...", end="")
            # Plain: the largest over the last 6 of 12 minibatches (a diverging solve is rerun at 2x).
            scale_hvp, left, statistic, iterations = hvp_fn, estimate.lambda_max, "max", PLAIN_SCALE_ITERATIONS
            if pairs:  # the minibatches' curvature outside the deflated directions
                # Its mean over the power iteration's minibatches, not the largest: outside the top
                # directions a rare heavy minibatch sets the largest (demo, minibatches of 32: 6.4, 1.5
                # or 1.2 for three streams, against means of 1.5, 1.1, 1.1), and a scale 4x too large
                # slows every direction 4x. A chain that diverges anyway is rerun at twice the scale (solve()).
                scale_hvp, left, statistic = _projected(hvp_fn, estimate.top_vectors), estimate.next_value, "mean"
                iterations = ihvp.DEFAULT_SCALE_ITERATIONS
            minibatch_top = ihvp.estimate_scale(scale_hvp, like=curvature.zeros(), margin=1.0, statistic=statistic,
                                                iterations=iterations)
            # The recursion contracts along curvature mu when 0 < damping + mu < 2 * scale, and its
            # coefficient damping / scale must stay below 1.
            scale = ihvp.DEFAULT_SCALE_MARGIN * max(minibatch_top, left, damping)
            echo(f" {scale:.4g} ({time.perf_counter() - began:.1f} s)")
        if not damping < scale:
            raise UserError(f"damping {damping:.4g} is not below the LiSSA scale {scale:.4g}: the answer would be "
                            "little more than the test gradient; lower --damping")
        if pairs and np.min(np.abs(estimate.top_values + damping)) <= 1e-6 * max(1.0, abs(estimate.lambda_max)):
            raise UserError(f"damping {damping:.4g} cancels a deflated eigenvalue of the Hessian "
                            f"({estimate.top_values[np.argmin(np.abs(estimate.top_values + damping))]:.4g}): "
                            "H + damping I is singular there; use --damping auto or --deflation 0")
        return PreparedLissa(self, sampler, hvp_fn, float(scale), float(damping), estimate)


def _projected(hvp_fn: ihvp.HvpFn, vectors) -> ihvp.HvpFn:
    """``u -> (I - V^T V) H_j (I - V^T V) u``: the minibatch Hessian outside the rows of ``vectors``."""
    def project_out(u):
        flat = ihvp.flat(u)
        rows = tf.cast(vectors, flat.dtype)
        flat = flat - tf.linalg.matvec(rows, tf.linalg.matvec(rows, flat), transpose_a=True)
        return ihvp.unflat(flat, u)

    return lambda u: project_out(hvp_fn(project_out(u)))


def resolve_damping(damping: float | str, estimate: CurvatureEstimate, *, echo: Callable[..., None] = print) -> float:
    """The Tikhonov damping to solve with: ``"auto"`` from the curvature range, or the number given
    (with a :class:`DampingWarning` when ``H + damping I`` is indefinite)."""
    if damping == AUTO:
        chosen = estimate.auto_damping()
        echo(f"Damping (auto): {chosen:.4g}; H + damping I has smallest eigenvalue about "
             f"{estimate.margin(chosen):.4g}")
        return chosen
    damping = float(damping)
    if estimate.margin(damping) <= 0:
        message = (f"damping {damping:.4g} leaves H + damping I indefinite: the training Hessian's most negative "
                   f"eigenvalue is about {estimate.lambda_min:.4g} (largest {estimate.lambda_max:.4g}), so there is "
                   f"no answer to converge to; use --damping auto ({estimate.auto_damping():.4g}) or at least "
                   f"{-estimate.lambda_min:.4g}")
        warnings.warn(message, DampingWarning, stacklevel=2)
        echo(f"WARNING: {message}")
    return damping


class PreparedLissa:
    name = "lissa"

    def __init__(self, solver: LissaSolver, sampler: MinibatchSampler, hvp_fn, scale: float, damping: float,
                 estimate: CurvatureEstimate):
        self.solver = solver
        self.sampler = sampler
        self.hvp_fn = hvp_fn
        self.scale = scale
        self.damping = damping
        self.estimate = estimate
        averaged = ihvp.averaged_steps(solver.depth, solver.average)
        # Along the slowest direction (curvature lambda_min) an iterate h_j has converged up to
        # rho^(j+1); the earliest iterate averaged is h_{J-A+1}.
        self.diagnostics = {
            "method": "lissa", "scale_used": scale, "effective_damping": damping,
            "lissa_damping": damping / scale, "lambda_min": estimate.lambda_min,
            "lambda_max": estimate.lambda_max, "well_posed": estimate.margin(damping) > 0,
            "sampling": solver.sampling, "depth": solver.depth, "repeat": solver.repeat,
            "batch_size": sampler.batch_size,
            "deflation": 0 if estimate.top_values is None else len(estimate.top_values),
            "averaged_steps": averaged, "slowest_residual": self.slowest_residual(scale),
        }

    def slowest_residual(self, scale: float) -> float:
        """What is left, where the averaging starts, of the initial error along the slowest
        direction (curvature lambda_min, never deflated): ``rho^(J - A + 1)``, ``rho = 1 -
        (damping + lambda_min) / scale``; inf when the problem is not well posed."""
        rho = 1.0 - (self.damping + self.estimate.lambda_min) / scale
        averaged = ihvp.averaged_steps(self.solver.depth, self.solver.average)
        return float(abs(rho) ** (self.solver.depth - averaged + 1)) if rho < 1 else float("inf")

    @property
    def steps(self) -> int:
        return self.solver.depth * self.solver.repeat

    def _run(self, v, key, scale, callback) -> ihvp.LissaResult:
        reseed = lambda run: self.sampler.reseed(*key) if run == 0 else self.sampler.reseed(*key, run)  # noqa: E731
        if self.estimate.top_values is not None:
            return ihvp.deflated_lissa(self.hvp_fn, v, top_values=self.estimate.top_values,
                                       top_vectors=self.estimate.top_vectors, damping=self.damping, scale=scale,
                                       depth=self.solver.depth, repeat=self.solver.repeat,
                                       average=self.solver.average, keep_runs=self.solver.repeat > 1,
                                       before_run=reseed, callback=callback)
        return ihvp.lissa(self.hvp_fn, v, depth=self.solver.depth, damping=self.damping / scale, scale=scale,
                          repeat=self.solver.repeat, callback=callback, average=self.solver.average,
                          keep_runs=self.solver.repeat > 1, before_run=reseed)

    def solve(self, v, *, key=(), callback=None) -> Solution:
        """One test gradient. With the scale estimated (``scale=None``), a solve that diverges is
        rerun from the start at twice the scale, up to ``SCALE_RETRIES`` times: the damping is
        Tikhonov, so the answer sought is the same and only its speed changes. The scale used
        and the retries are recorded. A scale the user gave is never changed."""
        scale, retries = self.scale, 0
        while True:
            try:
                result = self._run(v, key, scale, callback)
                break
            except ihvp.LissaDivergedError as error:
                # A larger scale cures a step too long for the minibatches, not a product that is
                # not finite (a model or image problem).
                if self.solver.scale is not None or retries == SCALE_RETRIES or "not finite" in str(error):
                    raise
                scale, retries = 2.0 * scale, retries + 1
        drift = window_drift(result.norms)
        slowest = self.slowest_residual(scale)
        converged = self.diagnostics["well_posed"] and slowest <= CONVERGED_SLOWEST_RESIDUAL and (
            self.estimate.top_values is not None or drift < CONVERGED_DRIFT)
        parts = result.runs if len(result.runs) > 1 else []
        spread = None
        if parts:
            spread = ihvp._norm([a - b for a, b in zip(parts[0], parts[1])]) / max(
                ihvp._norm(result.s_test), 1e-30)
        return Solution(result.s_test, {
            "effective_damping": result.effective_damping,
            "well_posed": self.diagnostics["well_posed"],
            "drift": drift,
            "chains_relative_difference": spread,
            "converged": bool(converged), "slowest_residual": slowest,
            "lissa_norms": np.asarray(result.norms).tolist(),
            "scale_used": scale, "scale_retries": retries, "lissa_damping": self.damping / scale,
        }, parts=parts)


def window_drift(norms: np.ndarray) -> float:
    """How far ``||h_j||`` still moves at the end of a chain, relative, worst chain: the mean
    over the last quarter of the steps against the quarter before. A chain at its fixed
    point only fluctuates around a constant norm; one still climbing (slow or negative
    curvature not yet resolved) or falling shows up here."""
    norms = np.atleast_2d(np.asarray(norms, dtype=np.float64))
    quarter = max(1, norms.shape[1] // 4)
    if norms.shape[1] < 2 * quarter:
        return float("nan")
    late = norms[:, -quarter:].mean(axis=1)
    early = norms[:, -2 * quarter:-quarter].mean(axis=1)
    return float(np.max(np.abs(late - early) / np.maximum(late, 1e-30)))


# -- how much to trust an answer ------------------------------------------------------------

STABLE_SHARED = 4  # of the top 5: the two chains must share at least this many (docs/lissa.md)


def top_k_shared(scores_a, scores_b, *, k: int = 5, harmful: bool = True) -> int:
    """How many of the ``k`` most harmful (lowest score; ``harmful=False``: most useful) the two
    score vectors share."""
    a, b = np.asarray(scores_a), np.asarray(scores_b)
    order = (lambda s: np.argsort(s, kind="stable")[:k]) if harmful else (lambda s: np.argsort(-s, kind="stable")[:k])
    return len(set(order(a).tolist()) & set(order(b).tolist()))


def stability(scores_a, scores_b, *, k: int = 5, stable_shared: int | None = None) -> dict:
    """The stability of a top-k from two independent halves of the work (the chains' scores:
    ``influence_scores`` of ``Solution.parts[0]`` and ``[1]``). Each half has twice the
    variance of the full answer, so this errs on the cautious side. JSON-ready:
    ``{"harmful_shared", "useful_shared", "k", "stable", "pearson"}``."""
    need = stable_shared if stable_shared is not None else max(1, round(k * STABLE_SHARED / 5))
    harmful = top_k_shared(scores_a, scores_b, k=k, harmful=True)
    useful = top_k_shared(scores_a, scores_b, k=k, harmful=False)
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    pearson = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    return {"harmful_shared": harmful, "useful_shared": useful, "k": k,
            "stable": bool(harmful >= need and useful >= need), "pearson": pearson}


def run_summary(diagnostics: list[dict]) -> tuple[dict, str]:
    """Counts over a run's per-test-image diagnostics (each a ``Solution.diagnostics``, with
    ``stability`` added by the caller where it scored the halves) and one line of advice."""
    total = len(diagnostics)
    unconverged = sum(1 for d in diagnostics if d.get("converged") is False)
    unstable = sum(1 for d in diagnostics if (d.get("stability") or {}).get("stable") is False)
    ill_posed = sum(1 for d in diagnostics if d.get("well_posed") is False)
    counts = {"test_images": total, "unconverged": unconverged, "unstable": unstable, "ill_posed": ill_posed}
    advice = []
    if ill_posed:
        advice.append("the damping leaves H + damping I indefinite: use --damping auto")
    if unconverged:
        advice.append("raise --depth (LiSSA has not reached its fixed point)")
    if unstable:
        advice.append("raise --batch-size or --depth (the top-5 changes between independent halves of the work), "
                      "or use --method cg where the training set is small")
    if not advice:
        line = f"all {total} test images converged with a stable top-{(diagnostics[0].get('stability') or {}).get('k', 5) if diagnostics else 5}"
    else:
        line = (f"{unstable} of {total} test images have an unstable top-5, {unconverged} did not converge"
                + (f", {ill_posed} were solved with an indefinite H + damping I" if ill_posed else "")
                + ": " + "; ".join(advice))
    return counts, line


# -- deterministic solvers on the full-batch Hessian ----------------------------------------


# Examples per chunk of the full-batch product (memory: one chunk's activations at a time).
FULL_BATCH_CHUNK = 64


@dataclass(frozen=True)
class ConjugateGradientSolver:
    """Conjugate gradients on the full-batch Hessian: ``(H + damping I) x = v``, ``damping`` Tikhonov.

    Exact up to ``tolerance`` (the relative residual), deterministic, and about
    ``sqrt(kappa) log(1 / tolerance)`` full-batch products per test image, ``kappa = (lambda_max
    + damping) / (lambda_min + damping)``: the method of choice where a full-batch product costs
    less than ~2 LiSSA solves' worth of minibatch products (docs/lissa.md, "When to use CG").
    ``damping="auto"`` is resolved as for LiSSA, from Lanczos on the whole training set.
    The full-batch product is summed over chunks of ``chunk_size`` examples (exact: the
    chunks' weighted products add up to the whole set's).
    """

    damping: float | str = AUTO
    max_iterations: int = 200
    tolerance: float = 1e-6
    chunk_size: int = FULL_BATCH_CHUNK
    name: str = "cg"

    def settings(self) -> dict:
        return {"method": self.name, "damping": self.damping, "max_iterations": self.max_iterations,
                "tolerance": self.tolerance}

    def prepare(self, curvature: TrainingCurvature) -> "PreparedDeterministic":
        hvp_fn = _full_hvp(curvature, self.chunk_size)
        count = len(curvature.sampler.source)
        curvature.echo("Curvature of the training Hessian (Lanczos, full batch)...", end="")
        estimate = estimate_curvature(curvature, sample=count, iterations=DEFAULT_LANCZOS_ITERATIONS,
                                      chunk_size=self.chunk_size)
        curvature.echo(f" eigenvalues from {estimate.lambda_min:.4g} to {estimate.lambda_max:.4g} "
                       f"({estimate.seconds:.1f} s)")
        damping = resolve_damping(self.damping, estimate, echo=curvature.echo)
        diagnostics = {"method": self.name, "effective_damping": damping, "lambda_min": estimate.lambda_min,
                       "lambda_max": estimate.lambda_max, "well_posed": estimate.margin(damping) > 0}
        tolerance = self.tolerance

        def solve(fn, v):
            return ihvp.conjugate_gradient(fn, v, damping=damping, max_iterations=self.max_iterations,
                                           tolerance=tolerance)

        prepared = PreparedDeterministic(self.name, hvp_fn, diagnostics, solve)
        prepared.tolerance = tolerance
        prepared.damping = damping
        return prepared


@dataclass(frozen=True)
class ExactSolver:
    """The explicit full-batch Hessian and ``np.linalg.solve``: small models and validation only."""

    damping: float = 0.01
    max_parameters: int = 5000
    name: str = "exact"

    def settings(self) -> dict:
        return {"method": self.name, "damping": self.damping}

    def prepare(self, curvature: TrainingCurvature) -> "PreparedDeterministic":
        if self.damping == AUTO:
            raise UserError("the exact solve needs a number for the damping, not 'auto'")
        return PreparedDeterministic(self.name, _full_hvp(curvature), {"effective_damping": self.damping},
                                     lambda hvp_fn, v: ihvp.exact_solve(
                                         hvp_fn, v, damping=self.damping, max_parameters=self.max_parameters))


def _full_hvp(curvature: TrainingCurvature, chunk_size: int = FULL_BATCH_CHUNK) -> ihvp.HvpFn:
    if curvature.full_hvp_fn is not None:
        return curvature.full_hvp_fn
    return hvp.dataset_hvp(curvature.model, curvature.variables, curvature.sampler.source, chunk_size=chunk_size,
                           form=curvature.form)


class PreparedDeterministic:
    def __init__(self, name: str, hvp_fn: ihvp.HvpFn, diagnostics: dict, solve: Callable):
        self.name = name
        self.hvp_fn = hvp_fn
        self.diagnostics = diagnostics
        self._solve = solve

    tolerance: float | None = None

    def solve(self, v, *, key=(), callback=None) -> Solution:
        result = self._solve(self.hvp_fn, v)
        residuals = np.asarray(result.residual_norms)
        relative = float(residuals[-1] / max(residuals[0], 1e-30)) if len(residuals) else float("nan")
        converged = self.diagnostics.get("well_posed", True) and (
            self.tolerance is None or relative <= 1.01 * self.tolerance)
        return Solution(result.s_test, {
            "effective_damping": result.damping,
            "well_posed": self.diagnostics.get("well_posed", True),
            "converged": bool(converged),
            "relative_residual": relative,
            "residual_norms": residuals.tolist(),
        })
