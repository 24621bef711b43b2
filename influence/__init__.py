"""Influence functions (Koh & Liang, 2017) for Keras image classifiers.

Modules, each with one job:

- ``archive``   the train/test archive format (the only code that knows its keys)
- ``imagenet``  the ILSVRC-2012 class list shipped as package data
- ``folders``   class folders -> labels (WordNet ids, natural sort, test-name resolution)
- ``decode``    Pillow decoding to RGB uint8, in parallel and in order
- ``prepare``   image folders -> archives (``prepare_data.py``, ``prepare_only_test.py``)
- ``losses``, ``params``, ``hvp``, ``ihvp``, ``scores``   the influence engine
- ``models``    classifier loading (VGG16 and saved Keras models)
- ``job``       the per-test-image batch job behind ``calculate.py``
- ``figures``, ``outputs``, ``progress``   its figures, atomic writes and progress bars
- ``cli``       what the three scripts share: error handling and quiet start-up
"""

from influence.errors import UserError

__all__ = ["UserError"]
