"""Every option of every stage, declared once, with the paper's defaults, grouped into typed sections; the presets.

An option is one dataclass field made with `option(...)`: its type is the annotation; the declaration
holds the default, the help, the --help panel, the choices or bounds, and what changing it does to a
resumed run (`resume`: "arch" fixes the parameters' shapes, "run" changes the schedule, data order or
objective and needs --force-resume). A training stage's config is made of sections (data, model,
pretext, optim, launch, output, logging, ...): each component is handed its own, typed. On the command
line, in presets and in old flat records the options keep their flat names (`--batch-size`); `--print-config`,
config.json and checkpoints hold the sectioned record (`to_record`). The CLI, validation, the records, the
resume check and the model's construction all derive from these declarations. Kept free of torch so that
the CLI answers --help and option errors at once.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional

from droppos import UserError

# ---------------------------------------------------------------------------------------------
# The choice lists (each exists here only)

# Encoder sizes: name -> (embed_dim, depth, num_heads, patch). `droppos_<name>` is the timm
# registry name of the DropPos model, `<name>_224` the stock timm ViT it exports to.
MODELS: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny_patch16": (192, 12, 3, 16),
    "vit_small_patch16": (384, 12, 6, 16),
    "vit_base_patch16": (768, 12, 12, 16),
    "vit_base_patch32": (768, 12, 12, 32),
    "vit_large_patch16": (1024, 24, 16, 16),
    "vit_huge_patch14": (1280, 32, 16, 14),
}
LOADERS = ("auto", "dali", "pil")
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "bf16", "fp32")
# [MASK] position tokens: learnable; zeros; wrong: the dropped patches' own PEs shuffled among them, one
# permutation per batch (the published code); random-wrong: the PE of a random other cell.
MASK_TOKENS = ("learnable", "zeros", "wrong", "random-wrong")
POOLS = ("avg", "token")  # timm's names: mean of the patch tokens (+ fc_norm), or the [CLS] token
CLIP_MODES = ("per-param", "global")
PROBE_FILLS = {  # eval-pos --probe-fill -> what replaces a dropped PE in the position probe
    "mean": "the mean patch PE",
    "zeros": "zeros",
    "mask-token": "the model's own learnable [MASK] token",
}
EXPORT_FORMATS = ("timm", "detectron2", "mmseg")
PROBE_TASKS = ("classification", "segmentation")
PROBE_OPTIMIZERS = ("lars", "adamw")
SHARD_LAYOUTS = ("auto", "imagenet", "ade20k", "masks")

SEED_MAX = 2**32 - 1  # seeds are combined with a step into one 64-bit seed (distributed.step_seed)

# Help panels, in the order --help shows them.
RECIPE, DATA, SAMPLE, IMAGES, VERIFY, MODELS_PANEL, ENCODER, MODEL, PRETEXT, DIAGNOSTICS, AUGMENT, OPTIM, LAUNCH, \
    OUTPUT = ("Recipe", "Data", "Sample data", "Images", "Verify", "Models", "Encoder", "Model", "Pretext",
              "Diagnostics", "Augmentation and regularisation", "Optimisation", "Launch",
              "Output, checkpoints and logging")
PANELS = (RECIPE, DATA, SAMPLE, IMAGES, VERIFY, MODELS_PANEL, ENCODER, MODEL, PRETEXT, DIAGNOSTICS, AUGMENT, OPTIM,
          LAUNCH, OUTPUT)



@dataclass(frozen=True)
class Spec:
    """What the CLI, validation and resume need to know about one option (besides type and default)."""

    help: str
    panel: str
    choices: Optional[tuple[str, ...]] = None
    low: Optional[float] = None  # bounds; `low_open`/`high_open`: the bound itself is excluded
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    resume: Optional[str] = None  # "arch" | "run" | None (see the module docstring)
    model_arg: bool = False  # passed to the DropPos model's constructor
    default_text: Optional[str] = None  # how --help shows a default that is None or needs words
    cli: bool = True  # False: recorded and used, but not a command-line option
    name: Optional[str] = None  # the option's flat name (--flag, presets, records) when not the field's own
    flag: Optional[str] = None  # the option's spelling when not derived from its name
    positional: bool = False  # a command-line argument rather than an option
    metavar: Optional[str] = None  # how --help names the value
    path: bool = False  # a file or folder: bounded like one (no NUL, names of at most 255 bytes) before any use


def option(default: Any, help: str, panel: str, **spec: Any) -> Any:
    """A dataclass field carrying its `Spec` (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"spec": Spec(help, panel, **spec)})


def section(cls: type) -> Any:
    """A config field holding a section: a dataclass of options, built with its defaults."""
    return dataclasses.field(default_factory=cls, metadata={"section": cls})


def spec_of(field: dataclasses.Field) -> Spec:
    return field.metadata["spec"]


@dataclass(frozen=True)
class Option:
    """One declared option where it lives: its flat name, its section (None: top level) and its field."""

    name: str
    section: Optional[str]
    field: dataclasses.Field
    annotation: Any

    @property
    def spec(self) -> Spec:
        return spec_of(self.field)


SECTION_ORDER = ("data", "model", "encoder", "pretext", "head", "augment", "optim", "launch", "output", "logging")


