"""`droppos pretrain`: DropPos pre-training (docs/METHOD.md), distributed, compiled and resumable.

The step: masks and dropped PEs from `torch.rand` + `argsort` seeded by (seed, rank, step), the
smoothing sigma of the step as a 0-dim tensor on the device, AdamW with the recipe's weight-decay
groups, gradient clipping. Everything else (schedule, accumulation, logging, signals, checkpoints,
resume, evaluation cadence) is the shared loop's (droppos/loop.py). After each epoch the held-out
position accuracy on the val split is logged; at the end the encoder is exported in timm's layout.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from droppos import UserError, check_all, checkpoint, distributed, environment, launch, loop
from droppos.environment import Environment
from droppos.loop import Metric
from droppos.recipes import PretrainConfig


def sigma_at_step(step: int, total_steps: int, sigma0: float, decay: bool) -> float:
    """Linear decay from sigma0 to 0 over training (per step), or constant."""
    if not decay:
        return sigma0
    return sigma0 * max(0.0, 1.0 - step / max(1, total_steps))


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float, mode: str) -> torch.Tensor:
    """Clip gradients in place; returns the global gradient norm (before clipping), for the non-finite check.

    'global': torch's clip_grad_norm_ (all gradients scaled together). 'per-param': each parameter
    tensor's gradient scaled to norm <= max_norm on its own, max_norm / (norm + 1e-6) as the published
    code does. max_norm 0: no clipping. No host sync either way (the coefficients stay on the device).
    """
    params = [p for p in parameters if p.grad is not None]
    if mode == "global" or max_norm <= 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


def optimizer_groups(model: torch.nn.Module, weight_decay: float, decay_tokens: bool) -> list[dict]:
    """AdamW groups by timm's rule (no decay on 1-D parameters and biases); the [CLS] and [MASK] tokens are
    decayed too when `decay_tokens` (the published code's rule), else exempt (timm's no_weight_decay)."""
    from timm.optim import param_groups_weight_decay

    no_decay = () if decay_tokens else set(model.no_weight_decay())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


def build_model(config: PretrainConfig) -> torch.nn.Module:
    from droppos.model import create_from_config

    return create_from_config(config)


# ---------------------------------------------------------------------------------------
# Entry point (parent process)


def run(config: PretrainConfig, export_only: bool = False) -> None:
    """Check what a user can get wrong, resolve the environment, then launch the workers."""
    out = launch.check_out_dir(config.output.out)
    if export_only:
        export_from_checkpoint(out)
        return
    model = config.model
    check_all([(model.img_size % model.patch == 0,
                f"--img-size {model.img_size} is not divisible by the patch size {model.patch}")])
    env = environment.resolve(config.launch, config.data, "pretrain")
    launch.start("pretrain", _worker, config, env, accum=config.optim.accum)


def export_from_checkpoint(out: Path) -> Path:
    """RUN/encoder.safetensors from RUN's last checkpoint (validated like any checkpoint; RUN locked meanwhile)."""
    from droppos.files import claim_output
    from droppos.weights import read_droppos_checkpoint

    path = checkpoint.path(out)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: nothing to export (run `droppos pretrain --out {out} ...` first)")
    with claim_output(out, "pretrain --export-only"):
        target = _export(read_droppos_checkpoint(path), out)
    print(f"exported the encoder of {path} to {target}", file=sys.stderr)
    return target


def _export(model: torch.nn.Module, out: Path) -> Path:
    from droppos.export import export_encoder

    target = Path(out) / "encoder.safetensors"
    export_encoder(distributed.unwrap(model), target)
    return target


# ---------------------------------------------------------------------------------------
# Worker


def _worker(config: PretrainConfig, env: Environment) -> None:
    """One training process (rank): build the stage and hand it to the shared loop."""
    launch.run_worker(env, lambda info: loop.train(PretrainStage(config, env, info), config, env, info))


