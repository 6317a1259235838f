"""The `droppos` command line: one Typer app, one command per stage.

This file only parses options, turns user mistakes into one-line errors (exit 2)
and calls the stage's `run(...)`. Stages are imported lazily so that `--help`
and option errors answer instantly, without importing torch or DALI.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional

import typer
from typer._click import exceptions as click_exceptions  # typer vendors its own click

from droppos import UserError
from droppos.recipes import FinetuneConfig, PretrainConfig, ProbeConfig

app = typer.Typer(
    name="droppos",
    help="Pre-train Vision Transformers with DropPos, evaluate them, and measure how "
    "location-aware they are.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_NOT_BUILT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _not_built(command: str, issue: int) -> None:
    raise UserError(f"`droppos {command}` is not built yet (tracked in issue #{issue}); nothing was run")


@app.command()
def shard(
    source: Optional[Path] = typer.Argument(
        None, help="ImageNet-style folder (train/<class>/*, val/<class>/*) or the root of --list paths."
    ),
    out: Optional[Path] = typer.Argument(None, help="Output dataset directory."),
    sample: bool = typer.Option(
        False, "--sample", help="Shard the built-in procedural sample data set (then the only argument is OUT)."
    ),
    list_files: List[str] = typer.Option(
        [], "--list", help="List file of `relative/path class_index` lines; `FILE` is the train split, "
        "`SPLIT=FILE` names another (repeatable).",
    ),
    verify: bool = typer.Option(False, "--verify", help="Re-check the shards of the dataset given as the only argument."),
    decode: bool = typer.Option(False, "--decode", help="With --verify: also decode every image."),
    seed: int = typer.Option(0, help="Seed of the global shuffle (same seed + input = byte-identical shards)."),
    workers: int = typer.Option(0, min=0, help="Worker processes (0: all cores)."),
    max_side: int = typer.Option(0, min=0, help="Downscale images whose longer side exceeds PX (0: keep size)."),
    quality: int = typer.Option(90, min=1, max=100, help="JPEG quality when an image has to be re-encoded."),
    shard_size: Optional[int] = typer.Option(
        None, min=1, help="Input images per tar shard (default: 1000; 200 with --sample, so that ranks x workers get many shards)."
    ),
    sample_classes: int = typer.Option(10, min=2, help="--sample: number of classes."),
    sample_train: int = typer.Option(260, min=0, help="--sample: train images per class."),
    sample_val: int = typer.Option(50, min=0, help="--sample: val images per class."),
) -> None:
    """Write validated WebDataset shards (+ DALI indexes, manifest.json) from ImageNet-style data."""
    from tools import shard_imagenet

    positional = [p for p in (source, out) if p is not None]
    if verify:
        if len(positional) != 1:
            raise UserError("--verify takes exactly one argument: the dataset directory")
        shard_imagenet.verify(positional[0], decode=decode)
        return
    if decode:
        raise UserError("--decode only applies with --verify")
    if sample:
        if len(positional) != 1:
            raise UserError("--sample takes exactly one argument: the output directory")
        if list_files:
            raise UserError("--sample and --list cannot be combined")
    elif len(positional) != 2:
        raise UserError("expected SOURCE and OUT (or --sample OUT, or --verify DIR)")
    shard_imagenet.run(
        source=None if sample else positional[0],
        out=positional[-1],
        sample=sample,
        lists=_parse_lists(list_files),
        seed=seed,
        workers=workers or (os.cpu_count() or 1),
        max_side=max_side,
        quality=quality,
        shard_size=shard_size or (200 if sample else 1000),
        sample_options=dict(num_classes=sample_classes, train_per_class=sample_train, val_per_class=sample_val),
    )


def _parse_lists(values: List[str]) -> dict:
    """`FILE` -> {'train': FILE}; `val=FILE` -> {'val': FILE}."""
    lists: dict = {}
    for value in values:
        split, sep, path = value.partition("=")
        if not sep:
            split, path = "train", value
        if not split.isidentifier() or not path:
            raise UserError(f"--list {value!r}: expected FILE or SPLIT=FILE")
        if split in lists:
            raise UserError(f"--list given twice for split {split!r}")
        lists[split] = Path(path)
    return lists


def _default(config_cls: type, name: str) -> str:
    """`(default: X)` from the recipe dataclass, so help and behaviour cannot drift apart."""
    import dataclasses

    value = {f.name: f.default for f in dataclasses.fields(config_cls)}[name]
    return f"(default: {value})"


def _with_default(config_cls: type) -> Callable[[str, str], str]:
    return lambda text, name: f"{text} {_default(config_cls, name)}"


def _option(name: str, annotation: Any, *decls: str, **kwargs: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(None, *decls, **kwargs))


def _source_options() -> list[inspect.Parameter]:
    """Where the encoder of finetune/probe comes from."""
    return [
        _option("encoder", Optional[Path], help="An exported encoder (RUN/encoder.safetensors)."),
        _option("run", Optional[Path], help="A `droppos pretrain` run directory (its encoder.safetensors)."),
        _option("timm_model", Optional[str], help="A timm ViT name, randomly initialised (no download)."),
        _option("random_init", Optional[bool], "--random-init/--no-random-init",
                help="Use --encoder/--run's architecture without its weights (a baseline)."),
        _option("depth", Optional[int], min=1, help="With --timm-model: override the depth (small experiments)."),
    ]


def _launch_options(config_cls: type) -> list[inspect.Parameter]:
    """Input pipeline, devices, processes, seed, checkpoints and logging: the same for every training stage."""
    d = _with_default(config_cls)
    return [
        _option("loader", Optional[str], help=d("Input pipeline: auto, dali or pil.", "loader")),
        _option("workers", Optional[int], min=0, help="Decode threads / loader workers (default: per backend)."),
        _option("compile", Optional[bool], "--compile/--no-compile", help="torch.compile (default: on with CUDA, off on CPU)."),
        _option("precision", Optional[str], help=d("auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.", "precision")),
        _option("device", Optional[str], help=d("auto, cuda or cpu.", "device")),
        _option("gpus", Optional[int], min=0, help="Start one process per GPU on this node (NCCL)."),
        _option("nproc", Optional[int], min=1, help="CPU: number of gloo processes."),
        _option("nnodes", Optional[int], min=1, help="Number of nodes."),
        _option("node_rank", Optional[int], min=0, help="This node's rank (0 hosts the rendezvous)."),
        _option("rdzv_endpoint", Optional[str], help="HOST:PORT of the rendezvous, for several nodes."),
        _option("seed", Optional[int], help=d("Seed.", "seed")),
        _option("max_steps", Optional[int], min=0, help="Stop after this many optimizer steps (schedule unchanged)."),
        _option("ckpt_every", Optional[int], min=1, help=d("Checkpoint every N steps.", "ckpt_every")),
        _option("ckpt_minutes", Optional[float], min=0, help=d("...and every M minutes.", "ckpt_minutes")),
        _option("log_every", Optional[int], min=1, help=d("Log every N steps.", "log_every")),
    ]


def _with_options(*groups: list[inspect.Parameter]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Append option groups to a command that takes them as `**shared`.

    Typer has no option groups; it reads a command's options from its signature, so the shared ones
    are spliced into that signature instead of being declared again in every stage's command.
    """
    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [p for group in groups for p in group]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            command(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + extra)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        return wrapper

    return decorate


