"""The set-up and the CLI frame: Pillow-SIMD replaced Pillow, the console script works."""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ("shard", "pretrain", "finetune", "probe", "eval-pos")


def test_pil_is_pillow_simd_and_pillow_is_gone():
    import PIL

    assert metadata.version("pillow-simd")
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("pillow")
    files = {str(Path(f)) for f in metadata.files("pillow-simd") or ()}
    assert str(Path("PIL") / "__init__.py") in files
    assert Path(PIL.__file__).parent.name == "PIL"


def test_torchvision_and_timm_work_with_pillow_simd():
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    tensor = transforms.Compose([transforms.RandomResizedCrop(32), transforms.ToTensor()])(image)
    assert tensor.shape == (3, 32, 32)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3)
    assert model(tensor[None]).shape == (1, 3)
    assert torch.isfinite(model(tensor[None])).all()


@pytest.mark.parametrize("entry", [["droppos"], [sys.executable, "-m", "droppos"]])
def test_help_lists_every_stage(entry):
    if entry == ["droppos"]:
        entry = [str(Path(sys.executable).with_name("droppos"))]
    result = subprocess.run([*entry, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("args", [["nope"], ["shard", "--bogus"], ["pretrain", "--epochs", "0"], ["shard"]])
def test_usage_mistakes_are_one_line_and_exit_2(args):
    result = subprocess.run([sys.executable, "-m", "droppos", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("droppos: error:"), result.stderr
