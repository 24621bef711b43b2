"""The batch job behind ``calculate.py``, top to bottom.

1. open the archives and check them against each other and the selection;
2. load the classifier and check it against the archives;
3. plan the work (:mod:`influence.plan`) and skip what a previous run completed;
4. prepare the engine once (:func:`influence.explain.prepare_engine`);
5. for each group of test images that score the same training images: solve each one's
   ``s_test`` (:func:`influence.explain.solve`), score them all in one pass over the training
   images (:func:`influence.explain.score`), and write each one's figures, score table and
   record (:mod:`influence.results`), the record last.

Every check on the input happens before the first Hessian-vector product, and a killed run
resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from influence import claims, outputs, plan, results
from influence.errors import ItemFailed, UserError
from influence.figures import Panel
from influence.settings import Settings


@dataclass
class Summary:
    computed: int = 0
    skipped: int = 0
    planned: int = 0
    recomputed: int = 0  # outputs that described another test image or training archive
    elsewhere: int = 0  # claimed by another process sharing the tree
    degenerate: list = field(default_factory=list)  # "folder/label/#n: reason", no ranking drawn
    output_dir: Path = field(default_factory=Path)
    failed: list[tuple[plan.WorkItem, str]] = field(default_factory=list)  # (item, reason)
    diagnostics: list[dict] = field(default_factory=list)  # the solver's, per computed test image


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def calculate(
    *,
    train_path: Path,
    test_path: Path,
    output_dir: Path,
    settings: Settings,
    model_path: Path | None = None,
    weights: Path | None = None,
    preprocess: str | None = None,
    model_outputs: str = "auto",
    folders: list[str] | None = None,
    labels: list[int] | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    retry_failed: bool = True,
    echo: Callable[..., None] = print,
) -> Summary:
    """Run the whole job; every check on the input happens before the first solve."""
    from influence import archive

    started = time.perf_counter()
    shard_index, shard_count = plan.parse_shard(shard)
    output_dir = Path(output_dir)
    with archive.open_train(train_path) as train, archive.open_test(test_path) as test:
        if tuple(train.image_size) != tuple(test.image_size):
            raise UserError(
                f"{test_path} holds {archive.format_image_size(test.image_size)} images but {train_path} holds "
                f"{archive.format_image_size(train.image_size)}; prepare both at the same --image-size"
            )
        archive.check_pairing(train, test)  # the test labels mean the train archive's classes
        planned = plan.plan_work(test, folders=folders, labels=labels)
        items = plan.select_shard(planned, shard_index, shard_count)
        names = archive.class_names(train, test)
        if not settings.scoring.all_labels:
            for label in sorted({item.label for item in items}):
                if len(train.label_indices(label)) == 0:
                    raise UserError(
                        f"no training images with label {label} ({names.get(label) or 'unnamed'}) "
                        f"in {train_path}; score the whole training set with --all-labels, or leave it out with --labels"
                    )
        outputs.check_writable_dir(output_dir)

        from influence import explain, imagenet, models  # TensorFlow is imported from here on

        loaded = models.load_classifier(model_path=model_path, weights=weights, preprocess=preprocess,
                                        outputs=model_outputs)
        models.check_image_size(loaded, train.image_size)
        highest = max([int(np.max(train.labels))] + [item.label for item in items])
        if highest >= loaded.num_classes:
            raise UserError(
                f"label {highest} is out of range for {loaded.description}, which has {loaded.num_classes} outputs"
            )
        if loaded.is_imagenet:
            names = {**imagenet.names(), **names}
        fingerprint = {
            **settings.fingerprint(),
            "model_sha256": sorted(loaded.files.values()),  # the model file and any weights file
            "preprocess": loaded.preprocess_name,
            "outputs": "logits" if loaded.from_logits else "probabilities",  # what the loss was computed from
        }
        from influence import params

        scoring = settings.scoring  # a bad layer selection fails before the tree is claimed
        params.select(loaded.model, layers=list(scoring.layers) if scoring.layers else None, last=scoring.last_layers)
        save_format = settings.presentation.save_format
        with _writing(output_dir):
            claims.claim_tree(output_dir, fingerprint, overwrite=overwrite)
        identity = _identities(train, test)
        mismatched: list = []
        todo = plan.pending_items(output_dir, items, save_format, fingerprint, overwrite=overwrite,
                                  identity=identity, mismatched=mismatched, retry_failed=retry_failed)
        summary = Summary(planned=len(items), skipped=len(items) - len(todo), recomputed=len(mismatched),
                          output_dir=output_dir)
        if summary.skipped:
            echo(f"{summary.skipped} of {len(items)} test images already complete in {output_dir}; skipping them")
        if mismatched:
            item, record = mismatched[0]
            echo(f"{len(mismatched)} earlier outputs describe other test images or another training archive "
                 f"(e.g. {item.folder}/{item.label}/{item.number}.json was computed for "
                 f"{record.get('test_id', 'an unrecorded image')}); computing them again")
        with warnings.catch_warnings():
            # resolve_damping echoes an indefinite damping as a WARNING line; the same Python
            # warning on stderr would repeat it with a source line.
            from influence.solvers import DampingWarning

            warnings.simplefilter("ignore", DampingWarning)
            engine = explain.prepare_engine(train, loaded, settings, echo) if todo else None
        test_sets = {name: test.folder(name) for name in {item.folder for item in todo}}
        failing = dict(output_dir=output_dir, test_sets=test_sets, engine=engine, settings=settings,
                       fingerprint=fingerprint, identity=identity, names=names, summary=summary, echo=echo)
        subset = None
        for group in _groups(todo, settings, explain.group_size(engine, settings) if todo else 1):
            held = _claim_group(group, output_dir=output_dir, save_format=save_format, fingerprint=fingerprint,
                                identity=identity, overwrite=overwrite, summary=summary, echo=echo)
            try:
                group = [item for item in group if item in held]
                if not group:
                    continue
                if subset is None or subset.key != explain.subset_key(group[0], settings):
                    subset = explain.load_label_subset(train, group[0], settings, echo)
                solved = []
                for item in group:
                    echo(f"Test image #{item.number} in process")
                    try:
                        solved.append(explain.solve(item=item, image=_test_image(test_sets[item.folder], item),
                                                    engine=engine, settings=settings))
                    except ItemFailed as failure:
                        _fail(item, failure, **failing)
                        held.pop(item).release()
                if not solved:
                    continue
                explained = explain.score(solved, train=train, subset=subset, engine=engine, settings=settings)
                for done, explanation in zip(solved, explained):
                    item = done.item
                    if isinstance(explanation, ItemFailed):
                        _fail(item, explanation, **failing)
                        held.pop(item).release()
                        continue
                    files = item.files(output_dir, save_format)
                    with _writing(output_dir):
                        outputs.remove_stale_temporaries(files.directory)
                        claims.check_tree(output_dir, fingerprint)
                        degenerate = _write(files, item, str(test_sets[item.folder].ids[item.row]), explanation,
                                            train=train, engine=engine, loaded=loaded, settings=settings,
                                            fingerprint=fingerprint, identity=identity(item), names=names, echo=echo)
                    held.pop(item).release()  # at once: a kill later in the group leaves no claim on it
                    summary.computed += 1
                    summary.diagnostics.append(explanation.diagnostics)
                    if degenerate:
                        summary.degenerate.append(f"{item.folder}/{item.label}/#{item.number}: {degenerate}")
            finally:
                for claim in held.values():
                    claim.release()

        # The consolidated store and the pages (influence.store, influence.pages).
        from influence import store

        store.finish_run(output_dir, train=train, test=test, planned=planned, shard=(shard_index, shard_count),
                         top=settings.presentation.top, echo=echo)
    others = f", {summary.elsewhere} left to other processes" if summary.elsewhere else ""
    echo(
        f"Done: {summary.computed} test images computed, {len(summary.failed)} failed, "
        f"{summary.skipped} already complete{others}, of {summary.planned} in this shard "
        f"({time.perf_counter() - started:.0f} s) -> {output_dir}"
    )
    if summary.diagnostics:
        from influence import solvers

        _, advice = solvers.run_summary(summary.diagnostics)
        echo(f"Trust: {advice}")
    if summary.failed:
        echo(f"{len(summary.failed)} test images failed; their records say why, and a rerun of the same "
             f"command retries them (and only them):")
        for item, reason in summary.failed:
            echo(f"  {item.folder}/{item.label}/{item.number}.json: {reason}")
    if summary.degenerate:
        echo(f"No ranking for {len(summary.degenerate)} test images (see 'degenerate' in their records):")
        for line in summary.degenerate:
            echo(f"  {line}")
    return summary


def _groups(items: list[plan.WorkItem], settings: Settings, size: int) -> list[list[plan.WorkItem]]:
    """Consecutive items that score the same training images, ``size`` at most per group."""
    from influence import explain

    groups: list[list[plan.WorkItem]] = []
    for item in items:
        if groups and len(groups[-1]) < size and (
                explain.subset_key(groups[-1][0], settings) == explain.subset_key(item, settings)):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _claim_group(group, *, output_dir, save_format, fingerprint, identity, overwrite, summary, echo) -> dict:
    """{item: claim} for the items of ``group`` this process may compute (:mod:`influence.claims`):
    not claimed by another process, and not completed by one since the plan was made."""
    held = {}
    try:
        with _writing(output_dir):
            claims.check_tree(output_dir, fingerprint)
            for item in group:
                files = item.files(output_dir, save_format)
                claim, holder = claims.claim_item(files.record)
                if claim is None:
                    echo(f"Test image #{item.number} of {item.folder}/{item.label} is being computed by "
                         f"{claims.describe(holder)}; skipping it")
                    summary.elsewhere += 1
                    continue
                held[item] = claim
                record = results.read_record(files)
                if (not overwrite and record is not None and record.get("identity") == identity(item)
                        and not results.is_failure(record) and results.results_present(files)):
                    held.pop(item).release()
                    summary.skipped += 1
    except BaseException:  # a write error or a signal while claiming: give back what this group took
        for claim in held.values():
            claim.release()
        raise
    return held


def _fail(item, failure, *, output_dir, test_sets, engine, settings, fingerprint, identity, names, summary,
          echo) -> None:
    """Record why a test image failed, in place of its results, and go on."""
    files = item.files(output_dir, settings.presentation.save_format)
    with _writing(output_dir):
        claims.check_tree(output_dir, fingerprint)
        results.write_failure(files, reason=str(failure), record={
            "identity": identity(item),
            **_identity(item, str(test_sets[item.folder].ids[item.row]), names),
            "settings": {**settings.as_dict(), "fingerprint": fingerprint},
            "solver": {"method": engine.prepared.name, **engine.prepared.diagnostics},
            "versions": versions(),
        })
    summary.failed.append((item, str(failure)))
    echo(f"Test image #{item.number} failed: {failure}")


def _test_image(test_set, item) -> np.ndarray:
    """(H, W, 3) uint8; an unreadable pixel buffer fails this test image only."""
    try:
        return np.array(test_set.images[item.row])
    except (OSError, ValueError) as error:
        raise ItemFailed(f"cannot read the test image: {error}") from error


def _identity(item, test_id: str, names: dict) -> dict:
    return {"test_id": test_id, "folder": item.folder, "label": item.label, "label_name": names.get(item.label),
            "number": item.number}


@contextlib.contextmanager
def _writing(output_dir: Path):
    """A failed write (disk full, a read-only folder) is one line; finished test images stay."""
    try:
        yield
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        raise UserError(f"cannot write into {output_dir}: {where}{error.strerror or error}; the test images "
                        f"completed so far are kept") from None


def _identities(train, test) -> Callable[[plan.WorkItem], dict]:
    """``identity(item)``: what a result is for (the test image's id, label and pixels, and the
    training archive), recorded with it and compared on resume (:func:`plan.pending_items`)."""
    train_fingerprint = train.content_fingerprint
    cache: dict = {}

    def identity(item: plan.WorkItem) -> dict:
        if item not in cache:
            test_set = test.folder(item.folder)
            try:
                pixels = np.ascontiguousarray(test_set.images[item.row])  # (H, W, 3) uint8
                image_sha256 = hashlib.sha256(pixels.tobytes()).hexdigest()
            except (OSError, ValueError):  # unreadable: the item fails when computed, and says why
                image_sha256 = None
            cache[item] = {
                "test_id": str(test_set.ids[item.row]),
                "label": item.label,
                "image_sha256": image_sha256,
                "train_archive": train_fingerprint,
            }
        return cache[item]

    return identity


def _write(files, item, test_id, explanation, *, train, engine, loaded, settings, fingerprint, identity, names,
           echo) -> str | None:
    """One test image's figures, score table and record; returns why it has no ranking, if so."""
    ids = train.ids[explanation.indices]
    train_labels = train.labels[explanation.indices]
    degenerate = results.degeneracy(explanation.scores, gradient_norm=explanation.gradient_norm)
    if degenerate:
        harmful, useful = np.zeros(0, np.int64), np.zeros(0, np.int64)
    else:
        harmful, useful = results.ranked(explanation.scores, settings.presentation.top)

    def rows(positions):
        return [results.TrainingRow(image=train.read(explanation.indices[r:r + 1])[0], id=str(ids[r]),
                                    label=int(train_labels[r]), score=float(explanation.scores[r]))
                for r in positions]

    label_name, predicted_name = names.get(item.label), names.get(explanation.predicted)
    test_panel = Panel(
        explanation.image,
        f"{item.folder}/{test_id}\nlabel {item.label}" + (f" ({label_name})" if label_name else "")
        + f"\npredicted {explanation.predicted}" + (f" ({predicted_name})" if predicted_name else ""),
    )
    record = {
        "identity": identity,
        "degenerate": degenerate,
        "test_gradient_norm": explanation.gradient_norm,
        **_identity(item, test_id, names),
        "predicted": explanation.predicted,
        "predicted_name": predicted_name,
        "test_loss": explanation.test_loss,
        "n_train": len(train),
        "n_scored": len(explanation.indices),
        "settings": {
            **settings.as_dict(),
            "hvp_form": engine.hvp_form,
            "parameters": engine.parameters,
            # Where the training images' features came from (None: the whole model ran on the images).
            "feature_cache": None if engine.features is None else {
                "path": str(engine.features.path), "cut": engine.features.key.get("cut"),
                "dtype": str(engine.features.stored_dtype)},
            "model": loaded.description,
            "model_source": str(loaded.source) if loaded.source else None,
            "model_sha256": loaded.sha256,
            "preprocess": loaded.preprocess_name,
            "fingerprint": fingerprint,
        },
        "solver": {"method": engine.prepared.name, **engine.prepared.diagnostics, **explanation.diagnostics},
        "versions": versions(),
    }
    top = len(harmful)
    harmful_rows, useful_rows = rows(harmful), rows(useful)
    trust = _trust(explanation.diagnostics)
    results.write_item(
        files,
        heading=f"Top {top} {{kind}} training images for {item.folder} label {item.label}, test image #{item.number}"
        + (f"\n{trust.upper()}" if trust.startswith("unstable") or "not converged" in trust else ""),
        test_panel=test_panel, harmful=harmful_rows, useful=useful_rows,
        score_table={str(i): float(s) for i, s in zip(ids, explanation.scores)},
        record={**record, "timings": {name: round(seconds, 4) for name, seconds in explanation.timings.items()}},
    )
    if degenerate:
        echo(f"warning: no ranking for {item.folder}/{item.label} test image #{item.number}: {degenerate}")
    echo(f"Top {top} harmful -> {files.harmful}")
    echo(f"Top {top} useful -> {files.useful}")
    echo(f"All influences dict -> {files.scores}")
    if trust:
        echo(f"Trust: {trust}")
    return degenerate


def _trust(diagnostics: dict) -> str:
    """One line on how far to trust a test image's answer: converged, and how stable its top-k is
    between the two independent halves of the work; empty where the solver says neither."""
    words = []
    stability = diagnostics.get("stability")
    if stability:
        k = stability["k"]
        words.append(f"{'stable' if stability['stable'] else 'unstable'} top-{k} (the two halves share "
                     f"{stability['harmful_shared']}/{k} harmful, {stability['useful_shared']}/{k} useful)")
    if diagnostics.get("converged") is False:
        words.append("not converged")
    if diagnostics.get("well_posed") is False:
        words.append("H + damping I indefinite")
    return ", ".join(words)
