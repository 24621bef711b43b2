#!/usr/bin/env python3
"""Speed and peak memory of prepare_data.py on a generated folder and one 10x larger.

Prints, side by side, prepare_data.py (parallel decoding, batches streamed to disk)
and a baseline in the style of the older suite (one process, every image held in
memory as int16, then saved). Each run is a child process; memory is measured two
ways, both including the decoding workers:

- peak RSS: the largest single process (getrusage of the children);
- peak PSS: the sum over the run's process tree of proportional set size, sampled
  every 50 ms from /proc (PSS splits pages shared by the forked workers fairly).

    python benchmarks/bench_prepare.py [--images 300] [--factor 10] [--workers N] [--no-baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Two classes, so that even the small folder fills whole batches of 150 per label.
WNIDS = ["n01440764", "n01443537"]
SOURCE_SIZE = (300, 400)  # (H, W): about an ImageNet photo


def make_source_images(folder: Path, count: int) -> list[Path]:
    """``count`` distinct JPEGs (smooth gradients plus noise, so they compress like photos)."""
    rng = np.random.default_rng(0)
    height, width = SOURCE_SIZE
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 6, size=3)
        base = 127 + 100 * np.sin(3 * x[..., None] + 2 * y[..., None] + phase)
        pixels = np.clip(base + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"src_{i:05d}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def make_train_folder(root: Path, sources: list[Path], count: int) -> Path:
    """``count`` images in len(WNIDS) class folders (copies of the sources: same decoding cost)."""
    for i in range(count):
        target = root / WNIDS[i % len(WNIDS)] / f"img_{i:06d}.JPEG"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[i % len(sources)], target)
    return root


def _children(pid: int) -> list[int]:
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                children.extend(int(child) for child in listing.read().split())
    except OSError:
        pass  # the process has just exited
    return children


def _tree_pids(root_pid: int) -> list[int]:
    tree, frontier = [root_pid], [root_pid]
    while frontier:
        frontier = [child for pid in frontier for child in _children(pid)]
        tree.extend(frontier)
    return tree


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# Runs the command and reports the largest peak RSS among its processes: a fresh launcher per run,
# because getrusage(RUSAGE_CHILDREN) keeps the maximum over every child ever waited for.
_LAUNCHER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(code)")


def measure(command: list[str]) -> dict:
    """Run ``command``; wall time, peak RSS of its largest process and peak PSS of its process tree."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *command], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_pss = 0
    done = threading.Event()

    def sample():
        nonlocal peak_pss
        while not done.is_set():
            tree = _tree_pids(process.pid)[1:]  # the command and its workers, not the launcher
            peak_pss = max(peak_pss, sum(_pss_kib(pid) for pid in tree))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err}")
    peak_rss = int(err.rsplit("MAXRSS_KIB", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_mib": peak_rss / 1024, "peak_pss_mib": peak_pss / 1024}


def baseline(train: Path, out: Path, image_size: int, batch_size: int) -> None:
    """The older suite's way: decode every image in one process, hold all as int16, shuffle, chunk, save."""
    sys.path.insert(0, str(ROOT))
    from influence.decode import is_image_file, load_rgb

    images, labels = [], []
    for label, folder in enumerate(sorted(os.listdir(train))):
        for name in sorted(os.listdir(train / folder)):
            if is_image_file(name):
                images.append(load_rgb(train / folder / name, (image_size, image_size)).astype(np.int16))
                labels.append(label)
    images = np.stack(images)
    order = np.random.default_rng(0).permutation(len(images))
    batches = {f"batch_{b}": images[order[start:start + batch_size]]
               for b, start in enumerate(range(0, len(images), batch_size))}
    np.savez(out / "train_baseline.npz", labels=np.asarray(labels)[order], **batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="images in the small folder (default 300)")
    parser.add_argument("--factor", type=int, default=10, help="the large folder is this many times larger")
    parser.add_argument("--unique", type=int, default=120, help="distinct source JPEGs (default 120)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("-bs", "--batch-size", type=int, default=150)
    parser.add_argument("--workers", type=int, default=None, help="prepare_data.py --workers (default: all cores)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline runs")
    parser.add_argument("--run-baseline", nargs=2, metavar=("TRAIN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_baseline:
        baseline(Path(args.run_baseline[0]), Path(args.run_baseline[1]), args.image_size, args.batch_size)
        return 0

    sys.path.insert(0, str(ROOT))
    from influence.decode import default_workers

    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as scratch:
        scratch = Path(scratch)
        (scratch / "sources").mkdir()
        print(f"Generating {args.unique} distinct {SOURCE_SIZE[1]}x{SOURCE_SIZE[0]} JPEGs ...", flush=True)
        sources = make_source_images(scratch / "sources", args.unique)
        test = make_train_folder(scratch / "test", sources, 8)
        rows = []
        for count in (args.images, args.images * args.factor):
            train = make_train_folder(scratch / f"train_{count}", sources, count)
            out = scratch / f"out_{count}"
            out.mkdir()
            print(f"prepare_data.py on {count} images ...", flush=True)
            run = measure([sys.executable, "prepare_data.py", "-tr", str(train), "-ts", str(test), "-o", str(out),
                           "-bs", str(args.batch_size), "--image-size", str(args.image_size),
                           "--workers", str(workers)])
            rows.append((count, f"prepare_data.py, {workers} worker(s)", run, (out / "train.npz").stat().st_size))
            if not args.no_baseline:
                print(f"baseline on {count} images ...", flush=True)
                run = measure([sys.executable, __file__, "--run-baseline", str(train), str(out),
                               "--image-size", str(args.image_size), "-bs", str(args.batch_size)])
                rows.append((count, "baseline: 1 process, all in memory, int16", run,
                             (out / "train_baseline.npz").stat().st_size))
            shutil.rmtree(train)
            shutil.rmtree(out)

    batch_mib = args.batch_size * args.image_size ** 2 * 3 / 2**20
    print(f"\nimages {args.image_size}x{args.image_size}, batch size {args.batch_size} "
          f"(one uint8 batch = {batch_mib:.1f} MiB), {os.cpu_count()} CPUs")
    print(f"{'images':>7}  {'method':<42} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13} "
          f"{'peak PSS MiB':>13} {'train bytes':>14}")
    for count, method, run, size in rows:
        print(f"{count:>7}  {method:<42} {run['seconds']:>8.1f} {count / run['seconds']:>9.0f} "
              f"{run['peak_rss_mib']:>13.0f} {run['peak_pss_mib']:>13.0f} {size:>14,}")
    print("peak RSS: largest single process; peak PSS: all processes of the run together (workers included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
