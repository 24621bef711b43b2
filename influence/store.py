"""The consolidated results store: every score of an output tree in one HDF5 file.

The per-image files (:mod:`influence.results`) stay the primary output; this module gathers
them into ``<output_dir>/results.h5``, a columnar table that loads in one line::

    scores = h5py.File("calc_output/results.h5")["blocks/orig/0/scores"][:]  # (n_test, n_train_of_label)

Layout (``mode`` is ``same_label`` or ``all_labels``; strings are UTF-8, read them with
``.asstr()[:]``)::

    attrs       format, store_version, mode, n_train, fingerprint (JSON: the settings that decide
                the scores), settings (JSON), versions (JSON list), sign_convention
    tests/      one row per explained test image, in plan order (folder, label, number)
        folder, test_id, label_name, predicted_name, block       (n,) str
        label, number, archive_row, predicted, block_row          (n,) int64
        test_loss                                                 (n,) float64
        record_file, harmful_figure, useful_figure, score_file    (n,) str, relative to the tree
    blocks/<folder>/<label>/    same_label: the test images of one folder and label
    blocks/all/                 all_labels: every test image over the whole training set
        scores       (n_b, k_b) float64   score of training image j for test image i
        train_index  (k_b,) int64          position in the train archive
        train_id, train_label              (k_b,) str, int64
        test_id, test_row                  (n_b,) str, int64 (its row in tests/)
    failures/   folder, test_id, reason (str), label, number (int64): failed test images
    missing/    folder (str), label, number (int64): planned, no result (collect --allow-missing)

``tests/block`` names the group holding a test image's scores and ``tests/block_row`` its row
there. Sign convention: ``score = s_test . grad L(z)``; positive = useful, negative = harmful.

Sharded runs: at its end every run writes its part, ``<output_dir>/parts/shard-<i>-of-<n>.h5``
(the layout above plus ``plan/`` -- every planned item of the whole job -- and the attributes
``shard_index`` and ``shard_count``); :func:`assemble` checks the parts against each other and
the plan and writes ``results.h5``. A tree without parts (older runs) is assembled from its
per-image records. Every file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from influence import outputs, results
from influence.errors import UserError

STORE_NAME = "results.h5"
PARTS_DIR = "parts"
FORMAT = "influence-results"
STORE_VERSION = 1
SAME_LABEL, ALL_LABELS = "same_label", "all_labels"
ALL_BLOCK = "all"
DONE, FAILED, MISSING = "done", "failed", "missing"
_FILE_COLUMNS = ("record_file", "harmful_figure", "useful_figure", "score_file")


def store_path(output_dir) -> Path:
    return Path(output_dir) / STORE_NAME


def part_path(output_dir, index: int, count: int) -> Path:
    return Path(output_dir) / PARTS_DIR / f"shard-{index}-of-{count}.h5"


# --------------------------------------------------------------------------- what is gathered


@dataclass
class Outcome:
    """One planned test image: its result, its failure, or nothing yet."""

    folder: str
    label: int
    number: int
    status: str  # DONE, FAILED or MISSING
    archive_row: int = -1
    test_id: str = ""
    reason: str = ""
    label_name: str = ""
    predicted: int = -1
    predicted_name: str = ""
    test_loss: float = float("nan")
    files: tuple[str, str, str, str] = ("", "", "", "")  # _FILE_COLUMNS, relative to the tree
    # () -> (training indices (k,) int64 ascending, scores (k,) float64)
    load: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.folder, self.label, self.number)


@dataclass
class Header:
    fingerprint: dict | None
    settings: dict = field(default_factory=dict)
    versions: list = field(default_factory=list)  # distinct version dicts

    @property
    def mode(self) -> str:
        return ALL_LABELS if ((self.fingerprint or {}).get("scoring") or {}).get("all_labels") else SAME_LABEL


def _name(key: tuple[str, int, int]) -> str:
    return f"{key[0]}/{key[1]}/{key[2]}"


def _listing(keys: list, limit: int = 5) -> str:
    shown = ", ".join(_name(key) for key in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


class _TrainingIds:
    """Training ids -> positions in the train archive (the score tables name images by id)."""

    def __init__(self, train):
        self.train = train
        self._position: dict[str, int] | None = None

    def indices(self, ids: np.ndarray, expected: np.ndarray) -> np.ndarray:
        all_ids = self.train.ids
        if len(ids) == len(expected) and np.array_equal(all_ids[expected], ids):
            return expected  # the usual case: scored in archive order
        if self._position is None:
            self._position = {str(image_id): i for i, image_id in enumerate(all_ids)}
        unknown = [str(image_id) for image_id in ids if str(image_id) not in self._position]
        if unknown:
            raise UserError(
                f"the results name training image {unknown[0]!r}, which is not in {self.train.path}; "
                f"give the train archive the run used (--train)"
            )
        return np.array([self._position[str(image_id)] for image_id in ids], dtype=np.int64)


def _record_outcome(output_dir: Path, key, archive_row: int, *, train, lookup: _TrainingIds) -> tuple[Outcome, dict | None]:
    """The outcome of one item from its per-image files, and its record (None when absent)."""
    folder, label, number = key
    files = results.item_files(output_dir, folder, label, number, "png")
    record = results.read_record(files)
    if record is None:
        return Outcome(folder, label, number, MISSING, archive_row), None
    files = results.item_files(output_dir, folder, label, number, results.record_save_format(record))
    relative = lambda path: path.relative_to(output_dir).as_posix()  # noqa: E731
    common = dict(archive_row=archive_row, test_id=str(record.get("test_id") or ""))
    reason = results.failure_reason(record)
    if reason is not None:
        return Outcome(folder, label, number, FAILED, reason=reason, files=(relative(files.record), "", "", ""),
                       **common), record
    if not results.results_present(files):
        return Outcome(folder, label, number, MISSING, archive_row), None
    all_labels = bool(((results.record_fingerprint(record) or {}).get("scoring") or {}).get("all_labels"))

    def load():
        ids, scores = results.read_score_table(files)
        expected = np.arange(len(train), dtype=np.int64) if all_labels else train.label_indices(label)
        indices = lookup.indices(ids, expected)
        order = np.argsort(indices, kind="stable")
        return indices[order], scores[order]

    return Outcome(
        folder, label, number, DONE,
        label_name=str(record.get("label_name") or ""), predicted=int(record["predicted"]),
        predicted_name=str(record.get("predicted_name") or ""), test_loss=float(record["test_loss"]),
        files=tuple(relative(path) for path in (files.record, files.harmful, files.useful, files.scores)),
        load=load, **common,
    ), record


def _gather_records(output_dir: Path, keys_rows: list[tuple[tuple, int]], *, train) -> tuple[Header, list[Outcome]]:
    """Outcomes of ``keys_rows`` from the per-image files; every record must share one fingerprint."""
    lookup = _TrainingIds(train)
    outcomes, header, first_path, settings_from_failure = [], None, None, False
    versions: dict[str, dict] = {}
    for key, archive_row in keys_rows:
        outcome, record = _record_outcome(output_dir, key, archive_row, train=train, lookup=lookup)
        outcomes.append(outcome)
        if record is None:
            continue
        fingerprint = results.record_fingerprint(record)
        if fingerprint is None and outcome.status == FAILED:
            continue  # a failure recorded before the settings were known
        if header is None:
            header, first_path = Header(fingerprint), _name(key)
        elif fingerprint != header.fingerprint:
            from influence.plan import _differences

            raise UserError(
                f"{output_dir} mixes results of different settings: {_name(key)} and {first_path} differ in "
                f"{', '.join(_differences(header.fingerprint or {}, fingerprint or {}))}"
            )
        if not header.settings or (outcome.status == DONE and settings_from_failure):
            # A result's settings name the model and solver it used; a failure's, only the knobs.
            header.settings, settings_from_failure = record.get("settings") or {}, outcome.status != DONE
        if record.get("versions"):
            versions[json.dumps(record["versions"], sort_keys=True)] = record["versions"]
    header = header or Header(None)
    header.versions = [versions[text] for text in sorted(versions)]
    return header, outcomes


# --------------------------------------------------------------------------- writing


def _strings(values: Iterable) -> np.ndarray:
    import h5py

    return np.array([str(value) for value in values], dtype=h5py.string_dtype())


def _write_store(path: Path, *, header: Header, outcomes: list[Outcome], train,
                 plan_keys: list | None = None, shard: tuple[int, int] | None = None) -> Path:
    """Write ``outcomes`` (in plan order) as a store (or, with ``plan_keys`` and ``shard``, a part)."""
    import h5py

    done = [outcome for outcome in outcomes if outcome.status == DONE]
    mode = header.mode
    blocks: dict[str, list[int]] = {}
    for position, outcome in enumerate(done):
        name = ALL_BLOCK if mode == ALL_LABELS else f"{outcome.folder}/{outcome.label}"
        blocks.setdefault(name, []).append(position)
    block_of, row_of = [""] * len(done), [0] * len(done)
    for name, members in blocks.items():
        for row, position in enumerate(members):
            block_of[position], row_of[position] = f"blocks/{name}", row

    with outputs.atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as store:
            store.attrs.update({
                "format": FORMAT, "store_version": STORE_VERSION, "mode": mode, "n_train": len(train),
                "fingerprint": json.dumps(header.fingerprint, sort_keys=True),
                "settings": json.dumps(header.settings, sort_keys=True),
                "versions": json.dumps(header.versions, sort_keys=True),
                "sign_convention": results.SIGN_CONVENTION,
            })
            tests = store.create_group("tests")
            for column in ("folder", "test_id", "label_name", "predicted_name"):
                tests[column] = _strings(getattr(outcome, column) for outcome in done)
            for column in ("label", "number", "archive_row", "predicted"):
                tests[column] = np.array([getattr(outcome, column) for outcome in done], dtype=np.int64)
            tests["test_loss"] = np.array([outcome.test_loss for outcome in done], dtype=np.float64)
            tests["block"] = _strings(block_of)
            tests["block_row"] = np.array(row_of, dtype=np.int64)
            for column_index, column in enumerate(_FILE_COLUMNS):
                tests[column] = _strings(outcome.files[column_index] for outcome in done)

            for name, members in blocks.items():
                _write_block(store.create_group(f"blocks/{name}"), [done[p] for p in members], members, train)

            failed = [outcome for outcome in outcomes if outcome.status == FAILED]
            missing = [outcome for outcome in outcomes if outcome.status == MISSING]
            for group_name, rows in (("failures", failed), ("missing", missing)):
                group = store.create_group(group_name)
                group["folder"] = _strings(outcome.folder for outcome in rows)
                group["label"] = np.array([outcome.label for outcome in rows], dtype=np.int64)
                group["number"] = np.array([outcome.number for outcome in rows], dtype=np.int64)
                if group_name == "failures":
                    group["test_id"] = _strings(outcome.test_id for outcome in rows)
                    group["reason"] = _strings(outcome.reason for outcome in rows)
                    group["record_file"] = _strings(outcome.files[0] for outcome in rows)
            if plan_keys is not None:
                planned = store.create_group("plan")
                planned["folder"] = _strings(key[0] for key in plan_keys)
                planned["label"] = np.array([key[1] for key in plan_keys], dtype=np.int64)
                planned["number"] = np.array([key[2] for key in plan_keys], dtype=np.int64)
                planned["archive_row"] = np.array([key[3] for key in plan_keys], dtype=np.int64)
                store.attrs["shard_index"], store.attrs["shard_count"] = shard
    return path


def _write_block(group, members: list[Outcome], test_rows: list[int], train) -> None:
    scores = None
    for row, outcome in enumerate(members):
        indices, row_scores = outcome.load()
        if scores is None:
            first, first_indices = outcome, indices
            scores = group.create_dataset("scores", shape=(len(members), len(indices)), dtype=np.float64)
            group["train_index"] = indices
            group["train_id"] = _strings(train.ids[indices])
            group["train_label"] = np.asarray(train.labels[indices], dtype=np.int64)
        elif not np.array_equal(indices, first_indices):
            raise UserError(
                f"{_name(outcome.key)} scored other training images than {_name(first.key)} "
                f"({len(indices)} vs {len(first_indices)}); recompute one of them with --overwrite"
            )
        scores[row] = row_scores
    group["test_id"] = _strings(outcome.test_id for outcome in members)
    group["test_row"] = np.asarray(test_rows, dtype=np.int64)


def write_part(output_dir, *, train, planned: list, shard: tuple[int, int] = (0, 1)) -> Path:
    """Write this shard's part from its per-image files: ``planned`` is the whole job's plan
    (:class:`influence.plan.WorkItem` list), ``shard`` its ``(index, count)``."""
    output_dir = Path(output_dir)
    index, count = shard
    mine = planned[index::count]
    header, outcomes = _gather_records(
        output_dir, [((item.folder, item.label, item.number), item.row) for item in mine], train=train
    )
    plan_keys = [(item.folder, item.label, item.number, item.row) for item in planned]
    return _write_store(part_path(output_dir, index, count), header=header, outcomes=outcomes, train=train,
                        plan_keys=plan_keys, shard=shard)


# --------------------------------------------------------------------------- reading


def _decoded(dataset) -> np.ndarray:
    return dataset.asstr()[:] if dataset.dtype.kind == "O" else dataset[:]


def read_table(path, name: str = "tests") -> dict[str, np.ndarray]:
    """One table of a store (``tests``, ``failures``, ``missing``) as ``{column: array}``, strings
    decoded: ``pandas.DataFrame(read_table(path))`` gives a data frame."""
    import h5py

    with h5py.File(path, "r") as store:
        return {column: _decoded(dataset) for column, dataset in store[name].items()}


def read_header(path) -> dict:
    """The store's attributes, JSON ones parsed."""
    import h5py

    with h5py.File(path, "r") as store:
        attrs = dict(store.attrs)
    for name in ("fingerprint", "settings", "versions"):
        attrs[name] = json.loads(attrs[name])
    return {name: value.item() if isinstance(value, np.generic) else value for name, value in attrs.items()}


