"""The consolidated results store (results.h5), its parts, collect.py and the pages, on the
output tree of one small calculate run (plus one --all-labels run for that layout)."""

from __future__ import annotations

import collections
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import h5py
import numpy as np
import pytest

from h5files import assert_same_h5
from imagegen import make_class_folders
from test_calculate import ROOT, SIZE, TRAIN_CLASSES, run_script, save_tiny_classifier

ITEMS = [("orig", 0, 1), ("orig", 0, 2), ("orig", 1, 1), ("noisy", 2, 1)]  # plan order
STORE_FILES = ("results.h5", "index.html")


def run_job(root: Path, output_dir: Path, **scoring):
    from influence import job
    from influence.settings import ScoringSettings, Settings, SolverSettings

    settings = Settings(solver=SolverSettings(depth=6, batch_size=4, seed=3),
                        scoring=ScoringSettings(score_batch_size=4, **scoring))
    lines = []
    job.calculate(train_path=root / "train.npz", test_path=root / "test.npz", output_dir=output_dir,
                  settings=settings, model_path=root / "model.keras", preprocess="unit",
                  echo=lambda text, end="\n": lines.append(text))
    return lines


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from influence import archive, prepare

    root = tmp_path_factory.mktemp("store")
    make_class_folders(root / "train", TRAIN_CLASSES, size=(SIZE, SIZE))
    make_class_folders(root / "orig", {"0": 2, "1": 1}, size=(SIZE, SIZE), class_indices={"0": 0, "1": 1})
    make_class_folders(root / "noisy", {"2": 1}, size=(SIZE, SIZE), class_indices={"2": 2})
    prepare.prepare_data(train=root / "train", tests=[root / "orig", root / "noisy"], out_dir=root,
                         image_size=(SIZE, SIZE), batch_size=4, workers=1)
    with archive.open_train(root / "train.npz") as train:
        save_tiny_classifier(root / "model.keras", train.read(np.arange(len(train))).astype("float32"),
                             np.asarray(train.labels))
    return root


@pytest.fixture(scope="module")
def tree(workspace):
    """One unsharded run; its end wrote parts/shard-0-of-1.h5, results.h5 and the pages."""
    output_dir = workspace / "calc_output"
    lines = run_job(workspace, output_dir)
    return output_dir, lines


def records(output_dir):
    return {key: json.loads((output_dir / key[0] / str(key[1]) / f"{key[2]}.json").read_text()) for key in ITEMS}


def score_tables(output_dir):
    return {key: np.load(output_dir / key[0] / str(key[1]) / f"{key[2]}.npy", allow_pickle=True).item()
            for key in ITEMS}


def copy_results(source: Path, target: Path, *, keep_store=False):
    """The per-image files of a tree (and, with keep_store, its parts and results.h5)."""
    ignore = None if keep_store else shutil.ignore_patterns("parts", "html", *STORE_FILES)
    shutil.copytree(source, target, ignore=ignore)
    return target


def collect(output_dir, workspace, *extra):
    return run_script("collect.py", output_dir, "--train", workspace / "train.npz", "--test",
                      workspace / "test.npz", *extra, timeout=120)


def test_the_run_ends_with_its_part_the_store_and_the_pages(tree):
    output_dir, lines = tree
    assert (output_dir / "parts" / "shard-0-of-1.h5").is_file()
    assert any(line.startswith("4 results, 0 failed, 0 missing, from 1 part of 1") for line in lines)
    assert f"Browse the results: {output_dir / 'index.html'}" in lines


def test_store_loads_in_one_line_and_holds_every_score_of_the_tree(tree):
    from influence import store

    output_dir, _ = tree
    tables, by_key = score_tables(output_dir), records(output_dir)
    for folder, label in (("orig", 0), ("orig", 1), ("noisy", 2)):
        scores = h5py.File(output_dir / "results.h5")[f"blocks/{folder}/{label}/scores"][:]  # the one line
        with h5py.File(output_dir / "results.h5") as file:
            block = file[f"blocks/{folder}/{label}"]
            train_ids = list(block["train_id"].asstr()[:])
            assert list(block["train_label"][:]) == [label] * len(train_ids)
            numbers = [key[2] for key in ITEMS if key[:2] == (folder, label)]
            assert scores.shape == (len(numbers), len(train_ids))
            for row, number in enumerate(numbers):
                table = tables[(folder, label, number)]
                assert train_ids == list(table)  # the npy's order: the training images of the label
                assert np.array_equal(scores[row], np.array(list(table.values())))
                assert block["test_id"].asstr()[row] == by_key[(folder, label, number)]["test_id"]

    tests = store.read_table(output_dir / "results.h5")
    assert len({len(column) for column in tests.values()}) == 1  # a data frame's columns
    assert [(f, int(l), int(n)) for f, l, n in zip(tests["folder"], tests["label"], tests["number"])] == ITEMS
    for i, key in enumerate(ITEMS):
        record = by_key[key]
        assert (tests["test_id"][i], tests["predicted"][i], tests["test_loss"][i]) == (
            record["test_id"], record["predicted"], record["test_loss"])
        assert tests["record_file"][i] == f"{key[0]}/{key[1]}/{key[2]}.json"
    header = store.read_header(output_dir / "results.h5")
    assert header["mode"] == "same_label" and header["n_train"] == sum(TRAIN_CLASSES.values())
    assert header["fingerprint"] == record["settings"]["fingerprint"]
    assert header["versions"] == [record["versions"]]


