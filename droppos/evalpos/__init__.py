"""`droppos eval-pos`: how location-aware is a ViT? (docs/METHOD.md, "Location-awareness diagnostics").

Three measurements, for one model or several side by side, each reported with the settings that produced it:
position accuracy (models with the DropPos position head), token-order sensitivity and a position linear probe
(any timm ViT). Masks and permutations are seeded: every model of a run with the same grid sees the same.

The package, each file readable top to bottom:
- `load.py`: what is evaluated, the models (`Subject`) and the images (`ImageSource`);
- `metrics.py`: the ViT taken apart, and the accumulators (on the device, no host sync per batch);
- `report.py`: report.json, the self-contained report.html with its figures, the terminal table;
- here: the options, one model's pass over the images (`evaluate`), and `run`.

Numbers are exact fp32: TF32 is off for matmuls and cuDNN while eval-pos runs (`exact_fp32`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from droppos import UserError, check_all, environment, files
from droppos.progress import Progress
from droppos.recipes import EvalPosConfig, check, parse_ratio
from droppos.evalpos import report
from droppos.evalpos.load import ImageSource, Subject, list_images, load_subject, load_subjects, random_like
from droppos.evalpos.metrics import PROBE_FILLS, OrderSensitivity, PositionAccuracy, ProbeFeatures

__all__ = ["DEFAULT_RATIOS", "EvalPosConfig", "Subject", "evaluate", "exact_fp32", "load_subject", "parse_ratio",
           "random_like", "run"]

DEFAULT_RATIOS: tuple[tuple[float, float], ...] = tuple(EvalPosConfig().ratio_pairs)
PROGRESS_EVERY_S = 30.0  # plain progress lines (not a terminal): at most one per this many seconds


def _validate(config: EvalPosConfig) -> None:
    if not config.out:
        raise UserError("--out is required: the folder the report is written to")
    if not config.sources and not config.timm_models:
        raise UserError("give a SOURCE (pretrain run, checkpoint or encoder .safetensors) or --timm-model NAME")
    if (config.data is None) == (config.images is None):
        raise UserError("give exactly one of --data DIR (shards) and --images DIR (a folder of images)")
    if config.data is not None and not Path(config.data).is_dir():
        raise UserError(f"--data {config.data} is not a directory: give a dataset written by `droppos shard`")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise UserError(f"--out {config.out} is a file: give a directory")
    models = len(config.sources) + len(config.timm_models) + int(config.random_baseline) + int(
        bool(config.weights and not config.timm_models))
    check(config)  # every option's type, choices and bounds, from its declaration
    check_all([
        (len(config.sources) + len(config.timm_models) <= 1 or config.compare,
         "several models given: add --compare to put them side by side (or give one SOURCE)"),
        (bool(config.ratio_pairs), "give at least one --ratio"),
        (len(config.labels) <= models, f"{len(config.labels)} --label given for {models} model(s): one per model, "
                                       "in the order SOURCE..., --timm-model..., --random-baseline"),
        (all(label.strip() for label in config.labels), "--label must not be empty"),
    ])
    for g, gp in config.ratio_pairs:
        if not (0.0 <= g < 1.0 and 0.0 < gp <= 1.0):
            raise UserError(f"--ratio {g}:{gp}: gamma must be in [0, 1) and gamma_pos in (0, 1]")
    if config.images is not None:
        list_images(Path(config.images))
    else:
        from droppos.manifest import load_manifest, split_shards

        split_shards(Path(config.data), config.split, load_manifest(Path(config.data)))


def _check_probe_fill(subjects: list[Subject], fill: str) -> None:
    if fill != "mask-token":
        return
    lacking = [s.name for s in subjects if s.mask_token is None]
    if lacking:
        raise UserError(f"--probe-fill mask-token: {', '.join(lacking)} has no learnable [MASK] token (only a DropPos "
                        "pretrain run or checkpoint trained with --mask-token learnable has one; exported encoders "
                        "and timm models do not): use --probe-fill mean")


# ----------------------------------------------------------------------------------------------
# Precision


@contextlib.contextmanager
def exact_fp32() -> Iterator[dict[str, Any]]:
    """fp32 with TF32 off for cuBLAS matmuls and cuDNN convolutions for the block; the previous flags after.

    Cosines near 1 and displacements near 0 must mean what they say. Yields what is in effect, read
    back from torch (what report.json records).
    """
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (torch.get_float32_matmul_precision(), cuda.allow_tf32, _cudnn_tf32())
    torch.set_float32_matmul_precision("highest")
    cuda.allow_tf32 = False
    cudnn.allow_tf32 = False
    try:
        yield {"dtype": "float32", "autocast": False, "tf32_matmul": cuda.allow_tf32, "tf32_cudnn": cudnn.allow_tf32,
               "float32_matmul_precision": torch.get_float32_matmul_precision()}
    finally:
        torch.set_float32_matmul_precision(saved[0])
        cuda.allow_tf32 = saved[1]
        if saved[2] is not None:
            cudnn.allow_tf32 = saved[2]


def _cudnn_tf32() -> Optional[bool]:
    """cuDNN's legacy TF32 flag; None when torch refuses to say (its new per-operator API set it unevenly)."""
    try:
        return torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return None


