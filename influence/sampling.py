"""The one training-minibatch sampler: endless random minibatches from the whole training set.

Every Hessian-vector product that a stochastic solver takes (LiSSA's ``H_j``, the power
iteration behind the ``auto`` scale) draws its minibatch here, from every training image,
never from one shard or one label. The images come from a :class:`Source`: the training
archive with the model's preprocessing (:class:`ArchiveSource`), arrays in memory
(:class:`ArraySource`), or anything else with the same three members (a feature cache).
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np

from influence.errors import UserError


class Source(Protocol):
    """Random access to a labelled training set, already preprocessed for the model."""

    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray):  # (k,) sorted global indices -> (k, ...) model input
        ...


class ArraySource:
    """``x`` and ``y`` held in memory (the engine's tests and the Python API)."""

    def __init__(self, x, y):
        if len(x) == 0 or len(y) != len(x):
            raise UserError(f"need as many labels as images (and at least one): {len(x)} images, {len(y)} labels")
        self.x = x
        self.labels = np.asarray(y, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices):
        return self.x[indices]


class ArchiveSource:
    """A training archive read image by image, preprocessed as the model expects."""

    def __init__(self, train, preprocess: Callable):
        self.train = train
        self.preprocess = preprocess
        self.labels = np.asarray(train.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices):
        return self.preprocess(self.train.read(indices))


class MinibatchSampler:
    """Endless random minibatches from the whole ``source``.

    Uniform (``probabilities=None``): ``(x, y)``, ``batch_size`` distinct examples drawn
    uniformly; a ``batch_size`` of at least ``len(source)`` yields the full set every time
    (the exact Hessian, for validation).

    Importance-sampled (``probabilities`` q, (N,) summing to 1): ``(x, y, weights)``,
    ``batch_size`` examples drawn independently with replacement, example ``i`` with
    probability ``q_i``, and weighted ``w_i = 1 / (B N q_i)``. Then for any per-example
    quantity ``E[sum_b w_b H_{i_b}] = (1/N) sum_i H_i``: the weighted minibatch Hessian is
    an unbiased estimate of the full-batch one, whatever q, and its variance is smallest when
    q follows the examples' curvature (:func:`importance_probabilities`).

    :meth:`reseed` restarts the random stream from a key, so that each test image draws the
    same minibatches whichever process (shard, resumed run) computes it.
    """

    def __init__(self, source: Source, batch_size: int, *, seed: int | tuple[int, ...] = 0,
                 probabilities: np.ndarray | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch size must be a whole number of at least 1, not {batch_size!r}")
        self.source = source
        self.batch_size = int(batch_size)
        self.probabilities = None
        if probabilities is not None:
            q = np.asarray(probabilities, dtype=np.float64).reshape(-1)
            if len(q) != len(source) or not np.all(q > 0) or not np.isclose(q.sum(), 1.0):
                raise UserError(f"sampling probabilities must be {len(source)} positive numbers summing to 1")
            self.probabilities = q / q.sum()
        self.reseed(seed)

    @property
    def weighted(self) -> bool:
        return self.probabilities is not None

    def with_probabilities(self, probabilities: np.ndarray | None) -> "MinibatchSampler":
        """The same source and batch size, drawing with ``probabilities`` (None: uniform)."""
        return MinibatchSampler(self.source, self.batch_size, probabilities=probabilities)

    @classmethod
    def from_arrays(cls, x, y, batch_size: int, *, seed: int | tuple[int, ...] = 0) -> "MinibatchSampler":
        return cls(ArraySource(x, y), batch_size, seed=seed)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def full_batch(self) -> bool:
        return self.batch_size >= len(self.source)

    def reseed(self, *key: int | tuple[int, ...]) -> None:
        flat = []
        for part in key:
            flat.extend(part if isinstance(part, (tuple, list)) else [part])
        self._rng = np.random.default_rng([int(k) for k in flat] if len(flat) != 1 else int(flat[0]))

    def next_indices(self) -> np.ndarray:
        """(batch_size,) sorted global indices of the next minibatch (the archive is read front to back)."""
        count = len(self.source)
        if self.weighted:
            return np.sort(self._rng.choice(count, size=self.batch_size, replace=True, p=self.probabilities))
        if self.full_batch:
            return np.arange(count)
        return np.sort(self._rng.choice(count, size=self.batch_size, replace=False))

    def weights(self, indices: np.ndarray) -> np.ndarray:
        """(B,) float32 ``1 / (B N q_i)`` for importance-sampled ``indices``."""
        return (1.0 / (len(indices) * len(self.source) * self.probabilities[indices])).astype(np.float32)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        indices = self.next_indices()
        if self.weighted:
            return self.source.take(indices), self.source.labels[indices], self.weights(indices)
        return self.source.take(indices), self.source.labels[indices]


# -- curvature-proportional sampling ----------------------------------------------------------

DEFAULT_UNIFORM_SHARE = 0.1


def softmax_curvature(model, source: Source, *, batch_size: int = 64) -> np.ndarray:
    """(N,) float64 ``1 - sum_k p_k^2`` per training example: the trace of the cross-entropy's
    Hessian with respect to the logits, ``diag(p) - p p^T``.

    One forward pass over the training set. Large for examples the model does not fit
    (label errors, hard cases), near 0 for the confidently fitted majority, whose Hessian
    ``J^T (diag(p) - p p^T) J`` is therefore nearly zero whatever the Jacobian ``J``.
    """
    import tensorflow as tf

    from influence import losses

    probabilities_out = losses.output_kind(model) == losses.PROBABILITIES
    traces = np.empty(len(source))
    for start in range(0, len(source), batch_size):
        indices = np.arange(start, min(start + batch_size, len(source)))
        out = model(source.take(indices), training=False)
        p = out if probabilities_out else tf.nn.softmax(out, axis=-1)
        p = np.asarray(p, dtype=np.float64)
        traces[indices] = 1.0 - np.sum(p * p, axis=-1)
    return traces


def importance_probabilities(curvature: np.ndarray, *, uniform_share: float = DEFAULT_UNIFORM_SHARE) -> np.ndarray:
    """``q_i = (1 - u) c_i / sum(c) + u / N``: proportional to a per-example curvature ``c``,
    mixed with a share ``u`` of uniform so that every example keeps ``q_i >= u / N`` and so a
    weight ``1 / (N q_i) <= 1 / u`` (a bounded variance even where the proxy says 0).
    ``u = 1`` is uniform sampling (with replacement)."""
    c = np.clip(np.asarray(curvature, dtype=np.float64), 0.0, None)
    count = len(c)
    if not 0.0 < uniform_share <= 1.0:
        raise UserError(f"the uniform share must be in (0, 1], not {uniform_share!r}")
    if not np.isfinite(c).all() or c.sum() <= 0.0:
        return np.full(count, 1.0 / count)
    return (1.0 - uniform_share) * c / c.sum() + uniform_share / count
