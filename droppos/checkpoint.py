"""The checkpoint format: one module writes it, reads it, checks its tag and knows its old forms.

A checkpoint is a plain dict (loadable with `torch.load(weights_only=True)`): each part's state (modules
without DDP/compile prefixes), the step, the stage, the run's config record (sectioned, as config.json),
its environment and schedule, `format`, and `digest`: the sha256 of everything else (tensor bytes
included), checked on every read, since torch.load does not check its zip records' CRC and a flipped
bit would load. Writing `last.pt` moves the one before it to `previous.pt`: a damaged last one leaves
a good one to resume from. Reading upgrades what older versions wrote:
- format 1 (no tag): no `stage` (a config that names a `model` is a pretrain run's, else finetune's);
- format 2: the config flat, by option name;
so every reader sees the current form. A tag this version does not know is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch

from droppos import UserError
from droppos.distributed import strip_prefixes
from droppos.recipes import TrainingConfig

FORMAT = "droppos-checkpoint/3"
_PREFIX = "droppos-checkpoint/"


def path(out: Path) -> Path:
    """Where every training stage keeps the checkpoint it resumes from."""
    return Path(out) / "checkpoints" / "last.pt"


def previous_path(source: Path) -> Path:
    """Where the checkpoint before `source` (a last.pt) is kept."""
    return Path(source).with_name("previous.pt")


def state(parts: dict[str, Any], **entries: Any) -> dict:
    """A checkpoint: each part's state by key (modules without wrapper prefixes, optimizers as they are) and
    the run's `entries` (step, stage, config, ...)."""
    saved = {key: strip_prefixes(part.state_dict()) if isinstance(part, torch.nn.Module) else part.state_dict()
             for key, part in parts.items()}
    return {**saved, **entries, "format": FORMAT}


def save(target: Path, checkpoint: dict) -> None:
    """Write atomically with its digest (files.atomic_write: a full disk leaves the previous checkpoint and no
    temporary file); a last.pt moves the one it replaces to previous.pt."""
    from droppos.files import atomic_write

    entries = {k: v for k, v in checkpoint.items() if k != "digest"}
    sealed = {**entries, "digest": digest(entries)}
    keep = previous_path(target) if Path(target).name == "last.pt" else None
    atomic_write(target, lambda handle: torch.save(sealed, handle), keep_previous=keep)


