"""`droppos probe`: MAE's linear probe of a frozen encoder (a DropPos export or any timm ViT).

The encoder is frozen; its [CLS] token (or, with `--pool avg`, the fc_norm-ed mean of its patch
tokens) feeds BatchNorm1d(affine=False) + Linear, trained with LARS (timm's `Lars`; trust ratio on
weight matrices, not on biases, as in MAE), lr = blr x effective batch / 256, warm-up then cosine
per step, plain cross-entropy.

Two ways to feed the head:
- default: images through the training pipeline (random resized crop + flip), the encoder run
  under no_grad every step, the head under DDP across ranks;
- `--cached`: every train and val image goes through the encoder once, with eval transforms
  (ranks split the work and gather the features), the features are saved to OUT/features.pt, and
  rank 0 trains the head on them: seconds on a CPU. Re-running reuses the features.
Both resume from OUT/checkpoints/last.pt and rewrite OUT/results.json after every epoch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from droppos import UserError, loop, runtime
from droppos.loop import Metric
from droppos.recipes import ProbeConfig

FEATURES_FORMAT = "droppos-features/1"


class LinearHead(nn.Sequential):
    """MAE's probe head: BatchNorm without affine (features on a common scale), then Linear."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(num_features, affine=False, eps=1e-6), nn.Linear(num_features, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def lars_groups(head: nn.Module, weight_decay: float) -> list[dict]:
    """Weight matrices get weight decay and the LARS trust ratio; biases neither (MAE's LARS)."""
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return [dict(params=weights, weight_decay=weight_decay, always_adapt=True),
            dict(params=others, weight_decay=0.0, always_adapt=False)]


# ---------------------------------------------------------------------------------------
# Entry point (parent process)


def run(config: ProbeConfig) -> None:
    """Check everything a user can get wrong, then launch the workers."""
    from droppos import encoders

    out = runtime.check_out_dir(config.out)
    encoders.check_encoder_source(config.encoder, config.run, config.timm_model, config.weights, config.pretrained,
                                  config.random_init)
    runtime.start("probe", _worker, config, out, step_batch=config.batch_size,
                  need_val="the probe is evaluated on it after every epoch")


def _worker(payload: dict) -> None:
    device = payload.pop("device")
    runtime.run_worker(device, lambda info: _probe(ProbeConfig(**payload), info))


def _probe(config: ProbeConfig, info: runtime.DistInfo) -> None:
    from droppos.data import build_loader, resolve_backend
    from droppos.encoders import load_encoder
    from droppos.manifest import load_manifest

    precision = runtime.setup_precision(info.device, config.precision)
    num_classes = len(load_manifest(Path(config.data))["classes"])
    torch.manual_seed(config.seed)  # a --timm-model / --random-init encoder is the same on every rank and run
    encoder, encoder_info = load_encoder(
        config.encoder, config.run, config.timm_model, num_classes=0, global_pool=config.pool,
        img_size=config.img_size, depth=config.depth, random_init=config.random_init, weights=config.weights,
        pretrained=config.pretrained)
    img_h, img_w = encoder_info["img_size"]
    if img_h != img_w:
        raise UserError(f"the encoder's input is {img_h}x{img_w}; the loaders crop squares: pass --img-size")
    encoder.requires_grad_(False)
    encoder.eval().to(info.device)
    use_compile = config.compile if config.compile is not None else info.device.type == "cuda"
    frozen = torch.compile(encoder) if use_compile else encoder

    def loader(split: str, mode: str):
        return build_loader(config.data, split, mode, config.batch_size, img_size=img_h, backend=config.loader,
                            device=info.device, rank=info.rank, world_size=info.world_size, seed=config.seed,
                            workers=config.workers)

    if config.cached:
        features = _cached_features(config, info, frozen, encoder_info, loader, precision)
        if not info.is_main:
            return  # rank 0 trains the head on the gathered features
        source: Any = CachedSource(*features, batch_size=config.batch_size * info.world_size, seed=config.seed,
                                   device=info.device)
        head_info = runtime.DistInfo(rank=0, world_size=1, local_rank=info.local_rank, device=info.device)
    else:
        source = EncoderSource(frozen, loader("train", "probe"), loader("val", "eval"), info.device, precision)
        head_info = info
    task = ProbeTask(config, head_info, source, encoder_info, num_classes, img_h)
    resolved = {"device": info.device.type, "precision": precision, "compile": use_compile,
                "loader": resolve_backend(config.loader, info.device, "probe")}
    # Batch x world size per step, also when rank 0 alone trains the head on the gathered cached features.
    schedule = loop.make_schedule(config, source.steps_per_epoch, info.world_size)
    loop.train(task, loop.Run(config, schedule, head_info, Path(config.out), resolved))


