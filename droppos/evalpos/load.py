"""What eval-pos evaluates: the models (`Subject`) and the images (`ImageSource`).

A model comes from a pretrain run or checkpoint (with its position head), a finetune checkpoint (a
classifier), an encoder file, or a timm name. Every one becomes a stock timm ViT (`Subject.vit`), so
all models go through the same measuring code; a DropPos model keeps its position head beside it
(`Subject.droppos`). `load_subjects` is the one entry point; each source has its own small loader.

Images come from shards (`--data`, through `droppos.data`) or a plain folder (`--images`, through
Pillow and timm's eval transform). Both yield fixed-size batches with a `valid` mask, so the
measurements never index by a data-dependent count.
"""

from __future__ import annotations

import copy
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from droppos import UserError, checkpoint, recipes
from droppos.environment import file_sha256
from droppos.files import Confinement, InputError, read_input

__all__ = ["IMAGE_CROP_PCT", "INITS", "ImageSource", "Subject", "list_images", "load_subject", "load_subjects", "random_like"]

from droppos.data.transforms import EVAL_CROP_PCT as IMAGE_CROP_PCT  # noqa: E402 - --images: the shards' eval crop
from droppos.recipes import POOLS  # noqa: E402 - the one list of pools
# Each random initialisation: key -> (short name, what it is). See `random_like` and the report's baseline text.
INITS = {
    "droppos": ("DropPos (MAE) init, fixed sin-cos PE",
                "DropPosViT's own (MAE's) initialisation: xavier-uniform linear layers and patch projection, normal(0, "
                "0.02) [CLS] and [MASK] tokens, and the fixed 2-D sin-cos PE that pre-training never changes"),
    "timm-fixed-pe": ("timm init, fixed sin-cos PE kept",
                      "timm's VisionTransformer initialisation for every weight, with the source's fixed 2-D sin-cos PE "
                      "kept (DropPos never trains it)"),
    "timm": ("timm init, learned PE std 0.02",
             "timm's VisionTransformer initialisation: weights and the learned PE trunc-normal(0, 0.02)"),
}


def _random_weights(init: str, seed: int) -> dict[str, Any]:
    """The weights record of a randomly initialised model."""
    return {"source": "random-init", "init": init, "description": INITS[init][1], "seed": seed}


@dataclass
class Subject:
    """One model under test: a timm ViT (always) and the DropPos model with its position head (if any).

    `fixed_pe`: the PE is part of the architecture (DropPos's sin-cos PE, never trained), so a random
    baseline keeps it.
    """

    name: str
    source: str
    kind: str  # droppos-run | droppos-checkpoint | finetune | encoder | timm | random-init
    vit: nn.Module
    droppos: Optional[nn.Module]
    img_size: int
    info: dict[str, Any] = field(default_factory=dict)
    fixed_pe: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_classes(self) -> int:
        return int(getattr(self.vit, "num_classes", 0) or 0)

    @property
    def mask_token(self) -> Optional[torch.Tensor]:
        """The learnable [MASK] token [1, 1, D] that replaced dropped PEs in pre-training (None: the model has none)."""
        return getattr(self.droppos, "mask_pos_token", None) if self.droppos is not None else None


# ----------------------------------------------------------------------------------------------
# Models


def load_subjects(sources: Sequence[str], timm_models: Sequence[str], img_size: Optional[int],
                  random_baseline: bool, seed: int, labels: Sequence[str] = (), pretrained: bool = False,
                  weights: Optional[str] = None) -> list[Subject]:
    """Every model of one report, in order (sources, --timm-model names or a --weights file, the random
    baseline), named by `labels`. `pretrained` applies to every --timm-model; `weights` to the one given."""
    if weights and len(timm_models) > 1:
        raise UserError("--weights FILE goes with one --timm-model NAME (its architecture), not several")
    subjects = [load_subject(s, img_size) for s in sources]
    subjects += [load_timm(name, img_size, seed, pretrained=pretrained, weights=weights) for name in timm_models]
    if weights and not timm_models:
        subjects.append(load_timm(None, img_size, seed, weights=weights))  # a file that names its architecture
    if random_baseline:
        subjects.append(random_like(subjects[0], seed))
    if len(labels) > len(subjects):
        raise UserError(f"{len(labels)} --label given for {len(subjects)} model(s): one per model, in the order "
                        "SOURCE..., --timm-model..., --random-baseline")
    for subject, label in zip(subjects, labels):
        subject.name = label
    _unique_names(subjects)
    return subjects


