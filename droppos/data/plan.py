"""The sample plan: which samples each rank reads, in which order, each epoch. Both backends follow it.

The guarantees of `droppos.data`, in one place (tests/test_data.py checks each, for both backends):

- Samples. A split's samples are the concatenation of its shards as `manifest.json` lists them
  (nothing the manifest does not list is read), in manifest order for eval and in a shard order
  permuted by (seed, epoch) for training: the same permutation on every rank.
- Rank split. Rank r of world k owns the contiguous range [r*N//k, (r+1)*N//k) of that
  concatenation (DALI's own sharding formula). Ranges are disjoint and cover every sample.
- Training modes (pretrain, finetune, probe). Every rank yields exactly
  `steps_per_epoch = (N//k) // batch_size` full batches, drawn through a shuffle buffer seeded by
  (seed, epoch, rank): no sample twice in an epoch, no ragged, empty or padded batch. The few
  leftover samples of a range are dropped that epoch (a different few each epoch).
- Eval mode. No shuffling; every rank yields `steps_per_epoch = ceil(ceil(N/k) / batch_size)`
  batches of static shape. Slots past the rank's samples are padding: zero images with label -1
  (`PAD_LABEL`); mask them out (`labels >= 0`). Over all ranks every sample appears exactly once;
  `Loader.rank_samples` is the number of real samples on this rank.
- Determinism. Every random draw of a sample (its crop, flip, RandAugment) is a function of
  (seed, epoch, rank, the sample's position in its stream) only; for `pil` the streams are the
  workers' roles, so the worker count is part of the seed. The loader neither reads nor changes
  the main process's global RNGs (python's `random`, numpy's, torch's). So
  `epoch(e, start_batch=s)` yields exactly the batches the uninterrupted epoch yields from step s:
  `pil` skips the first samples of each role undecoded (it replays only the shuffle), `dali`
  decodes and drops the first s batches (it cannot seek).
- Components. A sample is read as the components named in `COMPONENTS`: the JPEG and its int32
  label; a loader of label maps (`components(masks=True)`) reads `seg.png` too, split exactly like
  the JPEG, and its pil backend gives the mask the image's crop, flip and resize (`droppos.data.pil`).
  Masks come out as int64 [B, H, W] with IGNORE (-1) for unlabelled pixels and in eval padding.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from droppos.labelmaps import MASK_COMPONENT
from droppos.tarindex import index_sample, sample_start

PAD_LABEL = -1
COMPONENTS = ("jpg", "lbl")  # what each sample is read as; `droppos shard` writes both
SHUFFLE_BUFFER = 1024  # samples per shuffle buffer (DALI `initial_fill`, pil per worker role)


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


@dataclass(frozen=True)
class Role:
    """What one pil worker does in one epoch: batches `first`, `first + stride`, ... of the rank's epoch.

    Training roles read `segments` in order through a shuffle buffer seeded by `seed` and cut the
    samples into `num_batches` full batches, of which the first `skip` are drawn but not decoded
    (resume). Eval roles read `eval_batches`, the segments of each of their batches, in order.
    """

    num_batches: int
    skip: int = 0
    seed: int = 0
    segments: tuple[Segment, ...] = ()
    eval_batches: tuple[tuple[Segment, ...], ...] = ()


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

    def roles(self, epoch: int, start_batch: int, workers: int) -> list[Role]:
        """This rank's epoch from `start_batch` on, split into per-worker roles (`max(1, workers)` of them).

        Role w serves batches w, w+R, ...; the returned list is rotated so that its first role
        serves batch `start_batch`, and a DataLoader (which takes batches from its workers in turn)
        returns them in epoch order.
        """
        num_roles, batch, steps = max(1, workers), self.batch_size, self.steps_per_epoch
        shards, (lo, hi) = self.epoch_shards(epoch), self.range
        if not self.training:
            roles = []
            for i in range(min(num_roles, steps - start_batch)):
                groups = []
                for step in range(start_batch + i, steps, num_roles):
                    begin = min(hi, lo + step * batch)
                    groups.append(tuple(segments(shards, begin, min(hi, begin + batch))))
                roles.append(Role(num_batches=len(groups), eval_batches=tuple(groups)))
            return roles
        # Training: role w reads a contiguous piece of the rank's range (sequential tar reads); the
        # range's spare samples go to the last role (slack for corrupt ones).
        counts = [len(range(w, steps, num_roles)) for w in range(num_roles)]
        begin, pieces = lo, []
        for w, count in enumerate(counts):
            end = hi if w == num_roles - 1 else begin + count * batch
            pieces.append((begin, end))
            begin = end
        roles = []
        for i in range(min(num_roles, steps - start_batch)):
            w = (start_batch + i) % num_roles
            roles.append(Role(num_batches=counts[w], skip=len(range(w, start_batch, num_roles)),
                              seed=self.pipeline_seed(epoch, w), segments=tuple(segments(shards, *pieces[w]))))
        return roles


def shuffled(role: Role, samples: Iterator[dict]) -> Iterator[tuple[int, dict]]:
    """(position, sample) through the role's seeded shuffle buffer; positions count from 1."""
    rng = random.Random(role.seed)
    buffer: list[dict] = []
    position = 0
    for sample in samples:
        if len(buffer) < SHUFFLE_BUFFER:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        position += 1
        yield position, sample
    rng.shuffle(buffer)
    for sample in buffer:
        position += 1
        yield position, sample


def sample_seed(role: Role, position: int) -> int:
    """The seed of every random draw of the sample at `position` of `role` (crop, flip, RandAugment)."""
    return stable_seed(role.seed, position)


def read_segment(segment: Segment, components: Sequence[str] = COMPONENTS) -> Iterator[dict]:
    """Samples of one segment, streamed from the tar with webdataset from the first one's header."""
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


def read_segments(parts: Sequence[Segment], components: Sequence[str] = COMPONENTS) -> Iterator[dict]:
    """The samples of several segments, in order."""
    for segment in parts:
        yield from read_segment(segment, components)
