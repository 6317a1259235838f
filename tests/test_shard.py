"""`droppos shard`: conversion of every awkward input kind, determinism, resume, DALI/webdataset
readability of the shards, --verify, and one-line user errors from the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from droppos import UserError, shard, tarindex
from droppos.manifest import FORMAT, load_manifest, split_shards
from droppos.shard import convert, verifier, writer
from droppos.shard.convert import convert_image
from droppos.shard.inputs import SkipImage

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Test images, made with Pillow


def _gradient(width: int = 48, height: int = 32) -> Image.Image:
    """An RGB image whose pixels all differ, so orientation and scaling are observable."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _encode(im: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise_jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), quality=95)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return _encode(_gradient(48, 32), quality=95, exif=exif.tobytes())


INPUT_KINDS = {
    # name: (bytes factory, expected action or None for "kept byte for byte")
    "baseline_rgb": (lambda: _encode(_gradient(), quality=90), None),
    "cmyk": (lambda: _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0))), "cmyk"),
    "grayscale": (lambda: _encode(_gradient().convert("L")), "grayscale"),
    "gray16": (lambda: _encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"), "16-bit"),
    "palette": (lambda: _encode(_gradient().convert("P"), "PNG"), "palette"),
    "palette_transparent": (lambda: _encode(_gradient().convert("P"), "PNG", transparency=0), "alpha"),
    "rgba": (lambda: _encode(Image.new("RGBA", (30, 20), (10, 20, 30, 0)), "PNG"), "alpha"),
    "la": (lambda: _encode(Image.new("LA", (30, 20), (90, 0)), "PNG"), "alpha"),
    "png_named_jpeg": (lambda: _encode(_gradient(), "PNG"), "png"),
    "exif_rotated": (_exif_rotated_jpeg, "exif-rotated"),
    "progressive": (lambda: _encode(_gradient(), quality=90, progressive=True), "progressive"),
    "bytes_after_end": (lambda: _encode(_gradient(), quality=90) + b"junk after the end marker", "jpeg-structure"),
}