def _unique_names(subjects: Sequence[Subject]) -> None:
    seen: dict[str, int] = {}
    for s in subjects:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name} ({seen[s.name]})"
        else:
            seen[s.name] = 1


def load_subject(source: str, img_size: Optional[int] = None, timm_name: bool = False, seed: int = 0) -> Subject:
    """A run directory, a pretrain checkpoint (.pt), an encoder file (.safetensors) or (timm_name) a timm name."""
    if timm_name:
        return load_timm(source, img_size, seed)
    path = Path(source)
    if not path.exists():
        raise UserError(f"SOURCE {source} does not exist: give a pretrain run directory, a checkpoint (.pt), "
                        "an encoder (.safetensors) or use --timm-model NAME")
    if path.is_dir():
        checkpoint = path / "checkpoints" / "last.pt"
        if checkpoint.exists():
            return _from_checkpoint(checkpoint, source, path.name, "droppos-run")
        if (path / "encoder.safetensors").exists():
            return _from_encoder(path / "encoder.safetensors", source, path.name, img_size)
        raise UserError(f"{source} holds neither checkpoints/last.pt nor encoder.safetensors: is it a pretrain run?")
    if path.suffix == ".safetensors":
        return _from_encoder(path, source, path.stem, img_size)
    return _from_checkpoint(path, source, path.stem, "droppos-checkpoint")


def load_timm(name: Optional[str], img_size: Optional[int], seed: int = 0, pretrained: bool = False,
              weights: Optional[str] = None) -> Subject:
    """A timm ViT by name: timm's random initialisation, seeded (with its classifier head, so top-1 agreement
    is measured), or timm's pretrained weights (`pretrained`: the Hugging Face cache, never a silent random
    model) or a local checkpoint (`weights`), loaded as features through `encoders.load_encoder`."""
    torch.manual_seed(seed)
    if not (pretrained or weights):
        vit = _timm_vit(name, img_size)
        info = {"timm_model": name, "weights": _random_weights("timm", seed)}
        return _subject_from_timm(vit, f"random-init {name}", name, "timm", img_size, info)
    from droppos.encoders import check_encoder_source, load_encoder

    check_encoder_source(timm_model=name, weights=weights, pretrained=pretrained)
    # [CLS] pooling keeps the pre-trained final norm, as for encoder files.
    vit, info = load_encoder(timm_model=name, num_classes=0, global_pool="token", img_size=img_size,
                             weights=weights, pretrained=pretrained)
    return _subject_from_timm(vit, info["label"], weights or name, "timm", img_size, dict(info))


def _timm_vit(name: str, img_size: Optional[int]) -> nn.Module:
    import timm

    import droppos.model  # noqa: F401 - so droppos_* names resolve too

    kwargs = {"img_size": img_size} if img_size else {}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"unknown timm model {name!r}: see `timm.list_models('vit_*')` for names") from None
        raise
    except TypeError as err:
        raise UserError(f"timm model {name!r} does not take img_size={img_size}: {err}") from None


def _weights_record(path: Path, source: str) -> dict[str, Any]:
    return {"source": source, "path": str(path), "sha256": file_sha256(path)}


