"""Input pipeline: a `droppos shard` dataset directory -> normalised image batches on the device.

Two backends behind one `build_loader`, giving the same batches in form and in distribution:

- `dali`: NVIDIA DALI's webdataset reader with the per-shard indexes; JPEG decoding on the GPU
  (device 'mixed') when the training device is CUDA, on the CPU (`device_id=None`) otherwise;
  RandAugment through `nvidia.dali.auto_aug`.
- `pil`: webdataset tar streaming + torch DataLoader workers + Pillow(-SIMD), with timm's
  transforms; JPEGs are decoded at reduced size (`Image.draft`) whenever the crop allows.

Where batches are normalised (the one cost both backends add after augmentation):
- `dali`: `fn.crop_mirror_normalize` (flip, normalise and HWC->CHW float in one pass) in DALI's
  own threads, on the GPU with 'mixed'.
- `pil`: workers fill uint8 HWC batches in a shared-memory ring made once per loader (`_Ring`; no
  per-batch allocation, so no page faults) and send only slot indices; the main process normalises
  each batch on the training device as it arrives (`normalize`; four times fewer bytes over PCIe
  than float). On a CPU device it writes into a few reused output batches (`_BatchPool`): a fresh
  38 MB float batch per step costs more in page faults than the normalisation itself.

DALI's CPU mode is the slower CPU backend: its resampling is not vectorised (NVIDIA/DALI#4581).
Measured here with 2 threads on ~500x375 JPEGs: ROI decode 1.05 ms per image, antialiased bicubic
resize to 224 ~2.4 ms (Pillow-SIMD: 0.2 ms). It stays bicubic, as the recipe says; on a CPU-only
machine `--loader pil` is the faster choice (benchmarks/bench_loader.py).

How samples are split (identical for both backends, so they cover the same samples per rank):
- The split's samples are the concatenation of its shards, in manifest order for eval and in an
  order permuted by (seed, epoch) for training (same permutation on every rank).
- Rank r of world k owns the contiguous range [r*N//k, (r+1)*N//k) of that concatenation (DALI's
  own sharding formula). Ranges are disjoint and cover every sample.
- Training modes: every rank yields exactly `steps_per_epoch = (N//k) // batch_size` full batches,
  drawn through a shuffle buffer seeded by (seed, epoch, rank); no sample twice in an epoch, no
  ragged, empty or padded batch. The few leftover samples of a range are dropped that epoch (a
  different few each epoch).
- Eval mode: no shuffling; every rank yields `steps_per_epoch = ceil(ceil(N/k) / batch_size)`
  batches of static shape. Slots past the rank's samples are padding: zero images with label -1
  (`PAD_LABEL`); mask them out (`labels >= 0`). Over all ranks every sample appears exactly once;
  `Loader.rank_samples` is the number of real samples on this rank.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from droppos import UserError

__all__ = [
    "MODES", "BACKENDS", "PAD_LABEL", "IMAGENET_MEAN", "IMAGENET_STD", "EVAL_CROP_PCT",
    "Loader", "build_loader", "batch_augment", "normalize", "dali_available", "rank_range",
]

log = logging.getLogger(__name__)

MODES = ("pretrain", "finetune", "eval")
BACKENDS = ("auto", "dali", "pil")
PAD_LABEL = -1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 0.875
CROP_SCALE = {"pretrain": (0.2, 1.0), "finetune": (0.08, 1.0)}
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm's config string (pil backend)
# DALI's RandAugment has magnitude bins and no magnitude noise: m=27 of bins 0..30 is timm's 9/10.
DALI_RAND_AUGMENT_M, DALI_RAND_AUGMENT_BINS = 27, 31
SHUFFLE_BUFFER = 1024  # samples per shuffle buffer (DALI `initial_fill`, pil per worker)
PIL_PREFETCH = 2  # batches queued per pil DataLoader worker
READER_NAME = "reader"


def dali_available() -> bool:
    """True when nvidia-dali imports (the `auto` backend then picks it)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The half-open sample range of `rank`: DALI's sharding formula, reproduced for `pil`."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def _seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's `hash` is salted for str, so not used)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def normalize(images: torch.Tensor, device: torch.device | str, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B,H,W,3] (any device) -> float32 [B,3,H,W] ImageNet-normalised on `device` (or into `out`).

    A few flat passes (convert-and-reorder, scale, shift, in place) rather than one broadcast
    `(x - mean) / std` that mixes dtypes and layouts (about 8x slower on the CPU). On the CPU it
    runs in numpy, single-threaded on purpose: it runs in the main process while loader workers
    keep every core busy, and torch's intra-op threads would spin at their barriers (measured with
    2 threads on 2 cores: 0.37-0.45 vs 0.23-0.25 ms of main-process CPU per image). Same float32 operations,
    so the same bits as the torch path.
    """
    scale = [1.0 / (255.0 * s) for s in IMAGENET_STD]
    shift = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    if torch.device(device).type == "cpu" and images.device.type == "cpu":
        if out is None:
            batch, height, width, _ = images.shape
            out = torch.empty((batch, 3, height, width), dtype=torch.float32)
        dst = out.numpy()
        np.multiply(images.numpy().transpose(0, 3, 1, 2), np.array(scale, np.float32).reshape(1, 3, 1, 1),
                    out=dst, dtype=np.float32)
        np.add(dst, np.array(shift, np.float32).reshape(1, 3, 1, 1), out=dst)
        return out
    images = images.to(device, non_blocking=True)
    if out is None:
        batch, height, width, _ = images.shape
        out = torch.empty((batch, 3, height, width), dtype=torch.float32, device=images.device)
    out.copy_(images.permute(0, 3, 1, 2))
    return out.mul_(torch.tensor(scale, device=out.device).view(1, 3, 1, 1)).add_(
        torch.tensor(shift, device=out.device).view(1, 3, 1, 1))


class _BatchPool:
    """Float32 CPU batches to normalise into, reused once nothing outside the pool refers to them.

    The pool keeps storages, not tensors: each batch handed out is a new tensor on a pooled
    storage, so any reference the consumer keeps (the batch, a view, `.numpy()`) shows in the
    storage's use count, and a storage is reused only when the pool's is the last one. Consumers
    that keep every batch simply get fresh ones.
    """

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self.storages: list[torch.UntypedStorage] = []
        self._use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: no reuse, still correct

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * 4
        storage = None
        if self._use_count is not None:
            storage = next((s for s in self.storages if s.nbytes() >= nbytes and self._use_count(s._cdata) == 1),
                           None)
        if storage is None:
            storage = torch.UntypedStorage(nbytes)
            if self._use_count is not None and len(self.storages) < self.capacity:
                self.storages.append(storage)
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def batch_augment(
    num_classes: int,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    label_smoothing: float = 0.1,
    reprob: float = 0.25,
    device: torch.device | str = "cpu",
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Fine-tuning's batch-level augmentation on the training device, with timm's implementations.

    Returns f(images normalised [B,3,H,W], labels int64 [B]) -> (images, soft targets [B, classes]):
    random erasing (per sample, probability `reprob`, pixel mode) then mixup/cutmix with label
    smoothing (or smoothing alone when both alphas are 0). B must be even when mixing.
    """
    from timm.data import Mixup
    from timm.data.mixup import mixup_target
    from timm.data.random_erasing import RandomErasing

    erase = RandomErasing(probability=reprob, mode="pixel", max_count=1, device=str(device)) if reprob > 0 else None
    mix = (
        Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
        if mixup > 0 or cutmix > 0 else None
    )

    def apply(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if erase is not None:
            images = erase(images)
        if mix is not None:
            return mix(images, labels)
        return images, mixup_target(labels, num_classes, smoothing=label_smoothing)

    return apply


# ----------------------------------------------------------------------------------------------
# The sample plan shared by both backends


@dataclass(frozen=True)
class _Shard:
    tar: str
    index: str
    num_samples: int


@dataclass(frozen=True)
class _Segment:
    """Samples [start, stop) of one tar, read in order."""

    tar: str
    index: str
    start: int
    stop: int


def _segments(shards: Sequence[_Shard], begin: int, end: int) -> list[_Segment]:
    """The samples [begin, end) of the concatenation of `shards`, as per-tar segments."""
    out, offset = [], 0
    for shard in shards:
        lo, hi = max(begin, offset), min(end, offset + shard.num_samples)
        if lo < hi:
            out.append(_Segment(shard.tar, shard.index, lo - offset, hi - offset))
        offset += shard.num_samples
    return out


def _epoch_shards(shards: Sequence[_Shard], mode: str, seed: int, epoch: int) -> list[_Shard]:
    """Shard order of one epoch: manifest order for eval, else a (seed, epoch) permutation."""
    if mode == "eval":
        return list(shards)
    order = np.random.default_rng(_seed(seed, epoch, 0xC0FFEE)).permutation(len(shards))
    return [shards[i] for i in order]


class Loader:
    """Batches of one split for one rank. Build it with `build_loader`."""

    def __init__(self, *, data_dir: Path, split: str, mode: str, batch_size: int, img_size: int,
                 backend: str, device: torch.device, rank: int, world_size: int, seed: int,
                 workers: int, shards: list[_Shard], num_classes: int) -> None:
        self.data_dir, self.split, self.mode, self.backend = data_dir, split, mode, backend
        self.batch_size, self.img_size, self.device = batch_size, img_size, device
        self.rank, self.world_size, self.seed, self.workers = rank, world_size, seed, workers
        self.shards, self.num_classes = shards, num_classes
        self.num_samples = sum(s.num_samples for s in shards)
        lo, hi = rank_range(self.num_samples, rank, world_size)
        self.rank_samples = hi - lo  # eval: real (non-padding) samples this rank yields per epoch
        if mode == "eval":
            self.steps_per_epoch = math.ceil(math.ceil(self.num_samples / world_size) / batch_size)
        else:
            self.steps_per_epoch = (self.num_samples // world_size) // batch_size
            self.rank_samples = self.steps_per_epoch * batch_size
        self.skipped = 0  # corrupt samples skipped by the pil backend (the dali backend stops instead)
        self.skipped_keys: list[str] = []
        self._pool = _BatchPool()
        self._ring: _Ring | None = None  # the pil backend's shared batch slots, kept across epochs

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch` from `start_step` on: (float32 [B,3,H,W], int64 [B]) on the device.

        Deterministic given (seed, epoch, rank) (and, for `pil`, the worker count); resuming
        with `start_step` yields the same batches the uninterrupted epoch yields from there.
        """
        if not 0 <= start_step <= self.steps_per_epoch:
            raise UserError(f"start_step {start_step} is outside this epoch's 0..{self.steps_per_epoch} steps")
        if start_step == self.steps_per_epoch:
            return
        shards = _epoch_shards(self.shards, self.mode, self.seed, epoch)
        lo, hi = rank_range(self.num_samples, self.rank, self.world_size)
        source = _dali_epoch if self.backend == "dali" else _pil_epoch
        for images, labels in source(self, shards, lo, hi, epoch, start_step):
            images, labels = _pad_eval(images, labels, self.batch_size)
            yield images.to(self.device, non_blocking=True), labels.to(self.device, torch.int64, non_blocking=True)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W,3] -> normalised float32 [B,3,H,W] on the device (into a reused batch on a CPU)."""
        out = self._pool.take((images.shape[0], 3, *images.shape[1:3])) if self.device.type == "cpu" else None
        return normalize(images, self.device, out=out)

    def _note_skipped(self, keys: Sequence[str]) -> None:
        if keys:
            self.skipped += len(keys)
            self.skipped_keys.extend(keys)
            log.warning("skipped %d corrupt sample(s) of split %r in %s (%d so far: %s); "
                        "run `droppos shard --verify %s` to find them all",
                        len(keys), self.split, self.data_dir, self.skipped, ", ".join(keys[:3]), self.data_dir)

    def close(self) -> None:
        """Free the buffers kept across epochs (the pil backend's shared ring, the output pool)."""
        self._ring = None
        self._pool = _BatchPool()


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
) -> Loader:
    """A loader of `split` of the dataset in `data_dir` for one rank (see the module docstring)."""
    from droppos.manifest import load_manifest, split_shards

    if mode not in MODES:
        raise UserError(f"unknown data mode {mode!r}: use one of {', '.join(MODES)}")
    if backend not in BACKENDS:
        raise UserError(f"unknown data backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if batch_size < 1 or img_size < 16:
        raise UserError(f"batch size ({batch_size}) must be >= 1 and image size ({img_size}) >= 16")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    entries = split_shards(data_dir, split, manifest)
    shards = [_Shard(str(e.tar), str(e.index), int(e.num_samples)) for e in entries if e.num_samples > 0]
    if backend == "auto":
        backend = "dali" if dali_available() else "pil"
    elif backend == "dali" and not dali_available():
        raise UserError("the dali backend needs nvidia-dali, which does not import here: use --loader pil")
    device = torch.device(device)
    if workers is None:
        workers = max(1, len(os.sched_getaffinity(0)) // world_size)
    loader = Loader(data_dir=data_dir, split=split, mode=mode, batch_size=batch_size, img_size=img_size,
                    backend=backend, device=device, rank=rank, world_size=world_size, seed=seed,
                    workers=max(0, int(workers)), shards=shards, num_classes=len(manifest["classes"]))
    if loader.steps_per_epoch == 0:
        raise UserError(
            f"split {split!r} of {data_dir} has {loader.num_samples} samples: too few for batch size "
            f"{batch_size} on {world_size} rank(s); lower the batch size or add data")
    return loader


# ----------------------------------------------------------------------------------------------
# DALI backend


def _dali_pipeline(files, index_files, mode, img_size, shard_id, num_shards, shuffle, decoder_device):
    """The DALI graph: reader -> decode (+ random crop) -> resize (-> RandAugment) -> flip + normalise.

    Training decodes only the random crop's region (`image_random_crop`: the ROI decoding that makes
    RandomResizedCrop cheap); `crop_mirror_normalize` fuses the flip (and eval's centre crop) with
    normalisation and the HWC->CHW float conversion, in DALI's threads (on the GPU with 'mixed').
    (Measured on the CPU: ending in uint8 and normalising in the main process instead costs the
    same, and does not scale with `num_threads`.)

    Defined at module level in a source file because DALI's conditionals (AutoGraph, needed by
    RandAugment) read the function's source. Wrapped by `pipeline_def` in `_dali_epoch`.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    jpegs, labels = fn.readers.webdataset(
        paths=files, index_paths=index_files, ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error", num_shards=num_shards, shard_id=shard_id,
        random_shuffle=shuffle, initial_fill=SHUFFLE_BUFFER, pad_last_batch=False, stick_to_shard=True,
        name=READER_NAME,
    )
    normalise = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in IMAGENET_MEAN],
                     std=[255 * s for s in IMAGENET_STD])
    if mode == "eval":
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=int(img_size / EVAL_CROP_PCT),
                           interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop_mirror_normalize(images, crop=(img_size, img_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                          **normalise)
    else:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder_device, output_type=types.RGB, random_area=list(CROP_SCALE[mode]),
            random_aspect_ratio=list(CROP_RATIO), num_attempts=10)
        images = fn.resize(images, size=[img_size, img_size], interp_type=types.INTERP_CUBIC, antialias=True)
        if mode == "finetune":
            images = rand_augment.rand_augment(
                images, n=2, m=DALI_RAND_AUGMENT_M, num_magnitude_bins=DALI_RAND_AUGMENT_BINS,
                fill_value=128, monotonic_mag=True)
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5), **normalise)
    return images, labels


def _dali_epoch(loader: Loader, shards: list[_Shard], lo: int, hi: int, epoch: int,
                start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch through a fresh DALI pipeline (its shard order and seed are the epoch's)."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    mixed = loader.device.type == "cuda" and torch.cuda.is_available()
    device_id = (loader.device.index if loader.device.index is not None else torch.cuda.current_device()) if mixed else None
    training = loader.mode != "eval"
    with warnings.catch_warnings():  # DALI's own auto_aug still calls its deprecated aliases
        warnings.simplefilter("ignore", DeprecationWarning)
        pipe = _build_dali_pipeline(loader, shards, epoch, mixed, device_id, training)
        try:
            pipe.build()
        except RuntimeError as err:
            raise _dali_data_error(err, loader, shards, lo, hi, 0) from None
    batches = DALIGenericIterator(
        pipe, ["images", "labels"], reader_name=READER_NAME, auto_reset=False,
        last_batch_policy=LastBatchPolicy.DROP if training else LastBatchPolicy.PARTIAL,
    )
    try:
        for step in range(loader.steps_per_epoch):
            try:
                out = next(batches)[0]
            except StopIteration:
                out = None
            except RuntimeError as err:
                raise _dali_data_error(err, loader, shards, lo, hi, step) from None
            if out is None:
                if training:  # cannot happen: (N//k)//B full batches exist on every rank
                    raise RuntimeError(f"DALI ended the epoch after {step} of {loader.steps_per_epoch} batches")
                images = torch.zeros((0, 3, loader.img_size, loader.img_size), dtype=torch.float32)
                labels = torch.zeros(0, dtype=torch.int64)
            else:
                images, labels = out["images"], out["labels"].view(-1)
            if step < start_step:  # DALI cannot seek: resuming replays the skipped batches
                continue
            yield images, labels.to(torch.int64)
    finally:
        del batches, pipe


def _build_dali_pipeline(loader: Loader, shards: list[_Shard], epoch: int, mixed: bool,
                         device_id: int | None, training: bool):
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(_dali_pipeline, enable_conditionals=loader.mode == "finetune")(
        [s.tar for s in shards], [s.index for s in shards], loader.mode, loader.img_size,
        loader.rank, loader.world_size, training, "mixed" if mixed else "cpu",
        batch_size=loader.batch_size, num_threads=max(1, loader.workers), device_id=device_id,
        seed=_seed(loader.seed, epoch, loader.rank, 0xDA11), prefetch_queue_depth=2,
    )
    return pipe


def _dali_data_error(err: Exception, loader: Loader, shards: list[_Shard], lo: int, hi: int,
                     step: int) -> UserError:
    """DALI stops on the first undecodable sample and does not say which: find it and name its shard.

    The reader reads this rank's range in order, at most a shuffle buffer plus the prefetched
    batches ahead of `step`, so only that prefix is decoded again (with Pillow) to find the culprit.
    """
    from PIL import Image

    reason = next((line.strip() for line in str(err).splitlines() if "failure" in line or "rror:" in line),
                  "undecodable sample")
    where = f"a shard of split {loader.split!r}"
    read_upto = min(hi, lo + SHUFFLE_BUFFER + (step + 4) * loader.batch_size)
    for segment in _segments(shards, lo, read_upto):
        for sample in _read_segment(segment):
            try:
                Image.open(io.BytesIO(sample["jpg"])).load()
                int.from_bytes(sample["lbl"], "little")
            except Exception:
                where = f"shard {segment.tar} (sample {sample['__key__']})"
                break
        else:
            continue
        break
    return UserError(f"DALI could not decode {where}: {reason[:160]}; run `droppos shard --verify "
                     f"{loader.data_dir}` to check the shards (or use the pil backend, which skips bad samples)")


def _pad_eval(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a short (eval) batch of normalised images to `batch_size` with zeros labelled PAD_LABEL."""
    missing = batch_size - labels.shape[0]
    if missing <= 0:
        return images, labels
    pad = images.new_zeros((missing, *images.shape[1:]))
    return torch.cat([images, pad]), torch.cat([labels, labels.new_full((missing,), PAD_LABEL)])


# ----------------------------------------------------------------------------------------------
# Pillow backend


@dataclass(frozen=True)
class _Role:
    """What one pil worker does in one epoch: batches `first_batch`, +stride, ... of the epoch.

    `segments` are read in order; training roles pass the samples through a seeded shuffle
    buffer and cut them into `num_batches` full batches, of which the first `skip` are drawn but
    not decoded (resume); eval roles have one segment per batch.
    """

    segments: tuple[_Segment, ...]
    num_batches: int
    skip: int
    seed: int


class _PilEpoch(torch.utils.data.IterableDataset):
    """The epoch's roles; DataLoader worker i plays role i (roles were rotated for resuming).

    Yields ((worker, slot, count), labels, skipped keys): the images themselves stay in the
    loader's shared `_Ring`, which the main process reads (and releases) by slot.
    """

    def __init__(self, roles: list[_Role], mode: str, img_size: int, ring: torch.Tensor,
                 free_slots: Sequence | None) -> None:
        self.roles, self.mode, self.img_size, self.ring, self.free_slots = roles, mode, img_size, ring, free_slots

    def __iter__(self) -> Iterator[tuple[tuple[int, int, int], torch.Tensor, list[str]]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        transform = _PilTransform(self.mode, self.img_size)
        batches = _BatchWriter(worker, self.ring[worker], self.free_slots[worker] if self.free_slots else None)
        if self.mode == "eval":
            yield from _eval_batches(self.roles[worker], transform, batches)
        else:
            yield from _train_batches(self.roles[worker], transform, batches)


class _Ring:
    """uint8 [workers, depth, B, H, W, 3] batch slots in shared memory, made once per Loader.

    A fresh shared batch per step (what DataLoader's collate does) costs page faults twice, in the
    worker that fills it and in the main process that reads it; measured here at ~0.15 ms per 224 px
    image in the worker plus ~0.1 ms in the main process, about the cost of the Pillow resize. Slots reused across batches and epochs fault once. Worker w
    writes its j-th batch into slot j % depth after taking one of its `depth` semaphore units; the
    main process gives the unit back once it has normalised the slot (`_pil_epoch`).
    """

    def __init__(self, workers: int, depth: int, batch_size: int, img_size: int, shared: bool) -> None:
        shape = (workers, depth, batch_size, img_size, img_size, 3)
        if shared:
            storage = torch.UntypedStorage._new_shared(math.prod(shape))
            self.slots = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
        else:
            self.slots = torch.empty(shape, dtype=torch.uint8)
        self.shared = shared
        self.busy = False  # an epoch's workers may be writing into it

    def fits(self, workers: int, depth: int, batch_size: int, img_size: int, shared: bool) -> bool:
        w, d, b, h = self.slots.shape[:4]
        return w >= workers and d == depth and b == batch_size and h == img_size and self.shared == shared


class _BatchWriter:
    """Images are written straight into a ring slot (no per-image arrays to stack, no batch copy)."""

    def __init__(self, worker: int, slots: torch.Tensor, free_slots) -> None:
        self.worker, self.free_slots = worker, free_slots
        self.ring = slots.numpy()  # [depth, B, H, W, 3]
        self.batch_size = self.ring.shape[1]
        self._written = 0  # batches started so far
        self._slots: np.ndarray | None = None

    def _take_slot(self) -> None:
        if self.free_slots is not None:
            self.free_slots.acquire()  # blocks only while the main process still reads this slot
        self._slots = self.ring[self._written % len(self.ring)]
        self._written += 1

    @property
    def slots(self) -> np.ndarray:
        """The batch being filled, as numpy HWC slots (its ring slot is taken on first use)."""
        if self._slots is None:
            self._take_slot()
        return self._slots

    def finish(self, count: int) -> tuple[int, int, int]:
        """(worker, slot, count) of the batch just filled; the next image starts a new batch."""
        if self._slots is None:  # an eval batch of unreadable samples only
            self._take_slot()
        self._slots = None
        return self.worker, (self._written - 1) % len(self.ring), count


class _PilTransform:
    """Decode + augment one JPEG with Pillow(-SIMD) into a uint8 HWC slot of a batch.

    RandomResizedCrop resizes only the crop box (`resize(box=...)`: no intermediate crop copy) and
    decodes at reduced size (`Image.draft`) whenever the crop stays at least `img_size` big.
    """

    def __init__(self, mode: str, img_size: int) -> None:
        self.mode, self.size = mode, img_size
        self.rand_augment = None
        if mode == "finetune":
            from timm.data.auto_augment import rand_augment_transform

            hparams = dict(translate_const=int(img_size * 0.45),
                           img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN))
            self.rand_augment = rand_augment_transform(RAND_AUGMENT, hparams)

    def __call__(self, jpeg: bytes, sample_seed: int, slot: np.ndarray) -> None:
        from PIL import Image

        img = Image.open(io.BytesIO(jpeg))
        if self.mode == "eval":
            np.copyto(slot, self._eval(img))
            return
        from timm.data.transforms import RandomResizedCropAndInterpolation

        random.seed(sample_seed)  # per-sample stream: resuming mid-epoch gives the same crops
        width, height = img.size
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, CROP_SCALE[self.mode], CROP_RATIO)
        # Decode no more pixels than the crop needs: DCT-domain downscale by 1/2, 1/4 or 1/8 while
        # the crop stays at least img_size on both sides.
        img.draft("RGB", (math.ceil(width * self.size / w), math.ceil(height * self.size / h)))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        # Nor rows below the last one the bicubic filter reads (support 2 px x the downscale factor).
        img = _rgb(img, rows=math.ceil(box[3] + 2.0 * max(1.0, (box[3] - box[1]) / self.size)) + 1)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if random.random() < 0.5:  # Pillow's flip: 5x faster than a reversed-stride numpy copy
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:  # timm's order: crop, flip, RandAugment
            img = self.rand_augment(img)
        np.copyto(slot, np.asarray(img))

    def _eval(self, img) -> np.ndarray:
        from PIL import Image

        resize_to = int(self.size / EVAL_CROP_PCT)
        width, height = img.size
        short = min(width, height)
        img.draft("RGB", (math.ceil(width * resize_to / short), math.ceil(height * resize_to / short)))
        img = _rgb(img)
        width, height = img.size
        # torchvision's Resize(int): shorter side to resize_to, longer side truncated; then the
        # centre crop, taken as the resize's source box (only the crop's pixels are computed).
        if width <= height:
            new_w, new_h = resize_to, int(resize_to * height / width)
        else:
            new_w, new_h = int(resize_to * width / height), resize_to
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return np.asarray(img.resize((self.size, self.size), Image.BICUBIC, box=box))


def _rgb(img, rows: int | None = None):
    """The decoded image in RGB, or only its first `rows` rows when that saves decoding.

    `convert` would copy an image that already is RGB (as sharded JPEGs are).
    """
    if rows is not None and rows < img.size[1] and img.mode == "RGB":
        top = _decode_rows(img, rows)
        if top is not None:
            return top
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


_UNWRITTEN = (1, 254, 3)  # marks a row the decoder has not written (any colour would do)


def _decode_rows(img, rows: int):
    """The first `rows` rows of an opened (and drafted) RGB JPEG, decoded by Pillow's own decoder.

    libjpeg decodes top to bottom, so stopping after the rows a crop needs saves the rest (~10% of
    the decode for RandomResizedCrop; the resized crop is bit-identical). Pillow has no public
    call for it: this runs its JPEG decoder on an image of `rows` rows. libjpeg then reports the
    rows left unread as an error when it finishes, which is indistinguishable by code from a
    corrupt stream; so the last row is marked first and must have been overwritten. Anything
    unexpected returns None and the caller decodes the whole image the ordinary way (which also
    raises for a corrupt file).
    """
    from PIL import Image

    try:
        (codec, _, offset, args), = img.tile
        width = img.size[0]
        core = Image.core.new("RGB", (width, rows))
        core.paste(_UNWRITTEN, (0, rows - 1, width, rows))
        decoder = Image._getdecoder("RGB", codec, args, img.decoderconfig)
        try:
            decoder.setimage(core, (0, 0, width, rows))
            img.fp.seek(offset)
            consumed, _ = decoder.decode(img.fp.read())
        finally:
            decoder.cleanup()
    except Exception:
        return None
    if consumed >= 0 or any(core.getpixel((x, rows - 1)) == _UNWRITTEN for x in (0, width // 2, width - 1)):
        return None  # the decoder wanted more data, or stopped before the last row
    return Image.Image()._new(core)


def _read_segment(segment: _Segment) -> Iterator[dict]:
    """Samples of one segment, streamed from the tar with webdataset from the first one's header."""
    import webdataset as wds

    with open(segment.index, "r", encoding="ascii") as f:
        f.readline()  # "v1.2 <count>"
        for _ in range(segment.start):
            f.readline()
        fields = f.readline().split()
    header = min(int(fields[i]) for i in range(1, len(fields), 4)) - 512
    remaining = segment.stop - segment.start
    with open(segment.tar, "rb") as stream:
        stream.seek(header)
        members = wds.tariterators.tar_file_iterator(stream, select_files=lambda n: n.endswith((".jpg", ".lbl")))
        members = (dict(member, __url__=segment.tar) for member in members)
        for sample in wds.tariterators.group_by_keys(members):
            yield sample
            remaining -= 1
            if remaining == 0:
                return


def _decode(sample: dict, transform: _PilTransform, sample_seed: int, slot: np.ndarray) -> int | None:
    """Decode a sample into `slot`; its label, or None when it cannot be used (counted as skipped)."""
    try:
        label = int.from_bytes(sample["lbl"], "little", signed=True)
        transform(sample["jpg"], sample_seed, slot)
        return label
    except Exception:  # any failure of a sample's bytes: Pillow raises many types
        return None


def _train_batches(role: _Role, transform: _PilTransform, batches: _BatchWriter) -> Iterator[tuple]:
    """Shuffle-buffered samples of the role's segments, cut into exactly `num_batches` full batches."""
    rng = random.Random(role.seed)
    buffer: list[dict] = []

    def drawn() -> Iterator[dict]:
        for segment in role.segments:
            for sample in _read_segment(segment):
                if len(buffer) < SHUFFLE_BUFFER:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], sample = sample, buffer[i]
                yield sample
        rng.shuffle(buffer)
        yield from buffer

    batch_size = batches.batch_size
    labels: list[int] = []
    skipped: list[str] = []
    position = done = 0
    for sample in drawn():
        position += 1
        if position <= role.skip * batch_size:
            continue  # drawn, not decoded: resuming replays only the shuffle
        label = _decode(sample, transform, _seed(role.seed, position), batches.slots[len(labels)])
        if label is None:
            skipped.append(str(sample.get("__key__")))
            continue
        labels.append(label)
        if len(labels) == batch_size:
            yield batches.finish(batch_size), torch.tensor(labels), skipped
            labels, skipped = [], []
            done += 1
            if done == role.num_batches - role.skip:
                return
    if done < role.num_batches - role.skip:
        # Corrupt samples outnumbered the spare ones: complete the last batch by repeating its own
        # samples (static shapes); the skip count reports it.
        if not labels:
            raise UserError("every sample of a pil worker's share was unreadable: run `droppos shard --verify`")
        real = len(labels)
        for k in range(real, batch_size):
            batches.slots[k] = batches.slots[k % real]
            labels.append(labels[k % real])
        yield batches.finish(batch_size), torch.tensor(labels), skipped


def _eval_batches(role: _Role, transform: _PilTransform, batches: _BatchWriter) -> Iterator[tuple]:
    """One batch per segment, in order; unreadable samples leave padding (label -1) behind."""
    for segment_batch in _group_eval(role.segments):
        labels: list[int] = []
        skipped: list[str] = []
        for segment in segment_batch:
            for sample in _read_segment(segment):
                label = _decode(sample, transform, 0, batches.slots[len(labels)])
                if label is None:
                    skipped.append(str(sample.get("__key__")))
                    continue
                labels.append(label)
        yield batches.finish(len(labels)), torch.tensor(labels, dtype=torch.int64), skipped


def _group_eval(segments: Sequence[_Segment]) -> Iterator[list[_Segment]]:
    """Eval roles store a batch as consecutive segments separated by a start=stop=-1 marker."""
    group: list[_Segment] = []
    for segment in segments:
        if segment.start < 0:
            yield group
            group = []
        else:
            group.append(segment)


def _pil_roles(loader: Loader, shards: list[_Shard], lo: int, hi: int, epoch: int, start_step: int) -> list[_Role]:
    """Split this rank's epoch into per-worker roles; role of worker i starts at batch start_step+i."""
    num_roles, batch, steps = max(1, loader.workers), loader.batch_size, loader.steps_per_epoch
    roles = []
    if loader.mode == "eval":
        for i in range(min(num_roles, steps - start_step)):
            first = start_step + i
            segments: list[_Segment] = []
            for step in range(first, steps, num_roles):
                begin = min(hi, lo + step * batch)
                segments += _segments(shards, begin, min(hi, begin + batch))
                segments.append(_Segment("", "", -1, -1))
            roles.append(_Role(tuple(segments), len(range(first, steps, num_roles)), 0, 0))
        return roles
    # Training: role w serves batches w, w+R, ... and reads a contiguous piece of the rank's range
    # (sequential tar reads); the range's spare samples go to the last role (slack for corrupt ones).
    counts = [len(range(w, steps, num_roles)) for w in range(num_roles)]
    begin, pieces = lo, []
    for w, count in enumerate(counts):
        end = hi if w == num_roles - 1 else begin + count * batch
        pieces.append((begin, end))
        begin = end
    for i in range(min(num_roles, steps - start_step)):
        w = (start_step + i) % num_roles
        skip = len(range(w, start_step, num_roles))
        roles.append(_Role(tuple(_segments(shards, *pieces[w])), counts[w], skip,
                           _seed(loader.seed, epoch, loader.rank, w)))
    return roles


def _pil_epoch(loader: Loader, shards: list[_Shard], lo: int, hi: int, epoch: int,
               start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch through torch DataLoader workers, each filling whole batches (see `_Ring`)."""
    roles = _pil_roles(loader, shards, lo, hi, epoch, start_step)
    # Workers are forked each epoch: import the transforms' modules here, once per process, rather
    # than in every worker of every epoch (timm's import alone costs a worker about a CPU second).
    import timm.data.auto_augment  # noqa: F401
    import timm.data.transforms  # noqa: F401
    # Workers fill uint8 slots of the loader's shared ring and send only their indices; each batch
    # is normalised here on the training device, and its slot handed back at once. A worker holds
    # at most PIL_PREFETCH batches in the queue plus the one it writes: depth = PIL_PREFETCH + 1.
    workers = len(roles) if loader.workers > 0 else 0
    depth = PIL_PREFETCH + 1 if workers else 1
    shape = (max(1, loader.workers), depth, loader.batch_size, loader.img_size, workers > 0)
    ring = loader._ring
    if ring is None or ring.busy or not ring.fits(*shape):
        ring = _Ring(*shape)
        if loader._ring is None or not loader._ring.busy:
            loader._ring = ring  # kept for the next epochs; an epoch still open elsewhere keeps its own
    free_slots = [multiprocessing.Semaphore(depth) for _ in range(workers)] if workers else None
    dataset = _PilEpoch(roles, loader.mode, loader.img_size, ring.slots, free_slots)
    if workers == 0:
        batches: Iterator = iter(dataset)
    else:
        batches = iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, prefetch_factor=PIL_PREFETCH, persistent_workers=False))
    ring.busy = True
    produced = 0
    try:
        for (worker, slot, count), labels, skipped in batches:
            images = loader._normalise(ring.slots[worker, slot, :count])
            if free_slots:
                free_slots[worker].release()
            loader._note_skipped(skipped)
            produced += 1
            yield images, labels
    finally:
        del batches  # the last reference: DataLoader's iterator stops its workers before the ring is free
        ring.busy = False
    if produced != loader.steps_per_epoch - start_step:
        raise RuntimeError(f"pil loader produced {produced} batches, expected {loader.steps_per_epoch - start_step}")
