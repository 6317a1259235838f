"""droppos.data on the CPU: both backends, every mode, rank splitting, determinism, corrupt data.

Sample identity in training modes is recovered from `flat_shards`: every image is one flat colour
that encodes its id, which survives any crop, resize and flip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from droppos import UserError
from droppos.data import IMAGENET_MEAN, IMAGENET_STD, PAD_LABEL, batch_augment, build_loader, normalize
from droppos.manifest import load_manifest, split_shards

BACKENDS = ["dali", "pil"]
SIZE = 32
# Eval images of the two backends differ by interpolation details (DALI rounds the resized longer
# side, torchvision truncates it; different cubic kernels and JPEG IDCT): measured mean |diff|
# ~0.10 in normalised units (about 6 grey levels), so 0.2 is the documented tolerance.
EVAL_MEAN_ABS_TOL = 0.2
# Random-crop batches of the two backends: per-channel means over an epoch within 0.15.
TRAIN_CHANNEL_MEAN_TOL = 0.15


def _denormalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images * std + mean


def _epoch(loader, epoch: int = 0, start_step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch, start_step))


@pytest.fixture(scope="module")
def flat_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """61 train / 21 val flat-colour images (odd counts: uneven rank ranges), sharded by `droppos shard`."""
    from tools import shard_imagenet

    root = tmp_path_factory.mktemp("flat-source")
    for split, count, base in (("train", 61, 0), ("val", 21, 100)):
        for sample_id in range(base, base + count):
            folder = root / split / f"c{sample_id % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            size = (40 + sample_id % 17, 36 + sample_id % 11)
            Image.new("RGB", size, _id_colour(sample_id)).save(folder / f"{sample_id:04d}.jpg", quality=95)
    out = tmp_path_factory.mktemp("flat-shards")
    shard_imagenet.run(root, out, seed=0, workers=1, shard_size=9)
    return out


def _id_colour(sample_id: int) -> tuple[int, int, int]:
    return (32 * (sample_id % 8) + 16, 32 * (sample_id // 8 % 8) + 16, 32 * (sample_id // 64) + 16)


def _ids(images: torch.Tensor) -> list[int]:
    """Sample ids back from flat-colour images (mean colour, rounded to the 32-level grid)."""
    rgb = _denormalise(images).mean(dim=(2, 3))
    levels = ((rgb - 16) / 32).round().long().clamp(0, 7)
    return (levels[:, 0] + 8 * levels[:, 1] + 64 * levels[:, 2]).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["pretrain", "finetune", "eval"])
def test_batches_have_contract_shapes_and_normalisation(sample_shards: Path, backend: str, mode: str) -> None:
    split = "val" if mode == "eval" else "train"
    loader = build_loader(sample_shards, split, mode, batch_size=8, img_size=SIZE, backend=backend, workers=1)
    batches = _epoch(loader)
    assert len(batches) == loader.steps_per_epoch == len(loader)
    for images, labels in batches:
        assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels.shape == (8,) and labels.dtype == torch.int64
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    pixels = _denormalise(images)
    assert pixels.min() >= -0.51 and pixels.max() <= 255.51  # normalised uint8, nothing else
    assert 0.4 < images.std() < 2.0 and images.mean().abs() < 1.0  # ImageNet-normalised natural-ish images
    assert labels.min() >= 0 and labels.max() < 10
    if mode == "eval":
        assert loader.rank_samples == loader.num_samples == 40 == len(labels)
    else:
        assert len(labels) == loader.steps_per_epoch * 8 == 120


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_labels_match_the_manifest_in_order(sample_shards: Path, backend: str) -> None:
    manifest = load_manifest(sample_shards)
    expected = []
    for shard in split_shards(sample_shards, "val", manifest):
        for sample in wds.WebDataset(str(shard.tar), shardshuffle=False):
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == manifest["classes"].index(meta["class"])
            expected.append(int(sample["cls"]))
    loader = build_loader(sample_shards, "val", "eval", batch_size=16, img_size=SIZE, backend=backend, workers=2)
    labels = torch.cat([b[1] for b in _epoch(loader)])
    real = labels[labels != PAD_LABEL]
    assert real.tolist() == expected
    assert (labels[len(expected):] == PAD_LABEL).all() and len(labels) == 48  # 3 static batches of 16


def test_backends_agree(sample_shards: Path) -> None:
    def run(backend: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        split = "val" if mode == "eval" else "train"
        loader = build_loader(sample_shards, split, mode, batch_size=8, img_size=SIZE, backend=backend, workers=1)
        batches = _epoch(loader)
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    (dali_x, dali_y), (pil_x, pil_y) = run("dali", "eval"), run("pil", "eval")
    assert torch.equal(dali_y, pil_y)
    assert (dali_x - pil_x).abs().mean() < EVAL_MEAN_ABS_TOL
    (dali_x, dali_y), (pil_x, pil_y) = run("dali", "pretrain"), run("pil", "pretrain")
    assert sorted(dali_y.tolist()) == sorted(pil_y.tolist())  # same samples on the rank (one epoch)
    assert (dali_x.mean(dim=(0, 2, 3)) - pil_x.mean(dim=(0, 2, 3))).abs().max() < TRAIN_CHANNEL_MEAN_TOL
    assert abs(dali_x.std() - pil_x.std()) < TRAIN_CHANNEL_MEAN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_are_disjoint_equal_and_eval_covers_everything_once(flat_shards: Path, backend: str) -> None:
    per_rank, steps = [], []
    for rank in range(2):
        loader = build_loader(flat_shards, "train", "pretrain", batch_size=4, img_size=SIZE, backend=backend,
                              rank=rank, world_size=2, seed=3, workers=2)
        batches = _epoch(loader, epoch=1)
        steps.append(len(batches))
        ids = [i for images, _ in batches for i in _ids(images)]
        assert len(ids) == len(set(ids)), "a sample twice within one epoch on one rank"
        per_rank.append(set(ids))
    assert steps == [7, 7]  # (61 // 2) // 4 full batches on both ranks
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] <= set(range(61))

    seen: list[int] = []
    for rank in range(2):
        loader = build_loader(flat_shards, "val", "eval", batch_size=4, img_size=SIZE, backend=backend,
                              rank=rank, world_size=2, workers=2)
        batches = _epoch(loader)
        assert len(batches) == loader.steps_per_epoch == 3  # ceil(ceil(21 / 2) / 4), same on both ranks
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        real = labels != PAD_LABEL
        assert int(real.sum()) == loader.rank_samples
        ids = _ids(images[real])
        assert [i % 3 for i in ids] == labels[real].tolist()  # labels belong to their images
        seen += ids
    assert sorted(seen) == list(range(100, 121))


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_is_deterministic_new_each_epoch_and_resumable(flat_shards: Path, backend: str) -> None:
    def loader():
        return build_loader(flat_shards, "train", "pretrain", batch_size=4, img_size=SIZE, backend=backend,
                            seed=7, workers=2)

    first = _epoch(loader(), epoch=0)
    again = _epoch(loader(), epoch=0)
    for (a, la), (b, lb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    ids = lambda batches: [i for images, _ in batches for i in _ids(images)]  # noqa: E731
    assert ids(_epoch(loader(), epoch=1)) != ids(first)
    resumed = _epoch(loader(), epoch=0, start_step=5)
    assert len(resumed) == len(first) - 5
    for (a, la), (b, lb) in zip(first[5:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_pil_batches_survive_ring_reuse_and_an_epoch_left_open(flat_shards: Path) -> None:
    """Workers write into shared slots reused across batches and epochs; kept batches never change."""
    def loader():
        return build_loader(flat_shards, "train", "pretrain", batch_size=4, img_size=SIZE, backend="pil",
                            seed=3, workers=2)

    expected = [_epoch(loader(), epoch=e) for e in (0, 1)]
    same = loader()
    open_epoch = same.epoch(0)
    first = next(open_epoch)  # epoch 0 left open: its workers still hold slots
    for e in (1, 0):  # the next epochs of the same loader, one of them beside the open one
        for (a, la), (b, lb) in zip(_epoch(same, epoch=e), expected[e], strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    rest = [first, *open_epoch]
    for (a, la), (b, lb) in zip(rest, expected[0], strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_partial_jpeg_decode_is_exact_and_falls_back(sample_shards: Path) -> None:
    """Decoding only a crop's top rows gives the full decode's rows; an unusable stream says so."""
    import io

    from droppos.fastpaths import decode_rows as _decode_rows

    shard = split_shards(sample_shards, "train")[0]
    sample = next(s for s in wds.WebDataset(str(shard.tar), shardshuffle=False) if "jpg" in s)
    full = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    rows = full.height // 2 + 1
    top = _decode_rows(Image.open(io.BytesIO(sample["jpg"])), rows)
    assert top is not None and top.size == (full.width, rows)
    assert top.tobytes() == full.crop((0, 0, full.width, rows)).tobytes()
    cut = sample["jpg"][: len(sample["jpg"]) // 4]  # the stream ends before the rows asked for
    assert _decode_rows(Image.open(io.BytesIO(cut)), rows) is None


def _corrupt_one_jpeg(data_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of `data_dir` whose train shard 1 has one JPEG overwritten with garbage (sizes kept)."""
    copy = tmp_path / "corrupt"
    shutil.copytree(data_dir, copy)
    shard = split_shards(copy, "train")[1]
    fields = shard.index.read_text().splitlines()[2].split()
    at = fields.index("jpg")
    offset, size = int(fields[at + 1]), int(fields[at + 2])
    with open(shard.tar, "r+b") as f:
        f.seek(offset + 16)
        f.write(b"\x00\xffgarbage" * ((size - 32) // 9))
    return copy, shard.tar.name


def test_corrupt_sample_pil_skips_and_counts_dali_names_the_shard(sample_shards: Path, tmp_path: Path) -> None:
    data_dir, tar_name = _corrupt_one_jpeg(sample_shards, tmp_path)
    loader = build_loader(data_dir, "train", "pretrain", batch_size=8, img_size=SIZE, backend="pil", workers=1)
    batches = _epoch(loader)
    assert len(batches) == loader.steps_per_epoch and loader.skipped == 1 and len(loader.skipped_keys) == 1
    assert all(images.shape[0] == 8 for images, _ in batches)

    loader = build_loader(data_dir, "train", "pretrain", batch_size=8, img_size=SIZE, backend="dali", workers=1)
    with pytest.raises(UserError, match=rf"{tar_name}.*droppos shard --verify"):
        _epoch(loader)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 'mixed' (GPU decoding) path needs CUDA")
def test_mixed_decoding_on_cuda(sample_shards: Path) -> None:
    loader = build_loader(sample_shards, "train", "finetune", batch_size=8, img_size=SIZE, backend="dali",
                          device="cuda", workers=2)
    images, labels = next(iter(loader.epoch(0)))
    assert images.is_cuda and labels.is_cuda and images.shape == (8, 3, SIZE, SIZE)


def test_user_mistakes_are_user_errors(sample_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="mode"):
        build_loader(sample_shards, "train", "train", batch_size=8)
    with pytest.raises(UserError, match="backend"):
        build_loader(sample_shards, "train", "pretrain", batch_size=8, backend="opencv")
    with pytest.raises(UserError, match="too few"):
        build_loader(sample_shards, "train", "pretrain", batch_size=64, world_size=2, rank=1)
    with pytest.raises(UserError, match="split"):
        build_loader(sample_shards, "test", "eval", batch_size=8)
    with pytest.raises(UserError):
        build_loader(tmp_path / "nowhere", "train", "pretrain", batch_size=8)
    loader = build_loader(sample_shards, "train", "pretrain", batch_size=8, backend="pil", workers=0)
    with pytest.raises(UserError, match="start_step"):
        next(loader.epoch(0, start_step=99))


def test_batch_augment_gives_soft_targets() -> None:
    images = torch.randn(8, 3, SIZE, SIZE)
    labels = torch.arange(8) % 5
    mixed, targets = batch_augment(5, device="cpu")(images.clone(), labels)
    assert mixed.shape == images.shape and targets.shape == (8, 5)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    _, smooth = batch_augment(5, mixup=0, cutmix=0, reprob=0, label_smoothing=0.1)(images, labels)
    assert torch.allclose(smooth.max(1).values, torch.full((8,), 0.9 + 0.1 / 5))


def test_normalize_matches_the_reference_formula() -> None:
    """The fast path (reorder-copy, in-place scale and shift) is torchvision's ToTensor + Normalize."""
    pixels = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    reference = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = normalize(pixels, "cpu")
    assert out.shape == (3, 3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
