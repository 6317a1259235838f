"""The Pillow backend: webdataset tar streaming, torch DataLoader workers, Pillow(-SIMD) and timm's transforms.

It follows the plan (`droppos.data.plan`): each DataLoader worker plays one `Role` and fills whole batches.
Why it is shaped so:
- decoding: a JPEG is decoded at reduced size (`Image.draft`) and only down to the crop's last row
  (`fastpaths.decode_rows`), and only the crop box is resized; the augmentations are timm's, in timm's order
  (crop, flip, RandAugment; see `recipe`);
- allocation: workers write uint8 images into a shared-memory `Ring` made once per loader and send slot
  indices; the main process normalises each slot on the device (into a `BatchPool` on a CPU, through
  `PinnedStaging` to CUDA) and hands it back at once;
- bad data: an undecodable sample is skipped and counted, and a training batch completed from the role's spares;
- timm draws from python's and numpy's global RNGs, so each sample's draws run inside `seeded_globals`
  (seeded by `plan.sample_seed`, restored after) and the DataLoader has its own generator: the caller's RNGs
  are neither read nor changed.
Label maps (`masks=True`) take their image's crop box (in full-size coordinates) and flip, resized NEAREST,
into an int16 ring beside the images'; a mask of another size than its image makes the sample unreadable.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from droppos import UserError, fastpaths
from droppos.data.plan import Plan, Role, components, read_segments, sample_seed, shuffled
from droppos.data.transforms import CROP_RATIO, EVAL_CROP_PCT, RAND_AUGMENT, RECIPES, normalize, rand_augment_hparams
from droppos.labelmaps import MASK_COMPONENT, label_array

PIL_PREFETCH = 2  # batches queued per DataLoader worker
STAGING_DEPTH = 2  # pinned host batches in flight to CUDA


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Python's and numpy's global RNGs seeded with `seed` for one sample, and restored afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class PilTransform:
    """Decode + augment one JPEG (and its label map) with Pillow(-SIMD) into uint8 HWC (and int16 HW) batch
    slots (see the module docstring)."""

    def __init__(self, mode: str, img_size: int, lut: np.ndarray | None = None) -> None:
        self.recipe, self.size, self.lut = RECIPES[mode], img_size, lut
        self.rand_augment = None
        if self.recipe.rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            self.rand_augment = rand_augment_transform(RAND_AUGMENT, rand_augment_hparams(img_size))

    def __call__(self, jpeg: bytes, seed: int, slot: np.ndarray, mask: bytes | None = None,
                 mask_slot: np.ndarray | None = None) -> None:
        from PIL import Image

        img = Image.open(io.BytesIO(jpeg))
        labels = None if mask_slot is None else self._label_map(mask, img.size)
        if not self.recipe.training:
            pixels, box = self._eval(img)
            np.copyto(slot, pixels)
            if labels is not None:
                self._put_labels(labels.resize((self.size, self.size), Image.NEAREST, box=box), mask_slot)
            return
        with seeded_globals(seed):
            img, box = self._random_resized_crop(img)
            flip = self.recipe.flip and random.random() < 0.5
            if flip:  # Pillow's flip, faster than a reversed-stride copy (docs/measurements.md)
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if self.rand_augment is not None:
                img = self.rand_augment(img)
        np.copyto(slot, np.asarray(img))
        if labels is not None:
            labels = labels.resize((self.size, self.size), Image.NEAREST, box=box)
            self._put_labels(labels.transpose(Image.FLIP_LEFT_RIGHT) if flip else labels, mask_slot)

    @staticmethod
    def _label_map(data: bytes | None, size: tuple[int, int]):
        """The decoded label map, which must have the image's (full) size."""
        from PIL import Image

        if data is None:
            raise ValueError("the sample has no label map")
        labels = Image.open(io.BytesIO(data))
        labels.load()
        if labels.size != size:
            raise ValueError(f"label map {labels.size} and image {size} differ in size")
        return labels

    def _put_labels(self, labels, mask_slot: np.ndarray) -> None:
        np.take(self.lut, label_array(labels), out=mask_slot)

    def _random_resized_crop(self, img):
        """The crop resized to `size`, and its box in the full image's coordinates (for the label map)."""
        from PIL import Image
        from timm.data.transforms import RandomResizedCropAndInterpolation

        width, height = img.size
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, self.recipe.crop_scale, CROP_RATIO)
        # timm's fallback can give a 0-pixel side on a tiny image (a 1x1 photo is a valid sample): one pixel at least.
        h, w = max(1, min(h, height)), max(1, min(w, width))
        top, left = min(top, height - h), min(left, width - w)
        # Decode no more pixels than the crop needs: DCT-domain downscale by 1/2, 1/4 or 1/8 while
        # the crop stays at least img_size on both sides.
        img.draft("RGB", (math.ceil(width * self.size / w), math.ceil(height * self.size / h)))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        # Nor rows below the last one the bicubic filter reads (support 2 px x the downscale factor).
        img = _rgb(img, rows=math.ceil(box[3] + 2.0 * max(1.0, (box[3] - box[1]) / self.size)) + 1)
        return img.resize((self.size, self.size), Image.BICUBIC, box=box), (left, top, left + w, top + h)

    def _eval(self, img) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """The eval crop's pixels, and its box in the full image's coordinates (for the label map)."""
        from PIL import Image

        resize_to = int(self.size / EVAL_CROP_PCT)
        full_width, full_height = width, height = img.size
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
        fx, fy = full_width / width, full_height / height  # the drafted image -> the full one
        full_box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return np.asarray(img.resize((self.size, self.size), Image.BICUBIC, box=box)), full_box


