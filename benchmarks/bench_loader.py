"""Loader throughput at 224 px: droppos `dali` (CPU, or 'mixed' on CUDA) and `pil` vs the published baseline.

The baseline is what the DropPos/MAE code uses: torchvision ImageFolder + DataLoader with
RandomResizedCrop(224, bicubic) + flip + ToTensor + Normalize (pre-training's scale (0.2, 1); the
linear probe's (0.08, 1); fine-tuning: timm's `create_transform` with rand-m9-mstd0.5-inc1, without
random erasing, which ours applies on the device), same worker count, same Pillow(-SIMD) build; on
CUDA it pins its batches and copies them to the device, as the published code does. Data:
generated ~500x375 q90 JPEGs, as files for the baseline and sharded with `python -m droppos shard`
for ours. Prints a table; the last line is one JSON object (also written to `--json FILE`).

    python benchmarks/bench_loader.py --device cuda --backends pil,dali,baseline --images 4096 \
        --batch-size 256 --workers 16 --json loader.json

DALI, when it is not installed, is skipped and named in the JSON (`skipped`), never an error;
`--device cuda` without CUDA is an error.

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
import shutil
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


def _baseline_transform(mode: str):
    from torchvision import transforms

    normalise = [transforms.ToTensor(), transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    if mode == "finetune":
        from timm.data import create_transform

        return create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                                re_prob=0.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    scale = (0.2, 1.0) if mode == "pretrain" else (0.08, 1.0)
    return transforms.Compose([
        transforms.RandomResizedCrop(224, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), *normalise])


def baseline(folder: Path, mode: str, batch: int, workers: int, warmup: int, device: str) -> dict[str, float]:
    from torchvision import datasets

    tf = _baseline_transform(mode)
    cuda = device == "cuda"

    def batches():
        ds = datasets.ImageFolder(str(folder / "train"), transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                             pin_memory=cuda)
        for images, labels in loader:
            if cuda:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                torch.cuda.synchronize()
            yield images, labels

    return timed(batches, warmup)


def ours(data_dir: Path, backend: str, mode: str, batch: int, workers: int, warmup: int,
         device: str) -> dict[str, float]:
    from droppos.data import build_loader

    def batches():
        loader = build_loader(data_dir, "train", mode, batch, img_size=224, backend=backend, device=device,
                              workers=workers, labels_to_device=mode != "pretrain")
        for images, labels in loader.epoch(0):
            if device == "cuda":
                torch.cuda.synchronize()
            yield images, labels

    return timed(batches, warmup)


def count_images(folder: Path) -> int:
    return sum(1 for _ in (folder / "train").glob("*/*.jpg")) if (folder / "train").is_dir() else 0


def prepare(work: Path, images: int, workers: int) -> tuple[Path, Path]:
    """At least `images` generated JPEGs in work/folder, sharded into work/shards (reused when big enough)."""
    folder, shards = work / "folder", work / "shards"
    if count_images(folder) < images:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
        make_folder(folder, images)
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "droppos", "shard", str(folder), str(shards), "--shard-size", "256",
                        "--workers", str(workers)], check=True)
    return folder, shards


def plan_runs(args: argparse.Namespace, folder: Path, shards: Path) -> tuple[dict, dict[str, str]]:
    """The loaders to time ({name: run}) and the ones skipped here ({name: why})."""
    from droppos.data import dali_available

    runs, skipped = {}, {}
    common = (args.mode, args.batch_size, args.workers, args.warmup, args.device)
    for backend in args.backends:
        if backend == "baseline":
            runs["baseline"] = lambda: baseline(folder, *common)
        elif backend == "pil":
            runs["pil"] = lambda: ours(shards, "pil", *common)
        elif not dali_available():
            skipped["dali"] = "nvidia-dali is not installed"
        else:
            name = "dali_mixed" if args.device == "cuda" else "dali_cpu"
            runs[name] = lambda: ours(shards, "dali", *common)
    return runs, skipped


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where batches end up (cuda: pil through pinned memory, dali decoding with 'mixed')")
    parser.add_argument("--backends", default="pil,dali,baseline",
                        help="comma-separated subset of pil, dali, baseline")
    parser.add_argument("--mode", choices=("pretrain", "finetune", "probe"), default="pretrain")
    parser.add_argument("--images", type=int, default=1536, help="generate at least this many JPEGs")
    parser.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader; the median is reported")
    parser.add_argument("--warmup", type=int, default=4, help="batches per run left out of the steady-state rate")
    parser.add_argument("--dir", type=Path, default=None, help="keep the generated data here")
    parser.add_argument("--json", type=Path, default=None, help="also write the final JSON object to this file")
    args = parser.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"pil", "dali", "baseline"}
    if unknown or not args.backends:
        parser.error(f"--backends: choose from pil, dali, baseline (got {', '.join(sorted(unknown)) or 'none'})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    if args.images < args.batch_size * (args.warmup + 1):
        parser.error(f"--images {args.images} is too few for --batch-size {args.batch_size} and --warmup {args.warmup}")
    return args


def main() -> None:
    args = parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    folder, shards = prepare(work, args.images, args.workers)
    runs, skipped = plan_runs(args, folder, shards)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    # Interleave the repeats so that load from other processes hits every loader alike.
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            samples[name].append(fn())

    def median(name: str, key: str) -> float:
        return float(np.median([run[key] for run in samples[name]]))

    result: dict = {"cores": args.workers, "device": args.device, "mode": args.mode}
    base = median("baseline", "img_per_s") if "baseline" in samples else None
    base_cpu = median("baseline", "cpu_ms_per_img") if "baseline" in samples else None
    print(f"{'loader':<11}{'img/s':>8}{'img/s/core':>11}{'x base':>8}{'first batch s':>14}{'CPU ms/img':>11}"
          f"{'x base CPU':>11}   img/s runs")
    for name in samples:
        rate, cpu, first = median(name, "img_per_s"), median(name, "cpu_ms_per_img"), median(name, "first_batch_s")
        result[f"{name}_img_per_s"] = round(rate, 1)
        result[f"{name}_cpu_ms_per_img"] = round(cpu, 3)
        result[f"{name}_first_batch_s"] = round(first, 2)
        versus = f"{rate / base:>8.2f}" if base else f"{'-':>8}"
        versus_cpu = f"{base_cpu / cpu:>11.2f}" if base_cpu else f"{'-':>11}"
        print(f"{name:<11}{rate:>8.1f}{rate / args.workers:>11.1f}{versus}{first:>14.2f}{cpu:>11.2f}{versus_cpu}   "
              + " ".join(f"{run['img_per_s']:.0f}" for run in samples[name]))
    if base:
        for name in samples:
            if name != "baseline":
                result[f"{name}_vs_baseline"] = round(result[f"{name}_img_per_s"] / base, 2)
                result[f"{name}_vs_baseline_cpu"] = round(base_cpu / result[f"{name}_cpu_ms_per_img"], 2)
    result.update(images=count_images(folder), batch=args.batch_size, warmup=args.warmup, repeats=args.repeats,
                  skipped=skipped)
    line = json.dumps(result)
    if args.json is not None:
        from droppos.files import write_json_atomic

        write_json_atomic(args.json, result)
    print(line)


if __name__ == "__main__":
    main()