def _describe_precision(precision: dict[str, Any], device: torch.device) -> str:
    if device.type != "cuda":
        return f"fp32 (matmul precision {precision['float32_matmul_precision']})"
    tf32 = [name for name in ("matmul", "cudnn") if precision[f"tf32_{name}"]]
    return "fp32, TF32 off for matmul and cuDNN" if not tf32 else f"fp32, TF32 ON for {' and '.join(tf32)}"


# ----------------------------------------------------------------------------------------------
# One model's pass over the images


def evaluate(subject: Subject, images: ImageSource, config: EvalPosConfig, device: torch.device,
             ticker: Optional[Progress] = None) -> dict[str, Any]:
    """Every measurement for one model in one pass over the images (accumulated on the device)."""
    subject.vit.to(device)
    if subject.droppos is not None:
        subject.droppos.to(device)
    rows, cols = subject.grid
    num_patches = rows * cols
    seeds = torch.Generator().manual_seed(config.seed)
    permutations = torch.stack([torch.randperm(num_patches, generator=seeds) for _ in range(config.permutations)]).to(device)
    ratio_gens = [torch.Generator(device=device).manual_seed(config.seed + 1000 + i) for i in range(len(config.ratio_pairs))]
    accuracies = []
    if subject.droppos is not None:
        accuracies = [PositionAccuracy(g, gp, subject.grid, device) for g, gp in config.ratio_pairs]
    order = OrderSensitivity(permutations, classifier=subject.num_classes > 0,
                             labelled=images.data is not None and subject.num_classes > 0)
    probe = ProbeFeatures(num_patches, config.probe_drop, config.probe_fill, config.probe_images,
                          torch.Generator(device=device).manual_seed(config.seed + 2000), mask_token=subject.mask_token)
    started = time.perf_counter()
    batches = 0
    with torch.inference_mode():
        for imgs, labels, valid in images.batches(subject.img_size, device):
            if order.labelled and images.num_classes != subject.num_classes:
                order.labelled = False  # the head's classes are not the data's: agreement only
            torch.manual_seed(config.seed + batches)  # 'wrong' and 'random-wrong' [MASK] PEs draw from torch's
            for acc, gen in zip(accuracies, ratio_gens):
                noise = torch.rand(imgs.shape[0], num_patches, generator=gen, device=device)
                out = subject.droppos.forward_position(imgs, acc.mask_ratio, acc.pos_mask_ratio, noise=noise)
                acc.update(out["logits"], out["positions"], out["dropped"], valid)
            order.update(subject.vit, imgs, labels, valid)
            probe.update(subject.vit, imgs, valid)
            batches += 1
            if ticker is not None:
                ticker.advance(imgs.shape[0], subject.name)
    if batches == 0:
        skipped = images.skipped
        first = f"; the first of {len(skipped)} skipped: {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise UserError(f"no image could be read: nothing to evaluate{first}")
    cls_pool = getattr(subject.vit, "global_pool", "token")
    pool = "[CLS] token" if cls_pool == "token" else f"{cls_pool or 'avg'} pooling of patch tokens"
    order_result = order.result(pool)
    result = {
        "name": subject.name,
        "source": subject.source,
        "kind": subject.kind,
        "architecture": {
            "timm_model": getattr(subject.vit, "default_cfg", {}).get("architecture") if hasattr(subject.vit, "default_cfg") else None,
            "img_size": subject.img_size, "grid": [rows, cols], "num_patches": num_patches,
            "embed_dim": int(subject.vit.embed_dim), "depth": len(subject.vit.blocks),
            "position_head": subject.droppos is not None, "num_classes": subject.num_classes,
            "mask_token": subject.mask_token is not None, "fixed_pe": subject.fixed_pe, **order.rms(),
        },
        "info": subject.info,
        "images": int(float(order.sums["count"])),
        "position_accuracy": [a.result(config.seed + 1000 + i) for i, a in enumerate(accuracies)],
        "order_sensitivity": order_result,
        "position_probe": probe.result(subject.grid, config.probe_steps, config.seed + 2000),
        "seconds": round(time.perf_counter() - started, 3),
    }
    subject.vit.to("cpu")
    if subject.droppos is not None:
        subject.droppos.to("cpu")
    return result


