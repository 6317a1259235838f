"""`droppos pretrain`: DropPos pre-training, distributed, compiled and resumable.

The loop is step-based: the optimizer step `step` alone fixes the learning rate,
sigma, the data position (epoch, batch) and the random masks (seeded per step and
rank), so a resumed run continues exactly where an uninterrupted run would be.
The training step never synchronises with the host: loss, accuracy and a
non-finite flag accumulate on the device and are read every `--log-every` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from droppos import UserError, runtime
from droppos.recipes import MODELS, PretrainConfig, to_dict

# Options that fix the parameters' shapes: a checkpoint of other values cannot be resumed.
ARCH_KEYS = (
    "model", "img_size", "patch_size", "depth", "embed_dim", "num_heads",
    "decoder_depth", "decoder_width", "decoder_heads", "aux_mae", "mask_token",
)


class NonFiniteLoss(UserError):
    """Training diverged: reported in one line, the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------
# Schedules (stateless functions of the optimizer step, MAE style)


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to `peak_lr`, then a half-cycle cosine down to `min_lr`."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sigma_at_step(step: int, total_steps: int, sigma0: float, decay: bool) -> float:
    """Linear decay from sigma0 to 0 over training (per step), or constant."""
    if not decay:
        return sigma0
    return sigma0 * max(0.0, 1.0 - step / max(1, total_steps))


def peak_lr(config: PretrainConfig, world_size: int) -> float:
    if config.lr is not None:
        return config.lr
    return config.blr * config.batch_size * config.accum * world_size / 256


# ---------------------------------------------------------------------------------------
# Model


def build_model(config: PretrainConfig) -> torch.nn.Module:
    from droppos.model import create_from_config

    return create_from_config(to_dict(config))


# ---------------------------------------------------------------------------------------
# Entry point (parent process)


def run(config: PretrainConfig, export_only: bool = False) -> None:
    """Validate everything a user can get wrong, then launch the workers."""
    out = runtime.check_out_dir(config.out)
    if export_only:
        export_from_checkpoint(out)
        return
    if config.model not in MODELS:
        raise UserError(f"unknown --model {config.model!r}; choose one of: {', '.join(MODELS)}")
    _validate(config)
    runtime.start("pretrain", _worker, config, out, step_batch=config.batch_size * config.accum,
                  arch_keys=ARCH_KEYS, mismatch="a checkpoint of another model")


def _validate(config: PretrainConfig) -> None:
    checks = [
        (0 <= config.mask_ratio < 1, "--mask-ratio must be in [0, 1)"),
        (0 <= config.pos_mask_ratio <= 1, "--pos-mask-ratio must be in [0, 1]"),
        (config.epochs >= 1, "--epochs must be >= 1"),
        (config.batch_size >= 1 and config.accum >= 1, "--batch-size and --accum must be >= 1"),
        (config.sigma >= 0 and config.tau > 0, "--sigma must be >= 0 and --tau > 0"),
        (config.mask_token in ("learnable", "zeros", "wrong"), "--mask-token: choose learnable, zeros or wrong"),
    ]
    patch = config.patch_size or int(config.model.split("patch")[-1])
    checks.append((config.img_size % patch == 0, f"--img-size {config.img_size} is not divisible by the patch size {patch}"))
    runtime.check_all(checks)


def export_from_checkpoint(out: Path) -> Path:
    path = runtime.checkpoint_path(out)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: nothing to export (run `droppos pretrain --out {out} ...` first)")
    saved = runtime.load_checkpoint(path)
    config = PretrainConfig(**{k: v for k, v in saved["config"].items() if k in {f.name for f in dataclasses.fields(PretrainConfig)}})
    model = build_model(config)
    model.load_state_dict(saved["model"])
    target = _export(model, out)
    print(f"exported the encoder of step {saved['step']} to {target}", file=sys.stderr)
    return target


def _export(model: torch.nn.Module, out: Path) -> Path:
    from droppos.model import export_encoder

    target = Path(out) / "encoder.safetensors"
    export_encoder(runtime.unwrap(model), target)
    return target


