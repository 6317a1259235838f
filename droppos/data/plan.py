"""The sample plan: which samples each rank reads, in which order, each epoch. Both backends follow it.

The guarantees of `droppos.data`, in one place (tests/test_data.py checks each, for both backends):

- Samples. A split's samples are the concatenation of its shards as `manifest.json` lists them
  (nothing the manifest does not list is read), in manifest order for eval and in a shard order
  permuted by (seed, epoch) for training: the same permutation on every rank.
- Rank split. Rank r of world k owns the contiguous range [r*N//k, (r+1)*N//k) of that
  concatenation (DALI's own sharding formula). Ranges are disjoint and cover every sample.
- Training modes (pretrain, finetune, probe, segment). Every rank yields exactly
  `steps_per_epoch = (N//k) // batch_size` full batches: no sample twice in an epoch, no ragged,
  empty or padded batch. The few leftover samples of a range are dropped that epoch (a different
  few each epoch). `pil` reads the range in a permutation seeded by (seed, epoch, rank, k)
  (`Plan.epoch_order`); `dali` through its reader's shuffle buffer, seeded by (seed, epoch, rank).
- Eval mode. No shuffling; every rank yields `steps_per_epoch = ceil(ceil(N/k) / batch_size)`
  batches of static shape. Slots past the rank's samples are padding: zero images with label -1
  (`PAD_LABEL`); mask them out (`labels >= 0`). Over all ranks every sample appears exactly once;
  `Loader.rank_samples` is the number of real samples on this rank.
- Determinism. The batches are a function of (seed, epoch, rank, world size, the backend, and for
  `dali` the device it decodes on) only: never of `--workers`. `pil`: batch b holds positions
  [b*B, (b+1)*B) of the rank's epoch order, read by offset through the shard index whichever
  DataLoader worker makes it (worker w of W makes batches w, w+W, ...), and the sample at
  position p draws its crop, flip and RandAugment from `Plan.sample_seed(epoch, p)` =
  (seed, epoch, rank, world size, p). `dali`: its per-sample random streams and its reader do
  not depend on its thread count (tests/test_data.py checks it with CPU decoding; the GPU's
  'mixed' decoding is not checked). A resumed run whose backend (or DALI decoding device)
  differs is refused without --force-resume (`checkpoint.check_resumable`). The loader neither
  reads nor changes the main process's global RNGs (python's `random`, numpy's, torch's). So
  `epoch(e, start_batch=s)` yields exactly the batches the uninterrupted epoch yields from step s,
  whatever the worker count of either run: `pil` starts at batch s (nothing before it is read),
  `dali` decodes and drops the first s batches (it cannot seek).
- Bad data (`pil`). An unreadable training sample is counted and its slot filled with a copy of a
  readable sample of the same batch (so the batch still depends on nothing but the data); an
  unreadable eval sample leaves one more padding slot at the batch's end.
- Components. A sample is read as the components named in `COMPONENTS`: the JPEG and its int32
  label; a loader of label maps (`components(masks=True)`) reads `seg.png` too, split exactly like
  the JPEG, and its pil backend gives the mask the image's crop, flip and resize (`droppos.data.pil`).
  Masks come out as int64 [B, H, W] with IGNORE (-1) for unlabelled pixels and in eval padding.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from droppos import UserError
from droppos.labelmaps import MASK_COMPONENT
from droppos.tarindex import BadIndex, index_sample, iter_index, sample_start

PAD_LABEL = -1
COMPONENTS = ("jpg", "lbl")  # what each sample is read as; `droppos shard` writes both
SHUFFLE_BUFFER = 1024  # samples in DALI's shuffle buffer (its reader's `initial_fill`)
_ORDER_SALT, _SAMPLE_SALT = 0x0D3E, 0x5A3E  # keep the rank's order and its samples' draws apart
_SPAN_SLACK = 64 * 1024  # bytes between a sample's components (tar headers, its .json) read along in one pread


@dataclass(frozen=True)
class Shard:
    tar: str
    index: str
    num_samples: int


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one tar, read in order."""

    tar: str
    index: str
    start: int
    stop: int