def test_all_labels_store_has_one_row_per_test_image_over_the_training_set(workspace):
    output_dir = workspace / "all_labels"
    run_job(workspace, output_dir, all_labels=True)
    tables = score_tables(output_dir)
    with h5py.File(output_dir / "results.h5") as file:
        assert file.attrs["mode"] == "all_labels" and list(file["blocks"]) == ["all"]
        scores, train_ids = file["blocks/all/scores"][:], file["blocks/all/train_id"].asstr()[:]
        assert scores.shape == (len(ITEMS), sum(TRAIN_CLASSES.values()))
        assert list(file["blocks/all/train_label"][:]) == [0] * 6 + [1] * 5 + [2] * 6
        assert list(file["tests/block_row"][:]) == [0, 1, 2, 3]
    for row, key in enumerate(ITEMS):
        assert list(train_ids) == list(tables[key])
        assert np.array_equal(scores[row], np.array(list(tables[key].values())))


@pytest.fixture(scope="module")
def two_parts(workspace, tree):
    """The run's results as two shards' parts (what `--shard 0/2` and `--shard 1/2` write at their end)."""
    from influence import archive, plan, store

    output_dir, _ = tree
    sharded = copy_results(output_dir, workspace / "two_parts")
    with archive.open_train(workspace / "train.npz") as train, archive.open_test(workspace / "test.npz") as test:
        planned = plan.plan_work(test)
        for index in (0, 1):
            store.write_part(sharded, train=train, planned=planned, shard=(index, 2))
    return sharded


def test_two_parts_assemble_to_the_unsharded_store(workspace, tree, two_parts):
    output_dir, _ = tree
    result = collect(two_parts, workspace)
    assert result.returncode == 0, result.stderr
    assert "4 results, 0 failed, 0 missing, from 2 parts of 2" in result.stdout
    assert_same_h5(two_parts / "results.h5", output_dir / "results.h5")
    # Built straight from the records, without parts: the same table.
    records_only = copy_results(output_dir, workspace / "records_only")
    result = collect(records_only, workspace)
    assert result.returncode == 0, result.stderr
    assert "from the 4 records" in result.stdout and "no parts" in result.stdout
    assert_same_h5(records_only / "results.h5", output_dir / "results.h5")


def test_collect_refuses_a_part_computed_with_other_settings(workspace, two_parts):
    tree_copy = copy_results(two_parts, workspace / "other_settings", keep_store=True)
    before = (tree_copy / "results.h5").read_bytes()
    with h5py.File(tree_copy / "parts" / "shard-1-of-2.h5", "r+") as part:
        fingerprint = json.loads(part.attrs["fingerprint"])
        fingerprint["solver"]["depth"] = 7
        part.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    result = collect(tree_copy, workspace)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "shard-1-of-2.h5 was computed with other settings" in result.stderr
    assert "(solver.depth differ)" in result.stderr
    assert (tree_copy / "results.h5").read_bytes() == before


def test_collect_reports_missing_and_duplicated_test_images(workspace, tree, two_parts):
    tree_copy = copy_results(two_parts, workspace / "missing", keep_store=True)
    (tree_copy / "parts" / "shard-1-of-2.h5").unlink()  # shard 1/2 holds items 2 and 4 of the plan
    result = collect(tree_copy, workspace)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 of 4 planned test images have no result: orig/0/2, noisy/2/1 (shard 1/2)" in result.stderr
    result = collect(tree_copy, workspace, "--allow-missing")
    assert result.returncode == 0, result.stderr
    with h5py.File(tree_copy / "results.h5") as file:
        assert list(file["missing/folder"].asstr()[:]) == ["orig", "noisy"]
        assert list(file["tests/test_id"].asstr()[:]) == [records(two_parts)[key]["test_id"] for key in ITEMS[::2]]

    duplicated = copy_results(two_parts, workspace / "duplicated", keep_store=True)
    shutil.copy(duplicated / "parts" / "shard-0-of-2.h5", duplicated / "parts" / "shard-0-of-2-copy.h5")
    result = collect(duplicated, workspace)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 test images are in more than one part: orig/0/1, orig/1/1" in result.stderr

    # An unsharded rerun's part next to the two shards' parts: two jobs in one tree.
    mixed = copy_results(two_parts, workspace / "mixed", keep_store=True)
    shutil.copy(tree[0] / "parts" / "shard-0-of-1.h5", mixed / "parts")
    result = collect(mixed, workspace)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "belong to different jobs (split into 2 and 1 shards); remove the stale parts" in result.stderr