BAD_INPUTS = {
    "truncated": (lambda: _noise_jpeg()[: len(_noise_jpeg()) * 6 // 10], "image file is truncated"),
    "empty": (lambda: b"", "empty file"),
    "text": (lambda: b"just some notes, not a picture\n" * 4, "not an image"),
}


def _decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _assert_rgb_baseline_jpeg(data: bytes) -> Image.Image:
    im = _decoded(data)
    assert (im.format, im.mode) == ("JPEG", "RGB")
    assert convert._jpeg_frame_marker(data) == 0xC0
    assert not im.info.get("progressive")
    assert im.getexif().get(0x0112, 1) == 1
    return im


# --------------------------------------------------------------------------------------------
# One image


@pytest.mark.parametrize("kind", sorted(INPUT_KINDS))
def test_every_input_kind_becomes_an_rgb_baseline_jpeg(kind: str) -> None:
    make, action = INPUT_KINDS[kind]
    data = make()
    result = convert_image(data, quality=90)
    _assert_rgb_baseline_jpeg(result.jpg)
    original = Image.open(io.BytesIO(data))
    assert (result.width, result.height) == original.size
    if action is None:
        assert result.jpg == data and result.actions == ()
    else:
        assert action in result.actions
        assert result.jpg != data


def test_conversions_keep_the_picture() -> None:
    red = np.asarray(_decoded(convert_image(INPUT_KINDS["cmyk"][0]()).jpg), np.int32)
    assert red[..., 0].mean() > 200 and red[..., 1:].mean() < 60  # C=0, M=Y=255 is red
    gray16 = np.asarray(_decoded(convert_image(INPUT_KINDS["gray16"][0]()).jpg), np.int32)
    assert abs(gray16.mean() - 40000 / 256) < 3  # scaled to 8 bits, not clipped to 255
    for kind in ("rgba", "la"):  # fully transparent: composited on white
        assert np.asarray(_decoded(convert_image(INPUT_KINDS[kind][0]()).jpg)).min() > 245


def test_exif_orientation_is_applied_and_stripped() -> None:
    data = _exif_rotated_jpeg()
    result = convert_image(data, quality=95)
    out = _decoded(result.jpg)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert out.size == expected.size == (32, 48)
    assert (result.width, result.height) == (48, 32)  # the stored (pre-rotation) size
    difference = np.abs(np.asarray(out, np.int32) - np.asarray(expected, np.int32)).mean()
    assert difference < 4


def test_max_side_downscales_keeping_the_aspect() -> None:
    data = _encode(_gradient(200, 100), quality=90)
    result = convert_image(data, max_side=64)
    assert _assert_rgb_baseline_jpeg(result.jpg).size == (64, 32)
    assert "resized" in result.actions
    assert convert_image(data, max_side=200).jpg == data  # within max_side: untouched


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_undecodable_inputs_are_skipped_with_a_reason(kind: str) -> None:
    make, reason = BAD_INPUTS[kind]
    with pytest.raises(SkipImage, match=reason):
        convert_image(make())


def test_decompression_bombs_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(Image.new("RGB", (120, 100)))
    with pytest.raises(SkipImage, match="decompression bomb"):
        convert_image(data, max_pixels=120 * 100 - 1)
    assert convert_image(data, max_pixels=120 * 100).jpg == data
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own guard fires at 2x its limit
    with pytest.raises(SkipImage, match="decompression bomb"):
        convert_image(data)


def test_an_input_over_the_size_bound_is_a_counted_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from droppos.shard import inputs

    small, large = _noise_jpeg(16, 16, seed=1), _noise_jpeg(64, 48, seed=2)
    for name, data in (("small.jpg", small), ("large.jpg", large)):
        (tmp_path / "src" / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "train" / "a" / name).write_bytes(data)
    monkeypatch.setattr(inputs, "IMAGE_MAX_BYTES", len(small))  # 1 GiB in earnest: no test writes that much
    manifest = shard.run(tmp_path / "src", tmp_path / "out", workers=1)
    assert (manifest["found"], manifest["written"], manifest["skipped"]) == (2, 1, 1)
    skipped = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())
    assert skipped == {"path": "train/a/large.jpg",
                       "reason": f"too large: {len(large):,} bytes, more than the {len(small):,} it may be; refused"}


# --------------------------------------------------------------------------------------------
# A folder with every kind of input


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/{a,b}/ and val/{a,b}/ with every good and bad input kind, plus a stray file."""
    root = tmp_path_factory.mktemp("mixed-source")
    files = {f"train/a/{kind}.JPEG": make() for kind, (make, _) in INPUT_KINDS.items()}
    files.update({f"train/b/{kind}.JPEG": make() for kind, (make, _) in BAD_INPUTS.items()})
    files["train/b/bomb.JPEG"] = _encode(Image.new("RGB", (400, 400), (1, 2, 3)))
    files["train/b/notes.txt"] = b"readme"
    files["train/stray.JPEG"] = _encode(_gradient())
    files.update({f"train/b/ok_{i}.JPEG": _noise_jpeg(seed=i) for i in range(5)})
    files.update({f"val/a/{kind}.JPEG": INPUT_KINDS[kind][0]() for kind in ("cmyk", "exif_rotated")})
    files["val/b/ok.JPEG"] = _noise_jpeg(seed=9)
    files["train/a/.DS_Store"] = b"hidden files are not inputs"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


MIXED_SKIPPED = {
    "train/b/truncated.JPEG": "image file is truncated",
    "train/b/empty.JPEG": "empty file",
    "train/b/text.JPEG": "not an image",
    "train/b/notes.txt": "not an image",
    "train/b/bomb.JPEG": "decompression bomb",
    "train/stray.JPEG": "not inside a class folder",
    "train/a/.DS_Store": "hidden file",  # counted and listed: nothing found vanishes from the tally
}
MIXED_MAX_PIXELS = 300 * 300


@pytest.fixture(scope="module")
def mixed_shards(mixed_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed-shards")
    shard.run(mixed_source, out, seed=3, shard_size=4, max_pixels=MIXED_MAX_PIXELS)
    return out


def test_written_plus_skipped_equals_found(mixed_shards: Path, mixed_source: Path) -> None:
    manifest = load_manifest(mixed_shards)
    assert manifest["format"] == FORMAT and manifest["classes"] == ["a", "b"]
    inputs = [p for p in mixed_source.rglob("*") if p.is_file()]
    skipped = [json.loads(line) for line in (mixed_shards / "skipped.jsonl").read_text().splitlines()]
    assert {s["path"]: s["reason"] for s in skipped}.keys() == MIXED_SKIPPED.keys()
    for entry in skipped:
        assert MIXED_SKIPPED[entry["path"]] in entry["reason"]
    assert manifest["found"] == len(inputs)
    assert manifest["written"] + manifest["skipped"] == manifest["found"]
    assert manifest["skipped"] == len(MIXED_SKIPPED)
    for split, info in manifest["splits"].items():
        assert info["num_samples"] + info["skipped"] == info["found"]
        assert sum(s["num_samples"] for s in info["shards"]) == info["num_samples"]
    assert manifest["conversions"]["cmyk"] == 2 and manifest["conversions"]["exif-rotated"] == 2


def test_samples_have_the_contract_components(mixed_shards: Path, mixed_source: Path) -> None:
    manifest = load_manifest(mixed_shards)
    seen = set()
    for split in manifest["splits"]:
        for entry in split_shards(mixed_shards, split, manifest):
            with tarfile.open(entry.tar) as tar:
                members = tar.getmembers()
                assert {m.mtime for m in members} == {tarindex.TAR_MTIME}
                contents = {m.name: tar.extractfile(m).read() for m in members}
            keys = sorted({name.split(".", 1)[0] for name in contents})
            assert len(keys) == entry.num_samples
            for key in keys:
                assert "." not in key
                meta = json.loads(contents[f"{key}.json"])
                label = int(contents[f"{key}.cls"].decode("ascii"))
                assert contents[f"{key}.lbl"] == struct.pack("<i", label)
                assert manifest["classes"][label] == meta["class"] == Path(meta["path"]).parent.name
                original = Image.open(mixed_source / meta["path"])
                assert (meta["width"], meta["height"]) == original.size
                _assert_rgb_baseline_jpeg(contents[f"{key}.jpg"])
                seen.add(meta["path"])
    assert "train/a/baseline_rgb.JPEG" in seen and "val/a/cmyk.JPEG" in seen


def test_tally_is_printed(mixed_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shard.run(mixed_source, tmp_path / "out", shard_size=100, max_pixels=MIXED_MAX_PIXELS)
    out = capsys.readouterr().out
    found = sum(1 for p in mixed_source.rglob("*") if p.is_file())
    assert f"total: found {found}, written {found - len(MIXED_SKIPPED)}, skipped {len(MIXED_SKIPPED)}" in out


def test_plain_progress_lines_when_not_a_terminal(
    mixed_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "LOG_EVERY_S", 0.0)
    shard.run(mixed_source, tmp_path / "out", shard_size=100, max_pixels=MIXED_MAX_PIXELS)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shard: ")]
    assert lines and "images/s" in lines[-1]


# --------------------------------------------------------------------------------------------
# Determinism and resume


def _shard_bytes(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.suffix in (".tar", ".idx")}


def test_same_input_and_options_give_byte_identical_shards(sample_source: Path, sample_shards: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    shard.run(sample_source, again, seed=0, workers=2, shard_size=24)  # parallel == serial
    assert _shard_bytes(again) == _shard_bytes(sample_shards)
    assert load_manifest(again)["splits"] == load_manifest(sample_shards)["splits"]
    reseeded = tmp_path / "reseeded"
    shard.run(sample_source, reseeded, seed=1, workers=1, shard_size=24)
    assert _shard_bytes(reseeded)["train-000000.tar"] != _shard_bytes(sample_shards)["train-000000.tar"]


def test_shards_are_globally_shuffled(sample_shards: Path) -> None:
    first_shard = split_shards(sample_shards, "train")[0]
    with tarfile.open(first_shard.tar) as tar:
        labels = {int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")}
    assert len(labels) >= 5  # sorted input would give one or two classes per 24-sample shard


def _interrupt_the_third_commit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the third shard commit raise KeyboardInterrupt; returns the names of the shards committed before it."""
    real_commit = writer.ShardWriter.commit
    commits: list[str] = []

    def crash_on_third_commit(self):
        if len(commits) == 2:
            raise KeyboardInterrupt("simulated interruption while finishing a shard")
        commits.append(self.name)
        return real_commit(self)

    monkeypatch.setattr(writer.ShardWriter, "commit", crash_on_third_commit)
    return commits


def test_resume_after_an_interrupted_run(
    sample_source: Path, sample_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    commits = _interrupt_the_third_commit(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        shard.run(sample_source, out, seed=0, workers=1, shard_size=24)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    before = {name: (out / f"{name}.tar").stat().st_mtime_ns for name in commits}
    # Damage one finished shard: the re-run must notice it and rewrite that shard only.
    damaged = out / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")

    shard.run(sample_source, out, seed=0, workers=1, shard_size=24)
    assert _shard_bytes(out) == _shard_bytes(sample_shards)
    assert (out / "train-000000.tar").stat().st_mtime_ns == before["train-000000"]  # not rewritten
    assert load_manifest(out)["splits"] == load_manifest(sample_shards)["splits"]

    # A run on a finished directory verifies and rewrites nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    shard.run(sample_source, out, seed=0, workers=1, shard_size=24)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamps


def test_other_options_on_an_existing_dataset_are_refused(sample_source: Path, sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(sample_shards, out)
    with pytest.raises(UserError, match="other input or options"):
        shard.run(sample_source, out, seed=5, shard_size=24)


# --------------------------------------------------------------------------------------------
# Readers: DALI (CPU mode) and webdataset


def _read_tar(entry) -> list[tuple[str, int, tuple[int, int]]]:
    """(key, label, decoded (height, width)) of each sample in tar order, with Pillow."""
    with tarfile.open(entry.tar) as tar:
        members = tar.getmembers()
        data = {m.name: tar.extractfile(m).read() for m in members}
    keys = sorted({name.split(".", 1)[0] for name in data})
    result = []
    for key in keys:
        width, height = Image.open(io.BytesIO(data[f"{key}.jpg"])).size
        result.append((key, int(data[f"{key}.cls"]), (height, width)))
    return result


@pytest.mark.parametrize("dataset", ["sample_shards", "mixed_shards"])
def test_dali_reads_every_sample_through_the_indexes(dataset: str, request: pytest.FixtureRequest) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    data_dir = request.getfixturevalue(dataset)
    manifest = load_manifest(data_dir)
    for split in manifest["splits"]:
        entries = split_shards(data_dir, split, manifest)
        expected = [sample for entry in entries for sample in _read_tar(entry)]
        batch_size = 8

        @dali.pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=0)
        def pipeline():
            jpg, label = fn.readers.webdataset(
                paths=[str(e.tar) for e in entries],
                index_paths=[str(e.index) for e in entries],
                ext=["jpg", "lbl"],
                dtypes=[types.UINT8, types.INT32],
                missing_component_behavior="error",
                random_shuffle=False,
                name="reader",
            )
            return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), label

        pipe = pipeline()
        pipe.build()
        assert pipe.epoch_size("reader") == len(expected) == manifest["splits"][split]["num_samples"]
        got = []
        while len(got) < len(expected):
            images, labels = pipe.run()
            for i in range(batch_size):
                got.append((int(np.asarray(labels.at(i)).reshape(-1)[0]), np.asarray(images.at(i)).shape))
        got = got[: len(expected)]
        assert got == [(label, (h, w, 3)) for _, label, (h, w) in expected]


def test_indexes_match_what_dali_wds2idx_writes(sample_shards: Path, tmp_path: Path) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # shipped in the DALI wheel
    for entry in split_shards(sample_shards, "val"):
        reference = tmp_path / entry.index.name
        with wds2idx.IndexCreator(str(entry.tar), str(reference), verbose=False) as creator:
            creator.create_index()
        assert entry.index.read_text() == reference.read_text()


def test_webdataset_reads_every_sample(sample_shards: Path) -> None:
    import webdataset as wds

    manifest = load_manifest(sample_shards)
    for split in manifest["splits"]:
        entries = split_shards(sample_shards, split, manifest)
        dataset = wds.WebDataset([str(e.tar) for e in entries], shardshuffle=False, empty_check=False)
        samples = list(dataset)
        assert len(samples) == manifest["splits"][split]["num_samples"]
        assert len({s["__key__"] for s in samples}) == len(samples)
        for sample in samples:
            assert {"jpg", "cls", "lbl", "json"} <= sample.keys()
            assert struct.unpack("<i", sample["lbl"])[0] == int(sample["cls"])
            assert json.loads(sample["json"])["class"] == manifest["classes"][int(sample["cls"])]


# --------------------------------------------------------------------------------------------
# The tar + index format: one module (droppos.tarindex) for the writer, --verify and the loaders


def _members(tar_bytes: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, as the standard library reads the tar."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers()]


def test_tars_are_the_bytes_webdatasets_tarwriter_writes() -> None:
    import webdataset as wds

    sizes = (0, 1, 511, 512, 513, 5000)
    samples = [(f"train_{i:09d}", {"jpg": bytes([i]) * size, "cls": str(i).encode(), "lbl": struct.pack("<i", i),
                                   "seg.png": b"\x89PNG" * (i + 1)}) for i, size in enumerate(sizes)]
    ours, theirs = io.BytesIO(), io.BytesIO()
    indexed = tarindex.IndexedTarWriter(ours)
    reference = wds.TarWriter(theirs, encoder=False, mtime=tarindex.TAR_MTIME, user=tarindex.TAR_OWNER,
                              group=tarindex.TAR_OWNER, mode=tarindex.TAR_MODE)
    for key, components in samples:
        indexed.add(key, components)
        reference.write({"__key__": key, **components})
    indexed.close()
    reference.close()
    assert ours.getvalue() == theirs.getvalue()
    assert (indexed.size, indexed.sha256) == (len(ours.getvalue()), hashlib.sha256(ours.getvalue()).hexdigest())
    # The index written beside the tar parses back to the tar's real members, sample by sample.
    parsed = tarindex.parse_index(indexed.index_bytes())
    assert [(e.name, e.offset, e.size) for entries in parsed for e in entries] == _members(ours.getvalue())
    assert [{e.name.partition(".")[0] for e in entries} for entries in parsed] == [{key} for key, _ in samples]
    assert [[e.ext for e in entries] for entries in parsed] == [sorted(components) for _, components in samples]


def test_the_loaders_read_the_index_the_writer_wrote(sample_shards: Path) -> None:
    from droppos.data import plan

    assert plan.index_sample is tarindex.index_sample  # no parser of its own
    for entry in split_shards(sample_shards, "train"):
        samples = tarindex.read_index(entry.index)
        members = _members(entry.tar.read_bytes())
        assert [(e.name, e.offset, e.size) for entries in samples for e in entries] == members
        assert tarindex.format_index(samples) == entry.index.read_bytes()
        assert tarindex.index_problem(entry.index, members) is None
        assert tarindex.index_sample(entry.index, 2) == samples[2]
    # A segment that starts mid-shard starts at the sample the index says.
    entry = split_shards(sample_shards, "train")[1]
    samples = tarindex.read_index(entry.index)
    got = list(plan.read_segment(plan.Segment(str(entry.tar), str(entry.index), 3, 7)))
    assert [s["__key__"] for s in got] == [entries[0].name.partition(".")[0] for entries in samples[3:7]]


@pytest.mark.parametrize("text", [b"v1.1 1\njpg 512 3 a.jpg\n", b"v1.2 2\njpg 512 3 a.jpg\n", b"v1.2 1\njpg 512 a.jpg\n",
                                  b"v1.2 1\njpg x 3 a.jpg\n", b"v1.2 1\n\n", b"v1.2 1\njpg 512 3 \xe9.jpg\n"])
def test_a_malformed_index_is_refused(text: bytes) -> None:
    with pytest.raises(tarindex.BadIndex):
        tarindex.parse_index(text)


def test_shard_and_verify_do_not_import_torch(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / "src" / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "train" / "a" / f"{i}.jpg").write_bytes(_noise_jpeg(seed=i))
    code = f"""
import sys
from cli import main
for argv in (["shard", {str(tmp_path / "src")!r}, {str(tmp_path / "out")!r}, "--workers", "2", "--shard-size", "2"],
             ["shard", "--verify", {str(tmp_path / "out")!r}, "--decode"]):
    try:
        main(argv)
    except SystemExit as stop:
        assert not stop.code, stop.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "webdataset"))
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and load_manifest(tmp_path / "out")["written"] == 3


# --------------------------------------------------------------------------------------------
# --verify


def test_verify_passes_on_a_good_dataset(sample_shards: Path, capsys: pytest.CaptureFixture) -> None:
    counts = shard.verify(sample_shards, decode=True)
    assert counts == {"train": 120, "val": 40}
    assert "verified" in capsys.readouterr().out


def test_verify_catches_one_flipped_byte(sample_shards: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "copy"
    shutil.copytree(sample_shards, data_dir)
    tar = data_dir / "train-000002.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 3] ^= 0x01
    tar.write_bytes(bytes(data))
    with pytest.raises(UserError, match="train-000002.tar: sha256"):
        shard.verify(data_dir)


def test_verify_catches_a_wrong_count_and_a_missing_shard(sample_shards: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "copy"
    shutil.copytree(sample_shards, data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["num_samples"] += 1
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="samples"):
        shard.verify(data_dir)
    (data_dir / "train-000003.tar").unlink()
    with pytest.raises(UserError, match="train-000003.tar .*missing"):
        shard.verify(data_dir)


# --------------------------------------------------------------------------------------------
# --list mode


def test_list_mode_keeps_the_given_indices(mixed_source: Path, tmp_path: Path) -> None:
    train_list = tmp_path / "train.txt"
    train_list.write_text(
        "# comment lines and blank lines are ignored\n\n"
        "a/baseline_rgb.JPEG 7\n"
        "a/cmyk.JPEG 7\n"
        "b/ok_0.JPEG 2\n"
        "b/gone.JPEG 2\n"
    )
    val_list = tmp_path / "val.txt"
    val_list.write_text("../val/b/ok.JPEG 2\n")  # a list naming no input at all is the wrong list: one line
    with pytest.raises(UserError, match=r"val.txt: .*\(line 1: '\.\.' in the path"):
        shard.run(mixed_source / "train", tmp_path / "out", lists={"train": train_list, "val": val_list})
    manifest = shard.run(mixed_source / "train", tmp_path / "out", lists={"train": train_list})
    assert len(manifest["classes"]) == 8 and manifest["classes"][7] == "a" and manifest["classes"][2] == "b"
    assert manifest["classes"][0] == "0"
    assert (manifest["written"], manifest["skipped"]) == (3, 1)
    skipped = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())
    assert skipped == {"path": "b/gone.JPEG", "reason": "file not found"}


@pytest.mark.parametrize(
    "line, message",
    [("a/cmyk.JPEG", "1 field, expected 2: `relative/path class_index`"), ("a/cmyk.JPEG -1", "non-negative"),
     ("/etc/passwd 1", "not relative to SOURCE")],
)
def test_bad_list_lines_are_counted_with_file_and_line(mixed_source: Path, tmp_path: Path, line: str,
                                                       message: str) -> None:
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"a/baseline_rgb.JPEG 0\n{line}\n")
    manifest = shard.run(mixed_source / "train", tmp_path / "out", lists={"train": list_file})
    assert (manifest["found"], manifest["written"], manifest["skipped"]) == (2, 1, 1)
    skipped = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())
    assert message in skipped["reason"] and skipped["line"] == 2 and skipped["list"] == str(list_file)


# --------------------------------------------------------------------------------------------
# CLI: user mistakes are one line on stderr and exit 2


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "droppos", "shard", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    no_images = tmp_path / "no-images"
    (no_images / "train" / "cat").mkdir(parents=True)
    (no_images / "train" / "cat" / "readme.txt").write_text("not an image")
    flat = tmp_path / "flat"
    (flat / "val").mkdir(parents=True)
    (flat / "val" / "x.JPEG").write_bytes(_noise_jpeg())
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("cat/readme.txt zero\n")
    cases = [
        ((str(tmp_path / "missing"), str(tmp_path / "out")), "does not exist"),
        ((str(empty), str(tmp_path / "out")), "is empty"),
        ((str(no_images), str(a_file)), "is a file"),
        ((str(no_images), str(tmp_path / "out"), "--quality", "0"), "quality"),
        ((str(no_images), str(tmp_path / "out"), "--shard-size", "0"), "shard-size"),
        ((str(no_images / "train"), str(tmp_path / "out"), "--list", str(bad_list)), "(line 1: class index 'zero'"),
        ((str(flat), str(tmp_path / "out")), "no class folders"),
        ((str(no_images), str(tmp_path / "out2")), "usable image"),
        ((str(a_file),), "expected SOURCE and OUT"),
        (("--verify", str(empty)), "manifest.json is missing"),
    ]
    for args, message in cases:
        result = _cli(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)


def test_cli_shards_the_builtin_sample(tmp_path: Path) -> None:
    out = tmp_path / "sample"
    result = _cli("--sample", str(out), "--sample-classes", "3", "--sample-train", "3", "--sample-val", "1",
                  "--workers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "total: found 12, written 12, skipped 0" in result.stdout
    manifest = load_manifest(out)
    assert len(manifest["classes"]) == 3 and manifest["options"]["sample"] is True
    assert (manifest["splits"]["train"]["num_samples"], manifest["splits"]["val"]["num_samples"]) == (9, 3)
    # The sample data comes with its label maps: usable by the classification and the segmentation probe.
    assert manifest["task"] == "segmentation" and manifest["segmentation"]["image_classes"] is True
    assert "label maps: 5 classes" in result.stdout


def test_cli_verify_reports_success_and_corruption(sample_shards: Path, tmp_path: Path) -> None:
    ok = _cli("--verify", str(sample_shards), cwd=tmp_path)
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    data_dir = tmp_path / "copy"
    shutil.copytree(sample_shards, data_dir)
    tar = data_dir / "val-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x80
    tar.write_bytes(bytes(data))
    bad = _cli("--verify", str(data_dir), cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "val-000001.tar" in bad.stderr


# --------------------------------------------------------------------------------------------
# Segmentation data (label maps): resume, fingerprint, --verify --decode


@pytest.fixture(scope="module")
def seg_sample_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from droppos import sample_data

    return sample_data.generate(tmp_path_factory.mktemp("seg-sample"), num_classes=3, train_per_class=8,
                                val_per_class=2, seed=0, masks=True)


def test_segmentation_shards_resume_byte_identical_and_refuse_a_classification_twin(
    seg_sample_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    shard.run(seg_sample_source, reference, seed=0, workers=2, shard_size=5)
    out = tmp_path / "out"
    _interrupt_the_third_commit(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        shard.run(seg_sample_source, out, seed=0, workers=1, shard_size=5)
    monkeypatch.undo()
    shard.run(seg_sample_source, out, seed=0, workers=1, shard_size=5)
    assert _shard_bytes(out) == _shard_bytes(reference)  # parallel == serial == resumed
    with pytest.raises(UserError, match="other input or options"):  # the same folder as classification data
        shard.run(seg_sample_source, out, seed=0, workers=1, shard_size=5, layout="imagenet")


def test_verify_decode_checks_label_maps(seg_sample_source: Path, tmp_path: Path) -> None:
    from droppos.labelmaps import SegSpec, encode_label_map

    out = tmp_path / "out"
    shard.run(seg_sample_source, out, seed=0, workers=1, shard_size=100)
    shard.verify(out, decode=True)
    entry = split_shards(out, "val")[0]
    with tarfile.open(entry.tar) as tar:
        sample = {m.name.partition(".")[2]: tar.extractfile(m).read() for m in tar.getmembers()
                  if m.name.startswith("val_000000000.")}
    spec = SegSpec(("sky", "ground", "a", "b", "c"))
    verifier._verify_sample("val-000000.tar", "val_000000000", sample, spec)
    width, height = Image.open(io.BytesIO(sample["jpg"])).size
    for labels, message in ((np.zeros((height, width + 1), np.uint8), "label map"),
                            (np.full((height, width), 9, np.uint8), "not classes")):
        with pytest.raises(UserError, match=message):
            verifier._verify_sample("val-000000.tar", "val_000000000", {**sample, "seg.png": encode_label_map(labels)},
                                          spec)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    del manifest["segmentation"]["classes"]
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="segmentation classes"):
        shard.verify(damaged)


def test_verify_finds_labels_beyond_the_manifests_classes(tmp_path):
    """A hand-edited manifest with fewer classes than the shards' labels would crash fine-tuning's loss on the
    device; `--verify` (which reads every 4-byte label) names the first sample it breaks."""
    from droppos import shard

    data = tmp_path / "data"
    shard.run(None, data, sample=True, seed=0, workers=1, shard_size=200,
              sample_options=dict(num_classes=3, train_per_class=4, val_per_class=2))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:2]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"has label 2, but the manifest lists 2 classes"):
        shard.verify(data)