def _options(values: dict[str, Any]) -> dict[str, Any]:
    """A command's options for `make_config`: the shared ones flattened in, paths as strings."""
    flat = {k: v for k, v in values.items() if k != "shared"}
    flat.update(values.get("shared", {}))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in flat.items()}


_pd = _with_default(PretrainConfig)


@app.command()
@_with_options(_launch_options(PretrainConfig))
def pretrain(
    data: Optional[Path] = typer.Option(None, help="Dataset directory written by `droppos shard`."),
    out: Optional[Path] = typer.Option(None, help="Run directory (created; resumed when it holds a checkpoint)."),
    preset: Optional[str] = typer.Option(None, help="Recipe bundle: vit_b16_800ep, vit_b16_200ep, vit_l16_800ep, cpu-demo."),
    model: Optional[str] = typer.Option(None, help=_pd("Encoder: vit_{tiny,small,base,large}_patch16, vit_base_patch32, vit_huge_patch14.", "model")),
    img_size: Optional[int] = typer.Option(None, min=8, help=_pd("Input resolution.", "img_size")),
    patch_size: Optional[int] = typer.Option(None, min=1, help="Override the model's patch size."),
    depth: Optional[int] = typer.Option(None, min=1, help="Override the encoder depth (small experiments)."),
    epochs: Optional[int] = typer.Option(None, min=1, help=_pd("Epochs.", "epochs")),
    warmup_epochs: Optional[float] = typer.Option(None, min=0, help=_pd("Linear warm-up epochs.", "warmup_epochs")),
    batch_size: Optional[int] = typer.Option(None, min=1, help=_pd("Batch per device.", "batch_size")),
    accum: Optional[int] = typer.Option(None, min=1, help=_pd("Gradient accumulation steps.", "accum")),
    blr: Optional[float] = typer.Option(None, min=0, help=_pd("Base lr: lr = blr x effective batch / 256.", "blr")),
    lr: Optional[float] = typer.Option(None, min=0, help="Absolute lr (overrides --blr)."),
    weight_decay: Optional[float] = typer.Option(None, min=0, help=_pd("AdamW weight decay (none on biases, norms, tokens).", "weight_decay")),
    clip_grad: Optional[float] = typer.Option(None, min=0, help=_pd("Gradient-norm clip (0: off).", "clip_grad")),
    mask_ratio: Optional[float] = typer.Option(None, min=0, max=0.99, help=_pd("Patch-mask ratio gamma.", "mask_ratio")),
    pos_mask_ratio: Optional[float] = typer.Option(None, min=0, max=1, help=_pd("Position-drop ratio gamma_pos.", "pos_mask_ratio")),
    sigma: Optional[float] = typer.Option(None, min=0, help=_pd("Initial position-smoothing sigma.", "sigma")),
    sigma_decay: Optional[bool] = typer.Option(None, "--sigma-decay/--no-sigma-decay", help="Decay sigma linearly to 0 (default: on)."),
    attentive: Optional[bool] = typer.Option(None, "--attentive/--no-attentive", help="Attentive reconstruction (default: on)."),
    tau: Optional[float] = typer.Option(None, min=1e-6, help=_pd("Attentive temperature.", "tau")),
    mask_token: Optional[str] = typer.Option(None, help=_pd("[MASK] position token: learnable, zeros or wrong.", "mask_token")),
    aux_mae: Optional[bool] = typer.Option(None, "--aux-mae/--no-aux-mae", help="Add the auxiliary MAE pixel loss (default: off)."),
    pos_weight: Optional[float] = typer.Option(None, min=0, help=_pd("Weight of the position loss with --aux-mae.", "pos_weight")),
    decoder_depth: Optional[int] = typer.Option(None, min=1, help=_pd("Position decoder blocks.", "decoder_depth")),
    decoder_width: Optional[int] = typer.Option(None, min=8, help=_pd("Position decoder width.", "decoder_width")),
    keep_every: Optional[int] = typer.Option(None, min=0, help="Also keep checkpoints/step-N.pt every N steps."),
    export_only: bool = typer.Option(False, "--export-only", help="Export encoder.safetensors from --out's last checkpoint and exit."),
    **shared: Any,
) -> None:
    """Pre-train a DropPos ViT; re-run the same command to resume."""
    options = _options({k: v for k, v in locals().items() if k != "export_only"})
    from droppos.recipes import PRETRAIN_PRESETS, PretrainConfig, make_config

    if export_only:
        if out is None:
            raise UserError("--export-only needs --out RUN")
        config = PretrainConfig(out=str(out))
    else:
        config = make_config(PretrainConfig, PRETRAIN_PRESETS, options)
    from droppos import pretrain as stage

    stage.run(config, export_only=export_only)


