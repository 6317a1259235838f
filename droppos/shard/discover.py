"""Finding the inputs of `droppos shard`: an ImageNet-style folder, --list files, or segmentation layouts.

Whatever the listing meets is either a candidate or refused with its reason, so that written +
skipped = found always holds: hidden files and folders, symlinks to folders below a class folder
(not followed), folders that cannot be listed, files outside a class folder, the files of a class
folder whose name is not valid UTF-8, and (unless --follow-links) a split folder, class folder or
file that resolves outside SOURCE through a symlink: one entry, never listed or read. Listings are
sorted, so the file system's order never matters. Whether a candidate is a readable regular file
inside SOURCE is settled when it is read (droppos.shard.inputs, through droppos.files' opener).

A --list file is read through the same opener (a FIFO or a device is one line, never a hang). Each
of its lines is one entry: a malformed line (fields, class index, NUL byte, not UTF-8, a path that
leaves SOURCE or that no system could open) and a path listed again (in any list, with the same or
another label: the first stands) is refused with its reason, its list and line number.

Segmentation data (image + label-map pairs) is recognised by its layout: ADE20K's
(`[ADEChallengeData2016/]images/{training,validation}/*.jpg` with `annotations/...png`: 150
classes, stored 0 = "other", reduce_zero_label) or the generic one (`masks/{split}/REL.png` beside
each image `[images/]{split}/REL`, with `classes.txt`: line i names label i, stored 255 =
unlabelled). A label map without an image is refused too.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple, Optional

from droppos import UserError
from droppos.files import Confinement, InputError, name_too_long, read_input
from droppos.labelmaps import ADE20K_CLASSES, DEFAULT_IGNORE_INDEX, MAX_CLASSES, NO_IMAGE_CLASS, SegSpec
from droppos.recipes import SHARD_LAYOUTS as LAYOUTS  # what SOURCE holds (auto: recognised from its folders)
from droppos.shard.inputs import LIST_MAX_BYTES, describe, is_text, path_fields, skip_record

IMAGENET_SPLITS = ("train", "val")
NOT_IN_A_CLASS = "not inside a class folder"
ADE20K_ROOT = "ADEChallengeData2016"
ADE20K_SPLITS = {"train": "training", "val": "validation"}
MASKS_ROOT, CLASSES_FILE = "masks", "classes.txt"  # the generic segmentation layout
BAD_CLASS_NAME = "in a class folder whose name is not valid UTF-8 (class names are text): rename the folder"


class Candidate(NamedTuple):
    """One input file: its path relative to SOURCE (POSIX), its class index (-1: none) and, for
    segmentation data, the path of its label map relative to SOURCE."""

    path: str
    label: int
    mask: Optional[str] = None


class Listing(NamedTuple):
    """What discovery found: class names, the candidates of each split and, per split, what it
    refused while listing (skipped.jsonl records: path, maybe path_bytes, reason); for segmentation
    data, how its label maps are read."""

    classes: list[str]
    candidates: dict[str, list[Candidate]]
    refused: dict[str, list[dict]]
    segmentation: Optional[SegSpec] = None


def discover_imagenet(source: Path, within: Confinement | None = None) -> Listing:
    """SOURCE/{train,val}/<class>/** -> sorted class names, the candidates and the refused entries of each split.

    `within` (SOURCE's confinement; None with --follow-links): a split folder, class folder or file that
    resolves outside it through a symlink is one refused entry, never listed or read.
    """
    split_dirs = {split: source / split for split in IMAGENET_SPLITS if (source / split).is_dir()}
    if not split_dirs:
        raise UserError(
            f"{source} has no train/ or val/ folder; expected SOURCE/train/<class>/*.JPEG "
            "(or give list files with --list)"
        )
    per_split: dict[str, list[tuple[str, str | None]]] = {}
    refused: dict[str, list[dict]] = {}
    class_names: set[str] = set()
    for split, split_dir in split_dirs.items():
        files: list[tuple[str, str | None]] = []
        refused[split] = []
        classes_here = 0
        if within is not None and not within.holds(split_dir):
            entries, error = [], within.outside
        else:
            entries, error = _list_dir(split_dir)
        if error is not None:
            refused[split].append(skip_record(split, error))
        for entry in entries:
            rel = f"{split}/{entry.name}"
            if entry.name.startswith("."):
                refused[split].append(skip_record(rel, _hidden(entry)))
            elif _outside(entry, within):
                refused[split].append(skip_record(rel, within.outside))
            elif _is_dir(entry):
                found = _walk(rel, entry.path, within)
                if not is_text(entry.name):
                    refused[split].extend(skip_record(path, reason or BAD_CLASS_NAME) for path, reason in found)
                    continue
                classes_here += 1
                class_names.add(entry.name)
                for path, reason in found:
                    if reason is None:
                        files.append((path, entry.name))
                    else:
                        refused[split].append(skip_record(path, reason))
            elif entry.is_file():
                files.append((rel, None))
            else:
                refused[split].append(skip_record(rel, NOT_IN_A_CLASS))
        if files and not classes_here:
            raise UserError(
                f"{split_dir} holds files but no class folders; sort them into {split}/<class>/ "
                f"or describe them with --list {split}=FILE"
            )
        per_split[split] = files
    classes = sorted(class_names)
    index = {name: i for i, name in enumerate(classes)}
    splits = {
        split: [Candidate(rel, index[name] if name is not None else -1) for rel, name in files]
        for split, files in per_split.items()
    }
    return Listing(classes, splits, refused)


def _walk(rel: str, folder: str, within: Confinement | None = None) -> Iterator[tuple[str, str | None]]:
    """(path relative to SOURCE, None) for each file under `folder` that may be an input, (path,
    reason) for each entry refused while listing: hidden ones, symlinks to folders (not followed:
    no cycles), a folder that cannot be listed (one entry), and with `within` a symlink to a file
    that resolves outside it. Symlinks to files are inputs. Depth first, sorted, without recursion
    (a folder may nest as deep as the system's path length allows)."""
    entries, error = _list_dir(folder)
    if error is not None:
        yield rel, error
        return
    stack = [(rel, iter(entries))]
    while stack:
        base, pending = stack[-1]
        entry = next(pending, None)
        if entry is None:
            stack.pop()
            continue
        path = f"{base}/{entry.name}"
        if entry.name.startswith("."):
            yield path, _hidden(entry)
        elif _is_dir(entry, follow_symlinks=False):
            inner, error = _list_dir(entry.path)
            if error is not None:
                yield path, error
            else:
                stack.append((path, iter(inner)))
        elif entry.is_symlink() and _is_dir(entry):
            yield path, "a symlink to a folder (not followed)"
        elif _outside(entry, within):
            yield path, within.outside
        else:
            yield path, None  # what it is (regular, FIFO, device, broken link) is settled when it is read


def _outside(entry: os.DirEntry, within: Confinement | None) -> bool:
    """Whether `entry` is a symlink that resolves outside `within` (only links can: what is walked is inside)."""
    return within is not None and entry.is_symlink() and not within.holds(entry.path)


def _list_dir(folder: str | Path) -> tuple[list[os.DirEntry], str | None]:
    """The entries of `folder` sorted by name (the file system's order cannot matter), or the reason it cannot be listed."""
    too_long = name_too_long(folder)
    if too_long is not None:
        return [], f"{too_long}: not listed"
    try:
        with os.scandir(folder) as listing:
            return sorted(listing, key=lambda e: e.name), None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            return [], f"name too long: {err.strerror}: not listed"
        return [], f"folder cannot be listed: {err.strerror or describe(err)}"


def _is_dir(entry: os.DirEntry, follow_symlinks: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False


def _hidden(entry: os.DirEntry) -> str:
    return "hidden folder (not searched)" if _is_dir(entry, follow_symlinks=False) else "hidden file"


LIST_LINE = "`relative/path class_index`"
SHOWN = 4200  # characters of a refused line kept in its record (a longer path is refused as too long anyway)


class _Listed(NamedTuple):
    """Where a path was first listed, and with which label."""

    split: str
    line: int
    label: int


def discover_lists(source: Path, lists: dict[str, Path]) -> Listing:
    """List files of `relative/path class_index` lines -> class names and candidates per split.

    The given indices stand. A class is named after the one folder its files live in
    when that is unambiguous (e.g. ImageNet synsets), else after its index. What each line holds is
    checked here (`_parse_line`); a path listed again is refused, the first listing standing (also
    across splits: an image in train and val is a leak). What a listed path is (and whether it
    resolves inside SOURCE) is settled when it is read. Every refused line is a skipped.jsonl record
    with its `list` and `line`, so that written + skipped = found counts every line that names an entry.
    """
    splits: dict[str, list[Candidate]] = {}
    refused: dict[str, list[dict]] = {}
    first: dict[str, _Listed] = {}  # path -> where it was first listed
    for split, list_file in lists.items():
        list_file = Path(list_file)
        try:
            data = read_input(list_file, f"--list {split}=", LIST_MAX_BYTES)
        except InputError as err:
            raise UserError(f"--list {split}={list_file}: {err.reason}") from None
        candidates: list[Candidate] = []
        refused[split] = []
        well_formed, first_problem = 0, None
        for number, raw in enumerate(data.split(b"\n"), 1):
            parsed = _parse_line(raw, source)
            if parsed is None:
                continue
            path, label, problem = parsed
            if problem is None:
                well_formed += 1
                earlier = first.get(path)
                if earlier is None:
                    first[path] = _Listed(split, number, label)
                    candidates.append(Candidate(path, label))
                    continue
                where = f"line {earlier.line}" + ("" if earlier.split == split else f" of the {earlier.split} list")
                problem = (f"listed again ({where})" if earlier.label == label else
                           f"listed with label {earlier.label} and {label}: conflicting labels (first: {where}, kept)")
            elif first_problem is None:
                first_problem = f"line {number}: {problem}"
            refused[split].append({**path_fields(path), "reason": problem, "list": path_fields(str(list_file))["path"],
                                   "line": number})
        if not well_formed:
            if first_problem is None:
                raise UserError(f"--list {split}={list_file}: no {LIST_LINE} lines in it")
            raise UserError(f"--list {split}={list_file}: not one of its lines names an input as {LIST_LINE} "
                            f"({first_problem})")
        probe = candidates[: min(len(candidates), 100)]
        if probe and not any(os.path.exists(source / c.path) for c in probe):  # never raises
            raise UserError(
                f"none of the first {len(probe)} paths of {list_file} exists under {source}; "
                "is SOURCE the folder the list's paths are relative to?"
            )
        splits[split] = candidates
    num_classes = 1 + max(c.label for candidates in splits.values() for c in candidates)
    folders: dict[int, set[str]] = {}
    for candidates in splits.values():
        for c in candidates:
            parent = PurePosixPath(c.path).parent.name
            if parent:
                folders.setdefault(c.label, set()).add(parent)
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else str(i) for i in range(num_classes)]
    if len(set(names)) != len(names):
        names = [str(i) for i in range(num_classes)]
    return Listing(names, splits, refused)


def _parse_line(raw: bytes, source: Path) -> tuple[str, int, str | None] | None:
    """One line of a list file: None for a blank or comment line, (normalised path, label, None) for an
    entry, (what the line holds, -1, why) for a line that names no readable entry.

    The class index is the last field (white space before it), so a path may hold spaces.
    A class index is ASCII digits below MAX_CLASSES (int() also takes '²'-like digits of other scripts,
    and would build millions of class names from a huge one).
    """
    line = raw[:-1] if raw.endswith(b"\r") else raw
    try:
        text = line.decode("utf-8").strip(" \t")
    except UnicodeDecodeError as err:
        return os.fsdecode(line.strip(b" \t"))[:SHOWN], -1, f"not UTF-8 text (byte {err.start + 1}): not read"
    if not text or text.startswith("#"):
        return None
    if "\0" in text:
        return text[:SHOWN], -1, "a NUL byte in the line: not read"
    fields = text.rsplit(None, 1)  # the class index is the last field: a path may hold spaces
    if len(fields) != 2:
        return text[:SHOWN], -1, f"1 field, expected 2: {LIST_LINE}"
    path, label = fields[0].strip(), fields[1]
    if not re.fullmatch(r"[0-9]+", label):
        return path[:SHOWN], -1, f"class index {label[:20]!r} is not a non-negative integer (ASCII digits)"
    digits = label.lstrip("0") or "0"
    if len(digits) > len(str(MAX_CLASSES)) or int(digits) >= MAX_CLASSES:
        shown = digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits):,} digits)"
        return path[:SHOWN], -1, (f"class index {shown} is beyond the {MAX_CLASSES:,} classes a dataset can hold "
                                  f"(0..{MAX_CLASSES - 1})")
    rel = PurePosixPath(path)
    if rel.is_absolute() or path.startswith("~"):
        return path[:SHOWN], -1, "not relative to SOURCE (list paths are relative to SOURCE): not read"
    if ".." in rel.parts:
        return path[:SHOWN], -1, "'..' in the path (list paths stay inside SOURCE): not read"
    too_long = name_too_long(path) or name_too_long(source / rel)
    if too_long is not None:
        return path[:SHOWN], -1, f"{too_long}: not read"
    return rel.as_posix(), int(digits), None


class SegLayout(NamedTuple):
    """Where a segmentation SOURCE keeps its images and label maps (folders relative to SOURCE, POSIX)."""

    name: str  # "ade20k" | "masks"
    images: str  # the image root ("" = SOURCE itself)
    masks: str  # the label-map root
    splits: dict[str, str]  # our split -> its folder under both roots
    spec: SegSpec


def detect_layout(source: Path, layout: str = "auto", ignore_index: int | None = None,
                  reduce_zero_label: bool | None = None) -> SegLayout | None:
    """The segmentation layout of SOURCE, or None for classification data (see the module docstring).

    `ignore_index` and `reduce_zero_label` override the layout's own convention (ADE20K: 255 and true,
    the generic layout: 255 and false).
    """
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if ignore_index is not None and not 0 <= ignore_index <= 65535:
        raise UserError(f"--ignore-index must be in 0..65535 (a stored label value), got {ignore_index}")
    if layout == "imagenet":
        return None
    ade = next((root for root in (ADE20K_ROOT, "") if _is_ade20k(source / root)), None)
    if layout in ("auto", "ade20k") and ade is not None:
        splits = {ours: theirs for ours, theirs in ADE20K_SPLITS.items() if (source / ade / "images" / theirs).is_dir()}
        spec = SegSpec(ADE20K_CLASSES, DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index,
                       True if reduce_zero_label is None else reduce_zero_label, image_classes=False)
        return SegLayout("ade20k", rel_join(ade, "images"), rel_join(ade, "annotations"), splits, spec)
    if layout == "ade20k":
        raise UserError(f"{source} is not ADE20K's layout: expected [{ADE20K_ROOT}/]images/training (or "
                        "validation) with annotations/ beside it")
    if (source / MASKS_ROOT).is_dir():
        images = "images" if (source / "images").is_dir() else ""
        splits = {}
        for split in IMAGENET_SPLITS:
            folder = next((f for f in (split, ADE20K_SPLITS[split]) if (source / images / f).is_dir()
                           or (source / MASKS_ROOT / f).is_dir()), None)
            if folder is not None:
                splits[split] = folder
        if not splits:
            raise UserError(f"{source / MASKS_ROOT} has no train/ or val/ folder: expected masks/{{train,val}}/...")
        spec = SegSpec(_read_classes(source / CLASSES_FILE),
                       DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index, bool(reduce_zero_label))
        return SegLayout("masks", images, MASKS_ROOT, splits, spec)
    if layout == "masks":
        raise UserError(f"{source} has no {MASKS_ROOT}/ folder: expected masks/{{train,val}}/... beside the images")
    return None


def _is_ade20k(root: Path) -> bool:
    return (root / "annotations").is_dir() and any((root / "images" / s).is_dir() for s in ADE20K_SPLITS.values())


def rel_join(*parts: str) -> str:
    """Relative POSIX paths joined, empty parts left out."""
    return "/".join(p for p in parts if p)


def _read_classes(path: Path) -> tuple[str, ...]:
    """classes.txt: one class name per line, line i (from 0) naming label i; blank lines only at the end."""
    if not path.is_file():
        raise UserError(f"{path.parent} has label maps ({MASKS_ROOT}/) but no {CLASSES_FILE}: list the class names "
                        "in it, one per line, line i (from 0) naming label value i")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it ({describe(err)})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    blank = next((number for number, name in enumerate(names, 1) if not name), None)
    if blank is not None:
        raise UserError(f"{path}:{blank}: a blank class name (line i names label i-1: every line needs a name)")
    if not 1 <= len(names) <= MAX_CLASSES:
        raise UserError(f"{path}: {len(names)} classes; need 1..{MAX_CLASSES}")
    return names


def discover_segmentation(source: Path, layout: SegLayout) -> Listing:
    """Images of each split with the label map each must have; label maps without an image are refused.

    An image `IMAGES/{split}/REL` has the label map `MASKS/{split}/REL` with the suffix `.png`. Its
    image class is the first folder of REL when every image lies in a folder (ImageNet-style), else
    there are no image classes (class 0, `none`).
    """
    files: dict[str, list[tuple[str, str, str]]] = {}  # split -> (image path, folder, mask path)
    refused: dict[str, list[dict]] = {}
    for split, folder in layout.splits.items():
        image_rel, mask_rel = rel_join(layout.images, folder), rel_join(layout.masks, folder)
        refused[split], files[split] = [], []
        claimed: dict[str, str] = {}  # mask path -> the image that has it
        if (source / image_rel).is_dir():
            for path, reason in _walk(image_rel, str(source / image_rel)):
                if reason is not None:
                    refused[split].append(skip_record(path, reason))
                    continue
                inner = PurePosixPath(path[len(image_rel) + 1:])
                mask = f"{mask_rel}/{inner.with_suffix('.png').as_posix()}"
                if mask in claimed:
                    refused[split].append(skip_record(path, f"its label map name {mask} is also that of "
                                                            f"{claimed[mask]}: rename one of the two images"))
                    continue
                claimed[mask] = path
                files[split].append((path, inner.parts[0] if len(inner.parts) > 1 else "", mask))
        if (source / mask_rel).is_dir():
            for path, reason in _walk(mask_rel, str(source / mask_rel)):
                if reason is not None:
                    refused[split].append(skip_record(path, reason))
                elif path not in claimed:
                    refused[split].append(skip_record(path, f"a label map without an image (no {image_rel}/"
                                                            f"{PurePosixPath(path[len(mask_rel) + 1:]).stem}.*)"))
    listed = [entry for entries in files.values() for entry in entries]
    with_classes = bool(listed) and all(folder for _, folder, _ in listed)
    if with_classes:
        good = {folder for _, folder, _ in listed if is_text(folder)}
        classes = sorted(good)
    else:
        classes = [NO_IMAGE_CLASS]
    index = {name: i for i, name in enumerate(classes)}
    candidates: dict[str, list[Candidate]] = {}
    for split, entries in files.items():
        candidates[split] = []
        for path, folder, mask in entries:
            if with_classes and folder not in index:
                refused[split].append(skip_record(path, BAD_CLASS_NAME))
            else:
                candidates[split].append(Candidate(path, index[folder] if with_classes else 0, mask))
    return Listing(classes, candidates, refused, dataclasses.replace(layout.spec, image_classes=with_classes))