def _rgb(img, rows: int | None = None):
    """The decoded image in RGB, or only its first `rows` rows when that saves decoding.

    `convert` would copy an image that already is RGB (as sharded JPEGs are).
    """
    if rows is not None and rows < img.size[1] and img.mode == "RGB":
        top = fastpaths.decode_rows(img, rows)
        if top is not None:
            return top
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Workers: roles -> batches in the shared ring


class Ring:
    """uint8 [workers, depth, B, H, W, 3] batch slots in shared memory, made once per loader.

    A fresh shared batch per step (what DataLoader's collate does) costs page faults twice, in the
    worker that fills it and in the main process that reads it, about as much as the Pillow resize
    (docs/measurements.md). Slots reused across batches and epochs fault once. Worker w writes its
    j-th batch into slot j % depth after taking one of its `depth` semaphore units; the main process
    gives the unit back once it has read the slot (`PilBackend.epoch`).
    """

    def __init__(self, workers: int, depth: int, batch_size: int, img_size: int, shared: bool,
                 masks: bool = False) -> None:
        shape = (workers, depth, batch_size, img_size, img_size, 3)
        self.slots = _ring_tensor(shape, torch.uint8, shared)
        # Label maps: int16 [workers, depth, B, H, W] beside the images, in the same slots.
        self.mask_slots = _ring_tensor(shape[:-1], torch.int16, shared) if masks else None
        self.shared = shared
        self.busy = False  # an epoch's workers may be writing into it

    def fits(self, workers: int, depth: int, batch_size: int, img_size: int, shared: bool, masks: bool = False) -> bool:
        w, d, b, h = self.slots.shape[:4]
        return (w >= workers and d == depth and b == batch_size and h == img_size and self.shared == shared
                and (self.mask_slots is not None) == masks)


