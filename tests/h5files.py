"""Comparing HDF5 files in the tests: every dataset and every attribute, with h5py alone."""

from __future__ import annotations

import h5py
import numpy as np


def h5_contents(path) -> dict:
    """Every dataset (as an array) and every group's attributes of an HDF5 file, by name."""
    contents = {}
    with h5py.File(path, "r") as file:
        contents["/"] = dict(file.attrs)
        file.visititems(lambda name, obj: contents.__setitem__(
            name, obj[()] if isinstance(obj, h5py.Dataset) else dict(obj.attrs)))
    return contents


def assert_same_h5(a, b) -> None:
    first, second = h5_contents(a), h5_contents(b)
    assert first.keys() == second.keys()
    for name in first:
        if isinstance(first[name], dict):
            assert first[name].keys() == second[name].keys(), name
            for key in first[name]:
                assert np.array_equal(first[name][key], second[name][key]), (name, key)
        else:
            assert first[name].dtype == second[name].dtype and np.array_equal(first[name], second[name]), name
