"""A run's settings, split by who reads them.

- :class:`SolverSettings`: how ``s_test`` is solved (the method and its knobs, the minibatches
  of the Hessian, the seed); it builds the :mod:`influence.solvers` solver.
- :class:`ScoringSettings`: what is scored (the parameters, the training images, the batch).
- :class:`PresentationSettings`: how results are shown (figure format, images per figure).

The first two decide the numbers and form the fingerprint that every record carries; the
third only changes the files, so a run may change it and still resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from influence.errors import UserError

METHODS = ("lissa", "cg", "ekfac", "exact")


@dataclass(frozen=True)
class SolverSettings:
    method: str = "lissa"
    # LiSSA steps J per chain and the training minibatch of each Hessian-vector product; None:
    # the default for the run's LiSSA mode, 12 x 64 deflated, 50 x 8 plain (batch_size_for).
    depth: int | None = None
    batch_size: int | None = None
    # The Tikhonov damping: the problem solved is (H + damping I) s = v, for every method;
    # "auto": the least that makes it positive definite with a margin (docs/lissa.md).
    damping: float | str = "auto"
    scale: float | None = None  # LiSSA's step 1/scale; None: estimated once per run ("auto")
    repeat: int = 2  # independent LiSSA chains averaged; two or more also give the stability report
    average: float | None = None  # LiSSA: the share of each chain's final iterates averaged; None: 0.75 deflated, 0.5 plain
    sampling: str = "curvature"  # LiSSA minibatches: "curvature" (importance) or "uniform"
    deflation: int = 12  # LiSSA: top Ritz pairs solved exactly by the preconditioner; 0: plain LiSSA
    # EK-FAC: training images its factors are fitted on, at most (ekfac.DEFAULT_SAMPLES); 0: all.
    ekfac_samples: int = 2000
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        from influence.solvers import DEFAULT_LANCZOS_ITERATIONS  # the Ritz pairs come from its products

        if isinstance(self.deflation, bool) or not isinstance(self.deflation, int) or not (
                0 <= self.deflation < DEFAULT_LANCZOS_ITERATIONS):
            raise UserError(f"--deflation {self.deflation!r}: a whole number from 0 to {DEFAULT_LANCZOS_ITERATIONS - 1} "
                            f"(the Ritz pairs come from {DEFAULT_LANCZOS_ITERATIONS} Lanczos products)")
        if self.damping != "auto" and not (isinstance(self.damping, (int, float)) and 0.0 <= self.damping < float("inf")):
            raise UserError(f"damping must be 'auto' or a finite number >= 0, not {self.damping!r}")
        if isinstance(self.ekfac_samples, bool) or not isinstance(self.ekfac_samples, int) or self.ekfac_samples < 0:
            raise UserError(f"EK-FAC samples must be a whole number >= 0 (0: every training image), "
                            f"not {self.ekfac_samples!r}")

    def batch_size_for(self, parameters: int) -> int:
        """The minibatch, given as a number or the default for ``parameters`` selected weights."""
        if self.batch_size is not None:
            return self.batch_size
        from influence import solvers

        deflated = self.method == "lissa" and self.solver().deflated(parameters)
        return solvers.default_depth_and_batch(deflated)[1]

    def solver(self):
        from influence import solvers

        if self.method == "cg":
            return solvers.ConjugateGradientSolver(damping=self.damping)
        if self.method == "exact":
            return solvers.ExactSolver(damping=self.damping)
        if self.method == "ekfac":
            from influence import ekfac

            samples = self.ekfac_samples or None  # 0: every training image
            if self.damping == "auto":  # EK-FAC's curvature is positive semi-definite: a relative damping
                return ekfac.EkfacSolver(samples=samples)
            return ekfac.EkfacSolver(damping=float(self.damping), damping_mode="absolute", samples=samples)
        return solvers.LissaSolver(depth=self.depth, damping=self.damping, scale=self.scale, repeat=self.repeat,
                                   average=self.average, sampling=self.sampling,
                                   deflation=self.deflation)


@dataclass(frozen=True)
class ScoringSettings:
    layers: tuple[str, ...] | None = None  # parameters: these layers' weights only
    last_layers: int | None = None  # parameters: the last k layers with weights only
    all_labels: bool = False  # score the whole training set, not only the test image's label
    # Part of the fingerprint: float32 rounding differs between batch sizes, which can move a
    # score near a ReLU or max-pool tie by a visible amount.
    score_batch_size: int = 32
    # auto: run the selected top layers on cached features whenever a cut exists below them
    # (influence.features); on: require one; off: the whole model every time. In the
    # fingerprint: cached and uncached scores agree to float32 rounding, not bit for bit.
    feature_cache: str = "auto"

    def __post_init__(self):
        if self.feature_cache not in ("auto", "on", "off"):
            raise UserError(f"--feature-cache {self.feature_cache!r}: valid: auto, on, off")


@dataclass(frozen=True)
class PresentationSettings:
    top: int = 5
    save_format: str = "png"


@dataclass(frozen=True)
class Settings:
    solver: SolverSettings = field(default_factory=SolverSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    presentation: PresentationSettings = field(default_factory=PresentationSettings)

    def fingerprint(self) -> dict:
        """The settings that change the scores (the presentation only changes the files)."""
        scoring = dataclasses.asdict(self.scoring)
        scoring["layers"] = list(self.scoring.layers) if self.scoring.layers else None
        solver = dataclasses.asdict(self.solver)
        if self.solver.method != "ekfac":  # only EK-FAC's fit reads it: other methods' trees are unaffected
            del solver["ekfac_samples"]
        return {"solver": solver, "scoring": scoring}

    def as_dict(self) -> dict:
        return {**self.fingerprint(), "presentation": dataclasses.asdict(self.presentation)}