class PretrainStage(loop.Stage):
    name = "pretrain"
    metrics = (Metric("loss"), Metric("pos_acc", percent=True), Metric("pos_acc_weighted", percent=True))
    eval_metrics = (Metric("val_pos_acc", percent=True, label="held-out pos_acc (val)"),)

    def __init__(self, config: PretrainConfig, env: Environment, info: distributed.DistInfo) -> None:
        from droppos.data import build_loader
        from droppos.model import compile_step

        self.config, self.pretext, self.info, self.device = config, config.pretext, info, info.device
        self.out = Path(config.output.out)
        self.eval_every, self.accum, self.precision = config.logging.eval_every, config.optim.accum, env.precision
        self.loader_options = dict(img_size=config.model.img_size, backend=env.loader, device=self.device,
                                   rank=info.rank, world_size=info.world_size, seed=config.launch.seed,
                                   workers=env.workers)
        torch.manual_seed(config.launch.seed)
        self.model = build_model(config).to(self.device)
        self.loader = build_loader(config.data.path, "train", "pretrain", config.optim.batch_size,
                                   labels_to_device=False,  # the pretext needs no labels: no copy every step
                                   **self.loader_options)
        self.schedule = loop.make_schedule(config.optim, self.loader.steps_per_epoch, info.world_size, self.accum)
        groups = optimizer_groups(self.model, config.optim.weight_decay, config.optim.decay_tokens)
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=self.device.type == "cuda")
        # DDP first, then compile the wrapped module: DDPOptimizer splits the graph at bucket
        # boundaries so that gradient all-reduce overlaps the backward pass (PyTorch's advice). Compiled,
        # the attentive pass is its own inference graph (a CUDA graph on CUDA): model.compile_step.
        self.ddp = distributed.wrap_ddp(self.model, info, self.accum)
        self.saliency, self.forward = compile_step(self.ddp, self.device) if env.compile else (None, self.ddp)
        self.sigma = torch.zeros((), device=self.device)

    def parts(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        data = self.config.data.path
        return (f"droppos_{self.config.model.arch} ({params / 1e6:.1f}M parameters, {self.config.model.img_size} px) "
                f"on {data} ({_sample_counts(data)})")

    def loaders(self) -> list[Any]:
        return [self.loader]

    def batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        return self.loader.epoch(epoch, start_batch=start_batch)

    def sigma_at(self, step: int) -> float:
        return sigma_at_step(step, self.schedule.total_steps, self.pretext.sigma, self.pretext.sigma_decay)

    def log_fields(self, step: int) -> dict[str, Any]:
        return {"sigma": self.sigma_at(step)}

    def step(self, step: int, micro: list[Any], window: loop.MetricWindow) -> None:
        self.sigma.fill_(self.sigma_at(step))
        torch.manual_seed(distributed.step_seed(self.config.launch.seed, self.info.rank, step))
        for i, (images, _) in enumerate(micro):
            last = i == len(micro) - 1
            no_sync = self.ddp.no_sync() if self.info.distributed and not last else contextlib.nullcontext()
            with no_sync, environment.autocast(self.device, self.precision):
                weights = self.saliency(images) if self.saliency is not None else None  # else inside forward
                out = self.forward(images, self.sigma, saliency=weights)
            (out["loss"] / len(micro)).backward()
            for metric in self.metrics:
                window.add(metric.name, out[metric.name].detach().float() / len(micro))
        grad_norm = clip_gradients(self.model.parameters(), self.config.optim.clip_grad, self.config.optim.clip_mode)
        window.check_finite(grad_norm, out["loss"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate(self, step: int, epoch: float, say: Callable[[str], None]) -> Optional[dict[str, Any]]:
        held_out = self.evaluate_positions()
        if held_out is None:
            return None
        say(f"epoch {epoch}: held-out position accuracy {held_out:.2f}%")
        return {"val_pos_acc": held_out}

    @torch.no_grad()
    def evaluate_positions(self) -> Optional[float]:
        """Held-out position top-1 (percent) over dropped patches at the training ratios (val split)."""
        from droppos import manifest
        from droppos.data import build_loader

        data_manifest = manifest.load_manifest(Path(self.config.data.path))
        if "val" not in data_manifest["splits"] or data_manifest["splits"]["val"]["num_samples"] == 0:
            return None
        loader = build_loader(self.config.data.path, "val", "eval", self.config.optim.batch_size,
                              **self.loader_options)
        model = self.model
        was_training = model.training
        model.eval()
        generator_state = torch.get_rng_state()
        torch.manual_seed(self.config.launch.seed + 1)  # the same masks at every evaluation
        totals = torch.zeros(2, device=self.device)
        try:
            for images, labels in loader.epoch(0):
                with environment.autocast(self.device, self.precision):
                    out = model.forward_position(images, self.pretext.mask_ratio, self.pretext.pos_mask_ratio)
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
        return 100.0 * correct / count if count else None

    def finish(self) -> list[tuple[str, str]]:
        return [("encoder", str(_export(self.model, self.out)))]


def _sample_counts(data: str) -> str:
    from droppos.manifest import load_manifest

    splits = load_manifest(Path(data))["splits"]
    return " / ".join(f"{info['num_samples']} {name}" for name, info in splits.items())
