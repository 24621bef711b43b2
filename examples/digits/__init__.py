"""The built-in demo: handwritten digits with planted label errors, through the real scripts.

``python demo.py`` (``make demo``; also ``python -m examples.digits``) runs the whole
pipeline on a fresh machine with no download:

1. scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) are written
   in the suite's folder layout under ``<out>/data/``: ``train/<digit>/``, and two
   test folders ``orig/<label>/`` and ``noisy/<label>/`` (the same test scans with
   Gaussian noise, so that the classifier gets some of them wrong);
2. a few percent of the training images are put in the folder of another digit on
   purpose (label errors), listed in ``<out>/flipped.json`` with their true digit;
3. a small Keras CNN is trained on the (partly mislabelled) training folder on the
   CPU and saved as ``<out>/model.keras``;
4. ``prepare_data.py``, ``prepare_only_test.py`` and ``calculate.py`` run as a user
   would run them, each in its own process;
5. the report: of the top harmful training images of every misclassified test
   image, how many are planted label errors, against what a random pick finds;
   and, for contrast, how many sit among the top useful images.

Modules: ``settings`` (what a run depends on, what it writes), ``data`` (steps 1-2),
``train`` (step 3), ``run`` (the command line and step 4), ``report`` (step 5).
"""
