"""`droppos finetune`: end-to-end fine-tuning with the MAE protocol, from a DropPos encoder or any timm ViT.

The recipe (docs/METHOD.md): timm ViT with global average pooling (fc_norm), drop path 0.1, layer-wise
lr decay 0.75 (timm's `param_groups_layer_decay`: each group's `lr_scale` multiplies the shared
schedule), AdamW, RandAugment in the input pipeline, random erasing + mixup/cutmix + label
smoothing on the device (`data.batch_augment`), optional EMA (timm's `ModelEmaV3`).

Every random draw of a step (drop path, erasing, mixup) is seeded by (seed, rank, step), and the
input pipeline's by (seed, epoch, rank, sample), so a resumed run reproduces the uninterrupted one.
After every epoch the val split is evaluated (every sample once across ranks) and results.json is
rewritten. The loop itself is the shared one (droppos/loop.py).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from droppos import UserError, check_all, checkpoint, distributed, environment, launch, loop
from droppos.environment import Environment
from droppos.loop import Metric
from droppos.recipes import FinetuneConfig


def optimizer_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay groups: block i of d gets lr_scale layer_decay ** (d - i), the stem
    (patch embedding, [CLS], position embedding) layer_decay ** (d + 1), fc_norm and the head 1;
    no weight decay on biases, norms, [CLS] and the position embedding."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


def seed_step(seed: int, rank: int, step: int) -> None:
    """torch (drop path, erasing), numpy (timm's mixup) and random (erasing) from (seed, rank, step)."""
    value = distributed.step_seed(seed, rank, step)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


# ---------------------------------------------------------------------------------------
# Entry point (parent process)


def run(config: FinetuneConfig) -> None:
    """Check what a user can get wrong, resolve the environment, then launch the workers."""
    from droppos import encoders

    launch.check_out_dir(config.output.out)
    augment, optim, source = config.augment, config.optim, config.encoder
    mixing = augment.mixup > 0 or augment.cutmix > 0
    check_all([(not mixing or optim.batch_size % 2 == 0, f"--batch-size {optim.batch_size} must be even "
                "with mixup/cutmix (or pass --mixup 0 --cutmix 0)")])
    encoders.check_encoder_source(source.encoder, source.run, source.timm_model, source.weights, source.pretrained,
                                  source.random_init)
    env = environment.resolve(config.launch, config.data, "finetune")
    launch.start("finetune", _worker, config, env, accum=optim.accum,
                 need_val="fine-tuning evaluates on it after every epoch")


def _worker(config: FinetuneConfig, env: Environment) -> None:
    launch.run_worker(env, lambda info: loop.train(FinetuneStage(config, env, info), config, env, info))


class FinetuneStage(loop.Stage):
    name = "finetune"
    metrics = (Metric("loss"),)
    eval_metrics = (Metric("val_top1", percent=True, label="val top-1"),
                    Metric("val_top5", percent=True, label="val top-5"),
                    Metric("val_top1_ema", percent=True, label="val top-1 (EMA)"))

    def __init__(self, config: FinetuneConfig, env: Environment, info: distributed.DistInfo) -> None:
        from timm.loss import SoftTargetCrossEntropy

        from droppos.data import batch_augment, build_loader
        from droppos.encoders import load_encoder
        from droppos.manifest import load_manifest

        self.config, self.info, self.device = config, info, info.device
        self.out = Path(config.output.out)
        self.precision, self.accum, self.seed = env.precision, config.optim.accum, config.launch.seed
        source, augment, optim, data = config.encoder, config.augment, config.optim, config.data.path
        self.num_classes = len(load_manifest(Path(data))["classes"])
        torch.manual_seed(self.seed)  # the same head (and random encoder) on every rank
        model, self.encoder_info = load_encoder(
            source.encoder, source.run, source.timm_model, num_classes=self.num_classes, global_pool=source.pool,
            drop_path_rate=augment.drop_path, img_size=source.img_size, depth=source.depth,
            random_init=source.random_init, weights=source.weights, pretrained=source.pretrained)
        img_h, img_w = self.encoder_info["img_size"]
        if img_h != img_w:
            raise UserError(f"the encoder's input is {img_h}x{img_w}; the loaders crop squares: pass --img-size")
        self.img_size = img_h
        loader = dict(batch_size=optim.batch_size, img_size=img_h, backend=env.loader, device=self.device,
                      rank=info.rank, world_size=info.world_size, seed=self.seed, workers=env.workers)
        self.loader = build_loader(data, "train", "finetune", **loader)
        self.val_loader = build_loader(data, "val", "eval", **loader)
        self.schedule = loop.make_schedule(optim, self.loader.steps_per_epoch, info.world_size, self.accum)
        with torch.no_grad():  # MAE: a near-zero head so that the pre-trained features lead at first
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
            torch.nn.init.zeros_(model.head.bias)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, optim.weight_decay, optim.layer_decay),
                                           lr=0.0, fused=self.device.type == "cuda")
        self.ema = None
        if augment.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=augment.ema_decay)
        self.criterion = SoftTargetCrossEntropy()
        self.augment = batch_augment(self.num_classes, mixup=augment.mixup, cutmix=augment.cutmix,
                                     label_smoothing=augment.smoothing, reprob=augment.reprob, device=self.device)
        self.best: dict[str, Any] = {"top1": None, "epoch": None}
        self.ddp = distributed.wrap_ddp(self.model, info, self.accum)
        self.forward = torch.compile(self.ddp) if env.compile else self.ddp

    # -- state ------------------------------------------------------------------------

    def parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer}
        if self.ema is not None:  # `ema` fixes the architecture: a resumed checkpoint has it exactly when this run does
            parts["ema"] = self.ema.module
        return parts

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "encoder": checkpoint.plain(self.encoder_info)}

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        self.best = dict(saved.get("best") or self.best)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return (f"{self.encoder_info['label']} ({params / 1e6:.1f}M parameters, {self.img_size} px, "
                f"{self.num_classes} classes) on {self.config.data.path} ({self.loader.num_samples} train / "
                f"{self.val_loader.num_samples} val)")

    # -- training ---------------------------------------------------------------------

    def loaders(self) -> list[Any]:
        return [self.loader, self.val_loader]

    def batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        return self.loader.epoch(epoch, start_batch=start_batch)

    def step(self, step: int, micro: list[Any], window: loop.MetricWindow) -> None:
        seed_step(self.seed, self.info.rank, step)
        self.model.train()
        for i, (images, labels) in enumerate(micro):
            images, targets = self.augment(images, labels)
            last = i == len(micro) - 1
            no_sync = self.ddp.no_sync() if self.info.distributed and not last else contextlib.nullcontext()
            with no_sync, environment.autocast(self.device, self.precision):
                loss = self.criterion(self.forward(images).float(), targets)
            (loss / len(micro)).backward()
            window.add("loss", loss.detach() / len(micro))
            window.check_finite(loss)
        if self.config.optim.clip_grad > 0:
            window.check_finite(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step + 1)

    # -- evaluation -------------------------------------------------------------------

    def evaluate(self, step: int, epoch: float, say: Callable[[str], None]) -> Optional[dict[str, Any]]:
        """Top-1/top-5 on the val split (each sample once across ranks); rewrite results.json."""
        from droppos.files import write_json_atomic

        scores = self._evaluate(self.forward)
        record: dict[str, Any] = dict(scores)
        if self.ema is not None:
            record.update({f"{k}_ema": v for k, v in self._evaluate(self.ema.module).items() if k != "num_eval_samples"})
        if self.best["top1"] is None or scores["top1"] > self.best["top1"]:
            self.best = {"top1": scores["top1"], "epoch": epoch}
        if self.info.is_main:
            results = dict(record, step=step, epoch=epoch,
                           best_top1=self.best["top1"], best_epoch=self.best["epoch"], task="finetune",
                           num_classes=self.num_classes, img_size=self.img_size,
                           encoder=checkpoint.plain(self.encoder_info), units="percent")
            write_json_atomic(self.out / "results.json", results)
            extra = f" (EMA {record['top1_ema']:.2f}%)" if self.ema is not None else ""
            say(f"epoch {epoch}: val top-1 {scores['top1']:.2f}% top-5 {scores['top5']:.2f}%{extra} "
                         f"on {scores['num_eval_samples']} images")
        return {f"val_{k}": v for k, v in record.items()}

    def _evaluate(self, predict: torch.nn.Module) -> dict:
        from droppos.encoders import evaluate_topk

        self.model.eval()
        try:
            def logits(images: torch.Tensor) -> torch.Tensor:
                with environment.autocast(self.device, self.precision):
                    return predict(images)
            return evaluate_topk(logits, self.val_loader.epoch(0), self.device, self.info.distributed)
        finally:
            self.model.train()

    def finish(self) -> list[tuple[str, str]]:
        best = self.best
        results = self.out / "results.json"
        top = json.loads(results.read_text()) if results.exists() else {}
        print(f"finetune {self.out}: top-1 {top.get('top1', float('nan')):.2f}% top-5 {top.get('top5', float('nan')):.2f}% "
              f"on {top.get('num_eval_samples', 0)} val images (best top-1 {best['top1'] or 0:.2f}% at epoch "
              f"{best['epoch']}); results in {results}", file=sys.stderr)
        return [("results", str(results))]
