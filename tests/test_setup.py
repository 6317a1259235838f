"""The set-up and the CLI frame: Pillow-SIMD replaced Pillow, the console script works."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ("shard", "pretrain", "finetune", "probe", "eval-pos", "export")


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


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "droppos", *args], capture_output=True, text=True, timeout=60)


def test_version_bare_usage_and_print_config():
    import droppos

    assert _cli("--version").stdout.strip() == f"droppos {droppos.__version__}"
    bare = _cli()
    assert bare.returncode == 0 and "Usage: droppos" in bare.stdout and "error" not in bare.stderr
    shown = _cli("pretrain", "--preset", "cpu-demo", "--epochs", "3", "--print-config")
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    assert (config["model"]["img_size"], config["model"]["patch_size"], config["optim"]["epochs"],
            config["data"]["loader"]) == (48, 8, 3, "pil")
    assert list(config) == ["preset", "data", "model", "pretext", "optim", "launch", "output", "logging"]


def test_help_groups_options_in_panels_and_shows_each_default_once():
    result = subprocess.run([sys.executable, "-m", "droppos", "pretrain", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "200"})
    text = result.stdout
    for panel in ("Recipe", "Data", "Model", "Pretext", "Optimisation", "Launch", "Output, checkpoints and logging"):
        assert f"─ {panel} ─" in text, panel
    assert "cpu-demo: model=vit_tiny_patch16" in text  # the presets, and what each sets
    rows = [line for line in text.splitlines() if re.match(r"│ --[a-z]", line)]
    assert rows and all(line.count("default:") <= 1 for line in rows)
    assert text.count("default: 800") == 1 and "default: on" in text  # one style: values, on/off