def components(masks: bool) -> tuple[str, ...]:
    """The components a loader reads: `COMPONENTS`, and the label map when it reads masks."""
    return (*COMPONENTS, MASK_COMPONENT) if masks else COMPONENTS


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The half-open sample range of `rank`: DALI's sharding formula, reproduced for `pil`."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def stable_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's `hash` is salted for str, so not used)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def segments(shards: Sequence[Shard], begin: int, end: int) -> list[Segment]:
    """The samples [begin, end) of the concatenation of `shards`, as per-tar segments."""
    out, offset = [], 0
    for shard in shards:
        lo, hi = max(begin, offset), min(end, offset + shard.num_samples)
        if lo < hi:
            out.append(Segment(shard.tar, shard.index, lo - offset, hi - offset))
        offset += shard.num_samples
    return out


@dataclass(frozen=True)
class Plan:
    """One rank's view of one split: its sample range, its batches per epoch, each epoch's order."""

    shards: tuple[Shard, ...]
    training: bool
    batch_size: int
    rank: int
    world_size: int
    seed: int

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def range(self) -> tuple[int, int]:
        return rank_range(self.num_samples, self.rank, self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        if self.training:
            return (self.num_samples // self.world_size) // self.batch_size
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    @property
    def rank_samples(self) -> int:
        """Real samples this rank yields per epoch (training: the full batches' samples)."""
        if self.training:
            return self.steps_per_epoch * self.batch_size
        lo, hi = self.range
        return hi - lo

    def epoch_shards(self, epoch: int) -> list[Shard]:
        """Shard order of one epoch: manifest order for eval, else a (seed, epoch) permutation."""
        if not self.training:
            return list(self.shards)
        order = np.random.default_rng(stable_seed(self.seed, epoch, 0xC0FFEE)).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def pipeline_seed(self, epoch: int, salt: int) -> int:
        """The seed of a backend's own random streams for (seed, epoch, rank)."""
        return stable_seed(self.seed, epoch, self.rank, salt)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 positions, in the concatenation of `epoch_shards(epoch)`, of the samples this rank reads, in
        the order it reads them: the `pil` backend's epoch. Batch b is entries [b*B, (b+1)*B).

        Eval: the rank's range in order. Training: the first `rank_samples` entries of a permutation of the
        rank's range seeded by (seed, epoch, rank, world size) alone.
        """
        lo, hi = self.range
        if not self.training:
            return np.arange(lo, hi, dtype=np.int64)
        rng = np.random.default_rng(stable_seed(self.seed, epoch, self.rank, self.world_size, _ORDER_SALT))
        return lo + rng.permutation(hi - lo)[: self.rank_samples].astype(np.int64)

    def batch_positions(self, batch: int) -> range:
        """The entries of `epoch_order` that make batch `batch` (eval: fewer, or none, past the rank's range)."""
        size = self.rank_samples
        return range(min(size, batch * self.batch_size), min(size, (batch + 1) * self.batch_size))

    def sample_seed(self, epoch: int, position: int) -> int:
        """The seed of every random draw (crop, flip, RandAugment) of the sample at `position` of the rank's
        epoch order: a function of (seed, epoch, rank, world size, position) only."""
        return stable_seed(self.seed, epoch, self.rank, self.world_size, position, _SAMPLE_SALT)

    def worker_batches(self, start_batch: int, workers: int) -> list[range]:
        """The batches of each of `min(max(1, workers), batches left)` workers, from `start_batch` on.

        Worker i makes batches start_batch + i, start_batch + i + W, ...: a DataLoader takes batches from
        its workers in turn, so they come out in epoch order; the batches themselves do not depend on W.
        """
        left = self.steps_per_epoch - start_batch
        count = min(max(1, workers), left)
        return [range(start_batch + i, self.steps_per_epoch, count) for i in range(count)]

    def reads(self, epoch: int, sample_spans: Callable[[Shard], np.ndarray]) -> "EpochReads":
        """Where each entry of `epoch_order(epoch)` lies: its shard (among those of this rank's range only),
        its sample number there, and (through `sample_spans`, e.g. a cache of `spans`) its components."""
        shards, order = self.epoch_shards(epoch), self.epoch_order(epoch)
        starts = np.cumsum([0] + [s.num_samples for s in shards])
        which = np.searchsorted(starts, order, side="right") - 1
        numbers = order - starts[which]
        used, shard_ids = np.unique(which, return_inverse=True)
        touched = tuple(shards[i] for i in used)
        return EpochReads(touched, tuple(sample_spans(s) for s in touched), shard_ids.astype(np.int32),
                          numbers.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Reading samples


@dataclass(frozen=True)
class EpochReads:
    """Entry p of a rank's epoch order is sample `numbers[p]` of `shards[shard_ids[p]]`, whose components
    lie at `spans[shard_ids[p]][numbers[p]]` ((data offset, size) per component read)."""

    shards: tuple[Shard, ...]
    spans: tuple[np.ndarray, ...]
    shard_ids: np.ndarray
    numbers: np.ndarray

    def location(self, position: int) -> tuple[int, int]:
        return int(self.shard_ids[position]), int(self.numbers[position])

    def key(self, position: int) -> str:
        """The sample's key (for the skipped-sample report; reads the index again: rare)."""
        shard, number = self.location(position)
        try:
            return index_sample(self.shards[shard].index, number)[0].name.partition(".")[0]
        except (OSError, BadIndex):
            return f"{os.path.basename(self.shards[shard].tar)}#{number}"


def spans(shard: Shard, wanted: Sequence[str]) -> np.ndarray:
    """int64 [samples, len(wanted), 2]: each sample's (data offset, size) of each wanted component, as the
    shard's index lists them; (-1, 0) where a sample lacks one (it will be skipped as unreadable).

    The index must list the manifest's number of samples; a malformed one is a UserError.
    """
    out = np.full((shard.num_samples, len(wanted), 2), (-1, 0), dtype=np.int64)
    column = {ext: i for i, ext in enumerate(wanted)}
    count = 0
    try:
        for count, entries in enumerate(iter_index(shard.index), 1):
            if count > shard.num_samples:
                break
            row = out[count - 1]
            for entry in entries:
                i = column.get(entry.ext)
                if i is not None:
                    row[i] = (entry.offset, entry.size)
    except (OSError, BadIndex) as err:
        raise UserError(f"cannot read the index of {shard.tar} ({err}); run `droppos shard --verify` on the "
                        "dataset") from None
    if count != shard.num_samples:
        raise UserError(f"the index of {shard.tar} lists {'more' if count > shard.num_samples else count} samples, "
                        f"the manifest {shard.num_samples}; run `droppos shard --verify` on the dataset")
    return out


def read_samples(reads: EpochReads, positions: Sequence[int], wanted: Sequence[str]) -> Iterator[tuple[int, dict | None]]:
    """(position, {component: bytes} or None when it cannot be read) for each of `positions`, read in tar
    order (one pread per sample, each tar opened once): the order of the results is not `positions`'.

    A component the index does not list is left out of the dict (the caller finds it missing); a span
    outside the tar makes the sample unreadable.
    """
    by_shard: dict[int, list[int]] = {}
    for p in sorted(positions, key=reads.location):
        by_shard.setdefault(int(reads.shard_ids[p]), []).append(p)
    for shard, group in by_shard.items():
        table = reads.spans[shard]
        with open(reads.shards[shard].tar, "rb") as tar:
            fd, size = tar.fileno(), os.fstat(tar.fileno()).st_size
            for p in group:
                row = table[reads.numbers[p]]
                present = [(ext, int(o), int(n)) for ext, (o, n) in zip(wanted, row) if o >= 0]
                begin = min((o for _, o, _ in present), default=0)
                end = max((o + n for _, o, n in present), default=0)
                if not present or end > size:
                    yield p, None
                    continue
                if end - begin <= sum(n for _, _, n in present) + _SPAN_SLACK:  # adjacent members: one read
                    data = os.pread(fd, end - begin, begin)
                    parts = {ext: data[o - begin:o - begin + n] for ext, o, n in present}
                else:  # members far apart (not as `droppos shard` writes them): no read of what lies between
                    parts = {ext: os.pread(fd, n, o) for ext, o, n in present}
                if any(len(parts[ext]) != n for ext, _, n in present):
                    yield p, None
                    continue
                yield p, parts


def read_segment(segment: Segment, components: Sequence[str] = COMPONENTS) -> Iterator[dict]:
    """Samples of one segment, streamed from the tar with webdataset from the first one's header (DALI's
    error path reads them again with it to name an undecodable sample)."""
    from droppos import fastpaths

    header = sample_start(index_sample(segment.index, segment.start))
    remaining = segment.stop - segment.start
    suffixes = tuple(f".{c}" for c in components)
    with open(segment.tar, "rb") as stream:
        stream.seek(header)
        for sample in fastpaths.tar_samples(stream, lambda n: n.endswith(suffixes), segment.tar):
            yield sample
            remaining -= 1
            if remaining == 0:
                return