_fd = _with_default(FinetuneConfig)


@app.command()
@_with_options(_source_options(), _launch_options(FinetuneConfig))
def finetune(
    data: Optional[Path] = typer.Option(None, help="Dataset directory written by `droppos shard`."),
    out: Optional[Path] = typer.Option(None, help="Run directory (created; resumed when it holds a checkpoint)."),
    preset: Optional[str] = typer.Option(None, help="Recipe bundle: vit_b16, vit_l16, cpu-demo."),
    img_size: Optional[int] = typer.Option(None, min=8, help="Input resolution (default: the encoder's own)."),
    pool: Optional[str] = typer.Option(None, help=_fd("Feature: avg (patch tokens, fc_norm) or token ([CLS]).", "pool")),
    epochs: Optional[int] = typer.Option(None, min=1, help=_fd("Epochs.", "epochs")),
    warmup_epochs: Optional[float] = typer.Option(None, min=0, help=_fd("Linear warm-up epochs.", "warmup_epochs")),
    batch_size: Optional[int] = typer.Option(None, min=1, help=_fd("Batch per device.", "batch_size")),
    accum: Optional[int] = typer.Option(None, min=1, help=_fd("Gradient accumulation steps.", "accum")),
    blr: Optional[float] = typer.Option(None, min=0, help=_fd("Base lr: lr = blr x effective batch / 256.", "blr")),
    lr: Optional[float] = typer.Option(None, min=0, help="Absolute lr (overrides --blr)."),
    min_lr: Optional[float] = typer.Option(None, min=0, help=_fd("Final lr of the cosine.", "min_lr")),
    weight_decay: Optional[float] = typer.Option(None, min=0, help=_fd("AdamW weight decay.", "weight_decay")),
    layer_decay: Optional[float] = typer.Option(None, min=0, max=1, help=_fd("Layer-wise lr decay.", "layer_decay")),
    drop_path: Optional[float] = typer.Option(None, min=0, max=0.99, help=_fd("Stochastic depth rate.", "drop_path")),
    clip_grad: Optional[float] = typer.Option(None, min=0, help=_fd("Gradient-norm clip (0: off).", "clip_grad")),
    mixup: Optional[float] = typer.Option(None, min=0, help=_fd("Mixup alpha (0: off).", "mixup")),
    cutmix: Optional[float] = typer.Option(None, min=0, help=_fd("CutMix alpha (0: off).", "cutmix")),
    smoothing: Optional[float] = typer.Option(None, min=0, max=0.99, help=_fd("Label smoothing.", "smoothing")),
    reprob: Optional[float] = typer.Option(None, min=0, max=1, help=_fd("Random-erasing probability.", "reprob")),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Keep and evaluate an EMA of the weights (default: off)."),
    ema_decay: Optional[float] = typer.Option(None, min=0, max=1, help=_fd("EMA decay.", "ema_decay")),
    **shared: Any,
) -> None:
    """Fine-tune an encoder end to end (MAE protocol); top-1/top-5 in OUT/results.json. Re-run to resume."""
    options = _options(locals())
    from droppos.recipes import FINETUNE_PRESETS, FinetuneConfig, make_config

    config = make_config(FinetuneConfig, FINETUNE_PRESETS, options)
    from droppos import finetune as stage

    stage.run(config)


