"""Recipes: every stage's options with the paper's defaults, and the named presets.

Kept free of torch so that the CLI can show defaults and validate options instantly.
A preset is a set of overrides of the defaults; options given on the command line
override the preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from droppos import UserError

# Encoder sizes METHOD.md names; `droppos_<name>` is the timm registry name of the
# DropPos model, `<name>_<img_size>` roughly the stock timm ViT it exports to.
MODELS = (
    "vit_tiny_patch16",
    "vit_small_patch16",
    "vit_base_patch16",
    "vit_base_patch32",
    "vit_large_patch16",
    "vit_huge_patch14",
)


@dataclass
class LaunchOptions:
    """Options every training stage shares: input pipeline, device, launch, seed, checkpoints, logs."""

    loader: str = "auto"
    workers: Optional[int] = None
    compile: Optional[bool] = None  # None: on for CUDA, off on CPU
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    gpus: int = 0
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    seed: int = 0
    max_steps: int = 0  # 0: the full schedule
    ckpt_every: int = 1000
    ckpt_minutes: float = 30.0
    log_every: int = 20
    preset: Optional[str] = None


@dataclass
class PretrainConfig(LaunchOptions):
    """`droppos pretrain` options; defaults = METHOD.md's ViT-B/16 800-epoch recipe."""

    data: str = ""
    out: str = ""
    model: str = "vit_base_patch16"
    img_size: int = 224
    patch_size: Optional[int] = None  # None: the model's own patch size
    epochs: int = 800
    warmup_epochs: float = 10
    batch_size: int = 64  # per device
    accum: int = 1
    blr: float = 1.5e-4
    lr: Optional[float] = None  # absolute lr; None: blr * effective batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    clip_grad: float = 5.0  # 0 disables clipping
    mask_ratio: float = 0.75
    pos_mask_ratio: float = 0.75
    sigma: float = 1.0
    sigma_decay: bool = True
    attentive: bool = True
    tau: float = 0.1
    mask_token: str = "learnable"
    aux_mae: bool = False
    pos_weight: float = 1.0
    decoder_depth: int = 2
    decoder_width: int = 512
    decoder_heads: int = 16
    # Encoder overrides, for small experiments (None: the size's own value).
    depth: Optional[int] = None
    embed_dim: Optional[int] = None
    num_heads: Optional[int] = None
    keep_every: int = 0  # also keep checkpoints/step-N.pt every N steps (0: only last.pt)
    eval_every: int = 1  # held-out position accuracy every N epochs (0: only at the end)


PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # METHOD.md "Published recipe": ViT-B/16, batch 64 per GPU, blr 1.5e-4, warm-up 10.
    "vit_b16_800ep": dict(model="vit_base_patch16", epochs=800, warmup_epochs=10, batch_size=64),
    "vit_b16_200ep": dict(model="vit_base_patch16", epochs=200, warmup_epochs=10, batch_size=64),
    # ViT-L/16: batch 128 per GPU, warm-up 40 epochs.
    "vit_l16_800ep": dict(model="vit_large_patch16", epochs=800, warmup_epochs=40, batch_size=128),
    # A small model on the built-in sample data that visibly learns positions in a few
    # minutes on a 2-core CPU: 48 px images, 8 px patches (a 6x6 grid), 4 blocks of ViT-Ti
    # width, half the patches visible (more context per image than the paper's quarter:
    # faster to learn), the Pillow-SIMD loader (the faster backend on a CPU).
    "cpu-demo": dict(
        model="vit_tiny_patch16",
        img_size=48,
        patch_size=8,
        depth=4,
        mask_ratio=0.5,
        decoder_width=192,
        decoder_depth=1,
        epochs=8,
        warmup_epochs=1,
        batch_size=64,
        blr=3e-3,
        device="cpu",
        loader="pil",
        compile=False,
        log_every=10,
        ckpt_every=200,
    ),
}


@dataclass
class FinetuneConfig(LaunchOptions):
    """`droppos finetune` options; defaults = METHOD.md's fine-tuning recipe (MAE protocol, ViT-B)."""

    data: str = ""
    out: str = ""
    # The encoder: exactly one of these (see droppos/encoders.py).
    encoder: Optional[str] = None  # an exported encoder.safetensors
    run: Optional[str] = None  # a pretrain run directory
    timm_model: Optional[str] = None  # a timm ViT name, random init
    random_init: bool = False  # build --encoder/--run's architecture without its weights
    depth: Optional[int] = None  # --timm-model only
    img_size: Optional[int] = None  # None: the encoder's own (224 for stock timm ViTs)
    pool: str = "avg"  # global average pooling of patch tokens (timm's fc_norm)
    epochs: int = 100
    warmup_epochs: float = 5
    batch_size: int = 128  # per device: 8 GPUs x 128 = the recipe's 1024
    accum: int = 1
    blr: float = 1e-3
    lr: Optional[float] = None  # absolute lr; None: blr * effective batch / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    clip_grad: float = 0.0  # 0: no clipping (MAE's fine-tuning clips nothing)
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    reprob: float = 0.25  # random erasing; RandAugment rand-m9-mstd0.5-inc1 is in data's finetune mode
    ema: bool = False
    ema_decay: float = 0.9999


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # METHOD.md: 100 epochs for ViT-B, warm-up 5, effective batch 1024 (8 x 128).
    "vit_b16": dict(epochs=100, warmup_epochs=5, batch_size=128, drop_path=0.1),
    # METHOD.md: 50 epochs for ViT-L; drop path 0.2 as in MAE's ViT-L fine-tuning command.
    "vit_l16": dict(epochs=50, warmup_epochs=5, batch_size=128, drop_path=0.2),
    # The sample data on a 2-core CPU: the encoder's own (small) resolution, a few epochs.
    "cpu-demo": dict(
        epochs=5, warmup_epochs=1, batch_size=32, blr=2e-3, device="cpu", compile=False,
        log_every=10, ckpt_every=100,
    ),
}


@dataclass
class ProbeConfig(LaunchOptions):
    """`droppos probe` options; defaults = MAE's linear probe (METHOD.md)."""

    data: str = ""
    out: str = ""
    encoder: Optional[str] = None
    run: Optional[str] = None
    timm_model: Optional[str] = None
    random_init: bool = False
    depth: Optional[int] = None
    img_size: Optional[int] = None
    pool: str = "token"  # [CLS] (MAE's default); avg: mean of patch tokens
    cached: bool = False  # extract frozen features once (eval transforms), then train the head on them
    epochs: int = 90
    warmup_epochs: float = 10
    batch_size: int = 2048  # per device: 8 GPUs x 2048 = the recipe's 16384
    blr: float = 0.1
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.0


PROBE_PRESETS: dict[str, dict[str, Any]] = {
    # MAE's linear probe: 90 epochs, warm-up 10, batch 16384 (8 x 2048), LARS, blr 0.1.
    "mae": dict(epochs=90, warmup_epochs=10, batch_size=2048, blr=0.1),
    # The sample data on a CPU: cached features, a batch the 2,600 images can fill many times.
    "cpu-demo": dict(cached=True, epochs=90, warmup_epochs=10, batch_size=256, blr=0.1, device="cpu",
                     compile=False, log_every=100),
}


def make_config(cls: type, presets: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> Any:
    """Defaults, then the preset named in `overrides['preset']`, then the given options.

    `overrides` holds only what the user actually typed (None values are dropped).
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    preset = given.get("preset")
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(presets)}")
        values.update(presets[preset])
    values.update(given)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