def sections(cls: type) -> dict[str, type]:
    """A config class's sections by attribute name, in the order records and --print-config show them."""
    found = {f.name: f.metadata["section"] for f in dataclasses.fields(cls) if "section" in f.metadata}
    return {name: found[name] for name in sorted(found, key=SECTION_ORDER.index)}


def options(cls: type) -> list[Option]:
    """Every declared option of a config class (top level, then each section's), in declaration order."""
    found = []
    for owner, where in [(cls, None), *((section_cls, name) for name, section_cls in sections(cls).items())]:
        hints = typing.get_type_hints(owner)
        found += [Option(spec_of(f).name or f.name, where, f, hints[f.name])
                  for f in dataclasses.fields(owner) if "spec" in f.metadata]
    return found


def keys(cls: type, resume: str) -> tuple[str, ...]:
    """Flat names of the options whose `resume` is `resume` ("arch" or "run")."""
    return tuple(o.name for o in options(cls) if o.spec.resume == resume)


def value(config: Any, opt: Option) -> Any:
    return getattr(config if opt.section is None else getattr(config, opt.section), opt.field.name)


def model_args(config: Any) -> dict[str, Any]:
    """The DropPos model's constructor arguments a pretrain config sets (None: the size's own value)."""
    return {o.name: value(config, o) for o in options(type(config))
            if o.spec.model_arg and value(config, o) is not None}


# ---------------------------------------------------------------------------------------------
# Sections every training stage shares


@dataclass
class DataOptions:
    """Where the samples come from and how they are decoded."""

    path: str = option("", "Dataset directory written by `droppos shard`.", DATA, name="data",
                       default_text="required", path=True)
    loader: str = option("auto", "Input pipeline: dali, pil, or auto (DALI 'mixed' on CUDA; Pillow on a CPU and "
                         "for fine-tuning, whose RandAugment DALI does not match).",
                         DATA, choices=LOADERS)
    workers: Optional[int] = option(None, "Decode threads (dali) or loader processes (pil).", DATA, low=0,
                                    default_text="the usable cores / processes per node")


@dataclass
class LaunchOptions:
    """Device, numerics, processes and nodes, and the seed."""

    device: str = option("auto", "Training device (auto: cuda when available).", LAUNCH, choices=DEVICES)
    precision: str = option("auto", "Numerics: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on a CPU).", LAUNCH,
                            choices=PRECISIONS)
    compile: Optional[bool] = option(None, "torch.compile the training step.", LAUNCH,
                                     default_text="on with CUDA, off on a CPU")
    gpus: int = option(0, "Start one process per GPU on this node (NCCL).", LAUNCH, low=0)
    nproc: int = option(1, "On a CPU: the number of gloo processes.", LAUNCH, low=1)
    nnodes: int = option(1, "Number of nodes.", LAUNCH, low=1)
    node_rank: int = option(0, "This node's rank (0 hosts the rendezvous).", LAUNCH, low=0)
    rdzv_endpoint: str = option("", "HOST:PORT of the rendezvous, the same on every node.", LAUNCH,
                                default_text="none (one node)")
    seed: int = option(0, "Seed of the initialisation, the data order and every random draw.", LAUNCH, resume="run",
                       low=0, high=SEED_MAX)


@dataclass
class OutputOptions:
    """The run directory and its checkpoints."""

    out: str = option("", "Run directory: created, or resumed when it holds a checkpoint.", OUTPUT,
                      default_text="required", path=True)
    ckpt_every: int = option(1000, "Checkpoint every N steps (also at every epoch end).", OUTPUT, low=1)
    ckpt_minutes: float = option(30.0, "...and at least every M minutes (with several ranks: at the first log step "
                                 "after M minutes; 0: every step).", OUTPUT, low=0)
    keep_every: int = option(0, "Also keep checkpoints/step-N.pt every N steps (0: only last.pt).", OUTPUT, low=0)
    force_resume: bool = option(False, "Resume a checkpoint written with another schedule or data "
                                "(config.json keeps the earlier record).", OUTPUT)


@dataclass
class LoggingOptions:
    """How often the loop reports (stages that evaluate add how often)."""

    log_every: int = option(20, "Log (metrics.jsonl, progress) every N steps: the one host sync.", OUTPUT, low=1)


def _epochs(default: int) -> Any:
    return option(default, "Epochs.", OPTIM, low=1, resume="run")


def _warmup_epochs(default: float) -> Any:
    return option(default, "Linear warm-up epochs (per step), then a half-cycle cosine.", OPTIM, low=0, resume="run")


def _blr(default: float) -> Any:
    return option(default, "Base lr: lr = blr x effective batch / 256.", OPTIM, low=0, resume="run")


def _min_lr(default: float) -> Any:
    return option(default, "Final lr of the cosine.", OPTIM, low=0, resume="run")


def _batch_size(default: int, help: str, low: int = 1) -> Any:
    return option(default, help, OPTIM, low=low, resume="run")


def _eval_every(help: str) -> Any:
    return option(1, help, OUTPUT, low=0)