_prd = _with_default(ProbeConfig)


@app.command()
@_with_options(_source_options(), _launch_options(ProbeConfig))
def probe(
    data: Optional[Path] = typer.Option(None, help="Dataset directory written by `droppos shard`."),
    out: Optional[Path] = typer.Option(None, help="Run directory (created; resumed when it holds a checkpoint)."),
    preset: Optional[str] = typer.Option(None, help="Recipe bundle: mae, cpu-demo."),
    cached: Optional[bool] = typer.Option(None, "--cached/--no-cached", help="Extract frozen features once (eval transforms), then train the head on them (default: off)."),
    img_size: Optional[int] = typer.Option(None, min=8, help="Input resolution (default: the encoder's own)."),
    pool: Optional[str] = typer.Option(None, help=_prd("Feature: token ([CLS]) or avg (patch tokens).", "pool")),
    epochs: Optional[int] = typer.Option(None, min=1, help=_prd("Epochs.", "epochs")),
    warmup_epochs: Optional[float] = typer.Option(None, min=0, help=_prd("Linear warm-up epochs.", "warmup_epochs")),
    batch_size: Optional[int] = typer.Option(None, min=2, help=_prd("Batch per device.", "batch_size")),
    blr: Optional[float] = typer.Option(None, min=0, help=_prd("Base lr: lr = blr x effective batch / 256.", "blr")),
    lr: Optional[float] = typer.Option(None, min=0, help="Absolute lr (overrides --blr)."),
    min_lr: Optional[float] = typer.Option(None, min=0, help=_prd("Final lr of the cosine.", "min_lr")),
    weight_decay: Optional[float] = typer.Option(None, min=0, help=_prd("LARS weight decay.", "weight_decay")),
    **shared: Any,
) -> None:
    """Linear-probe a frozen encoder (MAE protocol); top-1/top-5 in OUT/results.json. Re-run to resume."""
    options = _options(locals())
    from droppos.recipes import PROBE_PRESETS, ProbeConfig, make_config

    config = make_config(ProbeConfig, PROBE_PRESETS, options)
    from droppos import probe as stage

    stage.run(config)