def _from_checkpoint(path: Path, source: str, name: str, kind: str) -> Subject:
    """A droppos checkpoint, by the stage that wrote it: pretrain (the DropPos model with its position
    head) or finetune (the classifier). Checkpoints before format 2 recorded no stage: those are told
    apart by their config (a pretrain config names a `model`)."""
    from droppos.weights import droppos_model_from

    saved = checkpoint.load(path)
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or not any(k in saved for k in ("model", "head")):
        raise UserError(f"{path} is not a droppos checkpoint (no 'model' and 'config'): "
                        "give a pretrain or finetune run directory, its checkpoint, or an encoder .safetensors")
    stage = saved.get("stage")  # checkpoint.load recorded it for the checkpoints that did not
    if stage == "finetune":
        return _from_finetune(path, saved, source, name)
    if stage != "pretrain":
        raise UserError(f"{path} is a `droppos {stage}` checkpoint: it holds a head, not an encoder; evaluate the "
                        "encoder it probed (its --run or --encoder) instead")
    model = droppos_model_from(saved, path)  # the config's numbers bounded and checked against the tensors first
    options = recipes.option_values(config)
    info = {"checkpoint": str(path), "step": saved.get("step"), "weights": _weights_record(path, kind),
            "config": {k: options.get(k) for k in ("model", "img_size", "patch_size", "depth", "mask_ratio",
                                                    "pos_mask_ratio", "mask_token", "epochs")}}
    return _subject_from_droppos(model, name, source, kind, info)