@dataclass
class ScheduleOptions:
    """The optimizer-step schedule every training stage has (its defaults are the stage's own)."""

    max_steps: int = option(0, "Stop after this many optimizer steps; the schedule is unchanged (0: run it all).",
                            OPTIM, low=0)
    epochs: int = _epochs(1)
    warmup_epochs: float = _warmup_epochs(0)
    batch_size: int = _batch_size(1, "Batch per device.")
    blr: float = _blr(1e-3)
    lr: Optional[float] = option(None, "Absolute peak lr (overrides --blr).", OPTIM, low=0, resume="run",
                                 default_text="from --blr")
    min_lr: float = _min_lr(0.0)


def _accum() -> Any:
    return option(1, "Gradient accumulation steps.", OPTIM, low=1, resume="run")


def _preset(presets: dict[str, dict[str, Any]]) -> Any:
    return option(None, "A recipe bundle; options given with it override it.", RECIPE, choices=tuple(presets))


@dataclass
class TrainingConfig:
    """What every training stage's config holds; each stage adds its own sections (and its preset)."""

    data: DataOptions = section(DataOptions)
    launch: LaunchOptions = section(LaunchOptions)
    output: OutputOptions = section(OutputOptions)
    logging: LoggingOptions = section(LoggingOptions)
    optim: ScheduleOptions = section(ScheduleOptions)


# ---------------------------------------------------------------------------------------------
# Pre-training


@dataclass
class PretrainModel:
    """The encoder and its position decoder: what fixes the parameters' shapes."""

    arch: str = option("vit_base_patch16", "Encoder size.", MODEL, choices=tuple(MODELS), resume="arch", name="model")
    img_size: int = option(224, "Input resolution (pixels, square).", MODEL, low=8, resume="arch")
    patch_size: Optional[int] = option(None, "Patch size.", MODEL, low=1, resume="arch", model_arg=True,
                                       default_text="the model's own")
    depth: Optional[int] = option(None, "Encoder blocks (small experiments).", MODEL, low=1, resume="arch",
                                  model_arg=True, default_text="the model's own")
    embed_dim: Optional[int] = option(None, "Encoder width (small experiments).", MODEL, low=8, resume="arch",
                                      model_arg=True, default_text="the model's own")
    num_heads: Optional[int] = option(None, "Encoder attention heads (small experiments).", MODEL, low=1,
                                      resume="arch", model_arg=True, default_text="the model's own")
    decoder_depth: int = option(2, "Position decoder blocks.", MODEL, low=1, resume="arch", model_arg=True)
    decoder_width: int = option(512, "Position decoder width.", MODEL, low=8, resume="arch", model_arg=True)
    decoder_heads: int = option(16, "Position decoder attention heads.", MODEL, low=1, resume="arch",
                                model_arg=True)

    @property
    def patch(self) -> int:
        """The patch size in use: the option, or the size's own."""
        return self.patch_size or MODELS[self.arch][3]


@dataclass
class Pretext:
    """DropPos's pretext task: what is masked, what the model must recover, how the loss is weighted."""

    mask_ratio: float = option(0.75, "Patch-mask ratio gamma: the share of patches removed.", PRETEXT, low=0,
                               high=1, high_open=True, resume="run", model_arg=True)
    pos_mask_ratio: float = option(0.75, "Position-drop ratio gamma_pos: the share of visible patches whose PE "
                                   "is dropped.", PRETEXT, low=0, high=1, resume="run", model_arg=True)
    mask_token: str = option("learnable", "What replaces a dropped PE: a learnable token, zeros, the dropped "
                             "patches' own PEs shuffled (wrong, as published) or a random other cell's PE.",
                             PRETEXT, choices=MASK_TOKENS, resume="arch", model_arg=True)
    sigma: float = option(1.0, "Initial position-smoothing sigma (patches).", PRETEXT, low=0, resume="run")
    sigma_decay: bool = option(True, "Decay sigma linearly to 0 over training (per step).", PRETEXT, resume="run")
    attentive: bool = option(True, "Attentive reconstruction: weight each patch's loss by its saliency.", PRETEXT,
                             resume="run", model_arg=True)
    tau: float = option(0.1, "Attentive temperature.", PRETEXT, low=0, low_open=True, resume="run", model_arg=True)
    aux_mae: bool = option(False, "Add the auxiliary MAE pixel loss.", PRETEXT, resume="arch", model_arg=True)
    pos_weight: float = option(1.0, "Weight of the position loss with --aux-mae.", PRETEXT, low=0, resume="run",
                               model_arg=True)


@dataclass
class PretrainOptim(ScheduleOptions):
    """docs/METHOD.md's pre-training optimisation: AdamW, warm-up + cosine, clipping."""

    epochs: int = _epochs(800)
    warmup_epochs: float = _warmup_epochs(10)
    batch_size: int = _batch_size(64, "Batch per device.")
    accum: int = _accum()
    blr: float = _blr(1.5e-4)
    min_lr: float = _min_lr(0.0)
    weight_decay: float = option(0.05, "AdamW weight decay (none on biases and norms).", OPTIM, low=0, resume="run")
    decay_tokens: bool = option(True, "Weight decay on the [CLS] and [MASK] tokens too, as the published code "
                                "(its rule skips only 1-D parameters and biases).", OPTIM, resume="run")
    clip_grad: float = option(5.0, "Gradient-norm clip (0: off).", OPTIM, low=0, resume="run")
    clip_mode: str = option("per-param", "per-param: each parameter tensor's gradient to norm --clip-grad (the "
                            "published code); global: the norm of all gradients together.", OPTIM,
                            choices=CLIP_MODES, resume="run")


