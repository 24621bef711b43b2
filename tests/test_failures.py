"""One failing test image does not end the job: it gets a record saying why, the run goes on,
the summary names it, the exit status says so, and a rerun retries only the failures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagegen import make_class_folders
from test_calculate import run_script, save_tiny_classifier

SIZE = 8
N_TEST = 12  # in one folder, labels 0 and 1: one scoring group per label, failures among successes
FAILING = {("orig", 0, 2), ("orig", 0, 5), ("orig", 1, 4)}
ARGS = ["-i", "3", "-b", "4", "--score-batch-size", "8", "--preprocess", "unit", "--top", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from influence import archive, prepare

    root = tmp_path_factory.mktemp("failures")
    make_class_folders(root / "train", {"a": 6, "b": 6}, size=(SIZE, SIZE))
    make_class_folders(root / "orig", {"0": N_TEST // 2, "1": N_TEST // 2}, size=(SIZE, SIZE),
                       class_indices={"0": 0, "1": 1})
    prepare.prepare_data(train=root / "train", tests=[root / "orig"], out_dir=root, image_size=(SIZE, SIZE),
                         batch_size=4, workers=1)
    with archive.open_train(root / "train.npz") as train:
        images = train.read(np.arange(len(train))).astype("float32")
        labels = np.asarray(train.labels)
    save_tiny_classifier(root / "model.keras", images, labels, classes=2)
    return root


def run_job(workspace, output_dir, *extra):
    import calculate

    status = calculate.main([
        "--train", str(workspace / "train.npz"), "--test", str(workspace / "test.npz"),
        "--model", str(workspace / "model.keras"), "--output-dir", str(output_dir), *ARGS, *extra,
    ])
    return status


def test_failed_images_are_recorded_the_job_goes_on_and_a_rerun_retries_only_them(workspace, tmp_path,
                                                                                   monkeypatch, capsys):
    from influence import cli, explain
    from influence.errors import ItemFailed

    real_solve = explain.solve
    attempted = []

    def solve_failing_some(*, item, **kwargs):
        attempted.append((item.folder, item.label, item.number))
        if (item.folder, item.label, item.number) in FAILING:
            raise ItemFailed(f"made to fail for the test ({item.number})")
        return real_solve(item=item, **kwargs)

    monkeypatch.setattr(explain, "solve", solve_failing_some)
    output_dir = tmp_path / "out"
    assert run_job(workspace, output_dir) == cli.EXIT_SOME_FAILED == 3
    printed = capsys.readouterr().out
    assert len(attempted) == N_TEST
    records = {(p.parent.parent.name, int(p.parent.name), int(p.stem)): json.loads(p.read_text())
               for p in output_dir.glob("*/*/*.json")}
    assert len(records) == N_TEST
    failed = {key for key, record in records.items() if record["status"] == "failed"}
    assert failed == FAILING
    for key in FAILING:
        folder, label, number = key
        assert records[key]["reason"] == f"made to fail for the test ({number})"
        assert records[key]["test_id"] and records[key]["settings"]["fingerprint"]
        assert not (output_dir / folder / str(label) / f"{number}.npy").exists()
        assert f"{folder}/{label}/{number}.json: made to fail for the test ({number})" in printed
    assert sum(record["status"] == "complete" for record in records.values()) == N_TEST - 3
    assert len(list(output_dir.glob("*/*/*.npy"))) == N_TEST - 3
    assert f"{N_TEST - 3} test images computed, 3 failed" in printed

    # The rerun, without the fault: only the three failures are computed, and it ends well.
    monkeypatch.setattr(explain, "solve", lambda **kwargs: attempted.append("rerun") or real_solve(**kwargs))
    assert run_job(workspace, output_dir) == 0
    printed = capsys.readouterr().out
    assert attempted.count("rerun") == 3 and f"{N_TEST - 3} of {N_TEST} test images already complete" in printed
    statuses = [json.loads(p.read_text())["status"] for p in output_dir.glob("*/*/*.json")]
    assert statuses == ["complete"] * N_TEST


def test_skip_failed_leaves_failures_alone(workspace, tmp_path, monkeypatch, capsys):
    from influence import explain
    from influence.errors import ItemFailed

    def always_fail(*, item, **kwargs):
        raise ItemFailed("broken")

    monkeypatch.setattr(explain, "solve", always_fail)
    output_dir = tmp_path / "out"
    assert run_job(workspace, output_dir, "--labels", "1") == 3
    monkeypatch.setattr(explain, "solve", lambda **kwargs: pytest.fail("a failure was retried"))
    assert run_job(workspace, output_dir, "--labels", "1", "--skip-failed") == 0
    assert f"{N_TEST // 2} of {N_TEST // 2} test images already complete" in capsys.readouterr().out


def test_a_real_divergence_fails_each_image_through_the_script(workspace, tmp_path):
    """A scale far below the Hessian's curvature makes LiSSA diverge: a record per image, exit 3."""
    output_dir = tmp_path / "out"
    result = run_script(
        "calculate.py", "--train", workspace / "train.npz", "--test", workspace / "test.npz",
        "--model", workspace / "model.keras", "--output-dir", output_dir, *ARGS, "--labels", "1",
        "--scale", "1e-4", "--damping", "0", "-i", "40",
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(p.read_text()) for p in sorted(output_dir.glob("orig/1/*.json"))]
    assert len(records) == N_TEST // 2
    assert all(r["status"] == "failed" and "LiSSA diverged" in r["reason"] for r in records)
    assert f"{N_TEST // 2} test images failed" in result.stdout
