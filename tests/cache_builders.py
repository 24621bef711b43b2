"""A numpy stand-in trunk and cache opener shared by test_features.py and its subprocesses
(which import only this, numpy, h5py and the cache module: no TensorFlow start-up)."""

from __future__ import annotations

import numpy as np

from influence import archive, feature_cache


def numpy_trunk(images):  # (k, H, W, 3) uint8 -> (k, 3) float32: per-image mean colour
    return images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32) / 255.0


def cache_key(train_path, *, model="m1", preprocess="unit") -> dict:
    return {"model": model, "cut": {"layer": "pool"}, "preprocess": preprocess, "images": "train",
            "dtype": "float32", "archive": archive.content_digest(train_path)}


def open_cache(train_path, cache_dir, messages=None, *, trunk=numpy_trunk, echo=None, **key_fields):
    key = cache_key(train_path, **key_fields)
    with archive.open_train(train_path) as train:
        return feature_cache.open_or_build(
            feature_cache.cache_path(cache_dir, stem="train", key=key), key, labels=train.labels, feature_shape=(3,),
            read_images=train.read, features_fn=trunk, batch_size=5,
            echo=echo or (messages.append if messages is not None else (lambda *a, **k: None)))