@dataclass
class PretrainLogging(LoggingOptions):
    eval_every: int = _eval_every("Held-out position accuracy (val split) every N epochs (0: only at the end).")


PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # docs/METHOD.md "Published recipe": ViT-B/16, batch 64 per GPU, blr 1.5e-4, warm-up 10.
    "vit_b16_800ep": dict(model="vit_base_patch16", epochs=800, warmup_epochs=10, batch_size=64),
    "vit_b16_200ep": dict(model="vit_base_patch16", epochs=200, warmup_epochs=10, batch_size=64),
    # ViT-L/16: batch 128 per GPU, warm-up 40 epochs.
    "vit_l16_800ep": dict(model="vit_large_patch16", epochs=800, warmup_epochs=40, batch_size=128),
    # A small model on the built-in sample data that visibly learns positions in a few
    # minutes on a 2-core CPU: 48 px images, 8 px patches (a 6x6 grid), 4 blocks of ViT-Ti
    # width, half the patches visible (more context per image than the paper's quarter:
    # faster to learn), the Pillow-SIMD loader (the faster backend on a CPU).
    "cpu-demo": dict(
        model="vit_tiny_patch16", img_size=48, patch_size=8, depth=4, mask_ratio=0.5, decoder_width=192,
        decoder_depth=1, epochs=8, warmup_epochs=1, batch_size=64, blr=3e-3, device="cpu", loader="pil",
        compile=False, log_every=10, ckpt_every=200, clip_mode="global", decay_tokens=False,
    ),
}


@dataclass
class PretrainConfig(TrainingConfig):
    """`droppos pretrain`; defaults = docs/METHOD.md's ViT-B/16 800-epoch recipe."""

    preset: Optional[str] = _preset(PRETRAIN_PRESETS)
    model: PretrainModel = section(PretrainModel)
    pretext: Pretext = section(Pretext)
    optim: PretrainOptim = section(PretrainOptim)
    logging: PretrainLogging = section(PretrainLogging)


# ---------------------------------------------------------------------------------------------
# Fine-tuning and linear probing: where the encoder comes from


@dataclass
class EncoderOptions:
    """Where the encoder of finetune/probe comes from (exactly one of encoder, run, timm_model) and its input."""

    encoder: Optional[str] = option(None, "An exported encoder (RUN/encoder.safetensors).", ENCODER, resume="arch",
                                    path=True)
    run: Optional[str] = option(None, "A `droppos pretrain` run directory (its encoder.safetensors).", ENCODER,
                                resume="arch", path=True)
    timm_model: Optional[str] = option(None, "A timm ViT by name: randomly initialised, or with --pretrained or "
                                       "--weights.", ENCODER, resume="arch")
    pretrained: bool = option(False, "With --timm-model: timm's pretrained weights from the Hugging Face cache "
                              "(HF_HUB_OFFLINE is honoured; nothing is downloaded in offline mode).", ENCODER,
                              resume="arch")
    weights: Optional[str] = option(None, "A local checkpoint: timm (.safetensors/.pth), MAE/DeiT {'model'}, MoCo v3, "
                                    "DINO (teacher), or a droppos export or checkpoint; add --timm-model NAME for "
                                    "foreign layouts.", ENCODER, resume="arch", path=True)
    random_init: bool = option(False, "Keep --encoder/--run's architecture, not its weights (a baseline).",
                               ENCODER, resume="arch")
    depth: Optional[int] = option(None, "With --timm-model: override the depth (small experiments).", ENCODER,
                                  low=1, resume="arch", default_text="the model's own")
    img_size: Optional[int] = option(None, "Input resolution; another size resamples the position embedding.",
                                     ENCODER, low=8, resume="arch", default_text="the encoder's own")


FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # docs/METHOD.md: 100 epochs for ViT-B, warm-up 5, effective batch 1024 (8 x 128).
    "vit_b16": dict(epochs=100, warmup_epochs=5, batch_size=128, drop_path=0.1),
    # docs/METHOD.md: 50 epochs for ViT-L; drop path 0.1 as in the published DropPos ViT-L fine-tuning script
    # (MAE's own ViT-L command uses 0.2).
    "vit_l16": dict(epochs=50, warmup_epochs=5, batch_size=128, drop_path=0.1),
    # The sample data on a 2-core CPU: the encoder's own (small) resolution, a few epochs.
    "cpu-demo": dict(epochs=5, warmup_epochs=1, batch_size=32, blr=2e-3, device="cpu", compile=False,
                     log_every=10, ckpt_every=100),
}


@dataclass
class FinetuneEncoder(EncoderOptions):
    pool: str = option("avg", "Feature: avg (patch tokens, fc_norm) or token ([CLS]).", MODEL, choices=POOLS,
                       resume="arch")


