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

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import tensorflow as tf

from influence import hvp, ihvp
from influence.sampling import MinibatchSampler

# The scale's power iteration draws its minibatches from this stream, apart from every
# test image's own (which are keyed by the test image), so the scale is one number per run.
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

    @classmethod
    def build(cls, model, variables, sampler: MinibatchSampler, *, seed: int = 0, form: str = "auto",
              echo: Callable[..., None] = print) -> "TrainingCurvature":
        return cls(model=model, variables=list(variables), sampler=sampler,
                   hvp_fn=hvp.training_hvp(model, variables, sampler, form=form), seed=seed, echo=echo)

    def zeros(self) -> list[tf.Tensor]:
        return [tf.zeros_like(hvp.tf_variables([v])[0]) for v in self.variables]


@dataclass
class Solution:
    """One solve: ``s_test`` shaped like the variables, and what the solver has to say about it."""

    s_test: list[tf.Tensor]
    diagnostics: dict = field(default_factory=dict)


class PreparedSolver(Protocol):
    name: str
    diagnostics: dict  # run-level, JSON-ready: what every solve of this run shares

    def solve(self, v: ihvp.Vector, *, key: tuple[int, ...] = (), callback=None) -> Solution: ...


class Solver(Protocol):
    name: str

    def settings(self) -> dict: ...  # the knobs that decide the numbers (into the fingerprint)

    def prepare(self, curvature: TrainingCurvature) -> PreparedSolver: ...


# -- LiSSA --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LissaSolver:
    """LiSSA (:func:`influence.ihvp.lissa`) on random minibatches of the whole training set.

    Prepared: the scale, estimated once per run by power iteration unless given. Applied:
    ``depth`` steps per repeat, the sampler reseeded with each test image's key.
    """

    depth: int = 100
    damping: float = 0.01
    scale: float | None = None  # None: "auto", estimated once per run
    repeat: int = 1
    name: str = "lissa"

    def settings(self) -> dict:
        return {"method": self.name, "depth": self.depth, "damping": self.damping, "scale": self.scale,
                "repeat": self.repeat}

    def prepare(self, curvature: TrainingCurvature) -> "PreparedLissa":
        scale = self.scale
        if scale is None:
            curvature.sampler.reseed(curvature.seed, SCALE_STREAM)
            began = time.perf_counter()
            curvature.echo("Estimate LiSSA scale...", end="")
            scale = float(ihvp.estimate_scale(curvature.hvp_fn, like=curvature.zeros(), damping=self.damping))
            curvature.echo(f" {scale:.4g} ({time.perf_counter() - began:.1f} s)")
        return PreparedLissa(self, curvature, float(scale))


class PreparedLissa:
    name = "lissa"

    def __init__(self, solver: LissaSolver, curvature: TrainingCurvature, scale: float):
        self.solver = solver
        self.curvature = curvature
        self.scale = scale
        self.diagnostics = {"scale_used": scale, "effective_damping": solver.damping * scale}

    @property
    def steps(self) -> int:
        return self.solver.depth * self.solver.repeat

    def solve(self, v, *, key=(), callback=None) -> Solution:
        self.curvature.sampler.reseed(*key)
        result = ihvp.lissa(self.curvature.hvp_fn, v, depth=self.solver.depth, damping=self.solver.damping,
                            scale=self.scale, repeat=self.solver.repeat, callback=callback)
        return Solution(result.s_test, {
            "effective_damping": result.effective_damping,
            "lissa_norms": np.asarray(result.norms).tolist(),
        })


# -- deterministic solvers on the full-batch Hessian ----------------------------------------


@dataclass(frozen=True)
class ConjugateGradientSolver:
    """Conjugate gradients on the full-batch Hessian: ``(H + damping I) x = v``, ``damping`` Tikhonov."""

    damping: float = 0.01
    max_iterations: int = 100
    tolerance: float = 1e-6
    name: str = "cg"

    def settings(self) -> dict:
        return {"method": self.name, "damping": self.damping, "max_iterations": self.max_iterations,
                "tolerance": self.tolerance}

    def prepare(self, curvature: TrainingCurvature) -> "PreparedDeterministic":
        return PreparedDeterministic(self.name, _full_hvp(curvature), {"effective_damping": self.damping},
                                     lambda hvp_fn, v: ihvp.conjugate_gradient(
                                         hvp_fn, v, damping=self.damping, max_iterations=self.max_iterations,
                                         tolerance=self.tolerance))


@dataclass(frozen=True)
class ExactSolver:
    """The explicit full-batch Hessian and ``np.linalg.solve``: small models and validation only."""

    damping: float = 0.01
    max_parameters: int = 5000
    name: str = "exact"

    def settings(self) -> dict:
        return {"method": self.name, "damping": self.damping}

    def prepare(self, curvature: TrainingCurvature) -> "PreparedDeterministic":
        return PreparedDeterministic(self.name, _full_hvp(curvature), {"effective_damping": self.damping},
                                     lambda hvp_fn, v: ihvp.exact_solve(
                                         hvp_fn, v, damping=self.damping, max_parameters=self.max_parameters))


def _full_hvp(curvature: TrainingCurvature) -> ihvp.HvpFn:
    if curvature.full_hvp_fn is not None:
        return curvature.full_hvp_fn
    full = MinibatchSampler(curvature.sampler.source, len(curvature.sampler))
    return hvp.training_hvp(curvature.model, curvature.variables, full)


class PreparedDeterministic:
    def __init__(self, name: str, hvp_fn: ihvp.HvpFn, diagnostics: dict, solve: Callable):
        self.name = name
        self.hvp_fn = hvp_fn
        self.diagnostics = diagnostics
        self._solve = solve

    def solve(self, v, *, key=(), callback=None) -> Solution:
        result = self._solve(self.hvp_fn, v)
        return Solution(result.s_test, {
            "effective_damping": result.damping,
            "residual_norms": np.asarray(result.residual_norms).tolist(),
        })