# ----------------------------------------------------------------------------------------------
# Entry point


def _start_line(subjects: list[Subject], images: ImageSource, planned: int, config: EvalPosConfig,
                device: torch.device, precision: str) -> str:
    models = "; ".join(f"{s.name} ({s.kind}, {s.img_size}px, grid {s.grid[0]}x{s.grid[1]}"
                       f"{', position head' if s.droppos is not None else ''})" for s in subjects)
    ratios = " ".join(f"{g:g}:{gp:g}" for g, gp in config.ratio_pairs)
    return (f"eval-pos: {len(subjects)} model(s): {models}\n"
            f"eval-pos: up to {planned} images of {images.describe()}, device {device}, {precision}; "
            f"ratios {ratios}; {config.permutations} permutation(s); probe drops {config.probe_drop:g} of the PEs "
            f"(fill: {PROBE_FILLS[config.probe_fill]}) on up to {config.probe_images or planned} images")


def run(config: EvalPosConfig) -> Path:
    """Load every model, evaluate each on the same images, write report.json / .html / PNGs; returns report.html."""
    _validate(config)
    device = torch.device(environment.resolve_device(config.device))
    out = Path(config.out)
    inputs = [*(("SOURCE", s) for s in config.sources), ("--images", config.images), ("--data", config.data),
              ("--weights", config.weights)]
    with files.claim_output(out, "eval-pos", inputs), exact_fp32() as precision:
        subjects = load_subjects(config.sources, config.timm_models, config.img_size, config.random_baseline,
                                 config.seed, config.labels, pretrained=config.pretrained, weights=config.weights)
        _check_probe_fill(subjects, config.probe_fill)
        images = ImageSource(config.data, config.split, config.images, config.max_images, config.batch_size,
                             config.loader, config.workers)
        planned = images.planned()
        precision["statement"] = _describe_precision(precision, device)
        print(_start_line(subjects, images, planned, config, device, precision["statement"]), file=sys.stderr, flush=True)
        ticker = Progress("eval-pos", planned * len(subjects), unit="images", plain_every_s=PROGRESS_EVERY_S)
        try:
            results = []
            for index, subject in enumerate(subjects):
                results.append(evaluate(subject, images, config, device, ticker))
                ticker.log(f"eval-pos: {subject.name} done ({index + 1}/{len(subjects)}, {results[-1]['images']} "
                           f"images, {results[-1]['seconds']:.0f} s)")
        finally:
            ticker.close()
        settings = report.resolved_settings(config, device=str(device), precision=precision, loader=images.backend,
                                            workers=images.workers_used)
        document = report.build(results, images, settings, environment.run_card(world_size=1, data_dir=config.data))
        page = report.write(out, document)
    report.print_table(results)
    if images.skipped:
        print(f"skipped {len(images.skipped)} unreadable file(s): {out / 'skipped.jsonl'}", file=sys.stderr)
    print(f"report: {page}")
    return page