@dataclass
class FinetuneAugment:
    """Regularisation on the device (RandAugment is the input pipeline's), and the weights' EMA."""

    drop_path: float = option(0.1, "Stochastic depth rate.", AUGMENT, low=0, high=1, high_open=True, resume="run")
    mixup: float = option(0.8, "Mixup alpha (0: off).", AUGMENT, low=0, resume="run")
    cutmix: float = option(1.0, "CutMix alpha (0: off).", AUGMENT, low=0, resume="run")
    smoothing: float = option(0.1, "Label smoothing.", AUGMENT, low=0, high=1, high_open=True, resume="run")
    reprob: float = option(0.25, "Random-erasing probability (RandAugment rand-m9-mstd0.5-inc1 is in the "
                           "input pipeline).", AUGMENT, low=0, high=1, resume="run")
    ema: bool = option(False, "Keep and evaluate an EMA of the weights.", AUGMENT, resume="arch")
    ema_decay: float = option(0.9999, "EMA decay.", AUGMENT, low=0, high=1, low_open=True, high_open=True,
                              resume="run")


@dataclass
class FinetuneOptim(ScheduleOptions):
    """The MAE fine-tuning optimisation: AdamW with layer-wise lr decay."""

    epochs: int = _epochs(100)
    warmup_epochs: float = _warmup_epochs(5)
    batch_size: int = _batch_size(128, "Batch per device (8 GPUs x 128 = the recipe's 1024).")
    accum: int = _accum()
    blr: float = _blr(1e-3)
    min_lr: float = _min_lr(1e-6)
    weight_decay: float = option(0.05, "AdamW weight decay.", OPTIM, low=0, resume="run")
    layer_decay: float = option(0.75, "Layer-wise lr decay.", OPTIM, low=0, high=1, low_open=True, resume="run")
    clip_grad: float = option(0.0, "Gradient-norm clip (0: off, as in MAE's fine-tuning).", OPTIM, low=0,
                              resume="run")


@dataclass
class FinetuneConfig(TrainingConfig):
    """`droppos finetune`; defaults = docs/METHOD.md's fine-tuning recipe (MAE protocol, ViT-B)."""

    preset: Optional[str] = _preset(FINETUNE_PRESETS)
    encoder: FinetuneEncoder = section(FinetuneEncoder)
    augment: FinetuneAugment = section(FinetuneAugment)
    optim: FinetuneOptim = section(FinetuneOptim)


PROBE_PRESETS: dict[str, dict[str, Any]] = {
    # MAE's linear probe: 90 epochs, warm-up 10, batch 16384 (8 x 2048), LARS, blr 0.1.
    "mae": dict(epochs=90, warmup_epochs=10, batch_size=2048, blr=0.1),
    # The sample data on a CPU: cached features, a batch the 2,600 images can fill many times. The mean
    # of the patch tokens, not [CLS]: DropPos puts no loss on [CLS], and its probe margin over a random
    # init does not hold across seeds (README, "The demo's figures").
    "cpu-demo": dict(cached=True, epochs=90, warmup_epochs=10, batch_size=256, blr=0.1, device="cpu",
                     compile=False, log_every=100, pool="avg"),
    # Linear segmentation (the BN + 1x1-conv head of DINOv2/iBOT) with the MMSegmentation schedule these
    # evaluations use: AdamW lr 1e-3 at batch 16 (8 x 2), weight decay 1e-4, 40k iterations = 32 epochs of
    # ADE20K's 20,210 images, 1,500 of warm-up; cosine here where they decay polynomially.
    "seg-linear": dict(task="segmentation", optimizer="adamw", batch_size=2, blr=0.016, weight_decay=1e-4, epochs=32,
                       warmup_epochs=1.2),
    # The sample data's label maps on a CPU: cached patch-token maps, a few epochs of AdamW (LARS's trust
    # ratio moves a 1x1-conv head too slowly for the rare object classes), one evaluation at the end.
    "cpu-demo-seg": dict(task="segmentation", cached=True, optimizer="adamw", epochs=8, warmup_epochs=1,
                         batch_size=256, blr=0.01, weight_decay=1e-4, device="cpu", compile=False, log_every=10,
                         eval_every=0),
}


@dataclass
class ProbeEncoder(EncoderOptions):
    pool: str = option("token", "Feature: token ([CLS]) or avg (mean of the patch tokens).", MODEL, choices=POOLS,
                       resume="arch")


@dataclass
class ProbeHead:
    """What the frozen encoder's features feed: a linear classifier or a segmentation head, and how it is fed."""

    cached: bool = option(False, "Extract the frozen features once (eval transforms), then train the head on "
                          "them.", MODEL, resume="arch")
    task: str = option("classification", "classification: a linear head on the [CLS] or pooled feature (top-1/top-5); "
                       "segmentation: BatchNorm + 1x1 conv on the patch tokens, upsampled to the label maps of a "
                       "segmentation dataset (mIoU, pixel accuracy, predictions.png).", MODEL, choices=PROBE_TASKS,
                       resume="arch")
    seg_layers: int = option(1, "Segmentation: the patch tokens of the last N blocks, concatenated, each through the "
                             "final norm (1: the last block; 4: DINOv2's multi-layer linear).", MODEL, low=1,
                             resume="arch")
    seg_previews: int = option(8, "Segmentation: val images drawn with their labels and predictions in "
                               "OUT/predictions.png (0: none).", OUTPUT, low=0)


