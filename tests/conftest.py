"""Shared fixtures: a small generated ImageNet-style folder and its shards (built once per session)."""

from __future__ import annotations

from pathlib import Path

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
    from tools import shard_imagenet

    out = tmp_path_factory.mktemp("sample-shards")
    shard_imagenet.run(sample_source, out, seed=0, workers=1, shard_size=SAMPLE_SHARD_SIZE)
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
