"""Planning of calculate.py's work: order, selection, shards, resume bookkeeping."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from influence import outputs, plan
from influence.settings import Settings, SolverSettings, ScoringSettings, PresentationSettings
from influence.errors import UserError


class FakeTestArchive:
    def __init__(self, folders):
        self._folders = folders

    @property
    def folders(self):
        return list(self._folders)

    def folder(self, name):
        return SimpleNamespace(labels=np.array(self._folders[name]))


ARCHIVE = FakeTestArchive({"orig": [7, 2, 7, 2, 2], "wb": [2, 7, 7]})


def test_plan_orders_folders_then_labels_then_images():
    items = plan.plan_work(ARCHIVE)
    assert [(i.folder, i.label, i.number, i.row) for i in items] == [
        ("orig", 2, 1, 1), ("orig", 2, 2, 3), ("orig", 2, 3, 4),
        ("orig", 7, 1, 0), ("orig", 7, 2, 2),
        ("wb", 2, 1, 0),
        ("wb", 7, 1, 1), ("wb", 7, 2, 2),
    ]


def test_plan_selects_folders_and_labels():
    items = plan.plan_work(ARCHIVE, folders=["wb"], labels=[7])
    assert [(i.folder, i.label, i.number) for i in items] == [("wb", 7, 1), ("wb", 7, 2)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"folders": ["styled"]}, "unknown test folder styled; the test archive has orig, wb"),
        ({"folders": ["wb", "wb"]}, "names a folder twice"),
        ({"labels": [3]}, "no test images with label 3"),
    ],
)
def test_plan_rejects_unknown_selections(kwargs, message):
    with pytest.raises(UserError, match=message):
        plan.plan_work(ARCHIVE, **kwargs)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 11])
def test_shards_cover_every_item_exactly_once(count):
    items = plan.plan_work(ARCHIVE)
    shards = [plan.select_shard(items, i, count) for i in range(count)]
    flat = [item for shard in shards for item in shard]
    assert sorted(flat, key=items.index) == items
    assert len(flat) == len(set(flat)) == len(items)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced


@pytest.mark.parametrize("text, expected", [(None, (0, 1)), ("0/1", (0, 1)), ("2/3", (2, 3))])
def test_parse_shard(text, expected):
    assert plan.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["3/2", "2/2", "-1/2", "1/0", "1", "a/b", "1/2/3"])
def test_parse_shard_rejects(text):
    with pytest.raises(UserError, match="--shard"):
        plan.parse_shard(text)


def test_settings_fingerprint_ignores_presentation_only():
    base = Settings()
    assert base.fingerprint() == Settings(presentation=PresentationSettings(save_format="pdf", top=3)).fingerprint()
    assert base.fingerprint() != Settings(scoring=ScoringSettings(score_batch_size=7)).fingerprint()
    assert base.fingerprint() != Settings(solver=SolverSettings(depth=5)).fingerprint()
    assert base.fingerprint() != Settings(scoring=ScoringSettings(all_labels=True)).fingerprint()


def _complete_item(tmp_path, fingerprint):
    item = plan.WorkItem("orig", 2, 1, 1)
    files = item.files(tmp_path, "png")
    files.directory.mkdir(parents=True)
    for path in files.results:
        path.write_bytes(b"x")
    files.record.write_text(json.dumps({"settings": {"fingerprint": fingerprint}}))
    return files


def test_item_complete_only_with_record_settings_and_every_file(tmp_path):
    fingerprint = Settings().fingerprint()
    files = _complete_item(tmp_path, fingerprint)
    item = plan.WorkItem("orig", 2, 1, 1)
    assert files.directory == tmp_path / "orig" / "2"
    assert [p.name for p in files.results] == ["harmful_1.png", "useful_1.png", "1.npy"]
    assert plan.pending_items(tmp_path, [item], "png", fingerprint) == []
    assert plan.pending_items(tmp_path, [item], "png", fingerprint, overwrite=True) == [item]
    files.useful.unlink()
    assert plan.pending_items(tmp_path, [item], "png", fingerprint) == [item]
    files.useful.write_bytes(b"x")
    files.record.write_text('{"settings": {"finger')  # torn write by a foreign tool
    assert plan.pending_items(tmp_path, [item], "png", fingerprint) == [item]


def test_previous_results_with_other_settings_are_refused(tmp_path):
    _complete_item(tmp_path, Settings(solver=SolverSettings(depth=3)).fingerprint())
    items = plan.plan_work(ARCHIVE)
    with pytest.raises(UserError, match=r"other settings \(solver.depth differ"):
        plan.pending_items(tmp_path, items, "png", Settings().fingerprint())
    assert len(plan.pending_items(tmp_path, items, "png", Settings().fingerprint(), overwrite=True)) == 8
    pending = plan.pending_items(tmp_path, items, "png", Settings(solver=SolverSettings(depth=3)).fingerprint())
    assert plan.WorkItem("orig", 2, 1, 1) not in pending and len(pending) == len(items) - 1


def test_unwritable_output_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot be created"):
        outputs.check_writable_dir(blocker / "calc_output")
    outputs.check_writable_dir(tmp_path / "new" / "calc_output")
    assert not (tmp_path / "new").exists()