def _from_finetune(path: Path, saved: dict, source: str, name: str) -> Subject:
    """A `droppos finetune` checkpoint: the classifier it trained, built from the architecture the checkpoint
    records (its `encoder` entry: the timm name and model_args, validated and bounded like a sidecar), its
    weights its own. Nothing is read from the paths the fine-tuning took its encoder from."""
    import timm

    from droppos.weights import check_architecture, require_finite

    encoder, state = saved.get("encoder"), saved["model"]
    if not isinstance(encoder, dict) or "head.weight" not in state:
        raise UserError(f"{path} is neither a pretrain nor a finetune checkpoint of droppos")
    require_finite(state, path)
    model_name, model_args = check_architecture(encoder.get("model"), encoder.get("model_args") or {}, str(path))
    pool = recipes.option_values(saved.get("config")).get("pool", "avg")
    if pool not in POOLS:
        raise UserError(f"{path}: config names pool {str(pool)[:20]!r}, not one of {', '.join(POOLS)}")
    build = dict(pretrained=False, num_classes=int(state["head.weight"].shape[0]), global_pool=pool, **model_args)
    try:
        with torch.device("meta"):  # the recorded architecture costs no memory until its shapes are the weights'
            shell = timm.create_model(model_name, **build)
        expected = {key: tuple(value.shape) for key, value in shell.state_dict().items()}
        found = {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
        if expected != found:
            differ = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
            raise ValueError(f"{len(differ)} tensor(s) differ, first {differ[0]}")
        model = timm.create_model(model_name, **build)
        model.load_state_dict(state)
    except (AssertionError, RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"{path}: weights do not match the classifier it records: {str(err).splitlines()[0][:160]}") from None
    info = dict(encoder, checkpoint=str(path), step=saved.get("step"), pretrained=True,
                weights=_weights_record(path, "finetune-checkpoint"), label=f"fine-tuned {model_name} ({path})")
    return _subject_from_timm(model, name, source, "finetune", None, info)


def _from_encoder(path: Path, source: str, name: str, img_size: Optional[int]) -> Subject:
    from droppos.encoders import load_encoder
    from droppos.weights import read_sidecar

    # [CLS] pooling keeps the pre-trained final norm (timm's avg pooling would swap in a fresh fc_norm).
    model, info = load_encoder(encoder=path, num_classes=0, global_pool="token", img_size=img_size)
    info = dict(info)
    info.setdefault("weights", _weights_record(path, "encoder"))
    subject = _subject_from_timm(model, name, source, "encoder", img_size, info)
    subject.fixed_pe = "droppos" in read_sidecar(path)  # exported by `droppos pretrain`: a fixed sin-cos PE
    return subject


def _droppos_to_timm(core: nn.Module) -> nn.Module:
    """The stock timm ViT that `export_encoder` targets, holding this DropPos encoder's weights."""
    import timm

    from droppos.model import encoder_state_dict

    vit = timm.create_model(core.timm_name, pretrained=False, num_classes=0, **core.timm_model_args())
    vit.load_state_dict(encoder_state_dict(core), strict=True)
    return vit


def _check_vit(vit: nn.Module, what: str) -> None:
    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens")
    missing = [n for n in needed if not hasattr(vit, n)]
    if missing or not hasattr(vit.patch_embed, "grid_size"):
        raise UserError(f"{what} is not a timm VisionTransformer with patch tokens and absolute PEs "
                        f"(lacks {', '.join(missing) or 'patch_embed.grid_size'}): pick a vit_* / deit_* model")


def _subject_from_droppos(model: nn.Module, name: str, source: str, kind: str, info: dict) -> Subject:
    model.eval()
    vit = _droppos_to_timm(model).eval()
    return Subject(name, source, kind, vit, model, int(model.img_size[0]), info, fixed_pe=True)


def _subject_from_timm(model: nn.Module, name: str, source: str, kind: str, img_size: Optional[int], info: dict) -> Subject:
    from droppos.model import DropPosViT

    if isinstance(model, DropPosViT):
        return _subject_from_droppos(model, name, source, kind, info)
    _check_vit(model, name)
    size = int(model.patch_embed.img_size[0]) if img_size is None else int(img_size)
    return Subject(name, source, kind, model.eval(), None, size, info)


def random_like(subject: Subject, seed: int) -> Subject:
    """The same architecture with fresh random weights (seeded): the reference every number is read against.

    It starts where training of the source started: a DropPos model gets DropPosViT's own init (the
    fixed sin-cos PE included); an encoder exported by droppos gets timm's init with its fixed PE kept;
    any other timm ViT gets timm's init, whose PE (std 0.02) is nearly invisible beside the patch tokens.
    """
    torch.manual_seed(seed)
    if subject.droppos is not None:
        fresh = copy.deepcopy(subject.droppos)
        fresh._init_weights()
        fresh.eval()
        vit = _droppos_to_timm(fresh).eval()
        droppos_model: Optional[nn.Module] = fresh
        init = "droppos"
    else:
        vit = copy.deepcopy(subject.vit)
        kept_pe = vit.pos_embed.detach().clone() if subject.fixed_pe else None
        vit.init_weights()
        if kept_pe is not None:
            with torch.no_grad():
                vit.pos_embed.copy_(kept_pe)
        vit.eval()
        droppos_model = None
        init = "timm-fixed-pe" if subject.fixed_pe else "timm"
    info = {"random_init_of": subject.name, "seed": seed, "weights": _random_weights(init, seed)}
    return Subject(f"random-init {subject.name}", subject.source, "random-init", vit, droppos_model,
                   subject.img_size, info, fixed_pe=subject.fixed_pe)


# ----------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageSource:
    """Where images come from, and what happened to them (filled in while batches are read)."""

    data: Optional[str]
    split: str
    images: Optional[str]
    max_images: int
    batch_size: int
    loader: str
    workers: Optional[int]
    has_labels: bool = False
    num_classes: int = 0
    found: int = 0
    skipped: list[dict] = field(default_factory=list)
    backend: str = ""  # the input pipeline actually used (after `auto`)
    workers_used: Optional[int] = None

    def describe(self) -> str:
        return f"split {self.split!r} of {self.data}" if self.data else f"folder {self.images}"

    def planned(self) -> int:
        """How many images a pass reads at most (before unreadable ones are skipped)."""
        if self.data:
            from droppos.manifest import load_manifest, split_shards

            total = sum(s.num_samples for s in split_shards(Path(self.data), self.split, load_manifest(Path(self.data))))
        else:
            total = len(list_images(Path(self.images)))
        return min(total, self.max_images) if self.max_images else total

    def batches(self, img_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images [B,3,S,S] normalised, labels [B] (-1 when unknown), valid [B] bool), all on `device`.

        `valid` is False for the eval loader's padding. At most `max_images` rows are yielded (a row
        count the host knows, so stopping never waits on the device).
        """
        source = self._dataset_batches if self.data else self._folder_batches
        rows = 0
        for images, labels, valid in source(img_size, device):
            if self.max_images and rows + len(labels) > self.max_images:
                keep = self.max_images - rows
                images, labels, valid = images[:keep], labels[:keep], valid[:keep]
            rows += len(labels)
            yield images, labels, valid
            if self.max_images and rows >= self.max_images:
                break

    def _dataset_batches(self, img_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from droppos.data import build_loader

        loader = build_loader(self.data, self.split, "eval", self.batch_size, img_size=img_size, backend=self.loader,
                              device=device, seed=0, workers=self.workers)
        self.found, self.has_labels, self.num_classes = loader.num_samples, True, loader.num_classes
        self.backend, self.workers_used = loader.backend, loader.workers
        try:
            for images, labels in loader.epoch(0):
                yield images, labels, labels >= 0
        finally:
            self.skipped = [{"path": key, "reason": f"corrupt sample skipped by the {loader.backend} loader"}
                            for key in loader.skipped_keys]
            loader.close()

    def _folder_batches(self, img_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        from timm.data import create_transform

        transform = create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=IMAGE_CROP_PCT)
        files = list_images(Path(self.images))
        within = Confinement.of(self.images, "--images")  # a link out of the folder is counted, never read
        self.found, self.backend, self.workers_used = len(files), "folder: Pillow + timm eval transform", 0
        skipped: list[dict] = []
        batch: list[torch.Tensor] = []
        for path in files:
            hidden = any(part.startswith(".") for part in path.relative_to(self.images).parts)
            img, reason = (None, "hidden file") if hidden else _open_rgb(path, within)
            if img is None:
                skipped.append({"path": str(path.relative_to(self.images)), "reason": reason})
                continue
            batch.append(transform(img))
            if len(batch) == self.batch_size:
                yield _to_device(batch, device)
                batch = []
        if batch:
            yield _to_device(batch, device)
        self.skipped = skipped


def _to_device(batch: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack(batch)
    if device.type == "cuda":
        images = images.pin_memory()
    images = images.to(device, non_blocking=True)
    labels = torch.full((len(batch),), -1, dtype=torch.int64, device=device)
    return images, labels, torch.ones(len(batch), dtype=torch.bool, device=device)


def list_images(root: Path) -> list[Path]:
    """Every entry under `root` that is not a folder (files, links, FIFOs, devices: each is then read or counted
    as skipped with its reason, never dropped unseen), sorted; links to folders are not walked into."""
    if not root.is_dir():
        raise UserError(f"--images {root} is not a directory: give a folder of images")
    entries = []
    for folder, subfolders, names in os.walk(root, followlinks=False):
        entries += [Path(folder, name) for name in names]
        entries += [Path(folder, name) for name in subfolders if os.path.islink(os.path.join(folder, name))]
    if not entries:
        raise UserError(f"--images {root} holds no files")
    return sorted(entries)


IMAGE_MAX_BYTES = 512 << 20  # a 16-bit 8k x 8k TIFF is 400 MB; anything larger is not a photo to evaluate


def _open_rgb(path: Path, within: Optional[Confinement] = None):
    """(RGB PIL image, None) or (None, why not): orientation applied, 16-bit and float scaled to 8 bits."""
    from PIL import Image, ImageOps

    try:
        data = read_input(path, "image", IMAGE_MAX_BYTES, within=within)
    except InputError as err:
        return None, err.reason
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                pixels = np.asarray(img, dtype=np.float64)
                span = max(float(pixels.max() - pixels.min()), 1e-12)
                img = Image.fromarray(((pixels - pixels.min()) * (255.0 / span)).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB"), None
    except Exception as err:  # noqa: BLE001 - any decoding failure means: skip and count
        words = re.sub(r" <[^>]*>", "", str(err).splitlines()[0][:160]) if str(err) else "unreadable"
        return None, f"{type(err).__name__}: {words}"  # without the object reprs Pillow puts in its messages