@dataclass
class ProbeOptim(ScheduleOptions):
    """MAE's linear-probe optimisation (LARS), or AdamW for a segmentation head."""

    epochs: int = _epochs(90)
    warmup_epochs: float = _warmup_epochs(10)
    batch_size: int = _batch_size(2048, "Batch per device (8 GPUs x 2048 = the recipe's 16384).", low=2)
    blr: float = _blr(0.1)
    min_lr: float = _min_lr(0.0)
    weight_decay: float = option(0.0, "Weight decay (LARS: on weight matrices only; AdamW: on every weight, not "
                                 "on biases and norms).", OPTIM, low=0, resume="run")
    optimizer: str = option("lars", "The head's optimizer: lars (MAE's linear probe) or adamw (DINOv2's linear "
                            "segmentation head; --preset seg-linear).", OPTIM, choices=PROBE_OPTIMIZERS, resume="run")


@dataclass
class ProbeLogging(LoggingOptions):
    eval_every: int = _eval_every("Evaluate on val every N epochs (0: only at the end).")


@dataclass
class ProbeConfig(TrainingConfig):
    """`droppos probe`; defaults = MAE's linear probe (docs/METHOD.md)."""

    preset: Optional[str] = _preset(PROBE_PRESETS)
    encoder: ProbeEncoder = section(ProbeEncoder)
    head: ProbeHead = section(ProbeHead)
    optim: ProbeOptim = section(ProbeOptim)
    logging: ProbeLogging = section(ProbeLogging)


@dataclass
class ShardConfig:
    """`droppos shard`: an ImageNet-style folder or list files -> validated WebDataset shards."""

    source: Optional[str] = option(None, "ImageNet-style folder (train/<class>/*, val/<class>/*) or the root of the "
                                   "--list paths.", DATA, positional=True, path=True)
    out: Optional[str] = option(None, "Output dataset directory (created; a re-run finishes an interrupted one).",
                                OUTPUT, positional=True, path=True)
    sample: bool = option(False, "Shard the built-in procedural sample data set (then the only argument is OUT).",
                          DATA, flag="--sample")
    lists: tuple[str, ...] = option((), "A list file of `relative/path class_index` lines: FILE is the train split, "
                                    "SPLIT=FILE names another (repeatable).", DATA, flag="--list", path=True,
                                    metavar="[SPLIT=]FILE")
    follow_links: bool = option(False, "Read files and class folders that symlinks inside SOURCE point to outside "
                                "it (subsets such as ImageNet-100 are made so); without it each is skipped and "
                                "counted. Regular files only; recorded paths stay relative to SOURCE.", DATA,
                                flag="--follow-links")
    verify: bool = option(False, "Re-check the shards of the dataset given as the only argument.", VERIFY,
                          flag="--verify")
    decode: bool = option(False, "With --verify: also decode every image.", VERIFY, flag="--decode")
    seed: int = option(0, "Seed of the global shuffle (the same seed and input give byte-identical shards).", OUTPUT,
                       low=0, high=SEED_MAX)
    workers: int = option(0, "Worker processes (0: all cores).", LAUNCH, low=0)
    max_side: int = option(0, "Downscale images whose longer side exceeds PX pixels (0: keep the size).", IMAGES,
                           low=0)
    quality: int = option(90, "JPEG quality when an image has to be re-encoded.", IMAGES, low=1, high=100)
    shard_size: Optional[int] = option(None, "Input images per tar shard.", OUTPUT, low=1,
                                       default_text="1000; 200 with --sample, so that ranks x workers get many shards")
    sample_classes: int = option(10, "--sample: number of classes.", SAMPLE, low=2)
    sample_train: int = option(260, "--sample: train images per class.", SAMPLE, low=0)
    sample_val: int = option(50, "--sample: val images per class.", SAMPLE, low=0)
    layout: str = option("auto", "What SOURCE holds: imagenet (class folders), ade20k (images/ + annotations/ "
                         "{training,validation}), masks (masks/{split}/... beside the images, with classes.txt), or "
                         "auto (recognised from the folders).", DATA, choices=SHARD_LAYOUTS)
    ignore_index: Optional[int] = option(None, "Segmentation: the stored label value that means unlabelled.", DATA,
                                         low=0, high=65535, default_text="255")
    reduce_zero_label: Optional[bool] = option(None, "Segmentation: stored 0 means unlabelled and stored v is class "
                                               "v-1 (MMSegmentation's reduce_zero_label).", DATA,
                                               default_text="on for ade20k, off for masks")


def parse_ratio(text: Any) -> tuple[float, float]:
    """'0.75:0.75' -> (0.75, 0.75) (gamma : gamma_pos); a (gamma, gamma_pos) pair passes through (Python callers)."""
    try:
        parts = text.replace(",", ":").split(":") if isinstance(text, str) else list(text)
        g, gp = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise UserError(f"--ratio {text!r}: expected GAMMA:GAMMA_POS, e.g. 0.75:0.75") from None
    return g, gp


