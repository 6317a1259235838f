"""`droppos finetune`: end-to-end fine-tuning with the MAE protocol, from a DropPos encoder or any timm ViT.

The recipe (METHOD.md): timm ViT with global average pooling (fc_norm), drop path 0.1, layer-wise
lr decay 0.75 (timm's `param_groups_layer_decay`), AdamW, warm-up then half-cycle cosine per step
(timm's `CosineLRScheduler`), RandAugment (data's finetune mode), random erasing + mixup/cutmix +
label smoothing (`data.batch_augment`), optional EMA (timm's `ModelEmaV3`).

Like pretrain, the optimizer step alone fixes the lr, the data position and every random draw
(seeded per step and rank), so re-running the command on the same --out resumes exactly; the
training step makes no host synchronisation. After every epoch the val split is evaluated, every
sample exactly once across ranks, and `results.json` is rewritten.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from droppos import UserError, runtime
from droppos.recipes import FinetuneConfig, to_dict

# Options that fix the parameters' shapes or their meaning: a checkpoint of others cannot be resumed.
ARCH_KEYS = ("encoder", "run", "timm_model", "random_init", "depth", "img_size", "pool", "ema")


def peak_lr(config: FinetuneConfig, world_size: int) -> float:
    if config.lr is not None:
        return config.lr
    return config.blr * config.batch_size * config.accum * world_size / 256


def optimizer_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay groups: block i of d gets lr_scale layer_decay ** (d - i), the stem
    (patch embedding, [CLS], position embedding) layer_decay ** (d + 1), fc_norm and the head 1;
    no weight decay on biases, norms, [CLS] and the position embedding."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


# ---------------------------------------------------------------------------------------
# Entry point (parent process)


def run(config: FinetuneConfig) -> None:
    """Check everything a user can get wrong, then launch the workers."""
    from droppos import encoders

    out = runtime.check_out_dir(config.out)
    _validate(config)
    encoders.check_encoder_source(config.encoder, config.run, config.timm_model)
    runtime.start("finetune", _worker, config, out, step_batch=config.batch_size * config.accum,
                  arch_keys=ARCH_KEYS, mismatch="a fine-tuning checkpoint of other options",
                  need_val="fine-tuning evaluates on it after every epoch")


def _validate(config: FinetuneConfig) -> None:
    mixing = config.mixup > 0 or config.cutmix > 0
    checks = [
        (config.epochs >= 1 and config.batch_size >= 1 and config.accum >= 1, "--epochs, --batch-size and --accum must be >= 1"),
        (not mixing or config.batch_size % 2 == 0, f"--batch-size {config.batch_size} must be even with mixup/cutmix (or pass --mixup 0 --cutmix 0)"),
        (0 < config.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
        (0 <= config.drop_path < 1, "--drop-path must be in [0, 1)"),
        (0 <= config.smoothing < 1 and 0 <= config.reprob <= 1, "--smoothing must be in [0, 1) and --reprob in [0, 1]"),
        (0 < config.ema_decay < 1, "--ema-decay must be in (0, 1)"),
        (config.pool in ("avg", "token"), "--pool: choose avg or token"),
    ]
    runtime.check_all(checks)


# ---------------------------------------------------------------------------------------
# Worker


def _worker(payload: dict) -> None:
    """One training process (rank)."""
    device = payload.pop("device")
    runtime.run_worker(device, lambda info: Finetuner(FinetuneConfig(**payload), info).train())


def seed_step(seed: int, rank: int, step: int) -> None:
    """torch (drop path, erasing), numpy (timm's mixup) and random (erasing) from (seed, rank, step)."""
    value = runtime.step_seed(seed, rank, step)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


class Finetuner:
    def __init__(self, config: FinetuneConfig, info: runtime.DistInfo) -> None:
        from timm.loss import SoftTargetCrossEntropy
        from timm.scheduler import CosineLRScheduler

        from droppos.data import batch_augment, build_loader
        from droppos.encoders import load_encoder

        self.config, self.info, self.device = config, info, info.device
        self.out = Path(config.out)
        self.precision = runtime.setup_precision(self.device, config.precision)
        self.use_compile = config.compile if config.compile is not None else self.device.type == "cuda"

        from droppos.manifest import load_manifest

        self.num_classes = len(load_manifest(Path(config.data))["classes"])
        torch.manual_seed(config.seed)  # the same head (and random encoder) on every rank
        model, self.encoder_info = load_encoder(
            config.encoder, config.run, config.timm_model, num_classes=self.num_classes, global_pool=config.pool,
            drop_path_rate=config.drop_path, img_size=config.img_size, depth=config.depth,
            random_init=config.random_init)
        img_h, img_w = self.encoder_info["img_size"]
        if img_h != img_w:
            raise UserError(f"the encoder's input is {img_h}x{img_w}; the loaders crop squares: pass --img-size")
        self.loader = build_loader(config.data, "train", "finetune", config.batch_size, img_size=img_h,
                                   backend=config.loader, device=self.device, rank=info.rank,
                                   world_size=info.world_size, seed=config.seed, workers=config.workers)
        self.img_size = img_h
        self.val_loader = build_loader(config.data, "val", "eval", config.batch_size, img_size=img_h,
                                       backend=config.loader, device=self.device, rank=info.rank,
                                       world_size=info.world_size, seed=config.seed, workers=config.workers)
        with torch.no_grad():  # MAE: a near-zero head so that the pre-trained features lead at first
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
            torch.nn.init.zeros_(model.head.bias)
        self.model = model.to(self.device)

        self.steps_per_epoch = self.loader.steps_per_epoch // config.accum
        if self.steps_per_epoch < 1:
            raise UserError("fewer batches per epoch than --accum; lower --batch-size or --accum")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, config.max_steps) if config.max_steps else self.total_steps
        warmup_steps = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.peak_lr = peak_lr(config, info.world_size)

        groups = optimizer_groups(self.model, config.weight_decay, config.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, fused=self.device.type == "cuda")
        # Step-based and stateless: step_update(step) sets every group's lr x its layer-decay lr_scale.
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, self.total_steps - warmup_steps), lr_min=config.min_lr,
            warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
        self.ema = None
        if config.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=config.ema_decay)
        self.criterion = SoftTargetCrossEntropy()
        self.augment = batch_augment(self.num_classes, mixup=config.mixup, cutmix=config.cutmix,
                                     label_smoothing=config.smoothing, reprob=config.reprob, device=self.device)
        self.step = 0
        self.best: dict[str, Any] = {"top1": None, "epoch": None}
        self._resume()

        wrapped = self.ddp = runtime.wrap_ddp(self.model, info)
        self.forward = torch.compile(wrapped) if self.use_compile else wrapped
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = runtime.MetricsLog(self.out, info.is_main)

    # -- state ------------------------------------------------------------------------

    def _resume(self) -> None:
        saved = runtime.resume(self.out, self.device, self._parts(), self.info.is_main)
        if saved is not None:
            self.step = int(saved["step"])
            self.best = dict(saved.get("best") or self.best)

    def _parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer}
        if self.ema is not None:  # `ema` is an ARCH_KEY: a resumed checkpoint has it exactly when this run does
            parts["ema"] = self.ema.module
        return parts

    def save(self, reason: str) -> None:
        if not self.info.is_main:
            return
        state = runtime.checkpoint_state(
            self._parts(), step=self.step, epoch=self.step // self.steps_per_epoch, config=to_dict(self.config),
            encoder=_plain(self.encoder_info), best=self.best, rng=runtime.rng_state(), reason=reason)
        runtime.save_checkpoint(runtime.checkpoint_path(self.out), state)

    # -- loop -------------------------------------------------------------------------

    def train(self) -> None:
        config, info = self.config, self.info
        record = dict(to_dict(config), world_size=info.world_size, img_size_used=self.img_size,
                      peak_lr=self.peak_lr, encoder_info=_plain(self.encoder_info))
        if not runtime.open_run(self.out, record, self.step, self.stop_step, info.is_main):
            return
        progress = runtime.Progress(self.stop_step, self.step, info.is_main, "finetune")
        sums = torch.zeros(2, device=self.device)  # loss, non-finite count
        window, timer = 0, runtime.Timer()
        last_ckpt = time.monotonic()
        status = ""
        results: Optional[dict] = None
        stopped_by: Optional[str] = None
        with runtime.StopRequest() as stop:
            while self.step < self.stop_step and stopped_by is None:
                epoch = self.step // self.steps_per_epoch
                batches = self.loader.epoch(epoch, start_step=(self.step % self.steps_per_epoch) * config.accum)
                while self.step < min((epoch + 1) * self.steps_per_epoch, self.stop_step):
                    with timer.waiting():
                        micro = [next(batches) for _ in range(config.accum)]
                    self._train_step(micro, sums)
                    self.step += 1
                    window += 1
                    at_log = self.step % config.log_every == 0 or self.step == self.stop_step
                    if at_log:
                        status = self._log(sums, window, timer, epoch, progress)
                        sums.zero_()
                        window = 0
                        timer.reset()
                    progress.update(self.step, status)
                    if runtime.stop_agreed(stop, self.info, at_log):
                        stopped_by = stop.signal_name or "signal"
                        break
                    minutes = (time.monotonic() - last_ckpt) / 60
                    if self.step % config.ckpt_every == 0 or (info.is_main and minutes >= config.ckpt_minutes):
                        self._save_checked(sums, "periodic")
                        last_ckpt = time.monotonic()
                batches.close()
                if stopped_by is not None:
                    break
                at_epoch_end = self.step % self.steps_per_epoch == 0
                if at_epoch_end or self.step >= self.stop_step:
                    self._check_finite(sums)
                    results = self.evaluate_epoch(progress)
                    self._save_checked(sums, "epoch" if at_epoch_end else "end")
                    last_ckpt = time.monotonic()
            if stopped_by is not None:
                self._save_checked(sums, f"stopped by {stopped_by}")
        progress.close()
        self.metrics.close()
        if stopped_by is not None:
            if info.is_main:
                print(f"stopped by {stopped_by} at step {self.step}: checkpoint saved to {runtime.checkpoint_path(self.out)}; "
                      "re-run the same command to resume", file=sys.stderr)
            raise SystemExit(143 if stopped_by == "SIGTERM" else 130)
        if info.is_main and results is not None:
            print(f"finetune {self.out}: top-1 {results['top1']:.2f}% top-5 {results['top5']:.2f}% on "
                  f"{results['num_eval_samples']} val images (best top-1 {self.best['top1']:.2f}% at epoch "
                  f"{self.best['epoch']}); results in {self.out / 'results.json'}", file=sys.stderr)

    def _train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]], sums: torch.Tensor) -> None:
        self.scheduler.step_update(self.step)
        seed_step(self.config.seed, self.info.rank, self.step)
        self.model.train()
        for i, (images, labels) in enumerate(micro):
            images, targets = self.augment(images, labels)
            last = i == len(micro) - 1
            no_sync = self.ddp.no_sync() if self.info.distributed and not last else _null()
            with no_sync, runtime.autocast(self.device, self.precision):
                loss = self.criterion(self.forward(images).float(), targets)
            (loss / len(micro)).backward()
            sums[0] += loss.detach() / len(micro)
        if self.config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        sums[1] += (~torch.isfinite(loss.detach())).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step + 1)

    def _log(self, sums: torch.Tensor, window: int, timer: runtime.Timer, epoch: int, progress: runtime.Progress) -> str:
        reduced = runtime.all_reduce_mean(sums, self.info).tolist()  # the one host sync per log step
        if reduced[1] > 0:
            raise self._non_finite()
        elapsed = max(timer.elapsed(), 1e-9)
        per_step = self.config.batch_size * self.config.accum * self.info.world_size
        record = {
            "step": self.step, "epoch": epoch, "loss": reduced[0] / window,
            "lr": max(group["lr"] for group in self.optimizer.param_groups),
            "img_per_s": window * per_step / elapsed, "data_wait": timer.data_wait / elapsed,
        }
        self.metrics.write(record)
        progress.log(f"step {self.step}/{self.stop_step} epoch {epoch} loss {record['loss']:.4f} lr {record['lr']:.3g} "
                     f"{record['img_per_s']:.1f} img/s data-wait {100 * record['data_wait']:.0f}%")
        return f"loss {record['loss']:.4f} {record['img_per_s']:.0f} img/s"

    def evaluate_epoch(self, progress: runtime.Progress) -> dict:
        """Top-1/top-5 on the val split (each sample once across ranks); rewrite results.json."""
        from droppos.manifest import write_json_atomic

        epoch = self.step / self.steps_per_epoch
        epoch = int(epoch) if epoch == int(epoch) else round(epoch, 3)
        scores = self._evaluate(self.forward)
        record: dict[str, Any] = {"step": self.step, "epoch": epoch, **scores}
        if self.ema is not None:
            ema_scores = self._evaluate(self.ema.module)
            record.update({f"{k}_ema": v for k, v in ema_scores.items() if k != "num_eval_samples"})
        if self.best["top1"] is None or scores["top1"] > self.best["top1"]:
            self.best = {"top1": scores["top1"], "epoch": epoch}
        if self.info.is_main:
            self.metrics.write({f"val_{k}" if k not in ("step", "epoch") else k: v for k, v in record.items()})
            results = dict(record, best_top1=self.best["top1"], best_epoch=self.best["epoch"], task="finetune",
                           num_classes=self.num_classes, img_size=self.img_size, encoder=_plain(self.encoder_info))
            write_json_atomic(self.out / "results.json", results)
            extra = f" (EMA {record['top1_ema']:.2f}%)" if self.ema is not None else ""
            progress.log(f"epoch {epoch}: val top-1 {scores['top1']:.2f}% top-5 {scores['top5']:.2f}%{extra} "
                         f"on {scores['num_eval_samples']} images")
        return record

    def _evaluate(self, predict: torch.nn.Module) -> dict:
        from droppos.encoders import evaluate_topk

        self.model.eval()
        try:
            def logits(images: torch.Tensor) -> torch.Tensor:
                with runtime.autocast(self.device, self.precision):
                    return predict(images)
            return evaluate_topk(logits, self.val_loader.epoch(0), self.device, self.info.distributed)
        finally:
            self.model.train()

    def _check_finite(self, sums: torch.Tensor) -> None:
        if bool(runtime.all_reduce_max(sums[1:2].clone(), self.info)[0] > 0):
            raise self._non_finite()

    def _non_finite(self) -> UserError:
        return UserError(f"non-finite loss before step {self.step}; the last good checkpoint "
                         f"({runtime.checkpoint_path(self.out)}) was kept. Lower --blr, then re-run to resume")

    def _save_checked(self, sums: torch.Tensor, reason: str) -> None:
        """Never checkpoint weights that a non-finite step may have poisoned."""
        if bool(sums[1] > 0):
            raise self._non_finite()
        self.save(reason)

def _null():
    import contextlib

    return contextlib.nullcontext()


def _plain(info: dict) -> dict:
    """The encoder info as JSON- and weights_only-safe plain values."""
    return json.loads(json.dumps(info))
