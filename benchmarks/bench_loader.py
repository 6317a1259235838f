"""Loader throughput at 224 px: droppos `dali` (CPU, and 'mixed' with CUDA) and `pil` vs the published baseline.

The baseline is what the DropPos/MAE code uses: torchvision ImageFolder + DataLoader with
RandomResizedCrop(224, bicubic) + flip + ToTensor + Normalize, same worker count, same Pillow
(-SIMD) build. Data: generated ~500x375 q90 JPEGs, as files for the baseline and sharded with
`python -m droppos shard` for ours. Prints a table; the last line is one JSON object.

Per loader and run, three figures over one epoch, taken from a fresh loader as training takes it:
- img/s: steady state, the batches after the first `--warmup` (worker start-up, DALI pipeline
  build and shuffle-buffer fill excluded); the JSON's `*_img_per_s` are the medians of these;
- first batch (s): start-up, from building the loader to the first batch;
- CPU ms/img: CPU time of the whole epoch (main process, its threads and its reaped DataLoader
  workers, start-up included) per image. Unlike wall time it hardly depends on what else runs on
  a shared machine, so it is the figure to compare there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_folder(root: Path, num_images: int, classes: int = 8) -> Path:
    """ImageNet-like JPEGs: ~500x375 (sizes vary a little), q90, smooth content plus noise."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / "train" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(460, 541)), int(rng.integers(340, 411))
        base = rng.integers(0, 255, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=90)
    (root / "val").mkdir(exist_ok=True)
    for c in range(classes):  # a tiny val split so the shard stage sees both splits
        (root / "val" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (c * 30, 90, 120)).save(root / "val" / f"class{c:02d}" / "v.jpg", quality=90)
    return root


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that have exited."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(make_batches, warmup: int) -> dict[str, float]:
    """Steady-state img/s after `warmup` batches, seconds to the first batch, CPU ms per image."""
    cpu0, start = cpu_seconds(), time.perf_counter()
    total = steady = 0
    first = steady_start = None
    for i, (images, _) in enumerate(make_batches()):
        if i == 0:
            first = time.perf_counter() - start
        if i == warmup:
            steady_start, steady = time.perf_counter(), 0
        total += images.shape[0]
        steady += images.shape[0]
    end = time.perf_counter()
    return {"img_per_s": steady / (end - steady_start) if steady_start else float("nan"),
            "first_batch_s": first, "cpu_ms_per_img": 1e3 * (cpu_seconds() - cpu0) / total}


def baseline(folder: Path, batch: int, workers: int, warmup: int) -> dict[str, float]:
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    def batches():
        ds = datasets.ImageFolder(str(folder / "train"), transform=tf)
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)

    return timed(batches, warmup)


def ours(data_dir: Path, backend: str, batch: int, workers: int, warmup: int, device: str = "cpu") -> dict[str, float]:
    from droppos.data import build_loader

    def batches():
        loader = build_loader(data_dir, "train", "pretrain", batch, img_size=224, backend=backend, device=device,
                              workers=workers)
        for images, labels in loader.epoch(0):
            if device == "cuda":
                torch.cuda.synchronize()
            yield images, labels

    return timed(batches, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader; the median is reported")
    parser.add_argument("--warmup", type=int, default=4, help="batches per run left out of the steady-state rate")
    parser.add_argument("--dir", type=Path, default=None, help="keep the generated data here")
    args = parser.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    folder, shards = work / "folder", work / "shards"
    if not (folder / "train").exists():
        make_folder(folder, args.images)
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "droppos", "shard", str(folder), str(shards), "--shard-size", "256",
                        "--workers", str(args.workers)], check=True)

    runs = {"baseline": lambda: baseline(folder, args.batch, args.workers, args.warmup),
            "dali_cpu": lambda: ours(shards, "dali", args.batch, args.workers, args.warmup),
            "pil": lambda: ours(shards, "pil", args.batch, args.workers, args.warmup)}
    if torch.cuda.is_available():
        runs["dali_mixed"] = lambda: ours(shards, "dali", args.batch, args.workers, args.warmup, device="cuda")
    # Interleave the repeats so that load from other processes hits every loader alike.
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            samples[name].append(fn())

    def median(name: str, key: str) -> float:
        return float(np.median([run[key] for run in samples[name]]))

    result: dict[str, float | int] = {"cores": args.workers}
    base, base_cpu = median("baseline", "img_per_s"), median("baseline", "cpu_ms_per_img")
    print(f"{'loader':<11}{'img/s':>8}{'img/s/core':>11}{'x base':>8}{'first batch s':>14}{'CPU ms/img':>11}"
          f"{'x base CPU':>11}   img/s runs")
    for name in samples:
        rate, cpu, first = median(name, "img_per_s"), median(name, "cpu_ms_per_img"), median(name, "first_batch_s")
        result[f"{name}_img_per_s"] = round(rate, 1)
        result[f"{name}_cpu_ms_per_img"] = round(cpu, 3)
        result[f"{name}_first_batch_s"] = round(first, 2)
        print(f"{name:<11}{rate:>8.1f}{rate / args.workers:>11.1f}{rate / base:>8.2f}{first:>14.2f}{cpu:>11.2f}"
              f"{base_cpu / cpu:>11.2f}   " + " ".join(f"{run['img_per_s']:.0f}" for run in samples[name]))
    for name in ("pil", "dali_cpu"):
        result[f"{name}_vs_baseline"] = round(result[f"{name}_img_per_s"] / base, 2)
        result[f"{name}_vs_baseline_cpu"] = round(base_cpu / result[f"{name}_cpu_ms_per_img"], 2)
    result.update(images=args.images, batch=args.batch, warmup=args.warmup, repeats=args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