# ---------------------------------------------------------------------------------------
# Feature sources


def _features(frozen: nn.Module, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    with torch.no_grad(), runtime.autocast(device, precision):
        return frozen(images).float()


class EncoderSource:
    """Features of augmented images, computed by the frozen encoder every step."""

    def __init__(self, frozen: nn.Module, train_loader: Any, val_loader: Any, device: torch.device, precision: str) -> None:
        self.frozen, self.train_loader, self.val_loader = frozen, train_loader, val_loader
        self.device, self.precision = device, precision
        self.steps_per_epoch = train_loader.steps_per_epoch

    def train_epoch(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.train_loader.epoch(epoch, start_step=start_step)
        try:
            for images, labels in batches:
                yield _features(self.frozen, images, self.device, self.precision), labels
        finally:
            batches.close()

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.val_loader.epoch(0):
            yield _features(self.frozen, images, self.device, self.precision), labels


class CachedSource:
    """Batches of cached features, reshuffled every epoch by (seed, epoch): resumable exactly."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 batch_size: int, seed: int, device: torch.device) -> None:
        self.train_x, self.train_y = train_x.to(device), train_y.to(device)
        self.val_x, self.val_y = val_x.to(device), val_y.to(device)
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(self.train_y) // batch_size  # full batches: BatchNorm sees no tiny one

    def train_epoch(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        order = order.to(self.train_y.device)
        for step in range(start_step, self.steps_per_epoch):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.train_x[index], self.train_y[index]

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for begin in range(0, len(self.val_y), self.batch_size):
            yield self.val_x[begin:begin + self.batch_size], self.val_y[begin:begin + self.batch_size]


def _cache_key(config: ProbeConfig, encoder_info: dict, img_size: int) -> dict:
    """What the features depend on: the encoder (file identity), its input, the data."""
    from droppos.manifest import load_manifest

    key: dict[str, Any] = {k: getattr(config, k) for k in ("timm_model", "depth", "random_init", "pool", "seed")}
    key["img_size"] = img_size
    key["weights"] = encoder_info["weights"].get("sha256")  # the weights' content, wherever they came from
    key["architecture"] = [encoder_info["model"], encoder_info["model_args"]]
    manifest = load_manifest(Path(config.data))
    key["data"] = [str(Path(config.data).resolve())] + [
        [s["sha256"] for s in manifest["splits"][split]["shards"]] for split in ("train", "val")]
    return key


def _cached_features(config: ProbeConfig, info: runtime.DistInfo, frozen: nn.Module, encoder_info: dict,
                     loader: Any, precision: str) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, val_x, val_y) on the CPU: from OUT/features.pt, or extracted across ranks once."""
    path = Path(config.out) / "features.pt"
    key = _cache_key(config, encoder_info, encoder_info["img_size"][0])
    if path.exists():
        saved = runtime.load_checkpoint(path)
        if saved.get("format") == FEATURES_FORMAT and saved.get("key") == json.loads(json.dumps(key)):
            if info.is_main:
                print(f"using the cached features in {path}", file=sys.stderr)
            return saved["train_x"], saved["train_y"], saved["val_x"], saved["val_y"]
    t0 = time.perf_counter()
    train_x, train_y = _extract(frozen, loader("train", "eval"), info, precision, "train")
    val_x, val_y = _extract(frozen, loader("val", "eval"), info, precision, "val")
    if info.is_main:
        runtime.save_checkpoint(path, {"format": FEATURES_FORMAT, "key": key, "train_x": train_x, "train_y": train_y,
                                       "val_x": val_x, "val_y": val_y})
        print(f"extracted {len(train_y)} train and {len(val_y)} val features of dim {train_x.shape[1]} in "
              f"{time.perf_counter() - t0:.1f} s -> {path}", file=sys.stderr)
    return train_x, train_y, val_x, val_y


def _extract(frozen: nn.Module, loader: Any, info: runtime.DistInfo, precision: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one split (eval transforms), every sample once, gathered on every rank."""
    feats, labels = [], []
    progress = runtime.Progress(loader.steps_per_epoch, 0, info.is_main, f"features ({split})")
    for step, (images, batch_labels) in enumerate(loader.epoch(0), start=1):
        feats.append(_features(frozen, images, info.device, precision))
        labels.append(batch_labels)
        progress.update(step)
    progress.close()
    x, y = torch.cat(feats), torch.cat(labels)
    if info.distributed:  # every rank holds the same number of (padded) slots: plain all_gather
        xs = [torch.empty_like(x) for _ in range(info.world_size)]
        ys = [torch.empty_like(y) for _ in range(info.world_size)]
        torch.distributed.all_gather(xs, x)
        torch.distributed.all_gather(ys, y)
        x, y = torch.cat(xs), torch.cat(ys)
    real = y >= 0  # drop the eval loader's padding
    return x[real].cpu(), y[real].cpu()


# ---------------------------------------------------------------------------------------
# The head's training


class ProbeTask(loop.Task):
    stage = "probe"
    metrics = (Metric("loss"), Metric("train_top1", percent=True))
    eval_metrics = (Metric("val_top1", percent=True, label="val top-1"),
                    Metric("val_top5", percent=True, label="val top-5"))

    def __init__(self, config: ProbeConfig, info: runtime.DistInfo, source: Any, encoder_info: dict,
                 num_classes: int, img_size: int) -> None:
        from timm.optim import Lars

        self.config, self.info, self.device, self.source = config, info, info.device, source
        self.encoder_info, self.num_classes, self.img_size = encoder_info, num_classes, img_size
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        self.head = LinearHead(encoder_info["num_features"], num_classes).to(self.device)
        self.optimizer = Lars(lars_groups(self.head, config.weight_decay), lr=0.0, momentum=0.9)
        self.criterion = nn.CrossEntropyLoss()
        self.best: dict[str, Any] = {"top1": None, "epoch": None}
        self.train_head = runtime.wrap_ddp(self.head, info)

    def parts(self) -> dict[str, Any]:
        return {"head": self.head, "optimizer": self.optimizer}

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "encoder": runtime.plain(self.encoder_info)}

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        self.best = dict(saved.get("best") or self.best)

    def describe(self) -> str:
        info = self.encoder_info
        feature = "[CLS] token" if self.config.pool == "token" else "mean of the patch tokens"
        how = "cached features" if self.config.cached else "features of augmented images every step"
        return (f"a linear head on the frozen {info['label']} ({info['num_features']}-d {feature}, {self.img_size} "
                f"px, {self.num_classes} classes, {how}) on {self.config.data}")

    def batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        return self.source.train_epoch(epoch, start_batch)

    def step(self, step: int, micro: list[Any], sums: torch.Tensor) -> None:
        (feats, labels), = micro
        self.head.train()
        logits = self.train_head(feats)
        loss = self.criterion(logits, labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums[0] += loss.detach()
        sums[1] += (logits.detach().argmax(-1) == labels).float().mean()
        sums[2] += (~torch.isfinite(loss.detach())).float()

    def evaluate(self, step: int, epoch: float, progress: runtime.Progress) -> Optional[dict[str, Any]]:
        from droppos.encoders import evaluate_topk
        from droppos.files import write_json_atomic

        self.head.eval()
        scores = evaluate_topk(self.head, self.source.val_batches(), self.device, self.info.distributed)
        if self.best["top1"] is None or scores["top1"] > self.best["top1"]:
            self.best = {"top1": scores["top1"], "epoch": epoch}
        if self.info.is_main:
            write_json_atomic(self.out / "results.json", dict(
                step=step, epoch=epoch, **scores, best_top1=self.best["top1"], best_epoch=self.best["epoch"],
                task="probe", cached=self.config.cached, pool=self.config.pool, num_classes=self.num_classes,
                img_size=self.img_size, encoder=runtime.plain(self.encoder_info), units="percent"))
            progress.log(f"epoch {epoch}: val top-1 {scores['top1']:.2f}% top-5 {scores['top5']:.2f}% "
                         f"on {scores['num_eval_samples']} images")
        return {"val_top1": scores["top1"], "val_top5": scores["top5"]}

    def finish(self) -> list[tuple[str, str]]:
        results = self.out / "results.json"
        if results.exists():
            r = json.loads(results.read_text())
            print(f"probe {self.out}: top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% on {r['num_eval_samples']} val "
                  f"images; results in {results}", file=sys.stderr)
        return [("results", str(results))]
