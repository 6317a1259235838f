"""Writing the shards: planning, the worker pool, resume, the manifest and the tally.

The shuffled candidates of a split are cut into shards of `shard_size` candidates before
anything is decoded (DALI's shuffle is only a local buffer, so shards are shuffled globally
here), which makes shards independent: a shard is the unit of parallel work. Each is written
under temporary names, fsynced, renamed, then recorded in an append-only progress log
(OUT/.shard-progress.jsonl); a re-run reuses what the log records once its tar's sha256 and its
index (entry by entry against the tar's headers) check out, and writes only the rest.
`manifest.json` is written last, so it never lists a partial shard; skipped.jsonl says what
was skipped and why (written + skipped = found).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
import signal
import struct
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from droppos import UserError
from droppos.files import Confinement
from droppos.files import fsync_dir, output_error, remove_stale_temporaries, temporary_path, write_bytes_atomic, \
    write_json_atomic, write_text_atomic
from droppos.labelmaps import MASK_COMPONENT, TASK, SegSpec, spec_from_manifest
from droppos.manifest import FORMAT, MANIFEST_NAME, file_sha256
from droppos.progress import Progress
from droppos.shard.convert import Converted, ConvertedMask, convert_file, convert_mask_file
from droppos.shard.discover import NOT_IN_A_CLASS, Candidate, Listing
from droppos.shard.inputs import path_fields, skip_record
from droppos.tarindex import BadTar, IndexedTarWriter, index_problem, scan_tar

PROGRESS_LOG = ".shard-progress.jsonl"
SKIPPED_NAME = "skipped.jsonl"
LOG_EVERY_S = 15.0  # a plain progress line this often when stderr is not a terminal


class ShardPlan(NamedTuple):
    """The candidates of one shard, in their shuffled order, with their global positions."""

    split: str
    name: str
    start: int
    items: list[Candidate]


def plan_shards(found: dict[str, list[Candidate]], splits: list[str], seed: int, shard_size: int) -> list[ShardPlan]:
    """Sort (so the file system's listing order cannot matter), shuffle by seed, cut into shards."""
    plans = []
    for split in splits:
        order = sorted(found[split])
        random.Random(f"droppos-shard:{seed}:{split}").shuffle(order)
        for number, start in enumerate(range(0, len(order), shard_size)):
            plans.append(ShardPlan(split, f"{split}-{number:06d}", start, order[start : start + shard_size]))
    return plans


def dataset_fingerprint(classes: list[str], found: dict[str, list[Candidate]], splits: list[str], options: dict,
                        seg: SegSpec | None = None) -> str:
    """What the shards depend on: the input listing, the classes and the options that change bytes
    (for segmentation data also the label maps' paths and convention; classification data hashes as before)."""
    digest = hashlib.sha256()
    relevant = {k: options[k] for k in ("mode", "seed", "shard_size", "max_side", "quality", "max_pixels")}
    if options.get("follow_links"):  # only when on: a dataset written before the option keeps its fingerprint
        relevant["follow_links"] = True
    digest.update(json.dumps({"format": FORMAT, "classes": classes, "options": relevant}, sort_keys=True).encode())
    if seg is not None:
        digest.update(json.dumps({"segmentation": seg.record()}, sort_keys=True).encode())
    for split in splits:
        digest.update(f"\n[{split}]\n".encode())
        for candidate in sorted(found[split]):
            mask = "" if candidate.mask is None else f"\t{candidate.mask}"
            digest.update(f"{candidate.path}\t{candidate.label}{mask}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def resume(out: Path, fingerprint: str) -> dict[str, dict]:
    """Shard records of a previous run on OUT whose files still match; refuses foreign datasets."""
    log = out / PROGRESS_LOG
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("options", {}).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != fingerprint:
            raise UserError(
                f"OUT {out} already holds a dataset written from other input or options; "
                "give an empty directory or delete that one"
            )
    records: dict[str, dict] = {}
    if not log.is_file():
        return records
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise output_error(err, log, "read") from None
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        raise UserError(
            f"OUT {out} holds shards of an unfinished run from other input or options; "
            "re-run that command, or give an empty directory"
        )
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by an interruption: that shard is simply redone
        if isinstance(record, dict) and isinstance(record.get("name"), str):
            records[record["name"]] = record
    intact = {}
    for name, record in records.items():
        problem = _shard_problem(out, record)
        if problem is None:
            intact[name] = record
        else:
            print(f"rewriting {name}: {problem}", file=sys.stderr, flush=True)
    return intact


def _shard_problem(out: Path, record: dict) -> str | None:
    """Why a recorded shard cannot be reused (None: its tar has the recorded size and sha256, and
    its index the recorded sha256 and, entry by entry, the tar's real layout).

    A record from before index hashes were recorded gets `index_sha256` here, once its index
    is checked against the tar: that is how a re-run upgrades an older dataset in place,
    without rewriting a tar.
    """
    entry = record.get("entry")
    if entry is None:  # every candidate of that shard was skipped: nothing on disk to check
        return None
    try:
        tar, index = out / entry["tar"], out / entry["index"]
        if tar.stat().st_size != entry["bytes"]:
            return "its tar has another size than when it was written"
        scan = scan_tar(tar)
        index_sha256 = file_sha256(index)
    except (KeyError, TypeError):
        return "its progress record is malformed"
    except (OSError, BadTar) as err:
        return str(err) if isinstance(err, BadTar) else f"cannot read it ({err.strerror})"
    if scan.sha256 != entry["sha256"]:
        return "its tar's sha256 differs from when it was written"
    if entry.get("index_sha256", index_sha256) != index_sha256:
        return f"{index.name}'s sha256 differs from when it was written"
    problem = index_problem(index, scan.members)
    if problem is not None:
        return f"{index.name}: {problem}"
    entry["index_sha256"] = index_sha256
    return None


def write_shards(
    source: Path, out: Path, todo: list[ShardPlan], classes: list[str], options: dict, workers: int,
    records: dict[str, dict], within: Confinement | None, seg: SegSpec | None = None,
) -> None:
    """Write the shards of `todo`, one shard per task on `workers` processes, logging each when done.

    Shards, not images, are the unit of parallel work: the image bytes never cross a process
    boundary and the tar writing scales with the workers too. Called with OUT locked, so every
    temporary file in OUT is stale: they are removed before and after (a failed or stopped
    pool leaves its workers' temporaries behind).
    """
    settings = (options["max_side"], options["quality"], options["max_pixels"])
    tasks = [(source, out, plan, classes, settings, within, seg) for plan in todo]
    progress = Progress("shard", sum(len(plan.items) for plan in todo), unit="images", plain_every_s=LOG_EVERY_S)
    log_path = out / PROGRESS_LOG
    _remove_temporaries(out)
    try:
        with _writing(log_path):
            log = _open_progress_log(log_path, options["fingerprint"])

        def record_done(record: dict) -> None:
            with _writing(log_path):
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.flush()
                os.fsync(log.fileno())
            records[record["name"]] = record

        try:
            if workers == 1 or len(tasks) == 1:
                for task in tasks:
                    record_done(_write_shard(task, on_image=progress.advance))
                return
            context = _pool_context()
            counter = context.Value("q", 0)
            with context.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool:
                pending = pool.imap_unordered(_write_shard, tasks)
                while True:
                    try:
                        record = pending.next(timeout=0.5)
                    except multiprocessing.TimeoutError:
                        progress.update(counter.value)
                        continue
                    except StopIteration:
                        break
                    record_done(record)
                    progress.update(counter.value)
        finally:
            with contextlib.suppress(OSError):
                log.close()
    finally:
        progress.close()
        _remove_temporaries(out)


def _open_progress_log(path: Path, fingerprint: str) -> io.TextIOWrapper:
    """The progress log for appending: created with its header line, or ended with a newline
    first when an interruption tore its last line (the next record must start a line)."""
    if not path.is_file():
        with open(path, "w", encoding="utf-8") as log:
            log.write(json.dumps({"format": FORMAT, "fingerprint": fingerprint}) + "\n")
            log.flush()
            os.fsync(log.fileno())
    log = open(path, "a+", encoding="utf-8")
    if log.tell() > 0:
        log.seek(log.tell() - 1)
        last = log.read(1)
        log.seek(0, os.SEEK_END)
        if last != "\n":
            log.write("\n")
    return log


def _remove_temporaries(out: Path) -> None:
    """Temporary files of earlier or failed runs in OUT (only ever called while holding OUT's lock)."""
    remove_stale_temporaries(out)
    for legacy in [*out.glob(".*-[0-9]*.tar.tmp"), *out.glob(".*-[0-9]*.idx.tmp")]:  # named so before files.py
        with contextlib.suppress(OSError):
            legacy.unlink()


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe (Linux, no other Python thread): workers start in milliseconds and
    inherit the imports; spawn elsewhere (each worker then imports this module itself)."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


_images_done = None  # a shared counter in worker processes, for the progress display


def _init_worker(counter: multiprocessing.sharedctypes.Synchronized) -> None:
    """Ctrl-C is the main process's to handle: it stops the pool; the next run removes the temporaries."""
    global _images_done
    _images_done = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _count_image() -> None:
    if _images_done is not None:
        with _images_done.get_lock():
            _images_done.value += 1


def _write_shard(task: tuple, on_image: Callable[[], None] = _count_image) -> dict:
    """Convert the candidates of one shard in order and write it atomically; returns its record."""
    source, out, plan, classes, (max_side, quality, max_pixels), within, seg = task
    writer = ShardWriter(out, plan.name)
    skipped, actions = [], Counter()
    try:
        for offset, candidate in enumerate(plan.items):
            mask = None
            if candidate.label < 0:
                converted, reason = None, NOT_IN_A_CLASS
            else:
                job = (str(source / candidate.path), max_side, quality, max_pixels)
                converted, reason = convert_file(job, within)
            if converted is not None and seg is not None:
                checked, reason = convert_mask_file(str(source / candidate.mask), candidate.mask, converted, seg,
                                                    max_pixels, within)
                converted, mask = (converted, (candidate.mask, checked)) if checked is not None else (None, None)
            if converted is None:
                skipped.append(skip_record(candidate.path, reason))
            else:
                actions.update(converted.actions or ("kept",))
                if mask is not None:
                    actions.update(mask[1].actions)
                components = _sample_components(candidate.label, classes[candidate.label], candidate.path,
                                                converted, mask)
                writer.write(_sample_key(plan.split, plan.start + offset), components)
            on_image()
        if writer.num_samples:
            entry = writer.commit()
        else:  # every candidate skipped: no empty tar (DALI's index format cannot describe one)
            writer.abort()
            entry = None
    except BaseException:
        writer.abort()
        raise
    return {"name": plan.name, "split": plan.split, "found": len(plan.items), "entry": entry,
            "skipped": skipped, "actions": dict(sorted(actions.items()))}


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (full disk, read-only, permissions) as one line naming it."""
    try:
        yield
    except OSError as err:
        raise output_error(err, path) from None


class ShardWriter:
    """One shard: its tar and DALI index (droppos.tarindex), both under temporary names until
    commit() fsyncs and renames them. An OSError is an OutputError naming the shard."""

    def __init__(self, out: Path, name: str):
        self.out = out
        self.name = name
        self.tar_path, self.index_path = out / f"{name}.tar", out / f"{name}.idx"
        self.tmp_tar, self.tmp_index = temporary_path(self.tar_path), temporary_path(self.index_path)
        with _writing(self.tar_path):
            self.file = open(self.tmp_tar, "wb")
        self.tar = IndexedTarWriter(self.file)

    @property
    def num_samples(self) -> int:
        return self.tar.num_samples

    def write(self, key: str, components: dict[str, bytes]) -> None:
        """Add one sample (and its index line)."""
        with _writing(self.tar_path):
            self.tar.add(key, components)

    def commit(self) -> dict:
        """Finish, fsync and rename both files; returns the manifest entry (None-free)."""
        with _writing(self.tar_path):
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        index_bytes = self.tar.index_bytes()
        write_bytes_atomic(self.index_path, index_bytes)  # the index first: a tar never stands without it
        with _writing(self.tar_path):
            os.replace(self.tmp_tar, self.tar_path)
        fsync_dir(self.out)
        return {
            "tar": self.tar_path.name,
            "index": self.index_path.name,
            "num_samples": self.tar.num_samples,
            "bytes": self.tar.size,
            "sha256": self.tar.sha256,
            "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        }

    def abort(self) -> None:
        """Drop the temporary files (an empty shard, or an interrupted or failed one); never raises an OSError."""
        if not self.file.closed:
            with contextlib.suppress(Exception):  # flush the tar stream into the file before it closes
                self.tar.close()
            with contextlib.suppress(OSError):  # a full disk fails the final flush too
                self.file.close()
        for tmp in (self.tmp_tar, self.tmp_index):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _sample_components(label: int, class_name: str, path: str, converted: Converted,
                       mask: tuple[str, ConvertedMask] | None = None) -> dict[str, bytes]:
    """jpg, cls (ASCII), lbl (int32 little-endian: fixed width, what DALI batches) and json (provenance);
    with a label map (its path, its checked PNG), seg.png too and the label map's path in json."""
    meta = {**path_fields(path), "class": class_name, "width": converted.width, "height": converted.height}
    if mask is not None:
        meta["mask"] = path_fields(mask[0])["path"]
    components = {
        "jpg": converted.jpg,
        "cls": str(label).encode("ascii"),
        "lbl": struct.pack("<i", label),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }
    if mask is not None:
        components[MASK_COMPONENT] = mask[1].png
    return components


def _sample_key(split: str, position: int) -> str:
    return f"{split}_{position:09d}"  # no dot: webdataset and DALI split keys at the first dot


def finish(
    out: Path, plans: list[ShardPlan], listing: Listing, splits: list[str], options: dict, records: dict[str, dict],
) -> dict:
    """Write skipped.jsonl and manifest.json from the listing and the shard records (the manifest last)."""
    split_info: dict[str, dict] = {}
    skipped_lines: list[str] = []
    actions: Counter = Counter()
    for split in splits:
        refused = listing.refused.get(split, [])
        found = len(listing.candidates.get(split, ())) + len(refused)
        shards, written, skipped = [], 0, len(refused)
        skipped_lines.extend(json.dumps(s, ensure_ascii=False) for s in refused)
        for plan in (p for p in plans if p.split == split):
            record = records[plan.name]
            skipped += len(record["skipped"])
            skipped_lines.extend(json.dumps(s, ensure_ascii=False) for s in record["skipped"])
            actions.update(record["actions"])
            if record["entry"] is not None:
                shards.append(record["entry"])
                written += record["entry"]["num_samples"]
        if written + skipped != found:
            raise RuntimeError(f"{split}: written {written} + skipped {skipped} != found {found}")
        split_info[split] = {"num_samples": written, "found": found, "skipped": skipped, "shards": shards}
    write_text_atomic(out / SKIPPED_NAME, "".join(line + "\n" for line in skipped_lines))
    kept_masks = actions.pop("mask-kept", 0)
    total_written = sum(info["num_samples"] for info in split_info.values())
    if total_written == 0:
        (out / PROGRESS_LOG).unlink(missing_ok=True)  # nothing usable: do not let a re-run "resume" this
        raise UserError(
            f"none of the {sum(info['found'] for info in split_info.values())} inputs under {options['source']} "
            f"is a usable image (reasons in {out / SKIPPED_NAME})"
        )
    manifest = {
        "format": FORMAT,
        "classes": listing.classes,
        "splits": {split: info for split, info in split_info.items() if info["num_samples"] > 0},
        "found": sum(info["found"] for info in split_info.values()),
        "written": total_written,
        "skipped": sum(info["skipped"] for info in split_info.values()),
        "conversions": {k: v for k, v in sorted(actions.items()) if k != "kept"},
        "kept_original_bytes": actions.get("kept", 0),
        "options": options,
    }
    if listing.segmentation is not None:
        manifest.update(task=TASK, segmentation=listing.segmentation.record(), kept_original_label_maps=kept_masks)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def print_tally(out: Path, manifest: dict) -> None:
    for split, info in manifest["splits"].items():
        print(f"{split}: found {info['found']}, written {info['num_samples']}, skipped {info['skipped']}, "
              f"{len(info['shards'])} shard{'s' if len(info['shards']) != 1 else ''}")
    conversions = ", ".join(f"{k} {v}" for k, v in manifest["conversions"].items()) or "none"
    print(f"re-encoded or converted: {conversions}; original bytes kept: {manifest['kept_original_bytes']}")
    spec = spec_from_manifest(manifest)
    if spec is not None:
        print(f"label maps: {spec.describe()}; {'image classes from the class folders' if spec.image_classes else 'no image classes'}; "
              f"original bytes kept: {manifest['kept_original_label_maps']}")
    print(f"total: found {manifest['found']}, written {manifest['written']}, skipped {manifest['skipped']} "
          f"-> {out} (skipped inputs and reasons: {out / SKIPPED_NAME})")


