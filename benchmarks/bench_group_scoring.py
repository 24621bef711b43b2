"""--all-labels scoring: one pass over the training archive per test image, or per group.

Side by side in one process on a prepared run (default: the demo's, ``make demo``): the same
``m`` test images and the same ``s_test`` vectors (the test gradients, so no solver noise
enters), scored against the whole training archive

- one test image at a time: every batch read, decoded, preprocessed and run for each image
  (what a run without grouping does);
- as one group: every batch read, decoded and preprocessed once, then scored for all ``m``
  (``explain.score``, what ``calculate.py --all-labels`` does).

Prints seconds per test image (best of ``--rounds``), the speed-up, and the largest score
difference relative to the largest score. No assertions.

    python benchmarks/bench_group_scoring.py --run demo      # after make demo
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("demo"), help="folder with train.npz, test.npz, model.keras")
    parser.add_argument("--images", type=int, default=16, help="test images m (default 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--score-batch-size", type=int, default=32)
    parser.add_argument("--folder", default=None, help="test folder (default: the archive's last)")
    args = parser.parse_args()

    from influence import archive, explain, hvp, models, params, scores
    from influence.plan import WorkItem
    from influence.settings import ScoringSettings, Settings

    loaded = models.load_classifier(model_path=args.run / "model.keras", preprocess="none")
    variables = params.select(loaded.model)
    settings = Settings(scoring=ScoringSettings(all_labels=True, score_batch_size=args.score_batch_size))
    engine = explain.Engine(model=loaded.model, preprocess=loaded.preprocess, variables=variables, prepared=None,
                            hvp_form="auto")
    with archive.open_train(args.run / "train.npz") as train, archive.open_test(args.run / "test.npz") as test:
        folder = test.folder(args.folder or test.folders[-1])
        rows = np.arange(min(args.images, len(folder.labels)))
        group = []
        for row in rows:
            image, label = np.asarray(folder.images[row]), int(folder.labels[row])
            v = hvp.loss_gradient(loaded.model, variables, loaded.preprocess(image[None]), np.array([label]))
            group.append(explain.Solved(WorkItem(folder.name, label, int(row) + 1, int(row)), image, 0, 0.0, v, {}, {}))
        subset = explain.LabelSubset(("all",), np.arange(len(train)), None)

        def one_at_a_time():
            out = []
            for solved in group:
                block = [scores.influence_scores(loaded.model, variables, solved.s_test, loaded.preprocess(images),
                                                 train.labels[indices])
                         for indices, images in train.iter_all(args.score_batch_size)]
                out.append(np.concatenate(block))
            return np.stack(out)

        def grouped():
            return np.stack([e.scores for e in explain.score(group, train=train, subset=subset, engine=engine,
                                                             settings=settings)])

        timings = {"one at a time": [], "grouped": []}
        values = {}
        for _ in range(args.rounds):
            for name, run in (("one at a time", one_at_a_time), ("grouped", grouped)):
                began = time.perf_counter()
                values[name] = run()
                timings[name].append((time.perf_counter() - began) / len(group))
    single, many = min(timings["one at a time"]), min(timings["grouped"])
    largest = np.abs(values["one at a time"]).max()
    difference = np.abs(values["one at a time"] - values["grouped"]).max() / max(largest, np.finfo(float).tiny)
    print(f"{len(train)} training images, {len(group)} test images of {folder.name}, largest |score| {largest:.3g}, score batch {args.score_batch_size}, "
          f"{params.count(variables):,} weights; best of {args.rounds} rounds")
    print("| scoring | s per test image |\n|---|---|")
    print(f"| one pass per test image | {single:.3f} |")
    print(f"| one pass per group of {len(group)} | {many:.3f} |")
    print(f"speed-up {single / many:.2f}x; largest score difference {difference:.1e} of the largest score")


if __name__ == "__main__":
    main()
