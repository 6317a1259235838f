"""`droppos probe`: a linear probe of a frozen encoder (MAE's protocol), or a linear segmentation head.

Classification: the [CLS] token (or, `--pool avg`, the mean of the patch tokens) -> BatchNorm without
affine -> Linear, trained with LARS. Segmentation (`--task segmentation`, DINOv2/iBOT's linear protocol,
droppos.dense): the last N blocks' patch tokens -> BatchNorm + 1x1 conv, upsampled to the label map;
mIoU exact over every val pixel across ranks. The head sees either the frozen encoder's features of
augmented images every step, or (`--cached`) features extracted once with eval transforms and kept in
OUT/features.pt, on which rank 0 trains the head alone (seconds on a CPU). Both resume exactly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from droppos import UserError, checkpoint, distributed, environment, launch, loop
from droppos.distributed import DistInfo
from droppos.environment import Environment
from droppos.loop import Metric
from droppos.progress import Progress
from droppos.recipes import ProbeConfig, ProbeOptim

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


def head_optimizer(head: nn.Module, optim: ProbeOptim) -> torch.optim.Optimizer:
    """`--optimizer`: LARS (MAE's linear probe) or AdamW (DINOv2's linear segmentation head); the loop sets the lr.
    Either way biases and norms get no weight decay."""
    if optim.optimizer == "adamw":
        groups = [{k: v for k, v in group.items() if k != "always_adapt"} for group in lars_groups(head, optim.weight_decay)]
        return torch.optim.AdamW(groups, lr=0.0)
    from timm.optim import Lars

    return Lars(lars_groups(head, optim.weight_decay), lr=0.0, momentum=0.9)


# ---------------------------------------------------------------------------------------
# Entry point (parent process)


def run(config: ProbeConfig) -> None:
    """Check everything a user can get wrong, resolve the environment, then launch the workers."""
    from droppos import encoders

    launch.check_out_dir(config.output.out)
    source = config.encoder
    encoders.check_encoder_source(source.encoder, source.run, source.timm_model, source.weights, source.pretrained,
                                  source.random_init)
    _check_task(config)
    segmentation = config.head.task == "segmentation"
    env = environment.resolve(config.launch, config.data, "segment" if segmentation else "probe", masks=segmentation)
    launch.start("probe", _worker, config, env, need_val="the probe is evaluated on it after every epoch")


def _check_task(config: ProbeConfig) -> None:
    """The data suits the task: label maps for segmentation, image classes for classification."""
    data = config.data.path
    if not data:
        return  # launch.start says what is missing
    from droppos.data import dataset_seg_spec
    from droppos.labelmaps import BadManifest, spec_from_manifest
    from droppos.manifest import load_manifest

    if config.head.task == "segmentation":
        dataset_seg_spec(data)
        return
    try:
        seg = spec_from_manifest(load_manifest(Path(data)))
    except BadManifest as err:
        raise UserError(str(err)) from None
    if seg is not None and not seg.image_classes:
        raise UserError(f"{data} has label maps but no image classes: probe it with --task segmentation")


def _worker(config: ProbeConfig, env: Environment) -> None:
    launch.run_worker(env, lambda info: _probe(config, env, info))


def _frozen_encoder(config: ProbeConfig, global_pool: str, device: torch.device) -> tuple[nn.Module, dict]:
    """The encoder, frozen on the device, and its info."""
    from droppos.encoders import load_encoder

    source = config.encoder
    torch.manual_seed(config.launch.seed)  # a --timm-model / --random-init encoder is the same on every rank and run
    encoder, encoder_info = load_encoder(
        source.encoder, source.run, source.timm_model, num_classes=0, global_pool=global_pool,
        img_size=source.img_size, depth=source.depth, random_init=source.random_init, weights=source.weights,
        pretrained=source.pretrained)
    img_h, img_w = encoder_info["img_size"]
    if img_h != img_w:
        raise UserError(f"the encoder's input is {img_h}x{img_w}; the loaders crop squares: pass --img-size")
    encoder.requires_grad_(False)
    encoder.eval().to(device)
    return encoder, encoder_info


def _loader_factory(config: ProbeConfig, env: Environment, info: DistInfo, img_size: int, masks: bool = False) -> Any:
    """loader(split, mode): this rank's loader of the probe's data."""
    from droppos.data import build_loader

    def loader(split: str, mode: str, rank: int = info.rank, world_size: int = info.world_size,
               batch_size: int = config.optim.batch_size, workers: int = env.workers):
        return build_loader(config.data.path, split, mode, batch_size, img_size=img_size, backend=env.loader,
                            device=info.device, rank=rank, world_size=world_size, seed=config.launch.seed,
                            workers=workers, masks=masks)

    return loader


def _probe(config: ProbeConfig, env: Environment, info: DistInfo) -> None:
    from droppos import dense
    from droppos.data import dataset_seg_spec
    from droppos.manifest import load_manifest

    segmentation, precision = config.head.task == "segmentation", env.precision
    # Segmentation reads the patch tokens through the final norm: `token` pooling keeps the trained norm there.
    encoder, encoder_info = _frozen_encoder(config, "token" if segmentation else config.encoder.pool, info.device)
    img_size = encoder_info["img_size"][0]
    if segmentation:
        seg = dataset_seg_spec(config.data.path)
        if config.head.seg_layers > len(encoder.blocks):
            raise UserError(f"--seg-layers {config.head.seg_layers}: the encoder has {len(encoder.blocks)} blocks")
        feature: nn.Module = dense.PatchFeatures(encoder, config.head.seg_layers).eval()
        train_mode = "segment"
    else:
        num_classes = len(load_manifest(Path(config.data.path))["classes"])
        feature, train_mode = encoder, "probe"
    frozen = torch.compile(feature) if env.compile else feature
    loader = _loader_factory(config, env, info, img_size, masks=segmentation)

    if config.head.cached:
        train, val = _cached_features(config, info, frozen, encoder_info, loader, precision)
        if not info.is_main:
            return  # rank 0 trains the head on the gathered features
        source: Any = CachedSource(train, val, batch_size=config.optim.batch_size * info.world_size,
                                   seed=config.launch.seed, device=info.device)
        head_info = info.alone()
    else:
        source = EncoderSource(frozen, loader("train", train_mode), loader("val", "eval"), info.device, precision)
        head_info = info
    # Batch x world size per step, also when rank 0 alone trains the head on the gathered cached features.
    schedule = loop.make_schedule(config.optim, source.steps_per_epoch, info.world_size)
    if segmentation:
        preview = _previewer(config, loader, frozen, info.device, precision)
        stage: loop.Stage = SegProbeStage(config, head_info, source, schedule, encoder_info, seg, img_size,
                                          feature.num_features, preview)
    else:
        stage = ProbeStage(config, head_info, source, schedule, encoder_info, num_classes, img_size)
    loop.train(stage, config, env, head_info)


# ---------------------------------------------------------------------------------------
# Feature sources: batches of (features, labels) or, with label maps, (feature maps, labels, masks)


def _features(frozen: nn.Module, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    with torch.no_grad(), environment.autocast(device, precision):
        return frozen(images).float()


class EncoderSource:
    """Features of augmented images, computed by the frozen encoder every step (masks cropped and flipped alike)."""

    def __init__(self, frozen: nn.Module, train_loader: Any, val_loader: Any, device: torch.device, precision: str) -> None:
        self.frozen, self.train_loader, self.val_loader = frozen, train_loader, val_loader
        self.device, self.precision = device, precision
        self.steps_per_epoch = train_loader.steps_per_epoch

    def train_epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        batches = self.train_loader.epoch(epoch, start_batch=start_batch)
        try:
            for images, *targets in batches:
                yield _features(self.frozen, images, self.device, self.precision), *targets
        finally:
            batches.close()

    def val_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Eval padding has label -1 (and an all-IGNORE mask)."""
        for images, *targets in self.val_loader.epoch(0):
            yield _features(self.frozen, images, self.device, self.precision), *targets