def _ring_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """A tensor made once per loader: in shared memory for worker processes, else a plain one."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(fastpaths.shared_storage(nbytes), 0, shape)


class BatchWriter:
    """Images are written straight into a ring slot (no per-image arrays to stack, no batch copy)."""

    def __init__(self, worker: int, slots: torch.Tensor, free_slots, mask_slots: torch.Tensor | None = None) -> None:
        self.worker, self.free_slots = worker, free_slots
        self.ring = slots.numpy()  # [depth, B, H, W, 3]
        self.mask_ring = mask_slots.numpy() if mask_slots is not None else None  # [depth, B, H, W]
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

    def mask_slot(self, k: int) -> np.ndarray | None:
        """Label-map slot k of the batch being filled (None: the loader reads no masks)."""
        if self.mask_ring is None:
            return None
        self.slots  # noqa: B018 - takes the ring slot on first use
        return self.mask_ring[(self._written - 1) % len(self.mask_ring), k]

    def repeat(self, k: int, source: int) -> None:
        """Slot k becomes a copy of slot `source` (image and label map): completing a short batch."""
        self.slots[k] = self.slots[source]
        if self.mask_ring is not None:
            self.mask_slot(k)[...] = self.mask_slot(source)

    def finish(self, count: int) -> tuple[int, int, int]:
        """(worker, slot, count) of the batch just filled; the next image starts a new batch."""
        if self._slots is None:  # an eval batch of unreadable samples only
            self._take_slot()
        self._slots = None
        return self.worker, (self._written - 1) % len(self.ring), count


def decode_sample(sample: dict, transform: PilTransform, seed: int, slot: np.ndarray,
                  mask_slot: np.ndarray | None = None) -> int | None:
    """Decode a sample into `slot` (and its label map into `mask_slot`); its label, or None when it
    cannot be used (counted as skipped)."""
    try:
        label = int.from_bytes(sample["lbl"], "little", signed=True)
        transform(sample["jpg"], seed, slot, sample.get(MASK_COMPONENT), mask_slot)
        return label
    except Exception:  # any failure of a sample's bytes: Pillow raises many types
        return None


def train_batches(role: Role, transform: PilTransform, batches: BatchWriter) -> Iterator[tuple]:
    """The role's shuffle-buffered samples, cut into exactly `num_batches - skip` full batches."""
    batch_size = batches.batch_size
    labels: list[int] = []
    skipped: list[str] = []
    done = 0
    for position, sample in shuffled(role, read_segments(role.segments, components(batches.mask_ring is not None))):
        if position <= role.skip * batch_size:
            continue  # drawn, not decoded: resuming replays only the shuffle
        label = decode_sample(sample, transform, sample_seed(role, position), batches.slots[len(labels)],
                              batches.mask_slot(len(labels)))
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
            batches.repeat(k, k % real)
            labels.append(labels[k % real])
        yield batches.finish(batch_size), torch.tensor(labels), skipped


def eval_batches(role: Role, transform: PilTransform, batches: BatchWriter) -> Iterator[tuple]:
    """The role's batches in order; unreadable samples leave padding (label -1) behind."""
    for group in role.eval_batches:
        labels: list[int] = []
        skipped: list[str] = []
        for sample in read_segments(group, components(batches.mask_ring is not None)):
            label = decode_sample(sample, transform, 0, batches.slots[len(labels)], batches.mask_slot(len(labels)))
            if label is None:
                skipped.append(str(sample.get("__key__")))
                continue
            labels.append(label)
        yield batches.finish(len(labels)), torch.tensor(labels, dtype=torch.int64), skipped