def digest(entries: Any) -> str:
    """sha256 of a checkpoint's content: every key, number and string, and every tensor's dtype, shape and bytes."""
    hasher = hashlib.sha256()
    _feed(hasher, entries)
    return hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(f"T{tensor.dtype}{tuple(value.shape)}:".encode())
        hasher.update(tensor.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        hasher.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(hasher, item)
    else:
        text = repr(value)
        hasher.update(f"S{len(text)}:{text}".encode())


def load(source: Path, map_location: Any = "cpu", mmap: bool = False, verify: bool = True) -> dict:
    """Read with weights_only=True (mmap: tensors read lazily), check the tag and (`verify`) the digest, upgrade
    older forms; an unreadable, damaged or foreign file is a one-line UserError."""
    from droppos.files import regular_file

    try:
        regular_file(source, "checkpoint")
        raw = torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise _damaged(source, f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    raw = upgrade(raw, source)
    if verify:
        check_digest(raw, source)
    return raw


def check_digest(raw: Any, source: Path) -> None:
    """Whatever `save` sealed (a checkpoint of format 3, a feature cache) must match the digest written with it;
    a format-3 checkpoint without one is damaged too."""
    if not isinstance(raw, dict) or raw.get("_upgraded"):
        return
    if "digest" not in raw and raw.get("format") != FORMAT:
        return
    if raw.get("digest") != digest({k: v for k, v in raw.items() if k != "digest"}):
        raise _damaged(source, "does not match the digest written with it")


def _damaged(source: Path, what: str) -> UserError:
    """One line: what is wrong with `source` and, when a previous checkpoint is kept, how to resume from it."""
    previous = previous_path(source)
    if Path(source).name == "last.pt" and previous.is_file():
        return UserError(f"checkpoint {source} {what}: it is damaged. The one before it is kept: `mv {previous} "
                         f"{source}`, then re-run the same command to resume from it")
    return UserError(f"checkpoint {source} {what}: it is damaged or not a checkpoint")


def upgrade(raw: Any, source: Path) -> Any:
    """A droppos checkpoint in the current form (other dicts, e.g. a feature cache or a foreign layout, pass as
    they are: their readers check their own keys)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        return raw
    tag = raw.get("format")
    if tag is not None and (not isinstance(tag, str) or not tag.startswith(_PREFIX)):
        return raw
    version = 1 if tag is None else _version(tag, source)
    if version > _version(FORMAT, source):
        raise UserError(f"{source} was written by a newer droppos ({tag}; this version reads up to {FORMAT}): "
                        "upgrade droppos to read it")
    if version >= 3:
        return raw
    from droppos import recipes

    raw = dict(raw, _upgraded=True)  # written before digests: nothing to check
    if version == 1:
        raw["stage"] = "pretrain" if "model" in raw["config"] else "finetune"
    stage_cls = recipes.STAGES.get(raw.get("stage"))
    if stage_cls is not None:
        raw["config"] = _sectioned(stage_cls, raw["config"])
    raw["format"] = FORMAT
    return raw


def _version(tag: str, source: Path) -> int:
    try:
        return int(tag[len(_PREFIX):])
    except ValueError:
        raise UserError(f"{source}: unknown checkpoint format {tag[:60]!r}") from None


def _sectioned(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    """A format-2 flat config as the sectioned record (names this version no longer declares kept at the top)."""
    from droppos import recipes

    where = {o.name: o.section for o in recipes.options(cls)}
    record: dict[str, Any] = {}
    for name, found in flat.items():
        section = where.get(name)
        if section is None:
            record[name] = found
        else:
            record.setdefault(section, {})[name] = found
    return record


def resume(out: Path, device: torch.device, parts: dict[str, Any]) -> Optional[dict]:
    """Load OUT's last checkpoint into `parts` (the keys `state` saved them under); None: a fresh start."""
    source = path(out)
    if not source.exists():
        return None
    saved = load(source, map_location=device, verify=False)  # verified by check_resumable before the launch
    for key, part in parts.items():
        part.load_state_dict(saved[key])
    return saved


def check_resumable(out: Path, config: TrainingConfig, stage: str, accum: int, world_size: int) -> None:
    """Refuse to resume OUT's checkpoint when it belongs to another stage or architecture; refuse another
    schedule or data unless --force-resume (config.json then keeps the earlier record).

    Compared: the options declared `resume="arch"` (always refused) and `resume="run"`, the effective batch
    (batch x accum x world size) and the data manifest's sha256.
    """
    from droppos import recipes
    from droppos.environment import file_sha256

    source = path(out)
    if not source.exists():
        return
    saved = load(source, mmap=True)
    if saved.get("stage") != stage:
        raise UserError(f"{out} holds a `droppos {saved.get('stage')}` run; give `droppos {stage}` another --out")
    before, now = recipes.option_values(saved.get("config")), recipes.option_values(config)
    cls = type(config)
    arch = [f"{k}={before.get(k)!r} (now {now.get(k)!r})" for k in recipes.keys(cls, "arch")
            if before.get(k) != now.get(k)]
    if arch:
        raise UserError(f"{out} holds a checkpoint of another model: {', '.join(arch)}; use another --out or the "
                        "same options")
    changed = [f"{k}={before.get(k)!r} (now {now.get(k)!r})" for k in recipes.keys(cls, "run")
               if k in before and before.get(k) != now.get(k)]
    saved_schedule = saved.get("schedule") or {}
    effective = config.optim.batch_size * accum * world_size
    if saved_schedule.get("effective_batch") not in (None, effective):
        changed.append(f"effective batch {saved_schedule['effective_batch']} (now {effective}: "
                       f"{config.optim.batch_size} x {accum} x {world_size} processes)")
    data_sha = file_sha256(Path(config.data.path) / "manifest.json")
    if saved.get("data_sha256") not in (None, data_sha):
        changed.append("the data (its manifest.json differs)")
    if changed and not config.output.force_resume:
        raise UserError(f"{out} was trained with another schedule or data: {'; '.join(changed)}. Re-run with the "
                        "same options, add --force-resume to continue with the new ones, or use another --out")


def plain(value: Any) -> Any:
    """`value` as the plain JSON values a checkpoint (weights_only) and a results file can hold."""
    return json.loads(json.dumps(value))
