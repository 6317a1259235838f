"""The `droppos` command line: one Typer app, one command per stage.

This file only parses options, turns user mistakes into one-line errors (exit 2)
and calls the stage's `run(...)`. Stages are imported lazily so that `--help`
and option errors answer instantly, without importing torch or DALI.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Sequence

import typer
from typer._click import exceptions as click_exceptions  # typer vendors its own click

from droppos import UserError, error_line
from droppos.recipes import EvalPosConfig, ExportConfig, FinetuneConfig, PretrainConfig, ProbeConfig, ShardConfig

app = typer.Typer(
    name="droppos",
    help="Pre-train Vision Transformers with DropPos, evaluate them, and measure how "
    "location-aware they are.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _version(value: bool) -> None:
    if value:
        import droppos

        print(f"droppos {droppos.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version and exit.")) -> None:
    """Pre-train Vision Transformers with DropPos, evaluate them, and measure how location-aware they are."""


# ---------------------------------------------------------------------------------------------
# Training stages: their options come from the declarations in droppos/recipes.py


def _show_default(spec: Any, default: Any) -> str:
    """Every default in one style: the value, on/off for switches, or the declaration's words."""
    if spec.default_text is not None:
        return spec.default_text
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default in (None, "", ()) else f"{default:g}" if isinstance(default, float) else str(default)


def _help(spec: Any, default: Any) -> str:
    """The declaration's help, its choices or range, and its default: one style for every option."""
    from rich.markup import escape

    from droppos.recipes import bounds_text

    notes = [f"one of: {', '.join(spec.choices)}"] if spec.choices else []
    if bounds_text(spec):
        notes.append(bounds_text(spec))
    notes.append(f"default: {_show_default(spec, default)}")
    return escape(f"{spec.help} [{'; '.join(notes)}]")


def _typer_parameter(opt: Any) -> inspect.Parameter:
    """One declared option (recipes.Option) as the Typer parameter of a command (default None: 'not given')."""
    from droppos.recipes import flag_name

    spec, field, annotation, name = opt.spec, opt.field, opt.annotation, opt.name
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Union else annotation
    if typing.get_origin(base) is tuple:  # a repeatable option
        base = List[typing.get_args(base)[0]]
    if spec.positional:
        default = typer.Argument(None, help=_help(spec, field.default), show_default=False, metavar=name.upper())
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[base],
                                 default=default)
    decls = [spec.flag] if spec.flag else [flag_name(name)]
    if base is bool and not spec.flag:
        decls = [f"{flag_name(name)}/--no-{name.replace('_', '-')}"]
    default = typer.Option(None, *decls, help=_help(spec, field.default), show_default=False,
                           rich_help_panel=spec.panel, metavar=_metavar(base, spec))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[base], default=default)


def _metavar(base: Any, spec: Any) -> Optional[str]:
    if spec.metavar:
        return spec.metavar
    if spec.choices:
        return "CHOICE"
    if typing.get_origin(base) is list:
        return "TEXT"
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(base)


def _panel_order(parameter: inspect.Parameter) -> int:
    from droppos.recipes import PANELS

    panel = getattr(parameter.default, "rich_help_panel", None)
    return -1 if panel is None else PANELS.index(panel)  # arguments first


def _preset_epilog(presets: dict[str, dict[str, Any]]) -> str:
    lines = [f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in presets.items()]
    return "Presets (see what one resolves to with --preset NAME --print-config):\n\n" + "\n\n".join(lines)


_PRINT_CONFIG = inspect.Parameter(
    "print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
    default=typer.Option(False, "--print-config", help="Print the options this command would run with (defaults, "
                         "then --preset, then your options) as JSON, and exit.", rich_help_panel="Recipe"))


def stage_command(name: str, config_cls: type, summary: str, actions: Sequence[inspect.Parameter] = ()) -> Callable:
    """Register a training stage: its options from `config_cls`'s declarations, its body the decorated
    `run(config, **actions)`, which gets the checked config (and the values of the `actions` flags)."""
    from droppos.recipes import PRESETS, options

    presets = PRESETS.get(config_cls)
    declared = [_typer_parameter(opt) for opt in options(config_cls) if opt.spec.cli]
    actions = [_PRINT_CONFIG, *actions] if presets else list(actions)
    parameters = sorted([*actions, *declared], key=_panel_order)  # stable: declaration order within a panel

    def decorate(body: Callable[..., None]) -> Callable[..., None]:
        def command(**values: Any) -> None:
            from droppos.recipes import make_config, to_record

            flags = {p.name: values.pop(p.name) for p in actions}
            values = {k: (tuple(v) or None) if isinstance(v, list) else v for k, v in values.items()}  # repeated
            config = make_config(config_cls, values)
            if flags.pop("print_config", False):
                print(json.dumps(to_record(config), indent=2))
                return
            body(config, **flags)

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__doc__ = summary
        command.__name__ = name.replace("-", "_")
        app.command(name, help=summary, epilog=_preset_epilog(presets) if presets else None)(command)
        return body

    return decorate