@dataclass
class Ranking:
    """The top training images of every test image (rows of ``tests/``)."""

    harmful_index: np.ndarray  # (n, top) int64 train archive positions, most harmful first
    harmful_score: np.ndarray  # (n, top) float64
    useful_index: np.ndarray  # (n, top) most useful first
    useful_score: np.ndarray


def rank(path, top: int) -> Ranking:
    """Top ``top`` harmful and useful training images of every test image in the store, by
    :func:`influence.results.ranked` (the order of the figures)."""
    import h5py

    with h5py.File(path, "r") as store:
        n = len(store["tests/test_id"])
        k = min([top] + [store[f"{name}/scores"].shape[1] for name in set(_decoded(store["tests/block"]))])
        out = Ranking(*(np.zeros((n, k), dtype) for dtype in (np.int64, np.float64, np.int64, np.float64)))
        for name in dict.fromkeys(_decoded(store["tests/block"])):
            block = store[name]
            train_index = block["train_index"][:]
            for row, test_row in enumerate(block["test_row"][:]):
                scores = block["scores"][row]
                harmful, useful = results.ranked(scores, k)
                out.harmful_index[test_row], out.harmful_score[test_row] = train_index[harmful], scores[harmful]
                out.useful_index[test_row], out.useful_score[test_row] = train_index[useful], scores[useful]
    return out


