"""Input pipeline: a `droppos shard` dataset directory -> normalised image batches on the device.

Read top to bottom, one seam per module:
- `plan`: manifest shards -> this rank's samples, each epoch's order, the pil workers' roles and the
  resume position. Its docstring holds every guarantee (rank split, eval padding, determinism).
- `transforms`: what each mode (pretrain, finetune, probe, eval) does to a sample; normalisation;
  fine-tuning's batch-level augmentation.
- `pil`: the webdataset + DataLoader workers + Pillow(-SIMD) backend, with timm's transforms.
- `dali`: the NVIDIA DALI backend (GPU decoding with 'mixed'); where its RandAugment differs.
- `loader`: `build_loader`, `Loader` and `resolve_backend` (what `--loader auto` becomes).
The private APIs the package uses (the pil backend's fast paths, webdataset's tar reader) live in
`droppos.fastpaths`.
"""

from droppos.data.loader import BACKENDS, Loader, build_loader, dali_available, dataset_seg_spec, resolve_backend
from droppos.data.plan import PAD_LABEL, rank_range
from droppos.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, MODES, batch_augment, normalize

__all__ = [
    "MODES", "BACKENDS", "PAD_LABEL", "IMAGENET_MEAN", "IMAGENET_STD", "EVAL_CROP_PCT",
    "Loader", "build_loader", "resolve_backend", "dataset_seg_spec", "batch_augment", "normalize", "dali_available", "rank_range",
]