@app.command("eval-pos")
def eval_pos(
    sources: Optional[List[str]] = typer.Argument(
        None, metavar="[SOURCE]...", help="Pretrain run directory or checkpoint (has the position head), finetune run, "
        "or encoder .safetensors. Several only with --compare."),
    out: Optional[Path] = typer.Option(None, help="Report folder: report.json, report.html, PNG plots."),
    data: Optional[Path] = typer.Option(None, help="Dataset directory written by `droppos shard`."),
    split: str = typer.Option("val", help="Split of --data to evaluate on."),
    images: Optional[Path] = typer.Option(None, help="Instead of --data: a folder of images in any format Pillow reads (recursive)."),
    timm_model: List[str] = typer.Option([], "--timm-model", help="A timm ViT by name, randomly initialised (no download); repeatable."),
    compare: bool = typer.Option(False, "--compare", help="Evaluate every SOURCE (and --timm-model) side by side in one report."),
    random_baseline: bool = typer.Option(False, "--random-baseline", help="Add the first model's architecture with fresh "
                                         "random weights, initialised as its training started (see the report)."),
    label: List[str] = typer.Option([], "--label", help="Name of a model in the report, repeatable, in the order the models "
                                    "are given: SOURCEs, --timm-model names, the random baseline (default: folder or file names)."),
    img_size: Optional[int] = typer.Option(None, min=16, help="Input size for encoders / timm models (default: the model's own)."),
    batch_size: int = typer.Option(64, min=1, help="Images per batch."),
    max_images: int = typer.Option(0, min=0, help="Evaluate at most N images (0: all)."),
    ratio: List[str] = typer.Option([], "--ratio", help="GAMMA:GAMMA_POS for position accuracy, repeatable "
                                    "(default: 0.75:0.75 0.5:0.75 0:0.75 0:1)."),
    permutations: int = typer.Option(5, min=1, help="Token permutations for the order sensitivity."),
    probe_drop: float = typer.Option(0.75, help="Position probe: fraction of patch PEs dropped."),
    probe_fill: str = typer.Option("mean", help="Position probe: what replaces a dropped PE: mean (mean patch PE), zeros, "
                                   "or mask-token (the model's own learnable [MASK] token; DropPos runs and checkpoints)."),
    probe_images: int = typer.Option(1000, min=0, help="Position probe: images used, half to fit, half to test (0: all)."),
    probe_steps: int = typer.Option(100, min=1, help="Position probe: L-BFGS iterations."),
    seed: int = typer.Option(0, help="Seed of masks, permutations, the probe and the random baseline (same seed: same numbers)."),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    loader: str = typer.Option("auto", help="Input pipeline for --data: auto, dali or pil."),
    workers: Optional[int] = typer.Option(None, min=0, help="Decode threads / loader workers (default: per backend)."),
) -> None:
    """Measure location awareness: position accuracy, token-order sensitivity, position linear probe."""
    from droppos import evalpos

    sources = list(sources or [])
    if len(sources) + len(timm_model) > 1 and not compare:
        raise UserError("several models given: add --compare to put them side by side (or give one SOURCE)")
    if out is None:
        raise UserError("--out is required: the folder the report is written to")
    config = evalpos.EvalPosConfig(
        out=str(out), sources=sources, timm_models=list(timm_model), random_baseline=random_baseline, labels=list(label),
        data=str(data) if data else None, split=split, images=str(images) if images else None, img_size=img_size,
        batch_size=batch_size, max_images=max_images,
        ratios=[evalpos.parse_ratio(r) for r in ratio] or list(evalpos.DEFAULT_RATIOS),
        permutations=permutations, probe_drop=probe_drop, probe_fill=probe_fill, probe_images=probe_images,
        probe_steps=probe_steps, seed=seed, device=device, loader=loader, workers=workers,
    )
    evalpos.run(config)


def _fail(message: str) -> NoReturn:
    print(f"droppos: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the console script and of `python -m droppos`."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="droppos", standalone_mode=False)
    except UserError as err:
        _fail(str(err))
    except click_exceptions.UsageError as err:
        where = f" {err.ctx.info_name}" if err.ctx is not None and err.ctx.parent is not None else ""
        _fail(f"{err.format_message()} (see `droppos{where} --help`)")
    except typer.Abort:
        print("droppos: interrupted", file=sys.stderr)
        sys.exit(130)
    except click_exceptions.ClickException as err:
        _fail(err.format_message())
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