@pytest.fixture(scope="module")
def with_failure(workspace, tree):
    """The tree with one test image failed (a failure record, no figures or scores), collected."""
    from influence import results

    output_dir, _ = tree
    failed = copy_results(output_dir, workspace / "failed")
    files = results.item_files(failed, "orig", 0, 2, "png")
    record = json.loads(files.record.read_text())
    results.write_failure(files, reason="LiSSA diverged (norm 3e+12 at step 4)", record={
        key: record[key] for key in ("test_id", "folder", "label", "label_name", "number", "settings", "versions")})
    result = collect(failed, workspace)
    assert result.returncode == 0, result.stderr
    assert "3 results, 1 failed, 0 missing" in result.stdout
    return failed, record["test_id"]


def test_failed_test_images_are_listed(with_failure):
    output_dir, test_id = with_failure
    with h5py.File(output_dir / "results.h5") as file:
        assert list(file["failures/test_id"].asstr()[:]) == [test_id]
        assert list(file["failures/reason"].asstr()[:]) == ["LiSSA diverged (norm 3e+12 at step 4)"]
        assert list(file["blocks/orig/0/test_id"].asstr()[:]) == [records(output_dir)[("orig", 0, 1)]["test_id"]]
    front = (output_dir / "index.html").read_text()
    assert "LiSSA diverged (norm 3e+12 at step 4)" in front and test_id in front


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("href", "src"):
            if attrs.get(name) is not None:
                self.targets.append(attrs[name])
        if tag == "img":
            self.images.append(attrs)


def check_pages(output_dir: Path) -> dict[str, Links]:
    """Parse every page and follow every link and image: relative, inside the tree, on disk."""
    parsed = {}
    pages = [output_dir / "index.html", *sorted((output_dir / "html").glob("*.html"))]
    for page in pages:
        parser = Links()
        parser.feed(page.read_text())
        parser.close()
        for target in parser.targets:
            url = urlparse(target)
            assert not url.scheme and not url.netloc and not target.startswith("/"), (page, target)
            resolved = (page.parent / unquote(url.path)).resolve()
            assert resolved.is_file(), (page, target)
            assert resolved.is_relative_to(output_dir.resolve()), (page, target)
        parsed[page.name] = parser
    return parsed


def test_pages_link_only_to_files_of_the_tree_and_show_the_records_top_lists(workspace, tree, with_failure):
    from PIL import Image

    for output_dir in (tree[0], with_failure[0]):
        parsed = check_pages(output_dir)
        assert set(parsed) == {"index.html", "orig.html", "noisy.html"}
        front = parsed["index.html"].targets
        assert "html/orig.html" in front and "html/noisy.html" in front and "results.h5" in front
    output_dir = tree[0]
    page = (output_dir / "html" / "orig.html").read_text()
    links = check_pages(output_dir)["orig.html"].targets
    for key, record in records(output_dir).items():
        if key[0] != "orig":
            continue
        assert f"../{key[0]}/{key[1]}/harmful_{key[2]}.png" in links and f"../{key[0]}/{key[1]}/{key[2]}.json" in links
        # The page's harmful list, in order, is the record's (written by the run, not read from the store).
        section = page.split(f"<h3>{record['test_id']}</h3>")[1].split("</section>")[0]
        harmful_html, useful_html = section.split("Top 5 useful")
        shown = re.findall(r"alt=\"training image ([^\"]+)\"", harmful_html)
        assert shown == [row["id"] for row in record["harmful"]]
        assert re.findall(r"alt=\"training image ([^\"]+)\"", useful_html) == [row["id"] for row in record["useful"]]
        assert f"{record['harmful'][0]['score']:+.3g}" in harmful_html
    thumbnails = re.findall(r"<img class=\"thumb\" src=\"([^\"]+)\" alt=\"(?:training image )?([^\"]+)\"", page)
    assert len(thumbnails) == 3 * 11
    # Each thumbnail shows its image: compared with the generated file it was prepared from.
    first_test = records(output_dir)[ITEMS[0]]["test_id"]
    for source, (src, alt) in ((workspace / "orig" / first_test, thumbnails[0]),
                               (workspace / "train" / thumbnails[1][1], thumbnails[1])):
        with Image.open(output_dir / "html" / src) as thumbnail, Image.open(source) as original:
            assert np.array_equal(np.asarray(thumbnail.convert("RGB")), np.asarray(original.convert("RGB"))), alt


def test_the_documented_example_counts_the_records_top_five(tree, monkeypatch):
    """docs/results-store.md's example, run as written, against counts from the records."""
    output_dir, _ = tree
    text = (ROOT / "docs" / "results-store.md").read_text()
    example = re.search(r"<!-- example: top-harmful -->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(output_dir.parent)
    namespace = {}
    exec(compile(example, "results-store.md", "exec"), namespace)
    expected, expected_per_class = collections.Counter(), collections.defaultdict(collections.Counter)
    for (folder, label, _), record in records(output_dir).items():
        if folder == "orig":
            ids = [row["id"] for row in record["harmful"]]
            expected.update(ids)
            expected_per_class[label].update(ids)
    assert namespace["overall"] == expected
    assert namespace["per_class"] == expected_per_class
    assert sum(expected.values()) == 15
