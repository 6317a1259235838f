"""Throughput of `droppos shard` (images/s) with 1 worker and with N workers.

Input: ImageNet-size JPEGs (500x375 or 375x500, quality 90), random crops of the real photos that
scikit-image ships, written once into a cached folder in the temp directory (10 classes).
Two cases are timed:
  validate  - the common ImageNet case: every image is fully decoded and checked, its bytes kept;
  re-encode - `--max-side 256`: decode, resize and re-encode every image.
Each timing is the median of --repeats runs into fresh output directories, after one untimed
warm-up run (which pays webdataset's import). The spawn of the worker pool is included: it is
part of what a user waits for.

Usage:  python benchmarks/bench_shard.py [--images 800] [--repeats 3] [--workers N]
Prints a table, then (last line) one JSON object with `cores`, `img_per_s_1_worker`,
`img_per_s_n_workers` and `speedup` (the validate case), and the same for re-encode.
Timings on a shared machine are noisy: compare ratios measured within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from droppos import shard

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SIZE = (500, 375)
CLASSES = 10


def make_source(root: Path, count: int, seed: int = 0) -> Path:
    """`count` ImageNet-size JPEGs in root/train/<class>/ (kept between runs: complete files are reused)."""
    import skimage.data

    marker = root / f".complete-{count}"
    if marker.exists():
        return root
    photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        width, height = SIZE if rng.random() < 0.75 else SIZE[::-1]
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.6)
        photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.Resampling.BICUBIC)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        crop = photo.crop((left, top, left + width, top + height))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = root / "train" / f"class{i % CLASSES:02d}" / f"img{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, "JPEG", quality=90)
    marker.touch()
    return root


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    self, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self.ru_utime + self.ru_stime + children.ru_utime + children.ru_stime


def time_run(source: Path, workers: int, max_side: int, shard_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one complete shard run into a fresh directory."""
    out = Path(tempfile.mkdtemp(prefix="droppos-bench-shard-out-"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cpu, start = _cpu_seconds(), time.perf_counter()
            shard.run(source, out, workers=workers, max_side=max_side, shard_size=shard_size)
            return time.perf_counter() - start, _cpu_seconds() - cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N (default: all cores)")
    parser.add_argument("--shard-size", type=int, default=50)
    args = parser.parse_args()

    source = make_source(Path(tempfile.gettempdir()) / f"droppos-bench-shard-src-{args.images}", args.images)
    input_mb = sum(p.stat().st_size for p in source.rglob("*.JPEG")) / 2**20
    time_run(source, 1, 0, args.shard_size)  # warm-up: imports, page cache

    results: dict[str, dict[int, float]] = {}
    cpu_ms: dict[str, dict[int, float]] = {}
    for case, max_side in (("validate", 0), ("re-encode", 256)):
        results[case], cpu_ms[case] = {}, {}
        for workers in sorted({1, args.workers}):
            runs = [time_run(source, workers, max_side, args.shard_size) for _ in range(args.repeats)]
            results[case][workers] = args.images / statistics.median(wall for wall, _ in runs)
            cpu_ms[case][workers] = 1000 * statistics.median(cpu for _, cpu in runs) / args.images

    n = args.workers
    print(f"droppos shard throughput: {args.images} JPEGs of {SIZE[0]}x{SIZE[1]} ({input_mb:.1f} MiB), "
          f"median of {args.repeats} runs, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'case':<10} {'1 worker img/s':>15} {f'{n} workers img/s':>17} {'speedup':>8} "
          f"{'CPU ms/img (1)':>15} {f'CPU ms/img ({n})':>15}")
    for case, rates in results.items():
        print(f"{case:<10} {rates[1]:>15.1f} {rates[n]:>17.1f} {rates[n] / rates[1]:>8.2f} "
              f"{cpu_ms[case][1]:>15.2f} {cpu_ms[case][n]:>15.2f}")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"note: 1-minute load average {load:.1f}: other processes share the cores, timings are noisy")
    print(json.dumps({
        "cores": os.cpu_count(),
        "workers": n,
        "images": args.images,
        "repeats": args.repeats,
        "img_per_s_1_worker": round(results["validate"][1], 1),
        "img_per_s_n_workers": round(results["validate"][n], 1),
        "speedup": round(results["validate"][n] / results["validate"][1], 3),
        "reencode_img_per_s_1_worker": round(results["re-encode"][1], 1),
        "reencode_img_per_s_n_workers": round(results["re-encode"][n], 1),
        "reencode_speedup": round(results["re-encode"][n] / results["re-encode"][1], 3),
        "cpu_ms_per_img_1_worker": round(cpu_ms["validate"][1], 3),
        "cpu_ms_per_img_n_workers": round(cpu_ms["validate"][n], 3),
        "load_average": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
