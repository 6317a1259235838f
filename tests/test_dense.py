"""Dense transfer: label maps in shards (sample data, ADE20K's layout, the generic one, every skip reason),
the mask component and paired augmentation of the loader, the segmentation head and its exact scores, and
`droppos probe --task segmentation` with the shared loop's guarantees (kill -9 + resume, SIGTERM,
divergence), one-line user errors, and the demo encoder against its random-init twin (slow)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from droppos import UserError, checkpoint, dense, labelmaps, sample_data, shard
from droppos.data import IMAGENET_MEAN, IMAGENET_STD, build_loader, resolve_backend
from droppos.labelmaps import ADE20K_CLASSES, IGNORE, MASK_COMPONENT
from droppos.manifest import load_manifest, split_shards
from inprocess import droppos, process
from test_loop import metrics, wait_for_step

CPU = ["--device", "cpu", "--no-compile", "--loader", "pil", "--workers", "0"]
TINY_TIMM = ["--timm-model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "2"]
SEG = ["--task", "segmentation", "--optimizer", "adamw", "--blr", "0.01"]
SEG_TRAIN, SEG_VAL = 12, 4  # sample images per class in the fixture (4 classes: 48 train, 16 val)


def _png(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", **options)
    return buffer.getvalue()


def _jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def _samples(data_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {component: bytes} over every shard of the dataset."""
    out: dict[str, dict[str, bytes]] = {}
    manifest = load_manifest(data_dir)
    for split in manifest["splits"]:
        for entry in split_shards(data_dir, split, manifest):
            with tarfile.open(entry.tar) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def _skipped(data_dir: Path) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in map(json.loads, (data_dir / "skipped.jsonl").read_text().splitlines())}


# --------------------------------------------------------------------------------------------
# The sample data's label maps


@pytest.fixture(scope="module")
def seg_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample_data.generate(tmp_path_factory.mktemp("seg-source"), num_classes=4, train_per_class=SEG_TRAIN,
                                val_per_class=SEG_VAL, seed=0, masks=True)