@dataclass
class EvalPosConfig:
    """`droppos eval-pos`: how location-aware a ViT is (docs/METHOD.md, "Location-awareness diagnostics")."""

    sources: tuple[str, ...] = option((), "Pretrain run directory or checkpoint (it has the position head), finetune "
                                      "run, or encoder .safetensors. Several only with --compare.", MODELS_PANEL,
                                      positional=True, metavar="[SOURCE]...", path=True)
    timm_models: tuple[str, ...] = option((), "A timm ViT by name (repeatable): random init, seeded by --seed, "
                                          "unless --pretrained or --weights.", MODELS_PANEL, flag="--timm-model")
    pretrained: bool = option(False, "With --timm-model: timm's pretrained weights from the Hugging Face cache "
                              "(HF_HUB_OFFLINE is honoured).", MODELS_PANEL)
    weights: Optional[str] = option(None, "A local checkpoint for the one --timm-model (or a droppos export alone): "
                                    "timm, MAE/DeiT, MoCo v3, DINO layouts.", MODELS_PANEL, path=True)
    compare: bool = option(False, "Evaluate every model given side by side in one report.", MODELS_PANEL,
                           flag="--compare")
    random_baseline: bool = option(False, "Add the first model's architecture with fresh random weights, initialised "
                                   "as its training started (see the report).", MODELS_PANEL, flag="--random-baseline")
    labels: tuple[str, ...] = option((), "A model's name in the report (repeatable), in the order the models are given: "
                                     "SOURCEs, --timm-model names, the random baseline.", MODELS_PANEL, flag="--label",
                                     default_text="folder or file names")
    img_size: Optional[int] = option(None, "Input size for encoders and timm models.", MODELS_PANEL, low=16,
                                     default_text="the model's own")
    data: Optional[str] = option(None, "Dataset directory written by `droppos shard`.", DATA, path=True)
    split: str = option("val", "Split of --data to evaluate on.", DATA)
    images: Optional[str] = option(None, "Instead of --data: a folder of images in any format Pillow reads "
                                   "(recursive).", DATA, path=True)
    max_images: int = option(0, "Evaluate at most N images (0: all).", DATA, low=0)
    batch_size: int = option(64, "Images per batch.", DATA, low=1)
    loader: str = option("auto", "Input pipeline for --data.", DATA, choices=LOADERS)
    workers: Optional[int] = option(None, "Decode threads (dali) or loader processes (pil).", DATA, low=0,
                                    default_text="per backend")
    ratios: tuple[str, ...] = option(("0.75:0.75", "0.5:0.75", "0:0.75", "0:1"), "GAMMA:GAMMA_POS of a position-"
                                     "accuracy measurement (repeatable).", DIAGNOSTICS, flag="--ratio",
                                     metavar="GAMMA:GAMMA_POS", default_text="0.75:0.75 0.5:0.75 0:0.75 0:1")
    permutations: int = option(5, "Token permutations for the order sensitivity.", DIAGNOSTICS, low=1)
    probe_drop: float = option(0.75, "Position probe: the fraction of patch PEs dropped.", DIAGNOSTICS, low=0,
                               low_open=True, high=1)
    probe_fill: str = option("mean", "Position probe: what replaces a dropped PE (mask-token: DropPos runs and "
                             "checkpoints).", DIAGNOSTICS, choices=tuple(PROBE_FILLS))
    probe_images: int = option(1000, "Position probe: images used, half to fit, half to test (0: all).", DIAGNOSTICS,
                               low=0)
    probe_steps: int = option(100, "Position probe: L-BFGS iterations.", DIAGNOSTICS, low=1)
    seed: int = option(0, "Seed of masks, permutations, the probe and random models (same seed: same numbers).",
                       LAUNCH, low=0, high=SEED_MAX)
    device: str = option("auto", "Device (auto: cuda when available).", LAUNCH, choices=DEVICES)
    out: str = option("", "Report folder: report.json, report.html, PNG figures.", OUTPUT, default_text="required",
                      path=True)

    @property
    def ratio_pairs(self) -> list[tuple[float, float]]:
        return [parse_ratio(text) for text in self.ratios]


@dataclass
class ExportConfig:
    """`droppos export`: an encoder in the layout another library loads."""

    source: str = option("", "A pretrain run directory, its checkpoint (.pt) or an encoder .safetensors.", DATA,
                         positional=True, default_text="required", path=True)
    format: str = option("timm", "timm: a local-dir/Hub folder; detectron2: a ViTDet .pth; mmseg: an MMSegmentation "
                         "MAE-backbone .pth.", OUTPUT, choices=EXPORT_FORMATS)
    out: str = option("", "Where to write: a folder for timm, a .pth (or a folder) for the others.", OUTPUT,
                      default_text="required", path=True)


PRESETS: dict[type, dict[str, dict[str, Any]]] = {
    PretrainConfig: PRETRAIN_PRESETS, FinetuneConfig: FINETUNE_PRESETS, ProbeConfig: PROBE_PRESETS,
}
STAGES: dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "probe": ProbeConfig}


# ---------------------------------------------------------------------------------------------
# Building, checking and recording a config


def make_config(cls: type, overrides: dict[str, Any], presets: Optional[dict[str, dict[str, Any]]] = None) -> Any:
    """Defaults, then the preset named in `overrides['preset']`, then the given options; checked.

    `overrides` holds what the user typed, by flat option name (None values are dropped: not given).
    """
    presets = PRESETS.get(cls, {}) if presets is None else presets
    given = {k: v for k, v in overrides.items() if v is not None}
    values: dict[str, Any] = {}
    preset = given.get("preset")
    if preset is not None:
        if preset not in presets:
            raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(presets)}")
        values.update(presets[preset])
    values.update(given)
    unknown = set(values) - {o.name for o in options(cls)}
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(sorted(unknown))}")
    config = build(cls, values)
    check(config)
    return config