@dataclass
class _Part:
    path: Path
    header: Header
    shard: tuple[int, int]
    plan: list[tuple[tuple[str, int, int], int]]  # (key, archive_row)
    outcomes: list[Outcome]


def _read_part(path: Path, output_dir: Path) -> _Part:
    import h5py

    try:
        with h5py.File(path, "r") as part:
            if part.attrs.get("format") != FORMAT or "plan" not in part:
                raise UserError(f"{path} is not a part of a results store; remove it from {path.parent}")
            attrs = part.attrs
            header = Header(json.loads(attrs["fingerprint"]), json.loads(attrs["settings"]),
                            json.loads(attrs["versions"]))
            shard = (int(attrs["shard_index"]), int(attrs["shard_count"]))
            plan = [((folder, int(label), int(number)), int(row)) for folder, label, number, row in zip(
                _decoded(part["plan/folder"]), part["plan/label"][:], part["plan/number"][:],
                part["plan/archive_row"][:])]
            tests = {column: _decoded(dataset) for column, dataset in part["tests"].items()}
            failures = {column: _decoded(dataset) for column, dataset in part["failures"].items()}
    except OSError as error:
        raise UserError(f"{path} is unreadable ({error}); rerun its shard to write it again") from None
    outcomes = []
    for i in range(len(tests["test_id"])):
        block, row = str(tests["block"][i]), int(tests["block_row"][i])

        def load(block=block, row=row):
            with h5py.File(path, "r") as part:
                return part[block]["train_index"][:], part[block]["scores"][row]

        outcomes.append(Outcome(
            str(tests["folder"][i]), int(tests["label"][i]), int(tests["number"][i]), DONE,
            archive_row=int(tests["archive_row"][i]), test_id=str(tests["test_id"][i]),
            label_name=str(tests["label_name"][i]), predicted=int(tests["predicted"][i]),
            predicted_name=str(tests["predicted_name"][i]), test_loss=float(tests["test_loss"][i]),
            files=tuple(str(tests[column][i]) for column in _FILE_COLUMNS), load=load,
        ))
    rows = {key: row for key, row in plan}
    for i in range(len(failures["test_id"])):
        key = (str(failures["folder"][i]), int(failures["label"][i]), int(failures["number"][i]))
        outcomes.append(Outcome(*key, FAILED, archive_row=rows.get(key, -1), test_id=str(failures["test_id"][i]),
                                reason=str(failures["reason"][i]), files=(str(failures["record_file"][i]), "", "", "")))
    return _Part(path, header, shard, plan, outcomes)


