"""The demo's report: are the planted label errors among the top harmful training images?

Counts them per misclassified test image, against what a random pick of as many
training images finds (hypergeometric, with an exact tail probability), and the
same at the useful end for contrast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from examples.digits.settings import FLIPPED_FILE, REPORT_FILE
from influence import results
from influence.errors import UserError


def hypergeometric_pmf(*, draws: int, population: int, marked: int) -> np.ndarray:
    """P(i marked items among ``draws`` drawn without replacement), i = 0..draws."""
    total = math.comb(population, draws)
    return np.array(
        [math.comb(marked, i) * math.comb(population - marked, draws - i) / total for i in range(draws + 1)]
    )


def random_pick_tail(*, found: int, images: int, draws: int, population: int, marked: int) -> float:
    """P(a random pick finds at least ``found`` marked items in all) for ``images`` test images.

    Each test image draws ``draws`` of the ``population`` training images without
    replacement, independently of the others; the total is a sum of ``images``
    independent hypergeometric counts, whose distribution is a convolution.
    """
    single = hypergeometric_pmf(draws=draws, population=population, marked=marked)
    total = np.array([1.0])
    for _ in range(images):
        total = np.convolve(total, single)
    return float(min(1.0, total[found:].sum()))


def ranked_ends(scores: dict, k: int) -> tuple[list[str], list[str]]:
    """The ``k`` most harmful ids (most negative score first) and the ``k`` most useful
    (most positive first); ties broken by id so that the ranking is reproducible."""
    ranked = sorted(scores, key=lambda train_id: (float(scores[train_id]), train_id))
    return ranked[:k], sorted(scores, key=lambda train_id: (-float(scores[train_id]), train_id))[:k]


def read_results(calc_dir: Path, folder: str, *, save_format: str) -> list[dict]:
    """calculate.py's results for one test folder, in archive order (label, then n), read
    through :mod:`influence.results`, the one module that knows the output tree.

    Each result: ``n``, ``test_id``, ``label``, ``predicted``, ``test_loss``, ``scores``
    (training id -> score), ``source`` (the record's path, for messages) and ``harmful_figure``.
    """
    found = []
    for record in results.iter_folder(calc_dir, folder):
        label, n = int(record["label"]), int(record["number"])
        found.append(
            {
                "n": n,
                "test_id": record["test_id"],
                "label": label,
                "predicted": int(record["predicted"]),
                "test_loss": float(record["test_loss"]),
                "scores": record["scores"],
                "source": record["record_path"],
                "harmful_figure": str(results.item_files(calc_dir, folder, label, n, save_format).harmful),
            }
        )
    return found


def label_errors_in(ids: list[str], *, flipped: dict, scores: dict, label: int, predicted: int) -> list[dict]:
    """The planted label errors among ``ids``, each with its rank and how it relates to the test image.

    ``shows_test_digit``: its true digit is the test image's label; ``teaches_prediction``:
    the label it was given is the test image's predicted label.
    """
    return [
        {
            **flipped[train_id],
            "rank": rank + 1,
            "score": float(scores[train_id]),
            "shows_test_digit": flipped[train_id]["true_label"] == label,
            "teaches_prediction": flipped[train_id]["given_label"] == predicted,
        }
        for rank, train_id in enumerate(ids)
        if train_id in flipped
    ]


def tally(entries: list[dict], *, top: int, population: int, marked: int) -> dict:
    """Label errors among the top harmful and top useful images of ``entries``, against random picks."""
    counts = {"test_images": len(entries), "picks": top * len(entries)}
    for end in ("harmful", "useful"):
        found = [error for entry in entries for error in entry[f"flipped_in_{end}"]]
        counts[end] = {
            "flipped_found": len(found),
            "distinct_flipped_found": len({error["id"] for error in found}),
            "shows_test_digit": sum(error["shows_test_digit"] for error in found),
            "teaches_prediction": sum(error["teaches_prediction"] for error in found),
            "either": sum(error["shows_test_digit"] or error["teaches_prediction"] for error in found),
        }
    counts["random_expected"] = counts["picks"] * marked / population
    counts["random_p_value"] = random_pick_tail(
        found=counts["harmful"]["flipped_found"], images=len(entries), draws=top, population=population, marked=marked
    )
    return counts


def build_report(
    *, calc_dir: Path, flipped_record: dict, train_ids: Sequence[str], test_counts: dict[str, int], top: int,
    save_format: str = "png",
) -> dict:
    """Count the planted label errors among the top-``top`` harmful images of each test image.

    Reads every test image's label, prediction and score table (the score of every
    training image) through :func:`read_results`, ranks the training images by score itself,
    and compares with a random pick of ``top`` training images per test image
    (hypergeometric: mean ``top * F / N`` per image; the tail probability is exact).
    The top useful images are counted the same way, for contrast.
    """
    flipped = {entry["id"]: entry for entry in flipped_record["flipped"]}
    train_ids = set(train_ids)
    population, marked = len(train_ids), len(flipped)
    if not flipped.keys() <= train_ids:
        raise UserError(f"flipped ids missing from the training set: {sorted(flipped.keys() - train_ids)[:3]}")

    folders, every_image = {}, []
    for folder, expected in test_counts.items():
        folder_results = read_results(calc_dir, folder, save_format=save_format)
        if len(folder_results) != expected:
            raise UserError(
                f"{calc_dir / folder} holds results for {len(folder_results)} test images, expected {expected}; "
                "calculate.py did not finish"
            )
        for result in folder_results:
            scores = result["scores"]
            if set(scores) != train_ids:
                raise UserError(
                    f"{result['source']}: the score table does not cover the whole training set "
                    "(calculate.py needs --all-labels for the demo's report)"
                )
            label, predicted = result["label"], result["predicted"]
            harmful, useful = ranked_ends(scores, top)
            relation = {"flipped": flipped, "scores": scores, "label": label, "predicted": predicted}
            every_image.append(
                {
                    "folder": folder,
                    "label": label,
                    "n": result["n"],
                    "test_id": result["test_id"],
                    "predicted": predicted,
                    "test_loss": result["test_loss"],
                    "harmful": harmful,
                    "useful": useful,
                    "flipped_in_harmful": label_errors_in(harmful, **relation),
                    "flipped_in_useful": label_errors_in(useful, **relation),
                    "figure": result["harmful_figure"],
                }
            )
        folders[folder] = {
            "test_images": len(folder_results),
            "misclassified": sum(e["predicted"] != e["label"] for e in every_image if e["folder"] == folder),
        }

    misclassified = [entry for entry in every_image if entry["predicted"] != entry["label"]]
    counting = {"top": top, "population": population, "marked": marked}
    return {
        "n_train": population,
        "n_flipped": marked,
        "top": top,
        "random_model": "hypergeometric: per test image, top training images drawn without replacement "
        "from n_train of which n_flipped are flipped; expected count top * n_flipped / n_train per image",
        "folders": folders,
        "misclassified": tally(misclassified, **counting),
        "all_test_images": tally(every_image, **counting),
        "misclassified_images": misclassified,
        "examples": {
            folder: best_example([entry for entry in misclassified if entry["folder"] == folder])
            for folder in folders
        },
    }


def best_example(misclassified: list[dict]) -> dict | None:
    """The misclassified test image whose top harmful images hold the most label errors related to it."""
    if not misclassified:
        return None

    def related(entry: dict) -> tuple:
        errors = entry["flipped_in_harmful"]
        on_point = [e for e in errors if e["shows_test_digit"] or e["teaches_prediction"]]
        return (len(on_point), len(errors), -min([e["rank"] for e in on_point] or [99]))

    return max(misclassified, key=related)  # first of equals: archive order


def _describe(entry: dict) -> str:
    errors = ", ".join(
        f"#{e['rank']} {e['id']} (digit {e['true_label']})" for e in entry["flipped_in_harmful"]
    ) or "none"
    return (
        f"{entry['folder']}/{entry['test_id']}, digit {entry['label']} predicted {entry['predicted']}: "
        f"label errors among its top harmful: {errors}"
    )


def format_report(report: dict, *, out_dir: Path, calc_dir: Path, timings: dict | None = None) -> str:
    """The report as the demo prints it."""
    k, wrong, every = report["top"], report["misclassified"], report["all_test_images"]
    share = 100 * report["n_flipped"] / report["n_train"]
    harmful, useful = wrong["harmful"], wrong["useful"]
    lines = [
        "",
        "Demo report",
        f"  training images: {report['n_train']}, of which {report['n_flipped']} ({share:.1f}%) were put in a "
        f"wrong digit's folder on purpose ({out_dir / FLIPPED_FILE})",
        "  test images: "
        + ", ".join(f"{folder} {c['test_images']} ({c['misclassified']} misclassified)" for folder, c in report["folders"].items()),
        f"  top-{k} harmful training images of the {wrong['test_images']} misclassified test images ({wrong['picks']} picks):",
        f"    label errors: {harmful['flipped_found']} ({harmful['distinct_flipped_found']} distinct); "
        f"a random pick finds {wrong['random_expected']:.1f} on average "
        f"(hypergeometric; P(>= {harmful['flipped_found']}) = {wrong['random_p_value']:.1g})",
        f"    of these, {harmful['either']} show the test image's digit ({harmful['shows_test_digit']}) or carry "
        f"the wrongly predicted label ({harmful['teaches_prediction']})",
        f"  their top-{k} useful images, for contrast: {useful['flipped_found']} label errors, {useful['either']} of "
        "them showing the test image's digit or carrying the predicted label",
        f"  all {every['test_images']} test images: {every['harmful']['flipped_found']} label errors in "
        f"{every['picks']} top-{k} harmful picks, {every['useful']['flipped_found']} in the top-{k} useful "
        f"(random {every['random_expected']:.1f})",
    ]
    if useful["flipped_found"] > 2 * wrong["random_expected"]:
        lines.append(
            "  (label errors keep a high training loss, so large gradients: they lead the rankings at both ends)"
        )
    for example in report["examples"].values():
        if example:
            lines.append(f"  e.g. {_describe(example)}")
            lines.append(f"       -> {example['figure']}")
    lines += [
        f"  figures: {calc_dir}/<test folder>/<label>/harmful_<n>.png and useful_<n>.png",
        f"  report: {out_dir / REPORT_FILE}",
    ]
    if timings:
        lines.append("  time: " + ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))
    return "\n".join(lines)