def build(cls: type, values: dict[str, Any]) -> Any:
    """`cls` from flat option values (the others at their defaults); unknown names are ignored."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in sections(cls)}
    for opt in options(cls):
        if opt.name in values:
            (top if opt.section is None else nested[opt.section])[opt.field.name] = values[opt.name]
    return cls(**top, **{name: sections(cls)[name](**fields) for name, fields in nested.items()})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_name(opt: Option) -> str:
    """How a message names an option: its flag as typed, or its argument's name."""
    return opt.spec.flag or (opt.name.upper() if opt.spec.positional else flag_name(opt.name))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1e6 else f"{value:g}"


def bounds_text(spec: Spec) -> str:
    """'x >= 1', '0 <= x < 1', ... (empty without bounds)."""
    low = "" if spec.low is None else f"{_number(spec.low)} {'<' if spec.low_open else '<='} "
    high = "" if spec.high is None else f" {'<' if spec.high_open else '<='} {_number(spec.high)}"
    if not low and not high:
        return ""
    if low and not high:
        return f"x {'>' if spec.low_open else '>='} {_number(spec.low)}"
    return f"{low}x{high}"


# What an integer option may hold when its declaration names no upper bound: what every consumer of it (tensor
# shapes and indices, numpy, DataLoader counts) can hold. Seeds have their own bound (SEED_MAX).
INT_MAX = 2**31 - 1


def check(config: Any) -> None:
    """Every option's type, choices and bounds, from the declarations (one line per mistake). Floats must be
    finite (NaN passes every comparison) and integers within their bounds, or within +-INT_MAX."""
    for opt in options(type(config)):
        spec, found, flag = opt.spec, value(config, opt), shown_name(opt)
        if found is None:
            if opt.field.default is not None:
                raise UserError(f"{flag} must be given a value")
            continue
        base = _base_type(opt.annotation)
        if base is bool and not isinstance(found, bool):
            raise UserError(f"{flag} must be true or false, got {found!r}")
        if base in (int, float) and (isinstance(found, bool) or not isinstance(found, (int, float))
                                     or (base is int and not isinstance(found, int))):
            raise UserError(f"{flag} must be a number ({base.__name__}), got {found!r}")
        if base is float and not math.isfinite(found):
            raise UserError(f"{flag} {found!r}: must be a finite number")
        if base is int and spec.high is None and abs(found) > INT_MAX:
            raise UserError(f"{flag} {found}: out of range (at most {INT_MAX})")
        if spec.path:
            for each in (found if isinstance(found, tuple) else (found,)):
                _check_path(flag, each)
        if spec.choices is not None and found not in spec.choices:
            raise UserError(f"{flag} {found!r}: choose one of {', '.join(spec.choices)}")
        if spec.low is not None or spec.high is not None:
            too_low = spec.low is not None and (found <= spec.low if spec.low_open else found < spec.low)
            too_high = spec.high is not None and (found >= spec.high if spec.high_open else found > spec.high)
            if too_low or too_high:
                raise UserError(f"{flag} {_number(found)} is out of range: need {bounds_text(spec)}")


def _check_path(flag: str, text: Any) -> None:
    """A path option holds no NUL and no name the file system cannot take (else every use is an OSError)."""
    from droppos.files import name_too_long

    if not isinstance(text, str):
        raise UserError(f"{flag} must be a path, got {text!r}")
    if "\0" in text:
        raise UserError(f"{flag}: a path cannot hold a NUL byte")
    too_long = name_too_long(text)
    if too_long is not None:
        raise UserError(f"{flag} {text[:48]!r}...: {too_long}; no such path can exist")


def _base_type(annotation: Any) -> Any:
    """int for Optional[int], etc."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def to_record(config: Any) -> dict[str, Any]:
    """The config as plain JSON values by flat option name, grouped by section: what --print-config prints and
    config.json and checkpoints hold."""
    record: dict[str, Any] = {}
    for opt in options(type(config)):
        found = value(config, opt)
        found = list(found) if isinstance(found, tuple) else found
        if opt.section is None:
            record[opt.name] = found
        else:
            record.setdefault(opt.section, {})[opt.name] = found
    return record


def option_values(record: Any) -> dict[str, Any]:
    """Flat option name -> value of a config, of its record, or of a record written before sections existed
    (flat: `{"data": "path", "model": "vit_base_patch16", ...}`): a section is a dict, an option never is."""
    if dataclasses.is_dataclass(record):
        return {opt.name: value(record, opt) for opt in options(type(record))}
    flat: dict[str, Any] = {}
    for key, found in (record or {}).items():
        if isinstance(found, dict):
            flat.update(found)
        else:
            flat[key] = found
    return flat


def from_record(cls: type, record: dict[str, Any]) -> Any:
    """A config from a recorded one (config.json, a checkpoint; sectioned or flat), ignoring names this version
    does not know; lists become the tuples the declarations hold. Not checked: callers bound what they use."""
    values = option_values(record)
    tuples = {o.name for o in options(cls) if typing.get_origin(_base_type(o.annotation)) is tuple}
    return build(cls, {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()})


def _check_unique_names() -> None:
    for cls in (*STAGES.values(), ShardConfig, EvalPosConfig, ExportConfig):
        names = [o.name for o in options(cls)]
        assert len(names) == len(set(names)), f"{cls.__name__} declares an option name twice"


_check_unique_names()
