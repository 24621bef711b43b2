"""Atomic writes: a file appears complete under its final name, or not at all."""

import os
import subprocess
import sys

import numpy as np
import pytest

from influence import outputs


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "deep" / "result.json"
    outputs.write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{")
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert '"a": 1' in target.read_text()
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_pickled_dict_round_trip(tmp_path):
    scores = {"n01440764/a.JPEG": -1.5, "n01440764/b.JPEG": 2.25}
    path = outputs.write_pickled_dict(tmp_path / "1.npy", scores)
    assert np.load(path, allow_pickle=True).item() == scores


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = outputs._host()
    stale = tmp_path / f".1.npy{outputs.TEMPORARY_MARK}{host}-{dead_pid}"
    live = tmp_path / f".2.npy{outputs.TEMPORARY_MARK}{host}-{os.getpid()}"
    foreign = tmp_path / f".3.npy{outputs.TEMPORARY_MARK}otherhost-{dead_pid}"
    for path in (stale, live, foreign):
        path.write_bytes(b"partial")
    assert outputs.remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists() and foreign.exists()