@pytest.fixture(scope="module")
def seg_shards(seg_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg-shards")
    shard.run(seg_source, out, seed=0, workers=1, shard_size=16)
    return out


def test_sample_masks_leave_the_images_byte_identical(seg_source: Path, tmp_path: Path) -> None:
    plain = sample_data.generate(tmp_path / "plain", num_classes=4, train_per_class=SEG_TRAIN, val_per_class=SEG_VAL,
                                 seed=0)
    images = sorted(p.relative_to(plain) for p in plain.rglob("*.jpg"))
    assert images == sorted(p.relative_to(seg_source) for p in seg_source.rglob("*.jpg"))
    assert all((plain / p).read_bytes() == (seg_source / p).read_bytes() for p in images)
    assert not (plain / sample_data.MASKS_DIR).exists()
    names = (seg_source / sample_data.CLASSES_FILE).read_text().splitlines()
    assert names == sample_data.seg_class_names(4) and names[:2] == ["sky", "ground"]
    for rel in images[:: max(1, len(images) // 12)]:
        image = np.asarray(Image.open(seg_source / rel), np.float32)
        split, folder, name = rel.parts
        mask = np.asarray(Image.open(seg_source / "masks" / split / folder / Path(name).with_suffix(".png")))
        class_index = sample_data.class_names(4).index(folder)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {sample_data.SKY, sample_data.GROUND, sample_data.FIRST_OBJECT + class_index}
        assert (mask[0] == sample_data.SKY).all() and (mask[-1] == sample_data.GROUND).all()
        # The labels follow the picture: the object's pixels have the class's flat object colour.
        colour = 255 * sample_data._class_rgb(class_index, lightness=0.55, saturation=0.9)
        on_object = image[mask == sample_data.FIRST_OBJECT + class_index]
        assert np.abs(np.median(on_object, axis=0) - colour).max() < 20


def test_sample_shards_serve_classification_and_segmentation(seg_source: Path, seg_shards: Path, tmp_path: Path) -> None:
    manifest = load_manifest(seg_shards)
    assert manifest["task"] == "segmentation" and manifest["classes"] == sample_data.class_names(4)
    assert manifest["segmentation"] == {"classes": sample_data.seg_class_names(4), "ignore_index": 255,
                                        "reduce_zero_label": False, "image_classes": True}
    assert manifest["found"] == manifest["written"] == 4 * (SEG_TRAIN + SEG_VAL)
    assert manifest["kept_original_label_maps"] == manifest["written"]
    # The same folder sharded as classification data: the same samples, JPEGs, labels and keys.
    plain = tmp_path / "plain"
    shard.run(seg_source, plain, seed=0, workers=1, shard_size=16, layout="imagenet")
    assert "task" not in load_manifest(plain)
    with_masks, without = _samples(seg_shards), _samples(plain)
    assert with_masks.keys() == without.keys()
    for key, parts in with_masks.items():
        assert {k: parts[k] for k in ("jpg", "cls", "lbl")} == {k: without[key][k] for k in ("jpg", "cls", "lbl")}
        meta = json.loads(parts["json"])
        assert (seg_source / meta["mask"]).read_bytes() == parts[MASK_COMPONENT]  # the source PNG, byte for byte
    counts = shard.verify(seg_shards, decode=True)
    assert counts == {"train": 4 * SEG_TRAIN, "val": 4 * SEG_VAL}


# --------------------------------------------------------------------------------------------
# ADE20K's layout, and every reason a label map is skipped


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _blocks(height: int, width: int, values: list[int]) -> np.ndarray:
    """A label map of vertical bands, one per value."""
    band = np.repeat(np.arange(len(values)), -(-width // len(values)))[:width]
    return np.asarray(values, np.uint8)[np.broadcast_to(band, (height, width))]


@pytest.fixture(scope="module")
def ade_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ADEChallengeData2016/{images,annotations}/{training,validation}: good pairs and one of every fault."""
    root = tmp_path_factory.mktemp("ade-source")
    ade = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for split, count in (("training", 5), ("validation", 3)):
        for i in range(count):
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            files[f"images/{split}/{name}.jpg"] = _jpeg(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8))
            files[f"annotations/{split}/{name}.png"] = _png(_blocks(30 + i, 40, [0, 1, 150, 255][: 2 + i % 3]))
    image = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    good = _blocks(24, 36, [0, 7])
    faults = {
        "missing": None,
        "text": b"not a picture",
        "size": _png(_blocks(20, 36, [3])),
        "range": _png(_blocks(24, 36, [151, 3, 200])),
        "rgb": _png(np.stack([good] * 3, -1)),
        "jpegmask": _jpeg(np.stack([good] * 3, -1)[..., 0]),
        "exif_image_only": _png(good),
    }
    for fault, mask in faults.items():
        exif = {"exif": _exif(6)} if fault.startswith("exif") else {}
        files[f"images/training/ADE_train_{fault}.jpg"] = _jpeg(image, **exif)
        if mask is not None:
            files[f"annotations/training/ADE_train_{fault}.png"] = mask
    files["images/training/ADE_train_exif_both.jpg"] = _jpeg(image, exif=_exif(6))
    files["annotations/training/ADE_train_exif_both.png"] = _png(_blocks(24, 36, [0, 5, 9]), exif=_exif(6))
    files["annotations/training/ADE_train_orphan.png"] = _png(good)
    files["annotations/training/.DS_Store"] = b"hidden"
    for rel, data in files.items():
        (ade / rel).parent.mkdir(parents=True, exist_ok=True)
        (ade / rel).write_bytes(data)
    return root


ADE_SKIPPED = {
    "images/training/ADE_train_missing.jpg": "label map ADEChallengeData2016/annotations/training/ADE_train_missing.png: file not found",
    "images/training/ADE_train_text.jpg": "not an image",
    "images/training/ADE_train_size.jpg": "size 36x20 differs from its image's 36x24",
    "images/training/ADE_train_range.jpg": "labels out of range: 151, 200",
    "images/training/ADE_train_rgb.jpg": "a RGB image, not a label map",
    "images/training/ADE_train_jpegmask.jpg": "a JPEG file: label maps must be PNGs",
    "images/training/ADE_train_exif_image_only.jpg": "EXIF orientation 1 differs from its image's 6",
    "annotations/training/ADE_train_orphan.png": "a label map without an image",
    "annotations/training/.DS_Store": "hidden file",
}


@pytest.fixture(scope="module")
def ade_shards(ade_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ade-shards")
    shard.run(ade_source, out, seed=0, workers=1, shard_size=4)
    return out


def test_ade20k_layout_is_recognised_and_recorded(ade_shards: Path) -> None:
    manifest = load_manifest(ade_shards)
    assert manifest["task"] == "segmentation" and manifest["options"]["mode"] == "ade20k"
    assert manifest["segmentation"] == {"classes": list(ADE20K_CLASSES), "ignore_index": 255,
                                        "reduce_zero_label": True, "image_classes": False}
    assert len(ADE20K_CLASSES) == 150 and manifest["classes"] == [labelmaps.NO_IMAGE_CLASS]
    assert (manifest["splits"]["train"]["num_samples"], manifest["splits"]["val"]["num_samples"]) == (6, 3)
    assert manifest["written"] + manifest["skipped"] == manifest["found"] == 9 + len(ADE_SKIPPED)


def test_label_maps_get_their_own_skip_reasons(ade_shards: Path) -> None:
    skipped = _skipped(ade_shards)
    prefix = "ADEChallengeData2016/"
    assert skipped.keys() == {prefix + path for path in ADE_SKIPPED}
    for path, reason in ADE_SKIPPED.items():
        assert reason in skipped[prefix + path], (path, skipped[prefix + path])


def test_label_maps_are_kept_byte_for_byte_or_turned_with_their_image(ade_source: Path, ade_shards: Path) -> None:
    by_path = {json.loads(parts["json"])["path"]: parts for parts in _samples(ade_shards).values()}
    root = ade_source / "ADEChallengeData2016"
    kept = by_path["ADEChallengeData2016/images/validation/ADE_val_00000002.jpg"]
    assert kept[MASK_COMPONENT] == (root / "annotations/validation/ADE_val_00000002.png").read_bytes()
    turned = by_path["ADEChallengeData2016/images/training/ADE_train_exif_both.jpg"]
    expected = np.asarray(ImageOps.exif_transpose(Image.open(root / "annotations/training/ADE_train_exif_both.png")))
    stored = labelmaps.decode_label_map(turned[MASK_COMPONENT])
    assert stored.shape == (36, 24) == Image.open(io.BytesIO(turned["jpg"])).size[::-1]
    np.testing.assert_array_equal(stored, expected)
    assert load_manifest(ade_shards)["conversions"]["mask-exif-rotated"] == 1


def test_the_loader_reads_stored_values_with_the_datasets_convention(ade_shards: Path) -> None:
    """ADE20K: stored 0 and 255 are unlabelled, stored v is class v-1 (reduce_zero_label)."""
    loader = build_loader(ade_shards, "val", "eval", 3, img_size=16, workers=0, masks=True)
    (images, labels, masks), = loader.epoch(0)
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 16, 16) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) == {IGNORE, 0, 149}
    stored = labelmaps.SegSpec(ADE20K_CLASSES, 255, True)
    assert stored.train_lut(8)[[0, 1, 150, 151, 255]].tolist() == [IGNORE, 0, 149, IGNORE, IGNORE]


def test_generic_layout_with_16_bit_labels_a_palette_and_an_ignore_index(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "images" / "train").mkdir(parents=True)
    (src / "masks" / "train").mkdir(parents=True)
    (src / "classes.txt").write_text("".join(f"c{i}\n" for i in range(301)) + "\n")
    rng = np.random.default_rng(1)
    wide = np.tile(np.array([0, 1, 300], np.uint16), (20, 10))  # 16-bit labels, 0 = unlabelled (--ignore-index 0)
    masks = {"wide": _png(wide), "palette": None, "over": _png(wide + 1)}
    palette = Image.fromarray(_blocks(20, 30, [0, 2, 4])).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    masks["palette"] = buffer.getvalue()
    for name, mask in masks.items():
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(src / "images" / "train" / f"{name}.png")
        (src / "masks" / "train" / f"{name}.png").write_bytes(mask)
    out = tmp_path / "out"
    manifest = shard.run(src, out, workers=1, ignore_index=0)
    assert manifest["segmentation"]["ignore_index"] == 0 and not manifest["segmentation"]["reduce_zero_label"]
    assert len(manifest["segmentation"]["classes"]) == 301 and manifest["options"]["mode"] == "masks"
    assert _skipped(out) == {"images/train/over.png": "label map masks/train/over.png: labels out of range: 301 "
                                                      "(the dataset has 301 classes, stored 0 = unlabelled)"}
    by_name = {Path(json.loads(p["json"])["path"]).stem: p for p in _samples(out).values()}
    np.testing.assert_array_equal(labelmaps.decode_label_map(by_name["wide"][MASK_COMPONENT]), wide)
    assert by_name["palette"][MASK_COMPONENT] == masks["palette"]  # palette indices are the labels: kept
    loader = build_loader(out, "train", "eval", 2, img_size=16, workers=0, masks=True)
    (_, _, masks_out), = loader.epoch(0)
    assert set(masks_out.unique().tolist()) <= {IGNORE, 1, 2, 4, 300} and 300 in masks_out


def test_segmentation_layout_mistakes_are_one_line(tmp_path: Path, seg_source: Path) -> None:
    no_list = tmp_path / "no-list"
    for rel in ("images/train", "masks/train"):
        (no_list / rel).mkdir(parents=True)
    (no_list / "images" / "train" / "a.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(UserError, match="no classes.txt"):
        shard.run(no_list, tmp_path / "o1", workers=1)
    with pytest.raises(UserError, match="not ADE20K's layout"):
        shard.run(no_list, tmp_path / "o2", workers=1, layout="ade20k")
    (no_list / "classes.txt").write_text("a\n\nb\n")
    with pytest.raises(UserError, match=r"classes.txt:2: a blank class name"):
        shard.run(no_list, tmp_path / "o3", workers=1)
    with pytest.raises(UserError, match="must not lie inside"):
        shard.run(seg_source, seg_source / "masks" / "train" / "out", workers=1)


# --------------------------------------------------------------------------------------------
# The loader: the mask takes the image's crop, flip and resize


GRID = 4  # blocks per side; block (row, col) has label row * GRID + col and its own colour
COLOURS = np.array([[40 + 60 * (k % 4), 40 + 60 * (k // 4), 220 - 60 * (k % 4)] for k in range(GRID * GRID)], np.uint8)


@pytest.fixture(scope="module")
def block_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of 4x4 coloured blocks (sizes vary) whose label maps name each block: colour tells label."""
    src = tmp_path_factory.mktemp("block-source")
    (src / "classes.txt").write_text("".join(f"block{k}\n" for k in range(GRID * GRID)))
    for split, count in (("train", 24), ("val", 7)):
        for i in range(count):
            height, width = 48 + 8 * (i % 3), 64 + 8 * (i % 4)
            rows = np.minimum(np.arange(height) * GRID // height, GRID - 1)
            cols = np.minimum(np.arange(width) * GRID // width, GRID - 1)
            labels = (rows[:, None] * GRID + cols[None, :]).astype(np.uint8)
            for kind, data in (("images", _jpeg(COLOURS[labels])), ("masks", _png(labels))):
                path = src / kind / split / f"{i:03d}.{'jpg' if kind == 'images' else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    out = tmp_path_factory.mktemp("block-shards")
    shard.run(src, out, workers=1, shard_size=5)
    return out


def _colour_agrees(images: torch.Tensor, masks: torch.Tensor) -> tuple[float, int]:
    """Share of block-interior pixels whose colour is their label's; and how many batch samples run right to left."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    rgb = (images * std + mean).permute(0, 2, 3, 1)
    nearest = torch.cdist(rgb.reshape(-1, 3), torch.tensor(COLOURS, dtype=torch.float32)).argmin(-1)
    nearest = nearest.view(masks.shape)
    padded = torch.nn.functional.pad(masks[:, None].float(), (1, 1, 1, 1), mode="replicate")
    interior = (torch.nn.functional.max_pool2d(padded, 3, 1) == -torch.nn.functional.max_pool2d(-padded, 3, 1))[:, 0]
    interior &= masks >= 0
    agree = float((nearest == masks)[interior].float().mean())
    columns = (masks % GRID).float()
    leftwards = int(sum(1 for c in columns if c[:, -1].mean() < c[:, 0].mean()))
    return agree, leftwards


@pytest.mark.parametrize("workers", [0, 2])
def test_training_crops_and_flips_the_mask_with_its_image(block_shards: Path, workers: int) -> None:
    loader = build_loader(block_shards, "train", "segment", 8, img_size=24, workers=workers, masks=True, seed=3)
    leftwards = 0
    for epoch in range(2):
        for images, labels, masks in loader.epoch(epoch):
            agree, flipped = _colour_agrees(images, masks)
            assert agree > 0.99, agree
            leftwards += flipped
            assert masks.shape == (8, 24, 24) and masks.dtype == torch.int64 and (masks >= 0).all()
    assert 0 < leftwards < 2 * 24  # some crops were flipped, not all


def test_eval_resizes_the_mask_alike_and_pads_with_ignore(block_shards: Path) -> None:
    whole = [b for b in build_loader(block_shards, "val", "eval", 4, img_size=24, workers=0, masks=True).epoch(0)]
    images, labels, masks = (torch.cat(parts) for parts in zip(*whole))
    assert _colour_agrees(images[labels >= 0], masks[labels >= 0])[0] > 0.99
    assert (masks[labels < 0] == IGNORE).all() and int((labels >= 0).sum()) == 7
    # Two ranks: every val sample once, in the same order, with the same mask.
    ranks = [torch.cat([m[y >= 0] for _, y, m in build_loader(block_shards, "val", "eval", 4, img_size=24, rank=r,
                                                                world_size=2, workers=0, masks=True).epoch(0)])
             for r in range(2)]
    torch.testing.assert_close(torch.cat(ranks), masks[labels >= 0])


def test_mask_batches_resume_exactly(block_shards: Path) -> None:
    loader = build_loader(block_shards, "train", "segment", 4, img_size=16, workers=2, masks=True, seed=1)
    full = list(loader.epoch(1))
    resumed = list(loader.epoch(1, start_batch=2))
    assert len(resumed) == len(full) - 2
    for got, want in zip(resumed, full[2:]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_dali_does_not_read_label_maps_and_auto_picks_pil(monkeypatch: pytest.MonkeyPatch, sample_shards: Path) -> None:
    from droppos.data import dali

    with pytest.raises(UserError, match="dali backend does not read label maps"):
        resolve_backend("dali", "cpu", "eval", masks=True)
    with pytest.raises(UserError, match="RandAugment"):
        resolve_backend("pil", "cpu", "finetune", masks=True)
    with pytest.raises(UserError, match="holds no label maps"):
        build_loader(sample_shards, "val", "eval", 2, masks=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dali, "available", lambda: True)
    assert resolve_backend("auto", "cuda", "eval") == "dali"
    assert resolve_backend("auto", "cuda", "segment", masks=True) == "pil"


# --------------------------------------------------------------------------------------------
# The head, the features and the scores


def test_patch_features_are_the_final_normed_patch_tokens_of_the_last_blocks() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=0, global_pool="token").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = dense.PatchFeatures(vit, 1)(x)
        tokens = vit.forward_features(x)[:, 1:]  # after the final norm
        torch.testing.assert_close(last, tokens.reshape(2, 2, 2, -1).permute(0, 3, 1, 2))
        both = dense.PatchFeatures(vit, 2)(x)
    assert both.shape == (2, 2 * 192, 2, 2) and dense.PatchFeatures(vit, 2).num_features == 384
    torch.testing.assert_close(both[:, 192:], last)
    with pytest.raises(ValueError):
        dense.PatchFeatures(vit, 4)


def test_head_is_batchnorm_then_1x1_conv_upsampled_bilinearly() -> None:
    head = dense.SegHead(8, 5).eval()
    assert isinstance(head.bn, torch.nn.BatchNorm2d) and head.conv.kernel_size == (1, 1)
    feats = torch.randn(2, 8, 3, 3)
    logits = head(feats, (12, 12))
    direct = torch.nn.functional.interpolate(head.conv(head.bn(feats)), (12, 12), mode="bilinear", align_corners=False)
    assert logits.shape == (2, 5, 12, 12)
    torch.testing.assert_close(logits, direct)
    masks = torch.full((2, 12, 12), IGNORE)
    assert float(dense.pixel_loss(logits, masks).detach()) == 0.0  # nothing labelled: 0, never NaN


def test_confusion_matrix_scores_match_a_reference() -> None:
    rng = np.random.default_rng(0)
    k = 5
    truth = rng.integers(-1, k - 1, (6, 10, 10))  # class 4 never labelled, -1 unlabelled
    predicted = rng.integers(0, k - 1, (6, 10, 10))  # class 4 never predicted either
    matrix = dense.ConfusionMatrix(k, "cpu")
    for b in range(0, 6, 4):  # two batches, the last one short
        matrix.update(torch.tensor(predicted[b:b + 4]), torch.tensor(truth[b:b + 4]))
    scores = matrix.scores([f"c{i}" for i in range(k)])
    labelled = truth >= 0
    ious = []
    for c in range(k - 1):
        tp = np.sum((truth == c) & (predicted == c) & labelled)
        union = np.sum(((truth == c) | (predicted == c)) & labelled)
        ious.append(tp / union)
        assert scores["per_class_iou"][f"c{c}"] == pytest.approx(100 * tp / union)
    assert scores["per_class_iou"]["c4"] is None  # in neither labels nor predictions: not averaged
    assert scores["miou"] == pytest.approx(100 * np.mean(ious))
    assert scores["pixel_acc"] == pytest.approx(100 * np.sum((truth == predicted) & labelled) / labelled.sum())
    assert scores["num_eval_pixels"] == labelled.sum() and scores["num_eval_images"] == 6


def test_prediction_grid_is_a_png_with_a_row_per_image() -> None:
    images = np.zeros((3, 8, 8, 3), np.uint8)
    masks = np.full((3, 8, 8), IGNORE)
    picture = Image.open(io.BytesIO(dense.prediction_grid(images, masks, np.zeros((3, 8, 8), int), 4, tile=32)))
    assert picture.format == "PNG" and picture.size == (3 * 32 + 16, 16 + 3 * 36 + 4)


# --------------------------------------------------------------------------------------------
# `droppos probe --task segmentation`


def cli_run(capsys, *args: str) -> tuple[int, str]:
    import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def test_cached_segmentation_probe_scores_saves_and_resumes(seg_shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe"
    args = ["probe", "--data", str(seg_shards), "--out", str(out), *TINY_TIMM, *CPU, *SEG, "--cached",
            "--batch-size", "8", "--epochs", "3", "--warmup-epochs", "1", "--log-every", "2", "--seg-previews", "3"]
    code, err = cli_run(capsys, *args, "--max-steps", "7")
    assert code == 0, err
    assert "extracted 48 train and 16 val feature maps of (192, 2, 2) (label maps (32, 32))" in err
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "segmentation" and results["step"] == 7 and results["units"] == "percent"
    assert list(results["per_class_iou"]) == sample_data.seg_class_names(4)
    assert all(v is None or 0 <= v <= 100 for v in results["per_class_iou"].values())
    assert 0 <= results["miou"] <= 100 and 0 <= results["pixel_acc"] <= 100
    assert (results["num_eval_images"], results["num_eval_pixels"]) == (16, 16 * 32 * 32)  # every val pixel once
    picture = Image.open(out / "predictions.png")
    assert picture.size == (3 * 128 + 16, 16 + 3 * 132 + 4)
    code, err = cli_run(capsys, *args)
    assert code == 0, err
    assert "using the cached features" in err and "from step 7" in err
    assert json.loads((out / "results.json").read_text())["step"] == 3 * (48 // 8)


def test_streaming_segmentation_probe_keeps_the_encoder_frozen(seg_shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "stream"
    code, err = cli_run(capsys, "probe", "--data", str(seg_shards), "--out", str(out), *TINY_TIMM, *CPU, *SEG,
                        "--seg-layers", "2", "--batch-size", "8", "--epochs", "1", "--max-steps", "3")
    assert code == 0, err
    head = checkpoint.load(out / "checkpoints" / "last.pt")["head"]
    assert head["conv.weight"].shape == (6, 2 * 192, 1, 1)
    assert set(head) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
                         "conv.weight", "conv.bias"}
    config = json.loads((out / "config.json").read_text())
    assert config["environment"]["loader"] == "pil" and config["head"]["task"] == "segmentation"


def test_segmentation_probe_mistakes_are_one_line(seg_shards: Path, sample_shards: Path, ade_shards: Path,
                                                  tmp_path: Path, capsys) -> None:
    base = ["probe", "--out", str(tmp_path / "p"), "--device", "cpu", *TINY_TIMM]
    cases = [
        (["--data", str(sample_shards), "--task", "segmentation"], "holds no label maps"),
        (["--data", str(seg_shards), "--task", "segmentation", "--loader", "dali"], "does not read label maps"),
        (["--data", str(seg_shards), "--task", "segmentation", "--seg-layers", "3", "--batch-size", "8"],
         "--seg-layers 3: the encoder has 2 blocks"),
        (["--data", str(ade_shards)], "no image classes: probe it with --task segmentation"),
        (["--data", str(seg_shards), "--task", "segment"], "--task"),
        (["--data", str(seg_shards), "--optimizer", "sgd"], "--optimizer"),
    ]
    for args, message in cases:
        code, err = cli_run(capsys, *base, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)


# The shared loop's guarantees for the segmentation probe (as tests/test_loop.py checks them for the others).

STREAMING = ["--task", "segmentation", *TINY_TIMM[:4], "--depth", "1", "--batch-size", "8", "--epochs", "10",
             "--warmup-epochs", "1", "--optimizer", "adamw", "--blr", "0.01"]


@pytest.mark.parametrize("cached", [False, True])
def test_kill9_then_resume_matches_an_uninterrupted_segmentation_probe(seg_shards: Path, tmp_path: Path,
                                                                       cached: bool) -> None:
    steps = 60
    command = ["probe", "--data", str(seg_shards), *STREAMING, *CPU, "--max-steps", str(steps), "--log-every", "1",
               "--ckpt-every", "3", *(["--cached"] if cached else [])]
    straight = tmp_path / "straight"
    result = droppos(*command, "--out", str(straight))
    assert result.returncode == 0, result.stderr
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "droppos", *command, "--out", str(resumed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(resumed, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 3 <= killed_at < steps
    result = droppos(*command, "--out", str(resumed))
    assert result.returncode == 0, result.stderr
    assert f"resumed from step {killed_at}" in result.stderr
    want = {r["step"]: r for r in metrics(straight) if "loss" in r}
    records = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert record["lr"] == want[record["step"]]["lr"]
        assert record["loss"] == pytest.approx(want[record["step"]]["loss"], rel=1e-5, abs=1e-6), record["step"]
    final = [json.loads((run / "results.json").read_text()) for run in (straight, resumed)]
    assert final[0]["miou"] == pytest.approx(final[1]["miou"], abs=1e-9)


def test_sigterm_and_divergence_stop_the_segmentation_probe_cleanly(seg_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "droppos", "probe", "--data", str(seg_shards), "--out", str(run),
                             *STREAMING, *CPU, "--log-every", "1", "--ckpt-every", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["reason"] == "stopped by SIGTERM"
    diverged = tmp_path / "diverged"
    result = droppos("probe", "--data", str(seg_shards), "--out", str(diverged), *STREAMING, *CPU, "--lr", "1e30",
                     "--warmup-epochs", "0", "--log-every", "1", "--ckpt-every", "1", "--max-steps", "20")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and last.startswith("droppos: error:") and "Traceback" not in result.stderr
    if (diverged / "checkpoints" / "last.pt").exists():
        head = torch.load(diverged / "checkpoints" / "last.pt", weights_only=True)["head"]
        assert all(torch.isfinite(v).all() for v in head.values() if v.is_floating_point())


@pytest.mark.parametrize("cached", [False, True])
def test_two_ranks_score_every_val_pixel_exactly_once(seg_shards: Path, tmp_path: Path, cached: bool) -> None:
    """Streaming: the confusion matrix summed across ranks. Cached: feature and label maps gathered from
    both ranks (label maps are int16, which neither gloo nor NCCL gathers: sent as int32)."""
    out = tmp_path / "ddp"
    result = process("probe", "--data", str(seg_shards), "--out", str(out), *STREAMING, *CPU, "--nproc", "2",
                     "--epochs", "1", "--batch-size", "4", "--max-steps", "2", *(["--cached"] if cached else []))
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert (results["num_eval_images"], results["num_eval_pixels"]) == (16, 16 * 32 * 32)


# --------------------------------------------------------------------------------------------
# The demo encoder against its random-init twin (slow: the demo pre-training)


@pytest.mark.slow
def test_demo_encoder_beats_random_init_on_segmentation(demo_data: Path, demo_run: Path, tmp_path: Path, capsys) -> None:
    scores = {}
    for name, extra in (("pretrained", []), ("random", ["--random-init"])):
        out = tmp_path / name
        code, err = cli_run(capsys, "probe", "--preset", "cpu-demo-seg", "--data", str(demo_data), "--out", str(out),
                            "--run", str(demo_run), *extra)
        assert code == 0, err
        scores[name] = json.loads((out / "results.json").read_text())["miou"]
    assert scores["pretrained"] > scores["random"] + MIOU_MARGIN, scores


# mIoU points. Measured 2026-12-01 on this project's CPU machine with the cpu-demo pre-training (seeds 0, 1, 2, each
# probed with the same --seed) and the cpu-demo-seg probe: pre-trained 52.66 / 58.61 / 56.48 against random-init
# 47.22 / 46.58 / 48.01, differences +5.44 / +12.02 / +8.46 (mean 8.64, sd 3.30): the margin is mean - 2 sd.
MIOU_MARGIN = 2.0


def test_cli_recognises_ade20k_and_verifies_its_label_maps(ade_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = droppos("shard", str(ade_source), str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert ("label maps: 150 classes, stored 0 = unlabelled, stored v = class v-1 (reduce_zero_label), stored 255 = "
            "unlabelled; no image classes") in result.stdout
    assert f"total: found {9 + len(ADE_SKIPPED)}, written 9, skipped {len(ADE_SKIPPED)}" in result.stdout
    checked = droppos("shard", "--verify", "--decode", str(out))
    assert checked.returncode == 0 and "every image and label map decodes" in checked.stdout, checked.stderr


def test_cli_layout_options_reach_the_shard_stage(seg_source: Path, tmp_path: Path) -> None:
    """--layout imagenet shards the sample folder as classification data; --ignore-index is recorded."""
    plain = droppos("shard", str(seg_source), str(tmp_path / "plain"), "--workers", "1", "--layout", "imagenet")
    assert plain.returncode == 0, plain.stderr
    assert "task" not in load_manifest(tmp_path / "plain")
    marked = droppos("shard", str(seg_source), str(tmp_path / "marked"), "--workers", "1", "--ignore-index", "7")
    assert marked.returncode == 0, marked.stderr
    assert load_manifest(tmp_path / "marked")["segmentation"]["ignore_index"] == 7
