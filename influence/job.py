"""The batch job behind ``calculate.py``, top to bottom.

1. open the archives and check them against each other and the selection;
2. load the classifier and check it against the archives;
3. plan the work (:mod:`influence.plan`) and skip what a previous run completed;
4. prepare the engine once (:func:`influence.explain.prepare_engine`);
5. for each test image: explain it (:func:`influence.explain.explain`) and write its figures,
   score table and record (:mod:`influence.results`), the record last.

Every check on the input happens before the first Hessian-vector product, and a killed run
resumes where it stopped.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from influence import outputs, plan, results
from influence.errors import ItemFailed, UserError
from influence.figures import Panel
from influence.settings import Settings


@dataclass
class Summary:
    computed: int = 0
    skipped: int = 0
    planned: int = 0
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

        loaded = models.load_classifier(model_path=model_path, weights=weights, preprocess=preprocess)
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
        }
        save_format = settings.presentation.save_format
        todo = plan.pending_items(output_dir, items, save_format, fingerprint, overwrite=overwrite,
                                  retry_failed=retry_failed)
        summary = Summary(planned=len(items), skipped=len(items) - len(todo), output_dir=output_dir)
        if summary.skipped:
            echo(f"{summary.skipped} of {len(items)} test images already complete in {output_dir}; skipping them")
        if todo:
            engine = explain.prepare_engine(train, loaded, settings, echo)
        test_sets = {name: test.folder(name) for name in {item.folder for item in todo}}
        subset = None
        for group in _groups(todo, settings, explain.group_size(engine) if todo else 1):
            if subset is None or subset.key != explain.subset_key(group[0], settings):
                subset = explain.load_label_subset(train, group[0], settings, echo)
            solved = []
            for item in group:
                echo(f"Test image #{item.number} in process")
                try:
                    solved.append(explain.solve(item=item, image=_test_image(test_sets[item.folder], item), engine=engine,
                                                settings=settings))
                except ItemFailed as failure:
                    _fail(item, failure, output_dir=output_dir, test_sets=test_sets, engine=engine, settings=settings,
                          fingerprint=fingerprint, names=names, summary=summary, echo=echo)
            if not solved:
                continue
            explained = explain.score(solved, train=train, subset=subset, engine=engine, settings=settings)
            for done, explanation in zip(solved, explained):
                item = done.item
                if isinstance(explanation, ItemFailed):
                    _fail(item, explanation, output_dir=output_dir, test_sets=test_sets, engine=engine, settings=settings,
                          fingerprint=fingerprint, names=names, summary=summary, echo=echo)
                    continue
                files = item.files(output_dir, save_format)
                outputs.remove_stale_temporaries(files.directory)
                _write(files, item, str(test_sets[item.folder].ids[item.row]), explanation, train=train,
                       engine=engine, loaded=loaded, settings=settings, fingerprint=fingerprint, names=names,
                       echo=echo)
                summary.computed += 1
                summary.diagnostics.append(explanation.diagnostics)

        # The consolidated store and the pages (influence.store, influence.pages).
        from influence import store

        store.finish_run(output_dir, train=train, test=test, planned=planned, shard=(shard_index, shard_count),
                         top=settings.presentation.top, echo=echo)
    echo(
        f"Done: {summary.computed} test images computed, {len(summary.failed)} failed, "
        f"{summary.skipped} already complete, of {summary.planned} in this shard "
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


def _fail(item, failure, *, output_dir, test_sets, engine, settings, fingerprint, names, summary, echo) -> None:
    """Record why a test image failed, in place of its results, and go on."""
    files = item.files(output_dir, settings.presentation.save_format)
    results.write_failure(files, reason=str(failure), record={
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


def _write(files, item, test_id, explanation, *, train, engine, loaded, settings, fingerprint, names, echo):
    """One test image's figures, score table and record."""
    ids = train.ids[explanation.indices]
    train_labels = train.labels[explanation.indices]
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
    echo(f"Top {top} harmful -> {files.harmful}")
    echo(f"Top {top} useful -> {files.useful}")
    echo(f"All influences dict -> {files.scores}")
    if trust:
        echo(f"Trust: {trust}")


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
