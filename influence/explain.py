"""One test image's explanation: its test gradient, ``s_test`` and the scores of training images.

:func:`prepare_engine` does, once per run, what every test image shares: the parameters,
the training-minibatch sampler and the prepared solver (LiSSA's scale, say).
:func:`solve` then computes, for one test image,

1. ``v = grad L(z_test)`` (no regularisers);
2. ``s_test = (H + lambda I)^-1 v`` with the prepared solver, its random draws keyed by the item;

and :func:`score`, for a group of test images that share their training images,

3. ``score(z) = s_test . grad L(z)`` for every training image of the label (or of the whole
   set with ``all_labels``), each batch read and preprocessed once for the whole group
   (:func:`influence.scores.influence_scores_many`).

When only top layers are selected and a cut exists below them (``--feature-cache auto|on``,
:mod:`influence.features`), the engine's model is the head above the cut, its input the
cached features of the training images (:mod:`influence.feature_cache`) and the trunk's
output for a test image: the frozen layers run once per image, not in every product.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from influence.errors import ItemFailed
from influence.plan import WorkItem, item_seed
from influence.progress import EstimateBar, progress_bar
from influence.settings import Settings

# On a head over cached features, the scores of up to this many test vectors (one test image's two
# LiSSA chains) are taken one pass after another rather than vectorised: as fast per batch there,
# and 0.3-0.5 s less to trace (influence.scores.influence_scores_many).
HEAD_UNROLL = 2


@dataclass
class Engine:
    """What every test image of a run shares."""

    model: object  # keras.Model
    preprocess: Callable
    variables: list
    prepared: object  # solvers.PreparedSolver
    hvp_form: str
    # With a cut: the model above is the head, preprocess ends with the trunk, and the training
    # images' features come from this feature_cache.FeatureCache.
    features: object = None

    @property
    def parameters(self) -> int:
        from influence import params

        return params.count(self.variables)


def prepare_engine(train, loaded, settings: Settings, echo: Callable[..., None]) -> Engine:
    """Parameters, the Hessian-vector product and the prepared solver: once per run."""
    from influence import hvp, losses, params, sampling, solvers

    scoring = settings.scoring
    variables = params.select(loaded.model, layers=list(scoring.layers) if scoring.layers else None,
                              last=scoring.last_layers)
    model, preprocess, source, cache = loaded.model, loaded.preprocess, None, None
    # With every weight selected the first layer reads the input: no cut to look for.
    if scoring.layers or scoring.last_layers or scoring.feature_cache == "on":
        from influence import features

        cut = features.choose_cut(scoring.feature_cache, loaded.model, variables, echo=echo)
        if cut is not None:
            cache = features.train_features(train, cut=cut, preprocess=loaded.preprocess,
                                            preprocess_name=loaded.preprocess_name,
                                            model=sorted(loaded.files.values()), echo=echo)
            model, preprocess = cut.head, features.trunk_features_fn(cut, loaded.preprocess)
            # The head's output is the model's: its loss is taken the same way (--outputs included).
            losses.declare_output_kind(model, losses.output_kind(loaded.model))
            source = features.FeatureSource(cache)
    sampler = sampling.MinibatchSampler(source or sampling.ArchiveSource(train, loaded.preprocess),
                                        settings.solver.batch_size_for(params.count(variables)))
    # On a head over cached features the summed-gradient product is the faster (VGG16's
    # fc2+predictions: a LiSSA step 7% faster, docs/feature-cache.md); forward-over-backward's
    # lower memory (0.4-1 GiB on VGG16 with every weight, docs/benchmarks.md) tells where a
    # product holds a convolutional network's activations, less on a head. Recorded as hvp_form.
    form = hvp.SUMMED_GRADIENT if cache is not None else "auto"
    curvature = solvers.TrainingCurvature.build(model, variables, sampler, seed=settings.solver.seed, echo=echo,
                                                form=form)
    solver = settings.solver.solver()
    if settings.solver.method == "ekfac":  # fitted factors, reused by later runs and every shard
        from influence import archive, features, feature_cache

        key = {"model": sorted(loaded.files.values()), "preprocess": loaded.preprocess_name,
               "outputs": losses.output_kind(loaded.model),  # the fit's loss and pseudo-labels depend on it
               "inputs": "features" if cache is not None else "images",
               "archive": archive.content_digest(train.path)}
        path = feature_cache.cache_path(features.default_cache_dir(train.path, "ekfac"), stem=train.path.stem,
                                        key={**key, "fit": solver.fit_settings(),
                                             "variables": [v.path for v in variables]}).with_suffix(".npz")
        prepared = solver.prepare(curvature, cache_path=path, cache_key=key)
    else:
        prepared = solver.prepare(curvature)
    return Engine(model=model, preprocess=preprocess, variables=variables, prepared=prepared,
                  hvp_form=curvature.form, features=cache)


@dataclass
class LabelSubset:
    """The training images scored for one label (or for every label), read once for all its test images."""

    key: tuple
    indices: np.ndarray  # (k,) global training indices
    images: np.ndarray | None  # (k, H, W, 3) uint8; None with all_labels (streamed instead)
    read_on_demand: bool = False  # images read at the first batches() (never, on cached features)

    def batches(self, train, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, images) batches covering the subset, in its order."""
        if self.images is None and self.read_on_demand:
            self.images = train.read(self.indices)
        if self.images is None:
            yield from train.iter_all(batch_size)
            return
        for start in range(0, len(self.indices), batch_size):
            yield self.indices[start:start + batch_size], self.images[start:start + batch_size]


