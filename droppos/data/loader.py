"""`build_loader`: a `droppos shard` dataset directory -> batches of one split for one rank, on the device.

The stages call `resolve_backend` once (to record the backend `auto` became in config.json) and
`build_loader` for each split they read. A `Loader` yields (float32 [B,3,H,W] normalised images,
int64 [B] labels) per step, and with `masks=True` (a segmentation dataset) also int64 [B,H,W]
label maps (IGNORE = -1 for unlabelled pixels and padding); what it guarantees about samples,
ranks, padding and determinism is in `droppos.data.plan`, what each mode does to a sample in
`droppos.data.transforms`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from droppos import UserError
from droppos.data import dali
from droppos.data.pil import PilBackend
from droppos.data.plan import PAD_LABEL, Plan, Shard
from droppos.data.transforms import MODES, RECIPES
from droppos.labelmaps import IGNORE, BadManifest, SegSpec, spec_from_manifest

log = logging.getLogger("droppos.data")

from droppos.recipes import LOADERS as BACKENDS  # the one list (recipes is torch-free)


def dali_available() -> bool:
    """True when nvidia-dali imports."""
    return dali.available()


def resolve_backend(requested: str, device: torch.device | str, mode: str, masks: bool = False) -> str:
    """The backend ('dali' or 'pil') that `requested` means for `mode` on `device` (with label maps: `masks`).

    `auto` is the fastest one that gives the recipe's batches: DALI with GPU decoding ('mixed') on a
    CUDA device when DALI imports; Pillow on a CPU, where DALI's CPU mode is the slower one
    (benchmarks/bench_loader.py); Pillow for fine-tuning on any device, until DALI's RandAugment
    matches timm's (what differs: `droppos.data.dali`); and Pillow for label maps, which only it
    reads (with the image's crop and flip): `dali` with masks is refused.
    """
    if requested not in BACKENDS:
        raise UserError(f"unknown data backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise UserError(f"unknown data mode {mode!r}: use one of {', '.join(MODES)}")
    if masks and RECIPES[mode].rand_augment:
        raise UserError(f"label maps cannot be read in {mode} mode: its RandAugment moves pixels that the mask "
                        "would not follow")
    if masks and requested == "dali":
        raise UserError("the dali backend does not read label maps (segmentation): use --loader pil "
                        "(--loader auto picks it)")
    if requested == "dali" and not dali.available():
        raise UserError("the dali backend needs nvidia-dali, which does not import here: use --loader pil")
    if requested != "auto":
        return requested
    if RECIPES[mode].rand_augment or masks:
        return "pil"
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return "dali" if cuda and dali.available() else "pil"


class Loader:
    """Batches of one split for one rank. Build it with `build_loader`."""

    def __init__(self, *, data_dir: Path, split: str, mode: str, img_size: int, device: torch.device,
                 plan: Plan, backend, workers: int, num_classes: int, seg: SegSpec | None = None) -> None:
        self.data_dir, self.split, self.mode, self.img_size, self.device = data_dir, split, mode, img_size, device
        self.plan, self._backend, self.workers, self.num_classes = plan, backend, workers, num_classes
        self.backend: str = backend.name  # the resolved name, never 'auto'
        self.batch_size, self.rank, self.world_size, self.seed = plan.batch_size, plan.rank, plan.world_size, plan.seed
        self.num_samples = plan.num_samples
        self.steps_per_epoch = plan.steps_per_epoch
        self.rank_samples = plan.rank_samples  # eval: real (non-padding) samples this rank yields per epoch
        self.skipped = 0  # corrupt samples skipped by the pil backend (the dali backend stops instead)
        self.skipped_keys: list[str] = []
        self.seg = seg  # a loader of label maps: how the dataset stores them (None: no masks)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of `epoch` from `start_batch` on: (float32 [B,3,H,W] on the device, int64 [B]), and
        int64 [B,H,W] label maps third when the loader reads masks.

        Labels are on the device unless the loader was built with `labels_to_device=False`.
        Resuming with `start_batch` yields the batches the uninterrupted epoch yields from there.
        """
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise UserError(f"start_batch {start_batch} is outside this epoch's 0..{self.steps_per_epoch} steps")
        if start_batch == self.steps_per_epoch:
            return
        batches = self._backend.epoch(epoch, start_batch)
        try:
            for images, labels, skipped, *masks in batches:
                self._note_skipped(skipped)
                yield pad_eval(images, labels, self.batch_size, *masks)
        finally:
            batches.close()  # an epoch left early stops its workers (and frees its ring) now

    def _note_skipped(self, keys: Sequence[str]) -> None:
        if keys:
            self.skipped += len(keys)
            self.skipped_keys.extend(keys)
            log.warning("skipped %d corrupt sample(s) of split %r in %s (%d so far: %s); "
                        "run `droppos shard --verify %s` to find them all",
                        len(keys), self.split, self.data_dir, self.skipped, ", ".join(keys[:3]), self.data_dir)

    def close(self) -> None:
        """Free the buffers kept across epochs (the pil backend's shared ring and output batches)."""
        self._backend.close()


def pad_eval(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
             masks: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Pad a short (eval) batch of normalised images to `batch_size` with zeros labelled PAD_LABEL
    (and label maps of IGNORE only)."""
    missing = batch_size - labels.shape[0]
    if missing > 0:
        images = torch.cat([images, images.new_zeros((missing, *images.shape[1:]))])
        labels = torch.cat([labels, labels.new_full((missing,), PAD_LABEL)])
        if masks is not None:
            masks = torch.cat([masks, masks.new_full((missing, *masks.shape[1:]), IGNORE)])
    return (images, labels) if masks is None else (images, labels, masks)


def build_loader(
    data_dir: str | Path,
    split: str,
    mode: str,
    batch_size: int,
    img_size: int = 224,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    workers: int | None = None,
    labels_to_device: bool = True,
    masks: bool = False,
) -> Loader:
    """A loader of `split` of the dataset in `data_dir` for one rank.

    `mode` is one of `MODES` (see `droppos.data.transforms`), `backend` one of `BACKENDS` (`auto` is
    resolved by `resolve_backend`; `Loader.backend` is the result). `workers` are the pil backend's
    DataLoader workers (0: decode in this process) or DALI's threads; by default the cores this
    process may use, shared among the ranks. `labels_to_device=False` leaves the labels on the
    host, for a stage that never reads them (pre-training): no copy to the device per step.
    `masks=True` reads each sample's label map too (a segmentation dataset; the pil backend).
    """
    from droppos.manifest import load_manifest, split_shards

    backend = resolve_backend(backend, device, mode, masks)
    if batch_size < 1 or img_size < 16:
        raise UserError(f"batch size ({batch_size}) must be >= 1 and image size ({img_size}) >= 16")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    seg = dataset_seg_spec(data_dir, manifest) if masks else None
    entries = split_shards(data_dir, split, manifest)
    shards = tuple(Shard(str(e.tar), str(e.index), int(e.num_samples)) for e in entries if e.num_samples > 0)
    plan = Plan(shards=shards, training=RECIPES[mode].training, batch_size=batch_size, rank=rank,
                world_size=world_size, seed=seed)
    if plan.steps_per_epoch == 0:
        raise UserError(
            f"split {split!r} of {data_dir} has {plan.num_samples} samples: too few for batch size "
            f"{batch_size} on {world_size} rank(s); lower the batch size or add data")
    device = torch.device(device)
    workers = max(1, len(os.sched_getaffinity(0)) // world_size) if workers is None else max(0, int(workers))
    if backend == "dali":
        impl = dali.DaliBackend(plan, mode, img_size, device, workers, labels_to_device, split, data_dir)
    else:
        impl = PilBackend(plan, mode, img_size, device, workers, labels_to_device,
                          seg.train_lut() if seg is not None else None)
    return Loader(data_dir=data_dir, split=split, mode=mode, img_size=img_size, device=device, plan=plan,
                  backend=impl, workers=workers, num_classes=len(manifest["classes"]), seg=seg)


def dataset_seg_spec(data_dir: str | Path, manifest: dict | None = None) -> SegSpec:
    """How the dataset in `data_dir` stores its label maps; a UserError when it has none (or a malformed record)."""
    from droppos.manifest import MANIFEST_NAME, load_manifest

    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir) if manifest is None else manifest
    try:
        seg = spec_from_manifest(manifest, str(data_dir / MANIFEST_NAME))
    except BadManifest as err:
        raise UserError(f"{err}; re-run `droppos shard`") from None
    if seg is None:
        raise UserError(f"{data_dir} holds no label maps (a classification dataset): shard image + label-map "
                        "pairs (ADE20K's layout, or masks/ + classes.txt beside the images) for segmentation")
    return seg