# ---------------------------------------------------------------------------------------
# Worker


def _worker(payload: dict) -> None:
    """One training process (rank): everything from the model to the last checkpoint."""
    device = payload.pop("device")
    runtime.run_worker(device, lambda info: Trainer(PretrainConfig(**payload), info).train())


class Trainer:
    def __init__(self, config: PretrainConfig, info: runtime.DistInfo) -> None:
        from droppos.data import build_loader

        self.config, self.info, self.device = config, info, info.device
        self.out = Path(config.out)
        self.precision = runtime.setup_precision(self.device, config.precision)
        use_compile = config.compile if config.compile is not None else self.device.type == "cuda"
        torch.manual_seed(config.seed)

        self.model = build_model(config).to(self.device)
        self.loader = build_loader(
            config.data, "train", "pretrain", config.batch_size, img_size=config.img_size,
            backend=config.loader, device=self.device, rank=info.rank, world_size=info.world_size,
            seed=config.seed, workers=config.workers,
        )
        self.steps_per_epoch = self.loader.steps_per_epoch // config.accum
        if self.steps_per_epoch < 1:
            raise UserError("fewer batches per epoch than --accum; lower --batch-size or --accum")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, config.max_steps) if config.max_steps else self.total_steps
        self.warmup_steps = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.peak_lr = peak_lr(config, info.world_size)

        from timm.optim import param_groups_weight_decay

        no_decay = set(getattr(self.model, "no_weight_decay", lambda: set())())
        groups = param_groups_weight_decay(self.model, config.weight_decay, no_weight_decay_list=no_decay)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, betas=(0.9, 0.95), fused=fused)
        self.step = 0
        self._resume()

        # DDP first, then compile the wrapped module: DDPOptimizer splits the graph at bucket
        # boundaries so gradient all-reduce overlaps the backward pass (PyTorch's advice).
        wrapped = self.ddp = runtime.wrap_ddp(self.model, info)
        self.forward = torch.compile(wrapped) if use_compile else wrapped
        self.sigma = torch.zeros((), device=self.device)
        self.metrics = runtime.MetricsLog(self.out, info.is_main)
        self.use_compile = use_compile

    # -- state ------------------------------------------------------------------------

    def _resume(self) -> None:
        saved = runtime.resume(self.out, self.device, self._parts(), self.info.is_main)
        if saved is not None:
            self.step = int(saved["step"])

    def _parts(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def save(self, reason: str) -> None:
        if not self.info.is_main:
            return
        state = runtime.checkpoint_state(
            self._parts(), step=self.step, epoch=self.step // self.steps_per_epoch,
            batch=(self.step % self.steps_per_epoch) * self.config.accum, config=to_dict(self.config),
            rng=runtime.rng_state(), reason=reason)
        runtime.save_checkpoint(runtime.checkpoint_path(self.out), state)
        if self.config.keep_every and self.step % self.config.keep_every == 0:
            runtime.save_checkpoint(self.out / "checkpoints" / f"step-{self.step:08d}.pt", state)

    # -- loop -------------------------------------------------------------------------

    def train(self) -> None:
        config, info = self.config, self.info
        record = dict(to_dict(config), world_size=info.world_size)
        if not runtime.open_run(self.out, record, self.step, self.stop_step, info.is_main):
            if info.is_main:
                _export(self.model, self.out)
            return
        progress = runtime.Progress(self.stop_step, self.step, info.is_main, "pretrain")
        sums = torch.zeros(4, device=self.device)  # loss, pos_acc, pos_acc_weighted, non-finite count
        window_steps, images_seen, start_step = 0, 0, self.step
        timer, t_start = runtime.Timer(), time.perf_counter()
        last_ckpt_time = time.monotonic()
        last_log: dict[str, Any] = {}
        held_out: Optional[float] = None
        stopped_by: Optional[str] = None
        with runtime.StopRequest() as stop:
            while self.step < self.stop_step and stopped_by is None:
                epoch = self.step // self.steps_per_epoch
                start_batch = (self.step % self.steps_per_epoch) * config.accum
                batches = self.loader.epoch(epoch, start_step=start_batch)
                epoch_end = (epoch + 1) * self.steps_per_epoch
                while self.step < min(epoch_end, self.stop_step):
                    micro = []
                    with timer.waiting():
                        for _ in range(config.accum):
                            micro.append(next(batches)[0])
                    self._train_step(micro, sums)
                    self.step += 1
                    window_steps += 1
                    images_seen += config.batch_size * config.accum * info.world_size
                    at_log = self.step % config.log_every == 0 or self.step == self.stop_step
                    if at_log:
                        last_log = self._log(sums, window_steps, timer, epoch, progress)
                        sums.zero_()
                        window_steps = 0
                        timer.reset()
                    progress.update(self.step, last_log.get("status", ""))
                    if runtime.stop_agreed(stop, info, at_log):
                        stopped_by = stop.signal_name or "signal"
                        break
                    minutes = (time.monotonic() - last_ckpt_time) / 60
                    if self.step % config.ckpt_every == 0 or (info.is_main and minutes >= config.ckpt_minutes):
                        self._save_checked(sums, "periodic")
                        last_ckpt_time = time.monotonic()
                with contextlib.suppress(Exception):
                    batches.close()
                if stopped_by is None and self.step % self.steps_per_epoch == 0:
                    self._save_checked(sums, "epoch")
                    last_ckpt_time = time.monotonic()
                    done_epochs = self.step // self.steps_per_epoch
                    last = self.step >= self.stop_step
                    if last or (config.eval_every and done_epochs % config.eval_every == 0):
                        held_out = self.evaluate_positions()
                        if held_out is not None:
                            self.metrics.write({"step": self.step, "epoch": done_epochs, "val_pos_acc": held_out})
                            progress.log(f"epoch {done_epochs}: held-out position accuracy {100 * held_out:.2f}%")
            if stopped_by is None and self.step % self.steps_per_epoch != 0:
                self._save_checked(sums, "end")  # a --max-steps run ends mid-epoch
                if held_out is None:
                    held_out = self.evaluate_positions()
            elif stopped_by is not None:
                self._save_checked(sums, f"stopped by {stopped_by}")
        progress.close()
        self.metrics.close()
        elapsed = time.perf_counter() - t_start
        if stopped_by is not None:
            if info.is_main:
                print(
                    f"stopped by {stopped_by} at step {self.step}: checkpoint saved to {runtime.checkpoint_path(self.out)}; "
                    "re-run the same command to resume", file=sys.stderr,
                )
            raise SystemExit(143 if stopped_by == "SIGTERM" else 130)
        if info.is_main:
            encoder = _export(self.model, self.out)
            self._summary(images_seen, elapsed, start_step, last_log, held_out, encoder)

    def _train_step(self, micro: list[torch.Tensor], sums: torch.Tensor) -> None:
        config = self.config
        lr = lr_at(self.step, self.peak_lr, self.warmup_steps, self.total_steps, config.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sigma.fill_(sigma_at_step(self.step, self.total_steps, config.sigma, config.sigma_decay))
        torch.manual_seed(runtime.step_seed(config.seed, self.info.rank, self.step))
        for i, images in enumerate(micro):
            sync = i == len(micro) - 1 or not self.info.distributed
            no_sync = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with no_sync, runtime.autocast(self.device, self.precision):
                out = self.forward(images, self.sigma)
            (out["loss"] / len(micro)).backward()
            sums[0] += out["loss"].detach().float() / len(micro)
            sums[1] += out["pos_acc"].detach().float() / len(micro)
            sums[2] += out["pos_acc_weighted"].detach().float() / len(micro)
        max_norm = config.clip_grad if config.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        sums[3] += (~torch.isfinite(grad_norm)).float() + (~torch.isfinite(out["loss"].detach())).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log(self, sums: torch.Tensor, window_steps: int, timer: runtime.Timer, epoch: int, progress: runtime.Progress) -> dict:
        reduced = runtime.all_reduce_mean(sums, self.info).tolist()  # the one host sync per log step
        if reduced[3] > 0:
            raise self._non_finite()
        elapsed = timer.elapsed()
        per_step = self.config.batch_size * self.config.accum * self.info.world_size
        record = {
            "step": self.step,
            "epoch": epoch,
            "loss": reduced[0] / window_steps,
            "pos_acc": reduced[1] / window_steps,
            "pos_acc_weighted": reduced[2] / window_steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "sigma": float(self.sigma),
            "img_per_s": window_steps * per_step / max(elapsed, 1e-9),
            "data_wait": timer.data_wait / max(elapsed, 1e-9),
        }
        self.metrics.write(record)
        status = f"loss {record['loss']:.4f} pos_acc {100 * record['pos_acc']:.1f}% {record['img_per_s']:.0f} img/s"
        progress.log(
            f"step {self.step}/{self.stop_step} epoch {epoch} loss {record['loss']:.4f} "
            f"pos_acc {100 * record['pos_acc']:.2f}% lr {record['lr']:.3g} sigma {record['sigma']:.3f} "
            f"{record['img_per_s']:.1f} img/s data-wait {100 * record['data_wait']:.0f}%"
        )
        return dict(record, status=status)

    def _non_finite(self) -> NonFiniteLoss:
        return NonFiniteLoss(
            f"non-finite loss or gradient before step {self.step}; the last good checkpoint "
            f"({runtime.checkpoint_path(self.out)}) was kept. Lower --blr or check the data, then re-run to resume"
        )

    def _save_checked(self, sums: torch.Tensor, reason: str) -> None:
        """Never checkpoint weights that a non-finite step may have poisoned."""
        if bool(sums[3] > 0):
            raise self._non_finite()
        self.save(reason)

    @torch.no_grad()
    def evaluate_positions(self) -> Optional[float]:
        """Held-out position top-1 over dropped patches at the training ratios (val split)."""
        from droppos import manifest
        from droppos.data import build_loader

        data_manifest = manifest.load_manifest(Path(self.config.data))
        if "val" not in data_manifest["splits"] or data_manifest["splits"]["val"]["num_samples"] == 0:
            return None
        loader = build_loader(
            self.config.data, "val", "eval", self.config.batch_size, img_size=self.config.img_size,
            backend=self.config.loader, device=self.device, rank=self.info.rank,
            world_size=self.info.world_size, seed=self.config.seed, workers=self.config.workers,
        )
        model = self.model
        was_training = model.training
        model.eval()
        generator_state = torch.get_rng_state()
        torch.manual_seed(self.config.seed + 1)  # the same masks at every evaluation
        totals = torch.zeros(2, device=self.device)
        try:
            for images, labels in loader.epoch(0):
                with runtime.autocast(self.device, self.precision):
                    out = model.forward_position(images, self.config.mask_ratio, self.config.pos_mask_ratio)
                real = (labels >= 0).float()[:, None]
                hit = (out["logits"].argmax(-1) == out["positions"]).float() * out["dropped"].float() * real
                totals[0] += hit.sum()
                totals[1] += (out["dropped"].float() * real).sum()
        finally:
            loader.close()
            torch.set_rng_state(generator_state)
            model.train(was_training)
        if self.info.distributed:
            torch.distributed.all_reduce(totals)
        correct, count = totals.tolist()
        return correct / count if count else None

    def _summary(self, images: int, elapsed: float, start_step: int, last: dict, held_out: Optional[float], encoder: Path) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"droppos pretrain: {self.out}", show_header=False)
        table.add_row("steps", f"{start_step} -> {self.step} of {self.total_steps}")
        table.add_row("images seen (this run)", f"{images:,}")
        table.add_row("time", f"{elapsed:.1f} s")
        table.add_row("throughput", f"{images / max(elapsed, 1e-9):.1f} img/s")
        if last:
            table.add_row("final train pos_acc", f"{100 * last['pos_acc']:.2f}%")
        if held_out is not None:
            table.add_row("held-out pos_acc (val)", f"{100 * held_out:.2f}%")
        table.add_row("encoder", str(encoder))
        Console(stderr=True).print(table)