@stage_command("shard", ShardConfig, "Write validated WebDataset shards (+ DALI indexes, manifest.json) from "
               "ImageNet-style data.")
def shard(config: ShardConfig) -> None:
    import droppos.shard

    positional = [p for p in (config.source, config.out) if p is not None]
    if config.verify:
        if len(positional) != 1:
            raise UserError("--verify takes exactly one argument: the dataset directory")
        droppos.shard.verify(Path(positional[0]), decode=config.decode)
        return
    if config.decode:
        raise UserError("--decode only applies with --verify")
    if config.sample:
        if len(positional) != 1:
            raise UserError("--sample takes exactly one argument: the output directory")
        if config.lists:
            raise UserError("--sample and --list cannot be combined")
    elif len(positional) != 2:
        raise UserError("expected SOURCE and OUT (or --sample OUT, or --verify DIR)")
    droppos.shard.run(
        source=None if config.sample else Path(positional[0]),
        out=Path(positional[-1]),
        sample=config.sample,
        lists=_parse_lists(config.lists),
        seed=config.seed,
        workers=config.workers or (os.cpu_count() or 1),
        max_side=config.max_side,
        quality=config.quality,
        shard_size=config.shard_size or (200 if config.sample else 1000),
        sample_options=dict(num_classes=config.sample_classes, train_per_class=config.sample_train,
                            val_per_class=config.sample_val),
        layout=config.layout, ignore_index=config.ignore_index, reduce_zero_label=config.reduce_zero_label,
        follow_links=config.follow_links,
    )


def _parse_lists(values: Sequence[str]) -> dict:
    """`FILE` -> {'train': FILE}; `val=FILE` -> {'val': FILE}."""
    lists: dict = {}
    for value in values:
        split, sep, path = value.partition("=")
        if not sep:
            split, path = "train", value
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,31}", split) or not path:
            raise UserError(f"--list {value!r}: expected FILE or SPLIT=FILE (SPLIT: up to 32 ASCII letters, digits "
                            "and underscores: it names the shard files)")
        if split in lists:
            raise UserError(f"--list given twice for split {split!r}")
        lists[split] = Path(path)
    return lists


_EXPORT_ONLY = inspect.Parameter(
    "export_only", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
    default=typer.Option(False, "--export-only", help="Export encoder.safetensors from --out's last checkpoint and "
                         "exit.", rich_help_panel="Output, checkpoints and logging"))


@stage_command("pretrain", PretrainConfig, "Pre-train a DropPos ViT; re-run the same command to resume.",
               actions=[_EXPORT_ONLY])
def pretrain(config: PretrainConfig, export_only: bool = False) -> None:
    from droppos import pretrain as stage

    stage.run(config, export_only=export_only)


@stage_command("finetune", FinetuneConfig, "Fine-tune an encoder end to end (MAE protocol); top-1/top-5 in "
               "OUT/results.json. Re-run to resume.")
def finetune(config: FinetuneConfig) -> None:
    from droppos import finetune as stage

    stage.run(config)


@stage_command("probe", ProbeConfig, "Linear-probe a frozen encoder (MAE protocol); top-1/top-5 in "
               "OUT/results.json. Re-run to resume.")
def probe(config: ProbeConfig) -> None:
    from droppos import probe as stage

    stage.run(config)


@stage_command("eval-pos", EvalPosConfig, "Measure location awareness: position accuracy, token-order "
               "sensitivity, position linear probe.")
def eval_pos(config: EvalPosConfig) -> None:
    from droppos import evalpos

    evalpos.run(config)


@stage_command("export", ExportConfig, "Export an encoder for timm (local-dir / Hugging Face Hub folder), "
               "Detectron2's ViTDet or MMSegmentation's MAE backbone.")
def export(config: ExportConfig) -> None:
    from droppos import export as stage

    for name in ("source", "out"):
        if not getattr(config, name):
            raise UserError(f"{'SOURCE' if name == 'source' else '--out'} is required (see `droppos export --help`)")
    path = stage.run(config.source, config.format, config.out)
    print(f"exported {config.source} for {config.format} -> {path}")
    print("next: " + stage.downstream_command(config.format, path, stage.read_source(config.source).meta))


def _fail(message: str) -> NoReturn:
    print(error_line(message), file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the console script and of `python -m droppos`."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="droppos", standalone_mode=False)
    except UserError as err:
        _fail(str(err))
    except click_exceptions.NoArgsIsHelpError:
        sys.exit(0)  # bare `droppos`: the usage was printed
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
    except OSError as err:  # what the file system said where no check turned it into words: still one line
        where = f" ({err.filename})" if err.filename else ""
        _fail(f"{err.strerror or type(err).__name__}{where}")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
