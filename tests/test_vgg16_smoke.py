"""One smoke run of the real default path: VGG16 at 224x224, vgg16 preprocessing, all
parameters, weights from a file (random weights; the ImageNet file cannot be downloaded here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from imagegen import make_class_folders

ROOT = Path(__file__).resolve().parents[1]


def test_vgg16_default_path_end_to_end(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    weights = tmp_path / "vgg16_random.weights.h5"
    keras.applications.VGG16(weights=None).save_weights(weights)
    keras.backend.clear_session()

    # Two real ImageNet classes by wnid: labels 0 (tench) and 1 (goldfish).
    make_class_folders(tmp_path / "train", {"n01440764": 2, "n01443537": 2}, size=(40, 40), suffix=".jpg")
    make_class_folders(tmp_path / "orig", {"1": 1}, size=(40, 40), class_indices={"1": 1})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prepared = subprocess.run(
        [sys.executable, str(ROOT / "prepare_data.py"), "-tr", "train", "-ts", "orig", "-bs", "2"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr

    result = subprocess.run(
        [sys.executable, str(ROOT / "calculate.py"), "--weights", str(weights),
         "-i", "2", "-b", "2", "--score-batch-size", "2", "--scale", "1e4", "-sf", "pdf"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "calc_output" / "orig" / "1"
    assert sorted(p.name for p in directory.iterdir()) == ["1.json", "1.npy", "harmful_1.pdf", "useful_1.pdf"]
    record = json.loads((directory / "1.json").read_text())
    assert record["label"] == 1 and record["label_name"] == "goldfish"
    assert record["settings"]["preprocess"] == "vgg16"
    assert record["settings"]["parameters"] == 138_357_544  # every VGG16 weight
    assert record["settings"]["model"].startswith("VGG16")
    assert (directory / "harmful_1.pdf").read_bytes().startswith(b"%PDF")
    scores = np.load(directory / "1.npy", allow_pickle=True).item()
    assert sorted(scores) == ["n01443537/img_0000.jpg", "n01443537/img_0001.jpg"]
    assert all(np.isfinite(list(scores.values())))