class CachedSource:
    """Batches of cached features (and labels, masks), reshuffled every epoch by (seed, epoch): resumable exactly."""

    def __init__(self, train: tuple[torch.Tensor, ...], val: tuple[torch.Tensor, ...], batch_size: int, seed: int,
                 device: torch.device) -> None:
        self.train, self.val = tuple(t.to(device) for t in train), tuple(t.to(device) for t in val)
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(self.train[0]) // batch_size  # full batches: BatchNorm sees no tiny one

    def train_epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.randperm(len(self.train[0]), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        order = order.to(self.train[0].device)
        for batch in range(start_batch, self.steps_per_epoch):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield tuple(_targets(t[index]) for t in self.train)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for begin in range(0, len(self.val[0]), self.batch_size):
            yield tuple(_targets(t[begin:begin + self.batch_size]) for t in self.val)


def _targets(tensor: torch.Tensor) -> torch.Tensor:
    """Cached masks are int16 (a quarter of the memory); the loss and the scores take int64."""
    return tensor.long() if tensor.dtype == torch.int16 else tensor


def _cache_key(config: ProbeConfig, encoder_info: dict, img_size: int, precision: str) -> dict:
    """What the features depend on: the encoder (its weights' content), its input and numerics, the data (and
    the task's feature)."""
    from droppos.manifest import load_manifest

    source = config.encoder
    key: dict[str, Any] = dict(timm_model=source.timm_model, depth=source.depth, random_init=source.random_init,
                               pool=source.pool, seed=config.launch.seed)
    key["img_size"], key["precision"] = img_size, precision
    key["weights"] = encoder_info["weights"].get("sha256")  # the weights' content, wherever they came from
    key["architecture"] = [encoder_info["model"], encoder_info["model_args"]]
    manifest = load_manifest(Path(config.data.path))
    key["data"] = [str(Path(config.data.path).resolve())] + [
        [s["sha256"] for s in manifest["splits"][split]["shards"]] for split in ("train", "val")]
    if config.head.task != "classification":
        key.update(task=config.head.task, seg_layers=config.head.seg_layers)
    return key


CACHED = ("x", "y", "m")  # features.pt holds train_x, train_y (and train_m: label maps), the same for val


def _cached_features(config: ProbeConfig, info: DistInfo, frozen: nn.Module, encoder_info: dict,
                     loader: Any, precision: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(train, val) tensors on the CPU, each (features, labels[, int16 masks]): from OUT/features.pt, or
    extracted across ranks once (eval transforms; masks at the loader's full resolution)."""
    path = Path(config.output.out) / "features.pt"
    key = _cache_key(config, encoder_info, encoder_info["img_size"][0], precision)
    parts = CACHED if config.head.task == "segmentation" else CACHED[:2]
    if path.exists():
        saved = checkpoint.load(path)
        if saved.get("format") == FEATURES_FORMAT and saved.get("key") == json.loads(json.dumps(key)):
            if info.is_main:
                print(f"using the cached features in {path}", file=sys.stderr)
            return tuple(saved[f"train_{p}"] for p in parts), tuple(saved[f"val_{p}"] for p in parts)
    t0 = time.perf_counter()
    train = _extract(frozen, loader("train", "eval"), info, precision, "train")
    val = _extract(frozen, loader("val", "eval"), info, precision, "val")
    if info.is_main:
        tensors = {f"{split}_{p}": t for split, held in (("train", train), ("val", val)) for p, t in zip(parts, held)}
        checkpoint.save(path, {"format": FEATURES_FORMAT, "key": key, **tensors})
        what = (f"feature maps of {tuple(train[0].shape[1:])} (label maps {tuple(train[2].shape[1:])})"
                if len(parts) == 3 else f"features of dim {train[0].shape[1]}")
        print(f"extracted {len(train[1])} train and {len(val[1])} val {what} in {time.perf_counter() - t0:.1f} s "
              f"-> {path}", file=sys.stderr)
    return train, val


def _extract(frozen: nn.Module, loader: Any, info: DistInfo, precision: str,
             split: str) -> tuple[torch.Tensor, ...]:
    """(features, labels[, int16 masks]) of one split (eval transforms), every sample once, gathered on every rank."""
    columns: list[list[torch.Tensor]] = []
    progress = Progress(f"features ({split})", loader.steps_per_epoch, unit="batches", enabled=info.is_main)
    for step, (images, *targets) in enumerate(loader.epoch(0), start=1):
        row = [_features(frozen, images, info.device, precision), targets[0], *(m.to(torch.int16) for m in targets[1:])]
        columns = columns or [[] for _ in row]
        for column, tensor in zip(columns, row):
            column.append(tensor)
        progress.update(step)
    progress.close()
    tensors = [torch.cat(column) for column in columns]
    if info.distributed:  # every rank holds the same number of (padded) slots: plain all_gather
        for i, tensor in enumerate(tensors):
            wire = tensor.to(torch.int32) if tensor.dtype == torch.int16 else tensor  # gloo and NCCL have no int16
            gathered = [torch.empty_like(wire) for _ in range(info.world_size)]
            torch.distributed.all_gather(gathered, wire)
            tensors[i] = torch.cat(gathered).to(tensor.dtype)
    real = tensors[1] >= 0  # drop the eval loader's padding
    return tuple(t[real].cpu() for t in tensors)


def _previewer(config: ProbeConfig, loader: Any, frozen: nn.Module, device: torch.device, precision: str) -> Any:
    """preview(head): the first val images, their label maps and the head's logits (rank 0, for predictions.png)."""
    from droppos.manifest import load_manifest

    def preview(head: nn.Module) -> Optional[tuple[torch.Tensor, ...]]:
        val = load_manifest(Path(config.data.path))["splits"]["val"]["num_samples"]
        count = min(config.head.seg_previews, val)
        if count == 0:
            return None
        batches = loader("val", "eval", rank=0, world_size=1, batch_size=count, workers=0).epoch(0)
        try:
            images, _, masks = next(batches)
        finally:
            batches.close()
        with torch.no_grad():
            logits = head(_features(frozen, images, device, precision), masks.shape[-2:])
        return images, masks, logits

    return preview


# ---------------------------------------------------------------------------------------
# The head's training


class HeadStage(loop.Stage):
    """What both probes share: a head (and its optimizer) trained on a feature source, the best score kept."""

    name = "probe"
    best_key = ""

    def __init__(self, config: ProbeConfig, info: DistInfo, source: Any, schedule: loop.Schedule,
                 encoder_info: dict, head: nn.Module, img_size: int) -> None:
        self.config, self.info, self.device, self.source = config, info, info.device, source
        self.schedule, self.encoder_info, self.img_size = schedule, encoder_info, img_size
        self.out = Path(config.output.out)
        self.eval_every = config.logging.eval_every
        self.head = head.to(self.device)
        self.optimizer = head_optimizer(self.head, config.optim)
        self.best: dict[str, Any] = {self.best_key: None, "epoch": None}
        self.train_head = distributed.wrap_ddp(self.head, info, sync_buffers=True)  # one BatchNorm across ranks

    def parts(self) -> dict[str, Any]:
        return {"head": self.head, "optimizer": self.optimizer}

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best, "encoder": checkpoint.plain(self.encoder_info)}

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        self.best = dict(saved.get("best") or self.best)

    def loaders(self) -> list[Any]:
        """The streaming source's loaders (cached features were read once, before the loop)."""
        return [getattr(self.source, name) for name in ("train_loader", "val_loader") if hasattr(self.source, name)]

    def batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        return self.source.train_epoch(epoch, start_batch)

    def share_statistics(self) -> None:
        """Rank 0's BatchNorm statistics on every rank, before an evaluation: DDP sends them before each forward,
        but each rank's forward then moves its own copy, so without this each rank would score its share of val
        with another head (and a resumed run, which loads rank 0's, would score differently)."""
        if self.info.distributed:
            for buffer in self.head.buffers():
                torch.distributed.broadcast(buffer, 0)

    def keep_best(self, score: float, epoch: float) -> None:
        if self.best[self.best_key] is None or score > self.best[self.best_key]:
            self.best = {self.best_key: score, "epoch": epoch}

    def learn(self, loss: torch.Tensor, accuracy: torch.Tensor, window: loop.MetricWindow) -> None:
        """Backward, step, and the step's metrics (the loss and the stage's accuracy) added on the device."""
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        window.add("loss", loss.detach())
        window.add(self.metrics[1].name, accuracy)
        window.check_finite(loss)


class ProbeStage(HeadStage):
    metrics = (Metric("loss"), Metric("train_top1", percent=True))
    eval_metrics = (Metric("val_top1", percent=True, label="val top-1"),
                    Metric("val_top5", percent=True, label="val top-5"))
    best_key = "top1"

    def __init__(self, config: ProbeConfig, info: DistInfo, source: Any, schedule: loop.Schedule, encoder_info: dict,
                 num_classes: int, img_size: int) -> None:
        torch.manual_seed(config.launch.seed)
        super().__init__(config, info, source, schedule, encoder_info,
                         LinearHead(encoder_info["num_features"], num_classes), img_size)
        self.num_classes = num_classes
        self.criterion = nn.CrossEntropyLoss()

    def describe(self) -> str:
        info = self.encoder_info
        feature = "[CLS] token" if self.config.encoder.pool == "token" else "mean of the patch tokens"
        how = "cached features" if self.config.head.cached else "features of augmented images every step"
        return (f"a linear head on the frozen {info['label']} ({info['num_features']}-d {feature}, {self.img_size} "
                f"px, {self.num_classes} classes, {how}) on {self.config.data.path}")

    def step(self, step: int, micro: list[Any], window: loop.MetricWindow) -> None:
        (feats, labels), = micro
        self.head.train()
        logits = self.train_head(feats)
        self.learn(self.criterion(logits, labels), (logits.detach().argmax(-1) == labels).float().mean(), window)

    def evaluate(self, step: int, epoch: float, say: Callable[[str], None]) -> Optional[dict[str, Any]]:
        from droppos.encoders import evaluate_topk
        from droppos.files import write_json_atomic

        self.share_statistics()
        self.head.eval()
        scores = evaluate_topk(self.head, self.source.val_batches(), self.device, self.info.distributed)
        self.keep_best(scores["top1"], epoch)
        if self.info.is_main:
            write_json_atomic(self.out / "results.json", dict(
                step=step, epoch=epoch, **scores, best_top1=self.best["top1"], best_epoch=self.best["epoch"],
                task="probe", cached=self.config.head.cached, pool=self.config.encoder.pool,
                num_classes=self.num_classes, img_size=self.img_size, encoder=checkpoint.plain(self.encoder_info),
                units="percent"))
            say(f"epoch {epoch}: val top-1 {scores['top1']:.2f}% top-5 {scores['top5']:.2f}% "
                         f"on {scores['num_eval_samples']} images")
        return {"val_top1": scores["top1"], "val_top5": scores["top5"]}

    def finish(self) -> list[tuple[str, str]]:
        results = self.out / "results.json"
        if results.exists():
            r = json.loads(results.read_text())
            print(f"probe {self.out}: top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}% on {r['num_eval_samples']} val "
                  f"images; results in {results}", file=sys.stderr)
        return [("results", str(results))]


class SegProbeStage(HeadStage):
    """The segmentation probe: BatchNorm + 1x1 conv on the patch-feature maps, scored by mIoU (droppos.dense)."""

    metrics = (Metric("loss"), Metric("pixel_acc", percent=True, label="final train pixel accuracy"))
    eval_metrics = (Metric("val_miou", percent=True, label="val mIoU"),
                    Metric("val_pixel_acc", percent=True, label="val pixel accuracy"))
    best_key = "miou"

    def __init__(self, config: ProbeConfig, info: DistInfo, source: Any, schedule: loop.Schedule, encoder_info: dict,
                 seg: Any, img_size: int, num_features: int, preview: Any) -> None:
        from droppos import dense

        torch.manual_seed(config.launch.seed)
        super().__init__(config, info, source, schedule, encoder_info, dense.SegHead(num_features, seg.num_classes),
                         img_size)
        self.seg, self.preview, self.num_features = seg, preview, num_features

    def describe(self) -> str:
        info, layers = self.encoder_info, self.config.head.seg_layers
        grid = "x".join(str(self.img_size // p) for p in info["patch_size"])
        tokens = "last block's" if layers == 1 else f"last {layers} blocks'"
        how = "cached feature maps" if self.config.head.cached else "feature maps of augmented images every step"
        return (f"a BatchNorm + 1x1-conv head on the frozen {info['label']} ({tokens} patch tokens, "
                f"{self.num_features}-d on a {grid} grid, {self.img_size} px, {self.seg.num_classes} classes, {how}) "
                f"on {self.config.data.path}")

    def step(self, step: int, micro: list[Any], window: loop.MetricWindow) -> None:
        from droppos import dense

        (feats, _, masks), = micro
        self.head.train()
        logits = self.train_head(feats, masks.shape[-2:])
        self.learn(dense.pixel_loss(logits, masks), dense.pixel_accuracy(logits.detach(), masks), window)

    @torch.no_grad()
    def evaluate(self, step: int, epoch: float, say: Callable[[str], None]) -> Optional[dict[str, Any]]:
        from droppos import dense
        from droppos.files import write_json_atomic

        self.share_statistics()
        self.head.eval()
        matrix = dense.ConfusionMatrix(self.seg.num_classes, self.device)
        for feats, labels, masks in self.source.val_batches():
            matrix.update(self.head(feats, masks.shape[-2:]).argmax(1), masks, labels >= 0)
        if self.info.distributed:
            matrix.all_reduce()
        scores = matrix.scores(self.seg.classes)
        self.keep_best(scores["miou"], epoch)
        if self.info.is_main:
            write_json_atomic(self.out / "results.json", dict(
                step=step, epoch=epoch, **scores, best_miou=self.best["miou"], best_epoch=self.best["epoch"],
                task="segmentation", cached=self.config.head.cached, seg_layers=self.config.head.seg_layers,
                num_classes=self.seg.num_classes, img_size=self.img_size,
                evaluated_on=(f"the eval centre crop at {self.img_size} px (shorter side resized to "
                              f"{self.img_size}/0.875), label maps resized nearest, logits upsampled bilinearly"),
                encoder=checkpoint.plain(self.encoder_info), units="percent"))
            say(f"epoch {epoch}: val mIoU {scores['miou']:.2f}% pixel accuracy {scores['pixel_acc']:.2f}% "
                         f"on {scores['num_eval_images']} images")
        return {"val_miou": scores["miou"], "val_pixel_acc": scores["pixel_acc"]}

    def finish(self) -> list[tuple[str, str]]:
        from droppos import dense

        rows = []
        results = self.out / "results.json"
        self.head.eval()
        shown = self.preview(self.head)
        if shown is not None:
            path = dense.write_predictions(self.out / "predictions.png", *shown, self.seg.num_classes)
            rows.append(("predictions", str(path)))
        if results.exists():
            r = json.loads(results.read_text())
            print(f"probe {self.out}: mIoU {r['miou']:.2f}% pixel accuracy {r['pixel_acc']:.2f}% on "
                  f"{r['num_eval_images']} val images ({r['num_eval_pixels']} labelled pixels); results in {results}",
                  file=sys.stderr)
        return [("results", str(results)), *rows]