class PilEpoch(torch.utils.data.IterableDataset):
    """The epoch's roles; DataLoader worker i plays role i (roles were rotated for resuming).

    Yields ((worker, slot, count), labels, skipped keys): the images themselves stay in the
    loader's shared `Ring`, which the main process reads (and releases) by slot.
    """

    def __init__(self, roles: list[Role], mode: str, img_size: int, ring: torch.Tensor,
                 free_slots: Sequence | None, mask_ring: torch.Tensor | None = None, lut: np.ndarray | None = None) -> None:
        self.roles, self.mode, self.img_size, self.ring, self.free_slots = roles, mode, img_size, ring, free_slots
        self.mask_ring, self.lut = mask_ring, lut

    def __iter__(self) -> Iterator[tuple[tuple[int, int, int], torch.Tensor, list[str]]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        transform = PilTransform(self.mode, self.img_size, self.lut)
        batches = BatchWriter(worker, self.ring[worker], self.free_slots[worker] if self.free_slots else None,
                              self.mask_ring[worker] if self.mask_ring is not None else None)
        make = train_batches if RECIPES[self.mode].training else eval_batches
        yield from make(self.roles[worker], transform, batches)


# ----------------------------------------------------------------------------------------------
# The main process: ring slots -> normalised batches on the device


class BatchPool:
    """Float32 CPU batches to normalise into, reused once nothing outside the pool refers to them (a fresh
    batch per step costs more in page faults than the normalisation itself: docs/measurements.md).

    The pool keeps storages, not tensors: each batch handed out is a new tensor on a pooled
    storage, so any reference the consumer keeps (the batch, a view, `.numpy()`) shows in the
    storage's use count, and a storage is reused only when the pool's is the last one. Consumers
    that keep every batch simply get fresh ones; without `fastpaths.storage_use_count` every batch
    is fresh.
    """

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self.storages: list[torch.UntypedStorage] = []

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * 4
        storage = next((s for s in self.storages if s.nbytes() >= nbytes and fastpaths.storage_use_count(s) == 1),
                       None)
        if storage is None:
            storage = torch.UntypedStorage(nbytes)
            if fastpaths.storage_use_count(storage) is not None and len(self.storages) < self.capacity:
                self.storages.append(storage)
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


class PinnedStaging:
    """Pinned host batches that copies to CUDA read from; each is reused only after its copy has completed.

    The main process copies a ring slot (one memcpy) into pinned staging batch k, starts the asynchronous
    host-to-device copy of the uint8 images (a quarter of float32's bytes; normalised on the GPU) and records
    a CUDA event on the copy's stream. The ring slot goes back to its worker at once (workers never wait for
    the GPU); batch k is written again only after its event has completed, which blocks only when the GPU is
    `depth` copies behind. The ring itself is not pinned: that needs cudaHostRegister on shared memory, which
    torch does not offer publicly, and a copy from pageable memory is not asynchronous at all.

    `new_event` and `stream` are there for tests: a fake event shows the bookkeeping on a CPU.
    """

    def __init__(self, device: torch.device | str, depth: int = STAGING_DEPTH, pin: bool = True,
                 new_event: Callable[[], object] | None = None, stream: Callable[[], object] | None = None) -> None:
        self.device, self.depth, self.pin = torch.device(device), depth, pin
        cuda = self.device.type == "cuda"
        self.new_event = new_event or torch.cuda.Event
        self.stream = stream or ((lambda: torch.cuda.current_stream(self.device)) if cuda else (lambda: None))
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * depth
        self.events: list[object | None] = [None] * depth
        self.used = 0  # batches staged so far

    def copy(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [n,H,W,3] (+ labels [n]) on the host -> the same on the device, copied asynchronously."""
        k = self.used % self.depth
        if self.events[k] is not None:
            self.events[k].synchronize()  # the copy that last read staging batch k has completed
            self.events[k] = None
        host_images, host_labels = self._buffer(k, images)
        n = images.shape[0]
        host_images[:n].copy_(images)
        out_images = host_images[:n].to(self.device, non_blocking=True)
        out_labels = None
        if labels is not None:
            host_labels[:n].copy_(labels)
            out_labels = host_labels[:n].to(self.device, non_blocking=True)
        event, stream = self.new_event(), self.stream()
        if stream is None:
            event.record()
        else:
            event.record(stream)
        self.events[k] = event
        self.used += 1
        return out_images, out_labels

    def _buffer(self, k: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffer = self.buffers[k]
        if buffer is None or buffer[0].shape[0] < images.shape[0] or buffer[0].shape[1:] != images.shape[1:]:
            buffer = (torch.empty(images.shape, dtype=torch.uint8, pin_memory=self.pin),
                      torch.empty(images.shape[0], dtype=torch.int64, pin_memory=self.pin))
            self.buffers[k] = buffer
        return buffer


class PilBackend:
    """One loader's Pillow pipeline: its ring and output buffers live across epochs."""

    name = "pil"

    def __init__(self, plan: Plan, mode: str, img_size: int, device: torch.device, workers: int,
                 labels_to_device: bool, lut: np.ndarray | None = None) -> None:
        self.plan, self.mode, self.img_size, self.device = plan, mode, img_size, device
        self.workers, self.labels_to_device = workers, labels_to_device
        self.lut = lut  # stored label value -> label: the loader reads label maps
        self._ring: Ring | None = None
        self._pool = BatchPool()
        self._staging = PinnedStaging(device) if device.type == "cuda" else None

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple]:
        """(normalised images on the device, labels, skipped keys[, int64 masks on the device]) of `epoch`
        from `start_batch` on."""
        roles = self.plan.roles(epoch, start_batch, self.workers)
        # Workers are forked each epoch: import the transforms' modules here, once per process, rather
        # than in every worker of every epoch (timm's import is slow: docs/measurements.md).
        import timm.data.auto_augment  # noqa: F401
        import timm.data.transforms  # noqa: F401
        # A worker holds at most PIL_PREFETCH batches in the queue plus the one it writes: depth = PIL_PREFETCH + 1.
        workers = len(roles) if self.workers > 0 else 0
        depth = PIL_PREFETCH + 1 if workers else 1
        masks = self.lut is not None
        ring = self._take_ring((max(1, self.workers), depth, self.plan.batch_size, self.img_size, workers > 0, masks))
        free_slots = [multiprocessing.Semaphore(depth) for _ in range(workers)] if workers else None
        dataset = PilEpoch(roles, self.mode, self.img_size, ring.slots, free_slots, ring.mask_slots, self.lut)
        if workers == 0:
            batches: Iterator = iter(dataset)
        else:
            generator = torch.Generator().manual_seed(self.plan.pipeline_seed(epoch, 0xD1))  # not the global RNG
            batches = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=workers, prefetch_factor=PIL_PREFETCH,
                persistent_workers=False, generator=generator))
        ring.busy = True
        produced = 0
        try:
            for (worker, slot, count), labels, skipped in batches:
                images, labels = self._to_device(ring.slots[worker, slot, :count], labels)
                extra = () if ring.mask_slots is None else (self._masks_to_device(ring.mask_slots[worker, slot, :count]),)
                if free_slots:
                    free_slots[worker].release()
                produced += 1
                yield images, labels, skipped, *extra
        finally:
            del batches  # the last reference: DataLoader's iterator stops its workers before the ring is free
            ring.busy = False
        if produced != self.plan.steps_per_epoch - start_batch:
            raise RuntimeError(f"pil loader produced {produced} batches, expected {self.plan.steps_per_epoch - start_batch}")

    def _masks_to_device(self, masks: torch.Tensor) -> torch.Tensor:
        """A ring slot's int16 labels -> int64 [B, H, W] on the device (a copy: the slot is free after)."""
        return masks.to(torch.int64).to(self.device, non_blocking=self.device.type == "cuda")

    def _take_ring(self, shape: tuple[int, int, int, int, bool, bool]) -> Ring:
        ring = self._ring
        if ring is None or ring.busy or not ring.fits(*shape):
            ring = Ring(*shape)
            if self._ring is None or not self._ring.busy:
                self._ring = ring  # kept for the next epochs; an epoch still open elsewhere keeps its own
        return ring

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A ring slot's uint8 images -> normalised float32 [B,3,H,W] on the device; the slot is free after."""
        if self._staging is None:
            out = self._pool.take((images.shape[0], 3, *images.shape[1:3])) if self.device.type == "cpu" else None
            return normalize(images, self.device, out=out), labels.to(self.device) if self.labels_to_device else labels
        images, device_labels = self._staging.copy(images, labels if self.labels_to_device else None)
        return normalize(images, self.device), labels if device_labels is None else device_labels

    def close(self) -> None:
        """Free the buffers kept across epochs (the shared ring, the output pool)."""
        self._ring = None
        self._pool = BatchPool()