# --------------------------------------------------------------------------- assembling


def assemble(output_dir, *, train, test=None, allow_missing: bool = False, from_records: bool = False,
             echo: Callable[..., None] = print) -> Path:
    """Write ``<output_dir>/results.h5`` from the tree's parts, or from its per-image records when
    it has no parts (or ``from_records``).

    Parts must share one settings fingerprint and one plan; every planned test image must be in
    exactly one part (``allow_missing`` lists the absent ones in ``missing/`` instead of refusing).
    Built from records, the store holds every record of the tree, in the test archive's order
    (``test`` given) -- without a plan, nothing can be found missing.
    """
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob(f"{PARTS_DIR}/*.h5"))
    if parts and not from_records:
        header, outcomes, summary = _from_parts([_read_part(path, output_dir) for path in parts], allow_missing)
    else:
        keys = results.recorded_items(output_dir)
        if not keys:
            raise UserError(f"{output_dir} holds no results of calculate.py (no <folder>/<label>/<n>.json)")
        rows = {}
        if test is not None:
            from influence import plan

            rows = {(item.folder, item.label, item.number): item.row for item in plan.plan_work(test)}
            order = {key: position for position, key in enumerate(rows)}
            keys.sort(key=lambda key: order.get(key, len(order)))
        header, outcomes = _gather_records(output_dir, [(key, rows.get(key, -1)) for key in keys], train=train)
        outcomes = [outcome for outcome in outcomes if outcome.status != MISSING]
        summary = (f"from the {len(outcomes)} records in {output_dir} "
                   f"({'no parts' if not parts else 'parts ignored'}: missing test images cannot be detected)")
    path = _write_store(store_path(output_dir), header=header, outcomes=outcomes, train=train)
    counts = {status: sum(outcome.status == status for outcome in outcomes) for status in (DONE, FAILED, MISSING)}
    echo(f"{counts[DONE]} results, {counts[FAILED]} failed, {counts[MISSING]} missing, {summary} -> {path}")
    return path