def subset_key(item: WorkItem, settings: Settings) -> tuple:
    return ("all",) if settings.scoring.all_labels else (item.folder, item.label)


def load_label_subset(train, item: WorkItem, settings: Settings, echo) -> LabelSubset:
    """One ImageNet class is about 1,300 images, 195 MB as uint8: held in memory for its test
    images. The whole set (``all_labels``) is streamed batch by batch for every test image."""
    key = subset_key(item, settings)
    if settings.scoring.all_labels:
        echo(f"Create label subset for all {len(train.class_names)} classes...", end="")
        subset = LabelSubset(key, np.arange(len(train)), None)
    else:
        echo(f"Create label subset for {item.label} class...", end="")
        indices = train.label_indices(item.label)
        subset = LabelSubset(key, indices, None, read_on_demand=True)
    echo(" finished")
    return subset


@dataclass
class Solved:
    """A test image's ``s_test``, before its training images are scored."""

    item: WorkItem
    image: np.ndarray  # (H, W, 3) uint8
    predicted: int
    test_loss: float
    s_test: list  # tensors shaped like the variables
    diagnostics: dict  # the solver's, for this test image
    timings: dict
    parts: list = field(default_factory=list)  # independent estimates whose mean is s_test (Solution.parts)
    gradient_norm: float = float("nan")  # ||grad L(z_test)||


@dataclass
class Explanation:
    """One test image's influence scores and what produced them."""

    image: np.ndarray  # (H, W, 3) uint8
    predicted: int
    test_loss: float
    indices: np.ndarray  # (k,) global training indices scored
    scores: np.ndarray  # (k,) float64, aligned with indices
    diagnostics: dict  # the solver's, for this test image
    timings: dict
    gradient_norm: float = float("nan")  # ||grad L(z_test)||: zero means every score is zero


def solve(*, item: WorkItem, image: np.ndarray, engine: Engine, settings: Settings) -> Solved:
    """The test gradient and ``s_test`` of one test image; :class:`ItemFailed` if the solver diverges."""
    from influence import hvp, ihvp, losses

    timings = {}
    x_test = engine.preprocess(image[None])
    y_test = np.array([item.label])

    began = time.perf_counter()
    predicted = int(np.argmax(engine.model(x_test, training=False)[0]))
    test_loss = float(losses.per_example_loss(engine.model)(x_test, y_test)[0])
    v = hvp.loss_gradient(engine.model, engine.variables, x_test, y_test)
    gradient_norm = ihvp._norm(v)  # noqa: SLF001 - float32 partial sums, float64 across: no float64 copy of v
    timings["test_gradient_s"] = time.perf_counter() - began

    began = time.perf_counter()
    steps = getattr(engine.prepared, "steps", None)
    with EstimateBar(total=steps, desc="IHVP calculation", disable=steps is None) as bar:
        try:
            solution = engine.prepared.solve(v, key=item_seed(settings.solver.seed, item),
                                             callback=lambda done, total, norm: bar.update(done - bar.n))
        except ihvp.LissaDivergedError as error:
            raise ItemFailed(str(error)) from error
    timings["solve_s"] = time.perf_counter() - began
    return Solved(item, image, predicted, test_loss, solution.s_test, solution.diagnostics, timings,
                  parts=list(getattr(solution, "parts", None) or []), gradient_norm=gradient_norm)


