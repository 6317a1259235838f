"""The one way out (`droppos.files.claim_output`, `publish`): every command that writes (shard, pretrain,
finetune, probe, eval-pos, export) refuses, in one line and exit 2, an output that is, lies inside or contains
one of its inputs, or that is another kind of command's output, or whose lock is a planted link; export replaces
only a recognisable previous export; a report or an export appears whole or not at all (a full disk, a kill
mid-publication). Each refusal is checked to leave every input and every other output byte-identical.

The world is built once per module: a tiny ImageNet-style source, a copy of `sample_shards`, a 1-step pretrain run
and, from them, one output of each kind (a second dataset, a second run, an eval-pos report, a timm export, a
folder of .pth exports).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import faultlib
import numpy as np
import pytest
import torch
from faultlib import Fault
from inprocess import droppos
from PIL import Image

from droppos.files import LOCK_NAME, folder_kinds

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_tiny_patch16", "--img-size", "32", "--patch-size", "8", "--depth", "1", "--decoder-width", "32",
        "--decoder-depth", "1", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0", "--device", "cpu",
        "--no-compile", "--loader", "pil", "--workers", "0"]
HEAD = ["--batch-size", "8", "--epochs", "1", "--device", "cpu", "--no-compile", "--loader", "pil", "--workers", "0"]
EVAL = ["--loader", "pil", "--workers", "0", "--batch-size", "16", "--permutations", "2", "--probe-steps", "5",
        "--max-images", "8", "--ratio", "0:1"]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("droppos: error: "), result.stderr
    return lines[0]


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under `roots` (links not followed) -> the sha256 of a file, 'dir', or 'link -> target'."""
    seen: dict[str, str] = {}
    for root in roots:
        if not os.path.lexists(root):
            seen[str(root)] = "absent"
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
            if path.is_symlink():
                seen[str(path)] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                seen[str(path)] = "dir"
            else:
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.fixture(scope="module")
def world(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs, each alone in a folder of its own (so that the folder is an output that contains only it), and one
    output of each kind."""
    from droppos import shard

    root = tmp_path_factory.mktemp("outputs")
    w: dict[str, Path] = {"root": root}
    source = root / "in-source" / "src"
    for split, classes, count in (("train", "abc", 4), ("val", "ab", 1)):
        for name in classes:
            (source / split / name).mkdir(parents=True)
            for i in range(count):
                (source / split / name / f"{i}.jpg").write_bytes(_jpeg(len(list(source.rglob("*.jpg")))))
    w["source"] = source
    w["list_root"] = source / "train"  # what --list's paths are relative to: shard's SOURCE in list mode
    (root / "in-list").mkdir()
    w["list"] = root / "in-list" / "train.txt"
    w["list"].write_text("a/0.jpg 0\nb/0.jpg 1\n")
    w["data"] = root / "in-data" / "data"
    shutil.copytree(sample_shards, w["data"])
    w["images"] = root / "in-images" / "images"
    w["images"].mkdir(parents=True)
    for i in range(4):
        (w["images"] / f"{i}.jpg").write_bytes(_jpeg(100 + i))
    w["run"] = root / "in-run" / "run"
    result = droppos("pretrain", "--data", str(w["data"]), "--out", str(w["run"]), *TINY, "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    if not (w["run"] / "encoder.safetensors").exists():
        assert droppos("pretrain", "--out", str(w["run"]), "--export-only").returncode == 0
    w["encoder"] = w["run"] / "encoder.safetensors"

    # One output of each kind, none of them an input of the commands below.
    w["dataset2"] = root / "out-dataset"
    shard.run(source, w["dataset2"], workers=1, shard_size=4)
    w["run2"] = root / "out-run"
    shutil.copytree(w["run"], w["run2"])
    w["report"] = root / "out-report"
    result = droppos("eval-pos", str(w["run"]), "--images", str(w["images"]), "--out", str(w["report"]), *EVAL)
    assert result.returncode == 0, result.stderr
    w["timm"] = root / "out-timm"
    assert droppos("export", str(w["run"]), "--format", "timm", "--out", str(w["timm"])).returncode == 0
    w["pths"] = root / "out-pths"  # a folder of .pth exports: only its lock's record says what it is
    w["pths"].mkdir()
    result = droppos("export", str(w["run"]), "--format", "detectron2", "--out", str(w["pths"] / "vitdet.pth"))
    assert result.returncode == 0, result.stderr
    return w


# --------------------------------------------------------------------------------------------
# The table: every command that writes, against every output shape it must refuse

# command -> (argv builder, the inputs it reads, the kind of output it writes)
COMMANDS = {
    "shard": (lambda w, out: ["shard", str(w["source"]), str(out), "--workers", "1"], ("source",), "dataset"),
    "shard --list": (lambda w, out: ["shard", str(w["list_root"]), str(out), "--list", str(w["list"]),
                                     "--workers", "1"], ("list_root", "list"), "dataset"),
    "pretrain": (lambda w, out: ["pretrain", "--data", str(w["data"]), "--out", str(out), *TINY], ("data",), "run"),
    "finetune": (lambda w, out: ["finetune", "--data", str(w["data"]), "--run", str(w["run"]), "--out", str(out),
                                 *HEAD], ("data", "run"), "run"),
    "probe": (lambda w, out: ["probe", "--data", str(w["data"]), "--encoder", str(w["encoder"]), "--out", str(out),
                              *HEAD], ("data", "encoder"), "run"),
    "eval-pos --data": (lambda w, out: ["eval-pos", str(w["run"]), "--data", str(w["data"]), "--out", str(out), *EVAL],
                        ("run", "data"), "report"),
    "eval-pos --images": (lambda w, out: ["eval-pos", str(w["run"]), "--images", str(w["images"]), "--out", str(out),
                                          *EVAL], ("run", "images"), "report"),
    "export timm": (lambda w, out: ["export", str(w["run"]), "--format", "timm", "--out", str(out)], ("run",), "export"),
    "export detectron2": (lambda w, out: ["export", str(w["encoder"]), "--format", "detectron2", "--out", str(out)],
                          ("encoder",), "export"),
}
OTHER_OUTPUTS = {"dataset2": "dataset", "run2": "run", "report": "report", "timm": "export", "pths": "export"}
PATH_CASES = ("is", "inside", "contains")


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for command, (_, inputs, kind) in COMMANDS.items():
        cases += [(command, shape, name) for name in inputs for shape in PATH_CASES]
        cases += [(command, "other", name) for name, other in OTHER_OUTPUTS.items() if other != kind]
        cases += [(command, "lock-link", ""), (command, "garbage-lock-on-other", "")]
    return cases


def _out_for(w: dict[str, Path], command: str, shape: str, name: str, tmp_path: Path) -> tuple[Path, str]:
    """The --out of a case and a regex its one line must match."""
    if shape == "is":  # shard's own earlier check, or a training stage's "--out is a file", may say it first
        return w[name], r"must not be|is a file"
    if shape == "inside":
        return w[name] / "sub", r"must not lie inside|must not be SOURCE or lie inside"
    if shape == "contains":  # a .pth export into the run holding its --encoder: refused as a run's folder
        return w[name].parent, r"must not contain|is a training run"
    if shape == "other":
        return w[name], r"never into another command's output"
    if shape == "lock-link":  # export locks the folder that receives the export: the timm folder's parent
        out = tmp_path / "fresh"
        out.mkdir()
        (out / LOCK_NAME).symlink_to(w["list"])  # an input: truncating it would show
        return (out / "timm" if command == "export timm" else out), r"is a symbolic link, not droppos's lock file"
    if shape == "garbage-lock-on-other":  # a garbled lock says nothing; the markers still tell what it is
        mine = COMMANDS[command][2]
        out = tmp_path / "other"
        shutil.copytree(w["report"] if mine == "run" else w["run"], out)
        (out / LOCK_NAME).write_bytes(b"\xff\x00[not json" * 50)
        return out, r"never into another command's output"
    raise ValueError(shape)


@pytest.mark.parametrize("command, shape, name", _cases(), ids=lambda v: str(v).replace(" ", "_") or "-")
def test_every_command_refuses_an_output_it_must_not_write(world, tmp_path, command, shape, name):
    build, inputs, kind = COMMANDS[command]
    out, expected = _out_for(world, command, shape, name, tmp_path)
    watched = [world["root"], tmp_path]
    before = _snapshot(*watched)
    line = _one_line_error(droppos(*build(world, out)))
    assert re.search(expected, line), line
    if shape in PATH_CASES and " must not " in line and "SOURCE or lie inside" not in line:
        assert str(world[name]) in line and str(out) in line  # both paths named
    assert _snapshot(*watched) == before  # nothing created, nothing touched (inputs, other outputs, a lock's target)


def test_the_table_covers_every_command_that_writes():
    from droppos.files import OUTPUT_KINDS

    assert {command.split()[0] for command in COMMANDS} == set(OUTPUT_KINDS)
    assert {kind for _, _, kind in COMMANDS.values()} == set(OUTPUT_KINDS.values()) == set(OTHER_OUTPUTS.values())


def test_pretrain_export_only_goes_through_the_guard_too(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / LOCK_NAME).unlink()
    (run / LOCK_NAME).symlink_to(world["list"])
    before = _snapshot(world["root"], tmp_path)
    line = _one_line_error(droppos("pretrain", "--out", str(run), "--export-only"))
    assert "is a symbolic link, not droppos's lock file" in line
    assert _snapshot(world["root"], tmp_path) == before
    (run / LOCK_NAME).unlink()
    (run / LOCK_NAME).write_text("[1, 2")  # garbled: tolerated
    assert droppos("pretrain", "--out", str(run), "--export-only").returncode == 0
    assert json.loads((run / LOCK_NAME).read_text())["command"] == "pretrain --export-only"


# --------------------------------------------------------------------------------------------
# Export: never replaces what it did not write


def _foreign_things(tmp_path: Path, world) -> dict[str, Path]:
    """Files and folders at an export's --out that droppos did not write."""
    things = {}
    text = tmp_path / "notes.pth"
    text.write_text("my notes")
    things["text.pth"] = text
    mae = tmp_path / "mae.pth"  # MAE's own checkpoint layout: {'model': ...} with the final norm: not ours
    from safetensors.torch import load_file

    state = load_file(str(world["encoder"]))
    torch.save({"model": state}, mae)
    things["mae.pth"] = mae
    flat = tmp_path / "flat.pth"  # a flat timm state dict
    torch.save(state, flat)
    things["timm-state.pth"] = flat
    link = tmp_path / "link.pth"
    link.symlink_to(world["pths"] / "vitdet.pth")  # even a link to an export
    things["link.pth"] = link
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (hub / "model.safetensors").write_bytes(b"x")
    things["hf-folder"] = hub
    extra = tmp_path / "timm-plus"
    shutil.copytree(world["timm"], extra)
    (extra / "README.md").write_text("model card")
    things["timm-folder+file"] = extra
    return things


@pytest.mark.parametrize("thing", ["text.pth", "mae.pth", "timm-state.pth", "link.pth", "hf-folder",
                                   "timm-folder+file"])
def test_export_never_replaces_what_it_did_not_write(world, tmp_path, thing):
    target = _foreign_things(tmp_path, world)[thing]
    fmt = "timm" if target.is_dir() and not target.is_symlink() else ("mmseg" if thing == "text.pth" else "detectron2")
    before = _snapshot(world["root"], tmp_path)
    line = _one_line_error(droppos("export", str(world["run"]), "--format", fmt, "--out", str(target)))
    assert "refusing to replace" in line and str(target) in line
    assert _snapshot(world["root"], tmp_path) == before


def test_export_replaces_its_own_previous_export(world, tmp_path):
    out = tmp_path / "exports"
    shutil.copytree(world["pths"], out)
    shutil.copytree(world["timm"], out / "timm")
    for fmt, target in (("mmseg", out / "vitdet.pth"), ("detectron2", out / "vitdet.pth"), ("timm", out / "timm")):
        result = droppos("export", str(world["run"]), "--format", fmt, "--out", str(target))
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "timm").iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "timm" / "model.safetensors").read_bytes() == (world["timm"] / "model.safetensors").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "timm", "vitdet.pth"]  # no temporary left