def _from_parts(parts: list[_Part], allow_missing: bool) -> tuple[Header, list[Outcome], str]:
    from influence.plan import _differences

    first = parts[0]
    for part in parts[1:]:
        if part.header.fingerprint != first.header.fingerprint:
            changed = _differences(first.header.fingerprint or {}, part.header.fingerprint or {})
            raise UserError(
                f"{part.path} was computed with other settings than {first.path} ({', '.join(changed)} differ); "
                f"remove the stale part or recompute its shard with the same settings"
            )
        if part.plan != first.plan or part.shard[1] != first.shard[1]:
            why = "their plans differ" if part.plan != first.plan else (
                f"split into {part.shard[1]} and {first.shard[1]} shards")
            raise UserError(
                f"{part.path.name} and {first.path.name} in {part.path.parent} belong to different jobs ({why}); "
                f"remove the stale parts"
            )
    found: dict[tuple, list[Path]] = {}
    by_key: dict[tuple, Outcome] = {}
    for part in parts:
        for outcome in part.outcomes:
            found.setdefault(outcome.key, []).append(part.path)
            by_key[outcome.key] = outcome
    duplicated = [key for key, paths in found.items() if len(paths) > 1]
    if duplicated:
        raise UserError(
            f"{len(duplicated)} test images are in more than one part: {_listing(duplicated)} "
            f"(in {', '.join(path.name for path in found[duplicated[0]])}); remove the extra part"
        )
    planned = [key for key, _ in first.plan]
    position = {key: i for i, key in enumerate(planned)}
    unplanned = [key for key in found if key not in position]
    if unplanned:
        raise UserError(f"{len(unplanned)} test images in the parts are not in their plan: {_listing(unplanned)}")
    count = first.shard[1]
    missing = [key for key in planned if key not in by_key]
    if missing and not allow_missing:
        shards = sorted({position[key] % count for key in missing})
        raise UserError(
            f"{len(missing)} of {len(planned)} planned test images have no result: {_listing(missing)} "
            f"(shard {', '.join(f'{i}/{count}' for i in shards)}); run or finish those shards, "
            f"or assemble what is there with collect.py --allow-missing"
        )
    rows = dict(first.plan)
    outcomes = [by_key.get(key) or Outcome(*key, MISSING, archive_row=rows[key]) for key in planned]
    header = Header(first.header.fingerprint)
    for part in sorted(parts, key=lambda part: part.shard):
        if part.header.settings:
            header.settings = part.header.settings
            break
    versions = {json.dumps(v, sort_keys=True): v for part in parts for v in part.header.versions}
    header.versions = [versions[text] for text in sorted(versions)]
    return header, outcomes, f"from {len(parts)} part{'s' if len(parts) > 1 else ''} of {count}"


def finish_run(output_dir, *, train, test, planned: list, shard: tuple[int, int] = (0, 1), top: int = 5,
               echo: Callable[..., None] = print) -> Path | None:
    """At the end of a run: write its part, then, once every shard's part is there, assemble
    ``results.h5`` and rebuild the pages. Returns the front page, or None when the store was not
    assembled (another shard still runs, say: the line echoed says why)."""
    from influence import pages

    try:
        part = write_part(output_dir, train=train, planned=planned, shard=shard)
        echo(f"Results of shard {shard[0]}/{shard[1]} for {STORE_NAME} -> {part}")
        assemble(output_dir, train=train, test=test, echo=echo)
        front = pages.build(output_dir, train=train, test=test, top=top)
    except (UserError, OSError) as error:
        # The per-image results are written and stay valid: say why the table is not, never fail the run.
        echo(f"{STORE_NAME} and the pages not rebuilt: {error}")
        return None
    echo(f"Browse the results: {front}")
    return front