def score(group: list[Solved], *, train, subset: LabelSubset, engine: Engine,
          settings: Settings) -> list[Explanation | ItemFailed]:
    """Score the subset's training images for every test image of ``group`` in one pass: each
    training batch is read, decoded and preprocessed once for the whole group.

    Returns, per test image, its :class:`Explanation`, or an :class:`ItemFailed` saying why not.
    """
    from influence import scores, solvers

    began = time.perf_counter()
    # A test image solved as independent chains (Solution.parts, s_test their mean) is scored
    # with each chain's estimate: scores are linear in s_test, so their mean is s_test's scores,
    # and the two halves' top-k agreement says how stable the ranking is, at no extra solve.
    tangents, rows_of = [], []
    for solved in group:
        parts = solved.parts if len(solved.parts) >= 2 else [solved.s_test]
        rows_of.append(range(len(tangents), len(tangents) + len(parts)))
        tangents.extend(parts)
    stacked = scores.stack_s_tests(tangents, engine.variables)
    scored_indices, scored = [], []  # scored: (tangents, batch) blocks
    batch_size = settings.scoring.score_batch_size
    if engine.features is not None:  # the head on cached features: a primal pass costs little there
        blocks = engine.features.blocks(subset.indices, batch_size)
        unroll = HEAD_UNROLL
    else:
        blocks = ((indices, engine.preprocess(images)) for indices, images in subset.batches(train, batch_size))
        unroll = 1
    with progress_bar(total=len(subset.indices) * len(group), desc="Batch influences", unit="img") as bar:
        for indices, inputs in blocks:
            block = scores.influence_scores_many(engine.model, engine.variables, stacked, inputs,
                                                 train.labels[indices], unroll=unroll)
            scored_indices.append(indices)
            scored.append(np.asarray(block, dtype=np.float64))
            bar.update(len(indices) * len(group))
    indices = np.concatenate(scored_indices)
    all_scores = np.concatenate(scored, axis=1)  # (tangents, k)
    seconds = (time.perf_counter() - began) / len(group)
    explained = []
    for solved, rows in zip(group, rows_of):
        halves = all_scores[list(rows)]
        row = halves.mean(axis=0)
        if not np.all(np.isfinite(row)):
            explained.append(ItemFailed(
                f"{np.sum(~np.isfinite(row))} of {len(row)} influence scores are not finite; "
                f"the solver did not converge: raise --scale or --damping"))
            continue
        diagnostics = dict(solved.diagnostics)
        if len(halves) >= 2:
            diagnostics["stability"] = solvers.stability(halves[0], halves[1], k=settings.presentation.top)
        explained.append(Explanation(solved.image, solved.predicted, solved.test_loss, indices, row,
                                     diagnostics, {**solved.timings, "scoring_s": seconds},
                                     solved.gradient_norm))
    return explained


def group_size(engine: Engine, settings: Settings, *, budget_bytes: float = 2 * 2**30, most: int = 16) -> int:
    """How many test images to score per pass over the training images: as many as fit their
    scoring vectors in ``budget_bytes`` (one per LiSSA chain, else one ``s_test``; VGG16 with
    every weight and two chains: 1), at most ``most``."""
    per_image = settings.solver.repeat if settings.solver.method == "lissa" else 1
    return int(max(1, min(most, budget_bytes // max(1, 4 * engine.parameters * per_image))))