def test_a_garbled_lock_is_tolerated_and_rewritten(world, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"\x00\xff" * 3000)
    result = droppos("export", str(world["run"]), "--format", "detectron2", "--out", str(out / "vitdet.pth"))
    assert result.returncode == 0, result.stderr
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["command"] == "export" and "released" in record and "pid" not in record
    assert folder_kinds(out) == {"export": f"its {LOCK_NAME} names `droppos export`"}


def test_export_into_a_folder_a_running_probe_holds_is_refused(world, tmp_path):
    from droppos.files import OutputLock

    out = tmp_path / "probe-run"
    with OutputLock(out, "probe"):  # a probe that has just started: nothing but its lock in the folder
        line = _one_line_error(droppos("export", str(world["run"]), "--format", "timm", "--out", str(out)))
        assert "is a training run (its .droppos.lock names `droppos probe`)" in line
        line = _one_line_error(droppos("export", str(world["run"]), "--format", "detectron2", "--out",
                                       str(out / "x.pth")))
        assert "is a training run" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# --------------------------------------------------------------------------------------------
# A command's files appear together or not at all


def _report_files(out: Path) -> dict[str, str]:
    return {k: v for k, v in _snapshot(out).items() if not k.endswith(LOCK_NAME)}


def test_a_full_disk_while_eval_pos_publishes_leaves_the_previous_report_whole(world, tmp_path):
    out = tmp_path / "report"
    shutil.copytree(world["report"], out)
    before = _report_files(out)
    sizes = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".png", ".json"))
    # Room for the lock, every figure and report.json: the disk fills while report.html is written (the last file).
    with faultlib.inject(Fault("write", out, "ENOSPC", after=sizes + 4000)):
        result = droppos("eval-pos", str(world["run"]), "--images", str(world["images"]), "--out", str(out), *EVAL,
                         "--seed", "7", "--random-baseline")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("droppos: error: cannot write ") and "No space left on device" in last
    assert _report_files(out) == before  # byte-identical, and no new file beside it
    # With space again, the new report replaces the old one whole (the baseline's extra heatmap included).
    result = droppos("eval-pos", str(world["run"]), "--images", str(world["images"]), "--out", str(out), *EVAL,
                     "--seed", "7", "--random-baseline")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    assert names == {"report.json", "report.html", *report["plots"]} and len(report["models"]) == 2
    # A later report of one model takes the previous report's extra files with it.
    assert droppos("eval-pos", str(world["run"]), "--images", str(world["images"]), "--out", str(out),
                   *EVAL).returncode == 0
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} - {LOCK_NAME} == {"report.json", "report.html", *report["plots"]}


