"""The DALI backend: NVIDIA DALI's webdataset reader with the per-shard indexes, decoding on the GPU or the CPU.

It follows the plan (`droppos.data.plan`): a fresh pipeline per epoch reads the epoch's shard order, sharded by
sample over the plan's rank ranges and shuffled through `SHUFFLE_BUFFER` samples with a seed of (seed, epoch,
rank), so it replays exactly; DALI cannot seek, so resuming decodes and drops the batches before `start_batch`.
JPEGs are decoded on the GPU ('mixed') for a CUDA device and on the CPU (`device_id=None`) otherwise; training
decodes only the random crop's region, and `crop_mirror_normalize` fuses flip, crop, normalisation and the
HWC->CHW float conversion in DALI's threads. DALI stops at the first undecodable sample (it has no per-sample
skip), so the epoch ends with one UserError naming the shard and sample, found again with Pillow.

`--loader auto` takes `pil` on a CPU, where DALI's resampling is not vectorised (NVIDIA/DALI#4581; figures in
docs/measurements.md; it stays bicubic, as the recipe says), and for fine-tuning, whose RandAugment DALI does not
match (the differences are listed above `RAND_AUGMENT_M`).
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from droppos import UserError
from droppos.data.plan import COMPONENTS, SHUFFLE_BUFFER, Plan, read_segment, segments
from droppos.data.transforms import CROP_RATIO, EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, RECIPES

# DALI's `auto_aug.rand_augment` (finetune mode) is not timm's `rand-m9-mstd0.5-inc1` (the recipe, and the `pil`
# backend), read against timm 1.0 `rand_augment_transform` and DALI 2.4 `rand_augment`. They differ in:
# - operations: timm's 15 (AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing, SolarizeIncreasing,
#   SolarizeAdd, Color/Contrast/Brightness/SharpnessIncreasing, ShearX/Y, TranslateX/YRel); DALI's 14 have no
#   Invert and no SolarizeAdd, and an Identity;
# - application: timm applies each of the 2 operations it draws with probability 0.5; DALI always applies both
#   (only its Identity leaves an image unchanged);
# - magnitude: timm draws each application's magnitude from N(9, 0.5) clipped to [0, 10] (`mstd0.5`); DALI takes
#   one fixed integer bin (27 of 0..30, timm's mean 9/10) and no noise (`apply_rand_augment` accepts an int only);
# - posterize: timm keeps 4 - int(0.4 m) bits (1 bit at m ~ 9, none at 10); DALI's monotonic suite keeps
#   round(8 - 4 * 0.9) = 4 bits;
# - fill of the geometric operations: timm the ImageNet mean colour (124, 116, 104); DALI one grey value (128);
# - interpolation of the geometric operations: timm bicubic (`recipe.rand_augment_hparams`); DALI's warp_affine
#   and rotate offer linear or nearest only (linear here);
# - Equalize follows OpenCV's lookup formula in DALI and PIL's in timm; DALI's Sharpness also filters the
#   1-pixel border that PIL leaves unchanged.
# They agree on: 2 operations per image, chosen uniformly with replacement; the rotation (27 degrees), shear
# (0.27), enhancement (1 +- 0.81) and solarize (threshold ~26) magnitudes at 9; random signs; and the
# translation range, 0.405 of the side (DALI's is in pixels, `max_translate_abs`, set from the image size here:
# its default of 100 px holds only at 224).
RAND_AUGMENT_M, RAND_AUGMENT_BINS = 27, 31  # magnitude bins, no noise: m=27 of bins 0..30 is timm's 9/10
RAND_AUGMENT_TRANSLATE = 0.45  # timm's translate_pct: the largest shift, as a fraction of the side
PREFETCH = 2  # batches DALI prepares ahead on a CPU
# GPU decoding ('mixed') on Hopper (H100/H200: 7 NVJPG engines), set by reading, not measured yet: most JPEGs
# to the hardware decoder (nvImageCodec's own default, above the legacy 0.65 meant for A100's 5 engines),
# nvJPEG's buffers padded for ImageNet-size images so that they are not reallocated as sizes vary (the
# paddings of DALI's ResNet-50 example), and one more batch in flight to hide decode jitter.
MIXED_DECODER = dict(hw_decoder_load=0.9, device_memory_padding=211_025_920, host_memory_padding=140_544_512)
MIXED_PREFETCH = 3
READER_NAME = "reader"
_SEED_SALT = 0xDA11


def available() -> bool:
    """True when nvidia-dali imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def pipeline(files, index_files, mode, img_size, shard_id, num_shards, decoder_device):
    """The DALI graph: reader -> decode (+ random crop) -> resize (-> RandAugment) -> flip + normalise.

    Defined at module level in a source file because DALI's conditionals (AutoGraph, needed by
    RandAugment) read the function's source. Wrapped by `pipeline_def` in `DaliBackend._build`.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    recipe = RECIPES[mode]
    jpegs, labels = fn.readers.webdataset(
        paths=files, index_paths=index_files, ext=list(COMPONENTS), dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error", num_shards=num_shards, shard_id=shard_id,
        random_shuffle=recipe.training, initial_fill=SHUFFLE_BUFFER, pad_last_batch=False, stick_to_shard=True,
        name=READER_NAME,
    )
    normalise = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in IMAGENET_MEAN],
                     std=[255 * s for s in IMAGENET_STD])
    tuned = MIXED_DECODER if decoder_device == "mixed" else {}
    if not recipe.training:
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **tuned)
        images = fn.resize(images, resize_shorter=int(img_size / EVAL_CROP_PCT),
                           interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(images, crop=(img_size, img_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                        **normalise), labels
    images = fn.decoders.image_random_crop(
        jpegs, device=decoder_device, output_type=types.RGB, random_area=list(recipe.crop_scale),
        random_aspect_ratio=list(CROP_RATIO), num_attempts=10, **tuned)
    images = fn.resize(images, size=[img_size, img_size], interp_type=types.INTERP_CUBIC, antialias=True)
    if recipe.rand_augment:
        images = rand_augment.rand_augment(
            images, n=2, m=RAND_AUGMENT_M, num_magnitude_bins=RAND_AUGMENT_BINS, fill_value=128,
            monotonic_mag=True, max_translate_abs=max(1, round(RAND_AUGMENT_TRANSLATE * img_size)))
    mirror = fn.random.coin_flip(probability=0.5) if recipe.flip else 0
    return fn.crop_mirror_normalize(images, mirror=mirror, **normalise), labels


class DaliBackend:
    """One loader's DALI pipelines, one per epoch."""

    name = "dali"

    def __init__(self, plan: Plan, mode: str, img_size: int, device: torch.device, threads: int,
                 labels_to_device: bool, split: str, data_dir) -> None:
        self.plan, self.mode, self.img_size, self.device = plan, mode, img_size, device
        self.threads, self.labels_to_device, self.split, self.data_dir = threads, labels_to_device, split, data_dir

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """(normalised images on the device, labels, no skipped keys) of `epoch` from `start_batch` on."""
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        training = self.plan.training
        with _quiet_dali_deprecations():
            pipe = self._build(epoch)
            try:
                pipe.build()
                # The constructor already decodes the first batch (and schedules the prefetched ones).
                batches = DALIGenericIterator(
                    pipe, ["images", "labels"], reader_name=READER_NAME, auto_reset=False,
                    last_batch_policy=LastBatchPolicy.DROP if training else LastBatchPolicy.PARTIAL)
            except RuntimeError as err:
                raise self._data_error(err, epoch, 0) from None
        try:
            for step in range(self.plan.steps_per_epoch):
                try:
                    out = next(batches)[0]
                except StopIteration:
                    out = None
                except RuntimeError as err:
                    raise self._data_error(err, epoch, step) from None
                if out is None:
                    if training:  # cannot happen: (N//k)//B full batches exist on every rank
                        raise RuntimeError(f"DALI ended the epoch after {step} of {self.plan.steps_per_epoch} batches")
                    images = torch.zeros((0, 3, self.img_size, self.img_size), dtype=torch.float32, device=self.device)
                    labels = torch.zeros(0, dtype=torch.int64)
                else:
                    images, labels = out["images"], out["labels"].view(-1).to(torch.int64)
                if step < start_batch:  # DALI cannot seek: resuming replays the skipped batches
                    continue
                if self.labels_to_device:
                    labels = labels.to(self.device, non_blocking=True)
                yield images.to(self.device, non_blocking=True), labels, []
        finally:
            del batches, pipe

    def _build(self, epoch: int):
        from nvidia.dali import pipeline_def

        mixed = self.device.type == "cuda" and torch.cuda.is_available()
        device_id = None
        if mixed:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        shards = self.plan.epoch_shards(epoch)
        return pipeline_def(pipeline, enable_conditionals=RECIPES[self.mode].rand_augment)(
            [s.tar for s in shards], [s.index for s in shards], self.mode, self.img_size,
            self.plan.rank, self.plan.world_size, "mixed" if mixed else "cpu",
            batch_size=self.plan.batch_size, num_threads=max(1, self.threads), device_id=device_id,
            seed=self.plan.pipeline_seed(epoch, _SEED_SALT),
            prefetch_queue_depth=MIXED_PREFETCH if mixed else PREFETCH,
        )

    def _data_error(self, err: Exception, epoch: int, step: int) -> UserError:
        """DALI stops on the first undecodable sample and does not say which: find it and name its shard.

        The reader reads this rank's range in order, at most a shuffle buffer plus the prefetched
        batches ahead of `step`, so only that prefix is decoded again (with Pillow) to find the culprit.
        """
        reason = next((line.strip() for line in str(err).splitlines() if "failure" in line or "rror:" in line),
                      "undecodable sample")
        where = f"a shard of split {self.split!r}"
        lo, hi = self.plan.range
        read_upto = min(hi, lo + SHUFFLE_BUFFER + (step + PREFETCH + 2) * self.plan.batch_size)
        for segment in segments(self.plan.epoch_shards(epoch), lo, read_upto):
            bad = next((s for s in read_segment(segment) if not _readable(s)), None)
            if bad is not None:
                where = f"shard {segment.tar} (sample {bad['__key__']})"
                break
        return UserError(f"DALI could not decode {where}: {reason[:160]}; run `droppos shard --verify "
                         f"{self.data_dir}` to check the shards (or use the pil backend, which skips bad samples)")

    def close(self) -> None:
        """Nothing is kept across epochs."""


@contextmanager
def _quiet_dali_deprecations() -> Iterator[None]:
    """Drop the deprecation warnings DALI's own auto_aug causes (its aliases `fn.experimental.filter`
    and `equalize`); DALI shows them through `simplefilter("default")` inside its own block, so no
    warning filter can hide them: they are dropped where they are shown, and every other warning passes."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message, category, *args, **kwargs):
            if not (issubclass(category, DeprecationWarning) and "nvidia.dali" in str(message)):
                show(message, category, *args, **kwargs)

        warnings.showwarning = showwarning
        yield


def _readable(sample: dict) -> bool:
    """Whether Pillow decodes the sample's JPEG and its label is there."""
    from PIL import Image

    try:
        Image.open(io.BytesIO(sample["jpg"])).load()
        int.from_bytes(sample["lbl"], "little")
    except Exception:
        return False
    return True
