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
    """Endless minibatches ``(x, y)`` of ``batch_size`` distinct examples drawn uniformly
    from the whole ``source``; a ``batch_size`` of at least ``len(source)`` yields the full
    set every time (the exact Hessian, for validation).

    :meth:`reseed` restarts the random stream from a key, so that each test image draws the
    same minibatches whichever process (shard, resumed run) computes it.
    """

    def __init__(self, source: Source, batch_size: int, *, seed: int | tuple[int, ...] = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserError(f"batch size must be a whole number of at least 1, not {batch_size!r}")
        self.source = source
        self.batch_size = int(batch_size)
        self.reseed(seed)

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
        if self.full_batch:
            return np.arange(count)
        return np.sort(self._rng.choice(count, size=self.batch_size, replace=False))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        indices = self.next_indices()
        return self.source.take(indices), self.source.labels[indices]