@pytest.mark.parametrize("fmt", ["timm", "detectron2"])
def test_a_full_disk_while_exporting_over_an_export_leaves_it_whole(world, tmp_path, fmt):
    import timm

    __import__("droppos.model")  # registers the droppos_* timm names
    from droppos.export import export_encoder

    folder = tmp_path / "exports"
    out = folder / ("timm" if fmt == "timm" else "vitdet.pth")
    assert droppos("export", str(world["run"]), "--format", fmt, "--out", str(out)).returncode == 0
    torch.manual_seed(5)  # another encoder of the same architecture: every byte differs
    other = timm.create_model("droppos_vit_tiny_patch16", img_size=32, patch_size=8, depth=1)
    export_encoder(other, tmp_path / "other" / "encoder.safetensors")
    before = _snapshot(folder)
    # timm: room for the lock and model.safetensors, not config.json (the last file); a .pth: full within the file.
    record = len(json.dumps({"command": "export", "pid": os.getpid(), "host": socket.gethostname(),
                             "since": "2026-01-01T00:00:00+00:00"})) + 1
    budget = (out / "model.safetensors").stat().st_size + record + 100 if fmt == "timm" else 20_000
    with faultlib.inject(Fault("write", folder, "ENOSPC", after=budget)):
        result = droppos("export", str(tmp_path / "other"), "--format", fmt, "--out", str(out))
    line = _one_line_error(result)
    failed = out / "config.json" if fmt == "timm" else out
    assert line.startswith(f"droppos: error: cannot write {failed}: No space left on device"), line
    after = _snapshot(folder)
    lock = str(folder / LOCK_NAME)
    assert {k: v for k, v in after.items() if k != lock} == {k: v for k, v in before.items() if k != lock}
    result = droppos("export", str(tmp_path / "other"), "--format", fmt, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert _snapshot(folder) != before


KILL_MID_PUBLICATION = textwrap.dedent("""
    import os, sys
    from droppos import files
    folder = sys.argv[1]
    real_replace, moves = os.replace, []
    def replace(src, dst):
        real_replace(src, dst)
        moves.append(dst)
        if len(moves) == 3:  # journal in place, a.txt set aside and replaced: killed before b.txt
            os._exit(9)
    with files.claim_output(folder, "eval-pos"):
        with files.publish(folder, owns=["c.txt"]) as staged:
            staged.write_text("a.txt", "new a")
            staged.write_text("b.txt", "new b")
            staged.write_text("d.txt", "new d")
            os.replace = replace
""")


def test_a_kill_in_the_middle_of_a_publication_is_rolled_back_by_the_next_claim(tmp_path):
    from droppos import files

    folder = tmp_path / "report"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "mine.txt"):
        (folder / name).write_text(f"old {name}")
    before = _report_files(folder)
    killed = subprocess.run([sys.executable, "-c", KILL_MID_PUBLICATION, str(folder)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == 9, killed.stderr
    assert (folder / "a.txt").read_text() == "new a"  # half published: what a reader would see until the next claim
    with files.claim_output(folder, "eval-pos"):
        pass
    assert _report_files(folder) == before  # the previous state, whole; no journal, no temporary left
    # A publication that completes replaces a.txt, b.txt, d.txt and takes c.txt away; mine.txt is not its file.
    with files.claim_output(folder, "eval-pos"):
        with files.publish(folder, owns=["c.txt", "a.txt"]) as staged:
            for name in ("a.txt", "b.txt", "d.txt"):
                staged.write_text(name, f"new {name}")
    assert {p.name: p.read_text() for p in folder.iterdir() if p.name != LOCK_NAME} == {
        "a.txt": "new a.txt", "b.txt": "new b.txt", "d.txt": "new d.txt", "mine.txt": "old mine.txt"}


def test_an_error_while_staging_leaves_nothing_behind(tmp_path):
    from droppos import files

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), files.claim_output(folder, "eval-pos"):
        with files.publish(folder, owns=["a.txt"]) as staged:
            staged.write_text("a.txt", "new")
            raise RuntimeError("a figure failed")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "a.txt"] and (folder / "a.txt").read_text() == "old"


def test_a_kill_while_staging_leaves_a_temporary_the_next_claim_removes(tmp_path):
    from droppos import files

    folder = tmp_path / "report"
    staged = folder / ".droppos-publish.tmp-999999" / "new"  # what a process killed while staging leaves
    staged.mkdir(parents=True)
    (staged / "report.json").write_text("half")
    (folder / ".report.html.tmp-999999").write_text("half")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x").write_text("not a temporary")
    (folder / ".linked.tmp-999999").symlink_to(keep, target_is_directory=True)
    (folder / "report.json").write_text("the previous report")
    with files.claim_output(folder, "eval-pos"):
        pass
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "report.json"]
    assert (keep / "x").read_text() == "not a temporary"  # a link is removed, never followed
