"""One writer per output tree: the tree's settings claim, per-image claims (stale ones from
killed processes and other hosts), and results that rank nothing."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from influence import claims, results
from influence.errors import UserError

FINGERPRINT = {"solver": {"depth": 6, "seed": 0}, "model_sha256": ["ab"]}


def test_tree_of_other_settings_is_refused_and_overwrite_takes_it_over(tmp_path):
    claims.claim_tree(tmp_path, FINGERPRINT)
    claims.claim_tree(tmp_path, json.loads(json.dumps(FINGERPRINT)))  # same settings: shards share the tree
    other = {**FINGERPRINT, "solver": {"depth": 6, "seed": 1}}
    with pytest.raises(UserError, match=r"other settings \(solver\.seed differ\)"):
        claims.claim_tree(tmp_path, other)
    claims.check_tree(tmp_path, FINGERPRINT)
    claims.claim_tree(tmp_path, other, overwrite=True)
    with pytest.raises(UserError, match="took over"):  # the first run stops before its next image
        claims.check_tree(tmp_path, FINGERPRINT)


def test_an_image_is_claimed_by_one_process_at_a_time(tmp_path):
    record = tmp_path / "orig/0/1.json"
    first, _ = claims.claim_item(record)
    second, holder = claims.claim_item(record)
    assert first is not None and second is None
    assert holder["pid"] == os.getpid() and holder["host"] == claims._host()
    first.release()
    again, _ = claims.claim_item(record)
    assert again is not None


def _write_claim(path, **holder):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))


def test_claim_of_a_killed_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = tmp_path / "1.json"
    _write_claim(claims.claim_path(record), host=claims._host(), pid=dead.pid, since=time.time())
    claim, _ = claims.claim_item(record)
    assert claim is not None
    assert json.loads(claim.path.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.claim"]  # the stale one moved aside and gone


def test_claim_from_another_host_is_respected_until_it_is_old(tmp_path):
    record = tmp_path / "1.json"
    path = claims.claim_path(record)
    _write_claim(path, host="elsewhere", pid=1, since=time.time())
    claim, holder = claims.claim_item(record)
    assert claim is None and claims.describe(holder) == "process 1 on elsewhere"
    old = time.time() - claims.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    claim, _ = claims.claim_item(record)
    assert claim is not None


@pytest.mark.parametrize("scores, gradient_norm, reason", [
    (np.zeros(4), 0.0, "test gradient is zero"),
    (np.array([0.1, np.nan, 0.2]), 1.0, "1 of 3 scores are not finite"),
    (np.array([0.0, 0.0, -0.0]), 1.0, "every score is exactly zero"),
    (np.full(3, 0.25), 1.0, "every score equals 0.25"),
])
def test_degenerate_scores_are_named(scores, gradient_norm, reason):
    assert reason in results.degeneracy(scores, gradient_norm=gradient_norm)


def test_ordinary_scores_are_not_degenerate():
    assert results.degeneracy(np.array([0.1, -0.2, 0.0]), gradient_norm=1e-9) is None
    assert results.degeneracy(np.array([3.0]), gradient_norm=1.0) is None  # one training image
