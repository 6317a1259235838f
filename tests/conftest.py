"""Shared fixtures: a small generated ImageNet-style folder and its shards (built once per session), and a
copy of them with one corrupt JPEG."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

SAMPLE_CLASSES = 10
SAMPLE_TRAIN_PER_CLASS = 12
SAMPLE_VAL_PER_CLASS = 4
SAMPLE_SHARD_SIZE = 24  # 120 train images -> 5 train shards, 40 val images -> 2 val shards


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg: 10 classes, 12 train and 4 val images each."""
    from droppos import sample_data

    root = tmp_path_factory.mktemp("sample-source")
    return sample_data.generate(
        root,
        num_classes=SAMPLE_CLASSES,
        train_per_class=SAMPLE_TRAIN_PER_CLASS,
        val_per_class=SAMPLE_VAL_PER_CLASS,
        seed=0,
        workers=1,
    )


@pytest.fixture(scope="session")
def sample_shards(sample_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sample_source` sharded with small shards (train has 5 shards); returns the dataset directory."""
    from droppos import shard

    out = tmp_path_factory.mktemp("sample-shards")
    shard.run(sample_source, out, seed=0, workers=1, shard_size=SAMPLE_SHARD_SIZE)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full built-in sample data set, sharded by the real CLI (what `make demo` uses)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run([sys.executable, "-m", "droppos", "shard", "--sample", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def demo_run(demo_data: Path) -> Path:
    """A pretrain run of the `cpu-demo` preset on `demo_data` (a few minutes; shared by every slow test)."""
    import subprocess
    import sys

    run = demo_data.parent / "run"
    result = subprocess.run(
        [sys.executable, "-m", "droppos", "pretrain", "--preset", "cpu-demo", "--data", str(demo_data), "--out", str(run)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture
def corrupt_jpeg(sample_shards: Path, tmp_path: Path) -> Callable[..., tuple[Path, str]]:
    """corrupt_jpeg(split, shard, sample) -> (a copy of `sample_shards` whose shard `shard` of `split` has JPEG
    `sample` overwritten with garbage, sizes kept so the tar and its index stay valid; that tar's name)."""
    from droppos.manifest import split_shards
    from droppos.tarindex import index_sample

    def corrupt(split: str = "train", shard: int = 1, sample: int = 1) -> tuple[Path, str]:
        copy = tmp_path / "corrupt"
        shutil.copytree(sample_shards, copy)
        entry = split_shards(copy, split)[shard]
        jpg = next(e for e in index_sample(entry.index, sample) if e.ext == "jpg")
        offset, size = jpg.offset, jpg.size
        with open(entry.tar, "r+b") as f:
            f.seek(offset + 16)
            f.write(b"\x00\xffgarbage" * ((size - 32) // 9))
        return copy, entry.tar.name

    return corrupt
