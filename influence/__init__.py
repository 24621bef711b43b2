"""Influence functions (Koh & Liang, 2017) for Keras image classifiers.

Modules, each with one job:

- ``archive``   the train/test archive format (the only code that knows its keys)
- ``imagenet``  the ILSVRC-2012 class list shipped as package data
- ``folders``   class folders -> labels (WordNet ids, natural sort, test-name resolution)
- ``decode``    Pillow decoding to RGB uint8, in parallel and in order
- ``prepare``   image folders -> archives (``prepare_data.py``, ``prepare_only_test.py``)
- ``losses``, ``params``, ``hvp``, ``scores``   the influence engine: loss, parameters,
  Hessian-vector products, influence scores
- ``sampling``  the one training-minibatch sampler (uniform over the whole training set)
- ``ihvp``      inverse-Hessian-vector product algorithms (LiSSA, CG, exact), on an HVP function
- ``solvers``   the two-phase solver interface: prepared once per run, applied per test gradient
- ``ekfac``     EK-FAC: Gauss-Newton curvature fitted once per run, a solver for every test image
- ``models``    classifier loading (VGG16 and saved Keras models)
- ``features``  the cut below the selected layers: trunk/head models, scoring many test images at once
- ``feature_cache``  the on-disk cache of the trunk's output (the only code that reads or writes it)
- ``settings``  a run's settings: solver, scoring, presentation
- ``plan``      calculate.py's work items, shards and resume state
- ``explain``   one test image's explanation: test gradient, s_test, scores
- ``results``   the output tree (figures, score tables, records): the only code that reads or writes it
- ``claims``    one writer per output tree: the tree's settings claim and per-image claims
- ``job``       the orchestrator behind ``calculate.py``
- ``figures``, ``outputs``, ``progress``   figures, atomic writes and progress bars
- ``graphs``    how every ``tf.function`` is compiled (no AutoGraph, fewer retraces)
- ``cli``       what the three scripts share: error handling, shared arguments and quiet start-up
- ``interrupts``  Ctrl-C and SIGTERM handled once, by the main process, where it is safe
"""

from influence.errors import UserError

__all__ = ["UserError"]
