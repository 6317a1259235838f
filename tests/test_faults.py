"""Fault injection, by category of the hardening issue (#12): what a planted path, an edited index,
a second writer, a strange input tree, an OS error or an unusual format does to droppos.

Faults are injected with tests/faultlib.py (portable: as root too, no mount), in this process or
in a `python -m droppos` subprocess. Every data set here is tiny: a run takes seconds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import faultlib
import inprocess
import numpy as np
import pytest
import torch
from faultlib import Fault
from PIL import Image, features

from droppos import UserError, shard
from droppos.files import LOCK_NAME, OutputLock, file_sha256
from droppos.manifest import load_manifest, split_shards
from droppos.shard import convert
from droppos.shard.convert import convert_image
from droppos.shard.inputs import SkipImage

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 4


# --------------------------------------------------------------------------------------------
# Helpers


def _jpeg(seed: int, width: int = 24, height: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write(path: Path | bytes, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _make_source(root: Path) -> Path:
    """train/{a,b,c}/ with 4 small JPEGs each, val/{a,b}/ with 1: 3 train shards and 1 val shard."""
    seed = 0
    for split, classes, count in (("train", "abc", 4), ("val", "ab", 1)):
        for name in classes:
            for i in range(count):
                seed += 1
                _write(root / split / name / f"{i}.jpg", _jpeg(seed))
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_source(tmp_path_factory.mktemp("faults-source"))


@pytest.fixture(scope="module")
def dataset(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`source` sharded without faults: the reference every faulty run is compared with."""
    out = tmp_path_factory.mktemp("faults-dataset") / "data"
    shard.run(source, out, workers=1, shard_size=SHARD_SIZE)
    return out


def _copy(dataset: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy, symlinks=True)
    return copy


def _shard_bytes(data_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.suffix in (".tar", ".idx")}


def _temporaries(data_dir: Path) -> list[str]:
    return [p.name for p in data_dir.iterdir() if ".tmp" in p.name]


def _edit_manifest(data_dir: Path, edit) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """With faults (`env`): a process of its own, which faultlib's sitecustomize patches; without: in this one."""
    if env is None:
        return inprocess.droppos(*args)
    return subprocess.run([sys.executable, "-m", "droppos", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one `droppos: error:` line of a run that failed the way a user mistake must."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("droppos: error: "), result.stderr
    return lines[0]


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if the test blocks for 60 s, e.g. on opening a FIFO."""

    def expire(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# The harness itself


def test_faultlib_fails_writes_after_the_budget_and_restores(tmp_path: Path) -> None:
    target = tmp_path / "disk"
    target.mkdir()
    with faultlib.inject(Fault("write", target, "ENOSPC", after=10)):
        with open(target / "a", "wb", buffering=0) as f:
            f.write(b"0123456789")  # exactly the budget
            with pytest.raises(OSError) as err:
                f.write(b"x")
            assert err.value.errno == 28
        with pytest.raises(OSError, match="No space left"):
            (target / "b").write_text("buffered: fails when flushed")
        with pytest.raises(PermissionError):
            with faultlib.inject(Fault("read", target)):
                open(target / "a", "rb")
        (tmp_path / "elsewhere").write_bytes(b"not under the faulty path: unaffected" * 10)
    (target / "b").write_bytes(b"restored" * 10)
    assert (target / "a").read_bytes() == b"0123456789"


# --------------------------------------------------------------------------------------------
# 12.1 Confinement: a manifest names only files inside its dataset directory


def _plant(data_dir: Path, tmp_path: Path, case: str) -> None:
    """Point train shard 0 (tar or index) outside `data_dir`, at a real copy of the right file."""
    outside = tmp_path / "x"
    outside.mkdir()
    for name in ("train-000000.tar", "train-000000.idx"):
        shutil.copy(data_dir / name, outside / name)

    def point(key: str, value: str):
        return lambda manifest: manifest["splits"]["train"]["shards"][0].__setitem__(key, value)

    if case == "dotdot-tar":
        _edit_manifest(data_dir, point("tar", "../x/train-000000.tar"))
    elif case == "dotdot-index":
        _edit_manifest(data_dir, point("index", "../x/train-000000.idx"))
    elif case == "absolute":
        _edit_manifest(data_dir, point("tar", "/etc/passwd"))
    elif case == "symlink":  # the listed name is innocent; the file behind it is not inside
        (data_dir / "train-000000.tar").unlink()
        (data_dir / "train-000000.tar").symlink_to(outside / "train-000000.tar")
    else:
        raise ValueError(case)


@pytest.mark.parametrize("case", ["dotdot-tar", "dotdot-index", "absolute", "symlink"])
def test_paths_outside_the_dataset_are_refused_by_loaders_and_verify(dataset: Path, tmp_path: Path, case: str) -> None:
    from droppos.data import build_loader

    data_dir = _copy(dataset, tmp_path)
    _plant(data_dir, tmp_path, case)
    message = "outside the dataset directory"
    with pytest.raises(UserError, match=message):
        split_shards(data_dir, "train")
    with pytest.raises(UserError, match=message):
        shard.verify(data_dir, decode=True)
    with pytest.raises(UserError, match=message):
        build_loader(data_dir, "train", "eval", batch_size=2, img_size=16, backend="pil", workers=0)
    split_shards(data_dir, "val")  # the other split is untouched and still loads


def test_verify_reports_a_planted_path_in_one_line(dataset: Path, tmp_path: Path) -> None:
    data_dir = _copy(dataset, tmp_path)
    _plant(data_dir, tmp_path, "dotdot-tar")
    line = _one_line_error(_cli("shard", "--verify", str(data_dir)))
    assert "'../x/train-000000.tar'" in line and "outside the dataset directory" in line


def test_a_symlink_that_stays_inside_is_accepted(dataset: Path, tmp_path: Path) -> None:
    data_dir = _copy(dataset, tmp_path)
    (data_dir / "train-000000.tar").rename(data_dir / "real.tar")
    (data_dir / "train-000000.tar").symlink_to("real.tar")
    assert split_shards(data_dir, "train")[0].tar == (data_dir / "real.tar").resolve()
    shard.verify(data_dir)


# --------------------------------------------------------------------------------------------
# 12.2 Index integrity: the manifest records each index's sha256; every entry is checked


def _swap_label_offsets(index: Path, tar: Path) -> tuple[int, int]:
    """Swap the .lbl offsets of the first two index lines whose samples have different labels
    (what makes DALI train on wrong labels); returns the two line numbers (1 = the header)."""
    with tarfile.open(tar) as archive:
        labels = {m.name.split(".")[0]: archive.extractfile(m).read() for m in archive if m.name.endswith(".cls")}
    lines = index.read_text().splitlines()
    rows = [line.split() for line in lines[1:]]
    first = 0
    second = next(i for i, row in enumerate(rows) if labels[row[3].split(".")[0]] != labels[rows[first][3].split(".")[0]])
    where = [next(j for j in range(0, len(row), 4) if row[j] == "lbl") for row in (rows[first], rows[second])]
    rows[first][where[0] + 1], rows[second][where[1] + 1] = rows[second][where[1] + 1], rows[first][where[0] + 1]
    index.write_text("\n".join([lines[0], *(" ".join(row) for row in rows)]) + "\n")
    return first + 2, second + 2


def test_swapped_label_offsets_are_refused(dataset: Path, source: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    data_dir = _copy(dataset, tmp_path)
    index, tar = data_dir / "train-000001.idx", data_dir / "train-000001.tar"
    first_line, _ = _swap_label_offsets(index, tar)

    # The manifest's index hash stops every loader.
    with pytest.raises(UserError, match="train-000001.idx: sha256 differs"):
        split_shards(data_dir, "train")

    # An index edited together with its hash: loaders cannot tell, --verify --decode can.
    new_hash = file_sha256(index)
    _edit_manifest(data_dir, lambda m: m["splits"]["train"]["shards"][1].__setitem__("index_sha256", new_hash))
    split_shards(data_dir, "train")
    with pytest.raises(UserError, match=rf"train-000001.idx: line {first_line}: lbl entry .* but the tar holds "
                                        r"train_\d+\.lbl \(4 bytes\) there"):
        shard.verify(data_dir, decode=True)

    # The same shard command rewrites that shard (its index) and nothing else.
    capsys.readouterr()
    shard.run(source, data_dir, workers=1, shard_size=SHARD_SIZE)
    assert "rewriting train-000001: train-000001.idx's sha256 differs" in capsys.readouterr().err
    assert _shard_bytes(data_dir) == _shard_bytes(dataset)
    assert load_manifest(data_dir)["splits"] == load_manifest(dataset)["splits"]


def test_verify_reports_a_bad_index_in_one_line(dataset: Path, tmp_path: Path) -> None:
    data_dir = _copy(dataset, tmp_path)
    index = data_dir / "val-000000.idx"
    index.write_text(index.read_text().replace(" 4 ", " 5 ", 1))  # one size off
    new_hash = file_sha256(index)
    _edit_manifest(data_dir, lambda m: m["splits"]["val"]["shards"][0].__setitem__("index_sha256", new_hash))
    line = _one_line_error(_cli("shard", "--verify", str(data_dir)))
    assert "val-000000.idx: line 2:" in line and "the index is corrupt or modified" in line


def _strip_index_hashes(data_dir: Path) -> None:
    """Make `data_dir` look written before index hashes existed (manifest and progress log)."""
    _edit_manifest(data_dir, lambda m: [s.pop("index_sha256") for info in m["splits"].values() for s in info["shards"]])
    log = data_dir / ".shard-progress.jsonl"
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    for record in records:
        if record["entry"]:
            record["entry"].pop("index_sha256")
    log.write_text("\n".join([lines[0], *(json.dumps(r) for r in records)]) + "\n")


def test_an_older_manifest_is_upgraded_in_place(dataset: Path, source: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    data_dir = _copy(dataset, tmp_path)
    _strip_index_hashes(data_dir)
    capsys.readouterr()
    assert len(split_shards(data_dir, "train")) == 3  # still loads, with a warning
    assert "records no index sha256" in capsys.readouterr().err
    shard.verify(data_dir)  # --verify checks those indexes entry by entry all the same
    # An index modified while no hash was recorded is caught when the tar is re-read.
    _swap_label_offsets(data_dir / "train-000002.idx", data_dir / "train-000002.tar")
    with pytest.raises(UserError, match="train-000002.idx: line"):
        shard.verify(data_dir)
    stamps = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir() if p.suffix in (".tar", ".idx")}

    capsys.readouterr()
    shard.run(source, data_dir, workers=1, shard_size=SHARD_SIZE)
    assert "rewriting train-000002: train-000002.idx: line" in capsys.readouterr().err
    assert load_manifest(data_dir) == load_manifest(dataset)  # index_sha256 recorded for every shard
    assert _shard_bytes(data_dir) == _shard_bytes(dataset)
    rewritten = {name for name, stamp in stamps.items() if (data_dir / name).stat().st_mtime_ns != stamp}
    assert rewritten == {"train-000002.tar", "train-000002.idx"}  # the other tars were checked, not rewritten


# --------------------------------------------------------------------------------------------
# 12.3 One writer per output directory


def test_a_second_shard_on_the_same_out_exits_2_naming_the_holder(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out, "shard"):
        line = _one_line_error(_cli("shard", str(source), str(out), "--workers", "1", "--shard-size", "4"))
        assert f"in use by `droppos shard` (pid {os.getpid()} on {socket.gethostname()}" in line
        assert not (out / "manifest.json").exists()
        # --verify only reads: it does not take the lock.
    shard.run(source, out, workers=1, shard_size=SHARD_SIZE)
    with OutputLock(out, "shard"):
        assert _cli("shard", "--verify", str(out)).returncode == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(source: Path, dataset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    out.mkdir()
    record = {"command": "shard", "pid": int(dead.stdout), "host": socket.gethostname(), "since": "2026-01-01T00:00:00"}
    (out / LOCK_NAME).write_text(json.dumps(record) + "\n")
    shard.run(source, out, workers=1, shard_size=SHARD_SIZE)
    assert "taking over the lock" in capsys.readouterr().err
    assert _shard_bytes(out) == _shard_bytes(dataset)


# --------------------------------------------------------------------------------------------
# 12.5 Shard discovery: what is not a regular file is skipped with a reason; nothing vanishes

BAD_NAME = b"caf\xe9.jpg"  # Latin-1, not UTF-8
BAD_CLASS = b"\xff\xfeclass"


def _awkward_source(root: Path) -> dict[str, str]:
    """A source with every kind of entry discovery meets; returns {skipped path: reason fragment}."""
    _make_source(root)
    a = root / "train" / "a"
    _write(a / ".hidden.jpg", _jpeg(90))
    _write(a / ".cache" / "x.jpg", _jpeg(91))
    os.mkfifo(a / "fifo.jpg")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(a / "sock.jpg"))
    (a / "dev.jpg").symlink_to("/dev/null")
    (a / "link.jpg").symlink_to("0.jpg")  # a symlink to a file is an input
    (a / "loop").symlink_to(".")
    (a / "broken.jpg").symlink_to("missing.jpg")
    _write(os.fsencode(a) + b"/" + BAD_NAME, _jpeg(92))  # written, original bytes recorded
    b = root / "train" / "b"
    for name in ("1.jpg", "2.jpg"):
        _write(b / "unlistable" / name, _jpeg(93))
        _write(b / "unreadable" / name, _jpeg(94))
    _write(os.fsencode(root / "train") + b"/" + BAD_CLASS + b"/0.jpg", _jpeg(95))
    return {
        "train/a/.hidden.jpg": "hidden file",
        "train/a/.cache": "hidden folder (not searched)",
        "train/a/fifo.jpg": "a FIFO (named pipe), not a regular file: not read",
        "train/a/sock.jpg": "a socket, not a regular file: not read",
        "train/a/dev.jpg": "resolves outside SOURCE through a symlink",  # /dev/null; with --follow-links: a device file
        "train/a/loop": "a symlink to a folder (not followed)",
        "train/a/broken.jpg": "broken symlink",
        "train/b/unlistable": "folder cannot be listed: Permission denied",
        "train/b/unreadable/1.jpg": "unreadable file: Permission denied",
        "train/b/unreadable/2.jpg": "unreadable file: Permission denied",
        "train/\ufffd\ufffdclass/0.jpg": "class folder whose name is not valid UTF-8",
    }


def test_discovery_skips_what_is_not_an_input_and_counts_everything(tmp_path: Path) -> None:
    root = tmp_path / "src"
    expected = _awkward_source(root)
    out = tmp_path / "out"
    env = faultlib.env(Fault("list", root / "train" / "b" / "unlistable"), Fault("read", root / "train" / "b" / "unreadable"))
    result = _cli("shard", str(root), str(out), "--workers", "2", "--shard-size", "4", env=env, timeout=90)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    written = 14 + 2  # the 14 plain images, link.jpg and the Latin-1 name: nothing else
    assert (manifest["found"], manifest["written"], manifest["skipped"]) == (written + len(expected), written, len(expected))
    assert f"total: found {written + len(expected)}, written {written}, skipped {len(expected)}" in result.stdout
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert reasons.keys() == expected.keys()
    for path, fragment in expected.items():
        assert fragment in reasons[path], (path, reasons[path])
    bad_class = next(s for s in skipped if s["path"].startswith("train/\ufffd"))
    assert base64.b64decode(bad_class["path_bytes"]) == b"train/" + BAD_CLASS + b"/0.jpg"
    metas = []
    for entry in split_shards(out, "train", manifest):
        with tarfile.open(entry.tar) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    latin = [m for m in metas if "path_bytes" in m]
    assert len(latin) == 1 and base64.b64decode(latin[0]["path_bytes"]) == b"train/a/" + BAD_NAME
    assert latin[0]["path"] == "train/a/caf\ufffd.jpg"
    assert {m["path"] for m in metas} >= {"train/a/link.jpg", "train/a/0.jpg"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through chmod 000 (the faultlib test above covers it)")
def test_a_folder_without_permissions_is_one_skipped_entry(tmp_path: Path) -> None:
    root = _make_source(tmp_path / "src")
    closed = root / "train" / "c"
    closed.chmod(0)
    try:
        manifest = shard.run(root, tmp_path / "out", workers=1, shard_size=SHARD_SIZE)
    finally:
        closed.chmod(0o755)
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"path": "train/c", "reason": "folder cannot be listed: Permission denied"}]
    assert manifest["written"] + manifest["skipped"] == manifest["found"] == 11


def test_a_source_that_cannot_be_listed_is_one_line(source: Path, tmp_path: Path) -> None:
    with faultlib.inject(Fault("list", source)), pytest.raises(UserError, match="cannot be listed: Permission denied"):
        shard.run(source, tmp_path / "out", workers=1)


def test_out_inside_source_through_a_symlink_is_refused(source: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(source / "train")
    with pytest.raises(UserError, match=r"must not be SOURCE or lie inside its train/ or val/ folder"):
        shard.run(source, link / "out", workers=1)
    assert not (source / "train" / "out").exists()  # refused before anything was created


def test_list_entries_resolving_outside_source_are_not_read(source: Path, tmp_path: Path, no_hang) -> None:
    root = tmp_path / "root"
    shutil.copytree(source / "train", root)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(7))
    (root / "a" / "escape.jpg").symlink_to(secret)
    os.mkfifo(root / "a" / "fifo.jpg")
    listing = tmp_path / "train.txt"
    listing.write_text("a/0.jpg 0\na/escape.jpg 0\na/fifo.jpg 0\nb/0.jpg 1\n")
    with faultlib.inject(Fault("read", secret)):  # reading it would be refused loudly, not skipped
        manifest = shard.run(root, tmp_path / "out", lists={"train": listing}, workers=1)
    skipped = {json.loads(line)["path"]: json.loads(line)["reason"]
               for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()}
    assert skipped == {"a/escape.jpg": "resolves outside SOURCE through a symlink: not read (--follow-links admits it)",
                       "a/fifo.jpg": "a FIFO (named pipe), not a regular file: not read"}
    assert (manifest["found"], manifest["written"]) == (4, 2)


# --------------------------------------------------------------------------------------------
# 12.5b Filesystem shapes for `shard`, in folder and --list mode: what resolves outside SOURCE, what
# is not a regular file, names too long, and list lines listed twice, with two labels or malformed.
# Each shape: exit 0 with exactly the expected counted skips (or exit 2 with one line where the whole
# command must stop), nothing opened or listed outside SOURCE unless --follow-links admits it, and
# written + skipped = found for every split.

OUTSIDE = "resolves outside SOURCE through a symlink: not read (--follow-links admits it)"
FIFO = "a FIFO (named pipe), not a regular file: not read"
SECRET = _jpeg(4242)  # the bytes of every file planted outside SOURCE (kept as they are when read)
BASE_LIST = "train/a/0.jpg 0\ntrain/a/1.jpg 0\ntrain/b/0.jpg 1\ntrain/b/1.jpg 1\n"


def _shape_source(root: Path, outside: Path) -> None:
    """SOURCE: train/{a,b}/{0,1}.jpg (4 images). Outside it: cls/secret.jpg and secret.jpg (SECRET)."""
    for i, rel in enumerate(("train/a/0.jpg", "train/a/1.jpg", "train/b/0.jpg", "train/b/1.jpg")):
        _write(root / rel, _jpeg(500 + i))
    _write(outside / "cls" / "secret.jpg", SECRET)
    _write(outside / "secret.jpg", SECRET)


def _deep_folders(root: Path, outside: Path) -> dict:
    """Folders of 250-byte names under train/a down to the system's path length: a short file name there is
    read, a longer one and a folder one level deeper are names too long (made through folder descriptors)."""
    fd = os.open(root / "train" / "a", os.O_RDONLY | os.O_DIRECTORY)
    rel, length = "train/a", len(os.fsencode(root / "train" / "a"))
    try:
        # Down to a folder whose path is 3,900 bytes, whatever the temporary folder's own length: from there a
        # 5-byte name fits, and names of 191 + 4 (a file) or 195 bytes (a folder) make paths of 4,096 bytes.
        while length < 3900:
            name = "n" * min(250, 3900 - length - 1)
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, rel, length = inner, f"{rel}/{name}", length + 1 + len(name)
        long_file = "f" * (4096 - length - 1 - 4) + ".jpg"  # this folder + '/' + it: 4096 bytes, one too many
        too_deep = "s" * (4096 - length - 1)
        for name, data in (("0.jpg", _jpeg(600)), (long_file, _jpeg(601))):
            handle = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(handle, data)
            os.close(handle)
        os.mkdir(too_deep, dir_fd=fd)
    finally:
        os.close(fd)
    return {f"{rel}/{long_file}": "name too long: a path of 4,096 bytes (at most 4,095): not read",
            f"{rel}/{too_deep}": "name too long: a path of 4,096 bytes (at most 4,095): not listed"}


def _link(path: Path, target: Path | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


# name: (mode, extra args, build(root, outside) -> expected extra skips or None, list text(s),
#        expected skips {path or list line: reason fragment}, written, error fragment (exit 2) or None)
SHAPES = {
    # a symlink out of SOURCE: a class folder, a file, a split folder, a list entry; admitted by --follow-links
    "dir-class-folder-link-out": ("dir", (), lambda r, o: _link(r / "train" / "x", o / "cls"), None,
                                  {"train/x": OUTSIDE}, 4, None),
    "dir-class-folder-link-out-followed": ("dir", ("--follow-links",), lambda r, o: _link(r / "train" / "x", o / "cls"),
                                           None, {}, 5, None),
    "dir-file-link-out": ("dir", (), lambda r, o: _link(r / "train" / "a" / "escape.jpg", o / "secret.jpg"), None,
                          {"train/a/escape.jpg": OUTSIDE}, 4, None),
    "dir-file-link-out-followed": ("dir", ("--follow-links",),
                                   lambda r, o: _link(r / "train" / "a" / "escape.jpg", o / "secret.jpg"), None, {}, 5,
                                   None),
    "dir-split-folder-link-out": ("dir", (), lambda r, o: _link(r / "val", o), None, {"val": OUTSIDE}, 4, None),
    "dir-link-inside-source": ("dir", (), lambda r, o: _link(r / "train" / "a" / "again.jpg", "0.jpg"), None, {}, 5,
                               None),
    "list-entry-link-out": ("list", (), lambda r, o: _link(r / "train" / "a" / "escape.jpg", o / "secret.jpg"),
                            BASE_LIST + "train/a/escape.jpg 0\n", {"train/a/escape.jpg": OUTSIDE}, 4, None),
    "list-entry-link-out-followed": ("list", ("--follow-links",),
                                     lambda r, o: _link(r / "train" / "a" / "escape.jpg", o / "secret.jpg"),
                                     BASE_LIST + "train/a/escape.jpg 0\n", {}, 5, None),
    # not a regular file: never opened, also through --follow-links; a --list that is not one stops the command
    "dir-fifo-image": ("dir", (), lambda r, o: os.mkfifo(r / "train" / "a" / "fifo.jpg"), None,
                       {"train/a/fifo.jpg": FIFO}, 4, None),
    "list-fifo-image": ("list", (), lambda r, o: os.mkfifo(r / "train" / "a" / "fifo.jpg"),
                        BASE_LIST + "train/a/fifo.jpg 0\n", {"train/a/fifo.jpg": FIFO}, 4, None),
    "dir-device-link": ("dir", (), lambda r, o: _link(r / "train" / "a" / "null.jpg", "/dev/null"), None,
                        {"train/a/null.jpg": OUTSIDE}, 4, None),
    "dir-device-link-followed": ("dir", ("--follow-links",), lambda r, o: _link(r / "train" / "a" / "null.jpg", "/dev/null"),
                                 None, {"train/a/null.jpg": "a device file, not a regular file: not read"}, 4, None),
    "list-file-is-a-fifo": ("list", (), None, "FIFO", {}, 0, "a FIFO (named pipe), not a regular file: not read"),
    "list-file-is-a-folder": ("list", (), None, "FOLDER", {}, 0, "a directory, not a file"),
    # names too long: a counted skip in both modes, never a traceback
    "dir-path-too-long": ("dir", (), _deep_folders, None, {}, 5, None),
    "list-names-too-long": ("list", (), None,
                            BASE_LIST + f"train/a/{'x' * 300}.jpg 0\n" + "d" * 200 + "/" + "e" * 200 + "/" * 0
                            + "".join(f"/{'d' * 250}" for _ in range(17)) + "/0.jpg 0\n",
                            {5: "name too long: a name of 304 bytes (at most 255): not read",
                             6: "name too long: a path of"}, 4, None),
    # the same file twice, with two labels, in two splits: the first listing stands
    "list-listed-twice": ("list", (), None, BASE_LIST + "train/a/0.jpg 0\n./train//a/1.jpg 0\n",
                          {5: "listed again (line 1)", 6: "listed again (line 2)"}, 4, None),
    "list-conflicting-labels": ("list", (), None, BASE_LIST + "train/a/0.jpg 1\n",
                                {5: "listed with label 0 and 1: conflicting labels (first: line 1, kept)"}, 4, None),
    "list-across-splits": ("list", (), None, (BASE_LIST, "train/b/1.jpg 1\ntrain/a/0.jpg 1\ntrain/b/0.jpg 1\n"),
                           {("val", 1): "listed again (line 4 of the train list)",
                            ("val", 2): "listed with label 0 and 1: conflicting labels (first: line 1 of the train list",
                            ("val", 3): "listed again (line 3 of the train list)"}, 4, None),
    # malformed lines: counted with their line number; a list with no usable line at all is the wrong list
    "list-bad-lines": ("list", (), lambda r, o: _write(r / "train" / "a" / "sp ace.jpg", _jpeg(700)),
                       BASE_LIST.replace("\n", "\r\n") + "train/a/1.jpg \u00b2\ntrain/a/1.jpg \u0661\n"
                       "train/a/\x001.jpg 0\ntrain/a/1.jpg 99999999999999999999999\ntrain/a/1.jpg 2147483648\n"
                       "train/a/1.jpg 32767\ntrain/a/1.jpg\ntrain/a/1.jpg 0 0\n/etc/passwd 0\n~/x.jpg 0\n"
                       "../outside/secret.jpg 0\n#comment\n\ntrain/a/sp ace.jpg 0\ntrain/a/sp ace.jpg\t0\n",
                       {5: "class index '\u00b2' is not a non-negative integer (ASCII digits)",
                        6: "class index '\u0661' is not a non-negative integer",
                        7: "a NUL byte in the line: not read",
                        8: "class index 99999999999999999999... (23 digits) is beyond the 32,767 classes",
                        9: "class index 2147483648 is beyond the 32,767 classes a dataset can hold (0..32766)",
                        10: "class index 32767 is beyond", 11: "1 field, expected 2: `relative/path class_index`",
                        "train/a/1.jpg 0": "file not found", 13: "not relative to SOURCE", 14: "not relative to SOURCE",
                        15: "'..' in the path (list paths stay inside SOURCE): not read",
                        19: "listed again (line 18)"}, 5, None),  # the index is the last field: paths hold spaces
    "list-not-utf8-line": ("list", (), None, BASE_LIST.encode() + b"train/a/caf\xe9.jpg 0\n",
                           {5: "not UTF-8 text (byte 12): not read"}, 4, None),
    "list-no-usable-line": ("list", (), None, "train/a/0.jpg \u00b2\ntrain/a/1.jpg\n", {}, 0,
                            "not one of its lines names an input as `relative/path class_index` (line 1: class index"),
}


def _spy_on_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path this process opens or lists from now on, resolved."""
    seen: list[str] = []
    real_open, real_scandir = os.open, os.scandir

    def note(path: object) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            try:
                seen.append(os.path.realpath(os.fsdecode(path)))
            except ValueError:  # a NUL byte: the system refuses it anyway
                pass

    def spy_open(path, flags, *args, **kwargs):
        if kwargs.get("dir_fd") is None:
            note(path)
        return real_open(path, flags, *args, **kwargs)

    def spy_scandir(path="."):
        note(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "scandir", spy_scandir)
    return seen


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shard_filesystem_shapes(shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hang) -> None:
    mode, extra, build, lists, expected, written, error = SHAPES[shape]
    root, outside, out = tmp_path / "src", tmp_path / "outside", tmp_path / "out"
    _shape_source(root, outside)
    expected = {**expected, **((build(root, outside) if build is not None else None) or {})}
    args = ["shard", str(root), str(out), "--workers", "1", "--shard-size", "3", *extra]
    if mode == "list":
        texts = lists if isinstance(lists, tuple) else (lists,)
        for split, text in zip(("train", "val"), texts):
            list_file = tmp_path / f"{split}.txt"
            if text == "FIFO":
                os.mkfifo(list_file)
            elif text == "FOLDER":
                list_file.mkdir()
            else:
                list_file.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
            args += ["--list", f"{split}={list_file}"]
    seen = _spy_on_reads(monkeypatch)
    result = _cli(*args)
    followed = "--follow-links" in extra
    if error is not None:
        assert error in _one_line_error(result)
        return
    assert result.returncode == 0, result.stderr
    real_outside = os.path.realpath(outside)
    read_outside = [p for p in seen if p == real_outside or p.startswith(real_outside + os.sep)]
    manifest = load_manifest(out)
    records = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    split_of = {rec.get("list"): split for split in ("train", "val") for rec in records
                if rec.get("list") == str(tmp_path / f"{split}.txt")}
    keys = {}
    for rec in records:
        key = rec["path"] if "line" not in rec else rec["line"]
        if "line" in rec and split_of.get(rec["list"]) == "val":
            key = ("val", rec["line"])
        keys[key] = rec["reason"]
    assert keys.keys() == expected.keys(), keys
    for key, fragment in expected.items():
        assert fragment in keys[key], (key, keys[key])
    assert (manifest["written"], manifest["skipped"]) == (written, len(expected))
    assert manifest["written"] + manifest["skipped"] == manifest["found"]
    assert f"total: found {manifest['found']}, written {written}, skipped {len(expected)}" in result.stdout
    for split in ("train", "val"):
        info = manifest["splits"].get(split)
        if info is not None:
            assert info["num_samples"] + info["skipped"] == info["found"]
    stored, paths = b"", []
    for split in manifest["splits"]:
        for entry in split_shards(out, split, manifest):
            stored += entry.tar.read_bytes()
            with tarfile.open(entry.tar) as tar:
                paths += [json.loads(tar.extractfile(m).read())["path"] for m in tar if m.name.endswith(".json")]
    assert all(not p.startswith("/") and ".." not in Path(p).parts for p in paths), paths
    reads_secret = followed and "link-out" in shape
    assert (SECRET in stored) == reads_secret  # when read, its bytes are kept: the check can see it
    assert bool(read_outside) == reads_secret, read_outside
    if shape == "dir-class-folder-link-out-followed":
        assert "train/x/secret.jpg" in paths and manifest["classes"] == ["a", "b", "x"]


def test_segmentation_inputs_outside_source_are_not_read(tmp_path: Path) -> None:
    """The masks layout: an image and a label map that links take out of SOURCE are skipped, each with its reason;
    --follow-links reads them."""
    root, outside = tmp_path / "src", tmp_path / "outside"
    label_map = io.BytesIO()
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(label_map, "PNG")
    for i in range(3):
        _write(root / "images" / "train" / f"{i}.jpg", _jpeg(900 + i))
        _write(root / "masks" / "train" / f"{i}.png", label_map.getvalue())
    (root / "classes.txt").write_text("ground\nsky\n")
    _write(outside / "o.jpg", SECRET)
    _write(outside / "o.png", label_map.getvalue())
    _link(root / "images" / "train" / "3.jpg", outside / "o.jpg")
    _link(root / "masks" / "train" / "3.png", root / "masks" / "train" / "0.png")
    _write(root / "images" / "train" / "4.jpg", _jpeg(904))
    _link(root / "masks" / "train" / "4.png", outside / "o.png")
    manifest = shard.run(root, tmp_path / "out", workers=1)
    skipped = {s["path"]: s["reason"] for s in map(json.loads, (tmp_path / "out" / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {"images/train/3.jpg": OUTSIDE, "images/train/4.jpg": f"label map masks/train/4.png: {OUTSIDE}"}
    assert (manifest["found"], manifest["written"], manifest["skipped"]) == (5, 3, 2)
    manifest = shard.run(root, tmp_path / "followed", workers=1, follow_links=True)
    assert (manifest["found"], manifest["written"], manifest["skipped"]) == (5, 5, 0)


def test_a_folder_nested_deeper_than_the_recursion_limit_is_walked(tmp_path: Path) -> None:
    """1,000 nested folders (within the system's path length): listed without recursion, the image at the bottom
    written (made and removed through folder descriptors: shutil.rmtree recurses)."""
    root = tmp_path / "src"
    _make_source(root)
    depth, fds = 1000, [os.open(root / "train" / "a", os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fds[-1])
            fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        handle = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fds[-1])
        os.write(handle, _jpeg(800))
        os.close(handle)
        manifest = shard.run(root, tmp_path / "out", workers=1, shard_size=SHARD_SIZE)
        metas = []
        for entry in split_shards(tmp_path / "out", "train", manifest):
            with tarfile.open(entry.tar) as tar:
                metas += [json.loads(tar.extractfile(m).read())["path"] for m in tar if m.name.endswith(".json")]
        assert "train/a/" + "d/" * depth + "deep.jpg" in metas
        assert (manifest["found"], manifest["written"], manifest["skipped"]) == (15, 15, 0)
    finally:
        os.unlink("deep.jpg", dir_fd=fds[-1])
        for parent, child in zip(reversed(fds[:-1]), reversed(fds[1:])):
            os.close(child)
            os.rmdir("d", dir_fd=parent)
        os.close(fds[0])


# --------------------------------------------------------------------------------------------
# 12.6 OS errors: one line naming the path and the cause; temporaries removed; re-run finishes


def test_a_read_only_out_is_one_line(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = _cli("shard", str(source), str(out), "--workers", "1", env=faultlib.env(Fault("write", out, "EROFS")))
    line = _one_line_error(result)
    assert str(out) in line and "Read-only file system" in line
    assert list(out.iterdir()) == []


def test_an_out_whose_parent_is_a_file_is_one_line(source: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    line = _one_line_error(_cli("shard", str(source), str(tmp_path / "a_file" / "out"), "--workers", "1"))
    assert str(tmp_path / "a_file" / "out") in line and "Not a directory" in line


def _budget(dataset: Path, case: str) -> tuple[int, str]:
    """Bytes a faulty disk lets through, and the file whose writing then fails."""
    sizes = {p.name: p.stat().st_size for p in dataset.iterdir()}
    lock_and_log = 400 + sizes[".shard-progress.jsonl"]  # lock record, progress log (header and records)
    if case == "mid-shard":  # room for train shards 0 and 1, not for shard 2
        return sum(sizes[f"train-00000{i}.{ext}"] for i in (0, 1) for ext in ("tar", "idx")) + lock_and_log, "train-000002.tar"
    if case == "manifest":  # every shard fits; the manifest does not
        return sum(size for name, size in sizes.items() if name.endswith((".tar", ".idx"))) + lock_and_log, "manifest.json"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["mid-shard", "manifest"])
def test_a_full_disk_stops_cleanly_and_a_rerun_finishes_byte_identical(
    source: Path, dataset: Path, tmp_path: Path, case: str
) -> None:
    out = tmp_path / "out"
    budget, failing = _budget(dataset, case)
    env = faultlib.env(Fault("write", out, "ENOSPC", after=budget))
    line = _one_line_error(_cli("shard", str(source), str(out), "--workers", "1", "--shard-size", "4", env=env))
    assert f"cannot write {out / failing}: No space left on device (the disk is full" in line
    assert _temporaries(out) == [] and not (out / "manifest.json").exists()
    log = (out / ".shard-progress.jsonl").read_text().splitlines()
    done = [json.loads(record)["name"] for record in log[1:]]  # every line whole
    assert done == (["train-000000", "train-000001"] if case == "mid-shard" else
                    ["train-000000", "train-000001", "train-000002", "val-000000"])
    reference = _shard_bytes(dataset)
    assert {name: data for name, data in _shard_bytes(out).items()} == {n: reference[n] for n in _shard_bytes(out)}

    shard.run(source, out, workers=1, shard_size=SHARD_SIZE)  # with space again
    assert _shard_bytes(out) == reference
    assert load_manifest(out)["splits"] == load_manifest(dataset)["splits"]


def test_a_full_disk_in_a_worker_pool_stops_cleanly(source: Path, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = faultlib.env(Fault("write", out, "ENOSPC", after=3000))  # per process: every worker runs out in its first shard
    line = _one_line_error(_cli("shard", str(source), str(out), "--workers", "2", "--shard-size", "4", env=env))
    assert "No space left on device" in line and str(out) in line
    assert _temporaries(out) == []
    shard.run(source, out, workers=2, shard_size=SHARD_SIZE)
    assert _shard_bytes(out) == _shard_bytes(dataset)


# --------------------------------------------------------------------------------------------
# 12.6 OS errors in a training run: the checkpoint, the run directory


TINY_PRETRAIN = ["--model", "vit_tiny_patch16", "--img-size", "32", "--patch-size", "8", "--depth", "1",
                 "--decoder-width", "32", "--decoder-depth", "1", "--batch-size", "4", "--epochs", "2",
                 "--warmup-epochs", "0", "--device", "cpu", "--no-compile", "--loader", "pil", "--workers", "0"]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["pretrain", "--data", str(dataset), "--out", str(run), *TINY_PRETRAIN]
    assert _cli(*common, "--max-steps", "2").returncode == 0
    good = (run / "checkpoints" / "last.pt").read_bytes()
    # The disk fills while the next checkpoint is written: one line, the last good checkpoint intact,
    # no temporary file left (every retry used to leave one behind).
    env = faultlib.env(Fault("write", run / "checkpoints", "ENOSPC", after=50_000))
    for _ in range(2):
        result = _cli(*common, "--max-steps", "4", env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip().splitlines()[-1]  # after the run's progress lines
        assert line.startswith("droppos: error: ")
        assert f"cannot write {run / 'checkpoints' / 'last.pt'}: No space left on device" in line
        assert (run / "checkpoints" / "last.pt").read_bytes() == good
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    result = _cli(*common, "--max-steps", "4")  # with space again: it resumes from the good one and finishes
    assert result.returncode == 0, result.stderr
    assert "resumed from step 2" in result.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


def test_a_read_only_run_directory_is_one_line(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = faultlib.env(Fault("write", run, "EROFS"))
    line = _one_line_error(_cli("pretrain", "--data", str(dataset), "--out", str(run), *TINY_PRETRAIN, env=env))
    assert str(run) in line and "Read-only file system" in line
    (tmp_path / "a_file").write_text("x")
    line = _one_line_error(_cli("pretrain", "--data", str(dataset), "--out", str(tmp_path / "a_file" / "run"),
                                *TINY_PRETRAIN))
    assert "a_file" in line and ("Not a directory" in line or "is a file" in line)


# --------------------------------------------------------------------------------------------
# 12.9 Formats: WebP and TIFF decode or name the missing codec; bombs and --max-side

# 16x12 RGB gradients made by a Pillow-SIMD built with libwebp and libtiff (`make setup`):
# lossless WebP, and TIFF with Adobe deflate compression (which only libtiff decodes).
WEBP = base64.b64decode("UklGRioAAABXRUJQVlA4TB4AAAAvD8ACAJmM6H9sIqL/ASEBYYT/dzV5IAYhJgC46i4=")
TIFF_DEFLATE = base64.b64decode(
    "SUkqAKYBAAB4nA3MEcItIRQA4IM/BsHFMAwHgnDw4GAQDIYHw4EgHDx4MQguhmELCGYJs4T3vgV8ACDgT4Ew8HGgELQHE2FL4ArsDFjh6OAn"
    "nA/EFwjkn5BCyY+RykmN0ni5RemS3ItElkeVvstzyvhIemUCLYT+KK2M1k4b1JvXLuo9aSz6YO2rPruOU9Oj06svsB9hlbLaWOPshtZ5u0eL"
    "yR7FerZntbFbmjY99nptAVQCtUJjcHPoEHePGPFI6AuejLEidUwTrwfLizcELYJRYTPBubBjQB+OGHwKZwmRA9WQerhmKE+438BARtCmyBna"
    "HSHS4clHOhPFQsSUKl2dyqT7IX7pC3kT2am8m4wuH5i9z2fMMWUqOXG+ai493zPzk79vrsBO8K4YDR+OPfLpOcb/L6fCF3OpfHfmyd+H68s/"
    "aLtoqNphmnftxBZ9o9hSaldphdtdG/f2na0+7fe2DgPFONTwZpxuRBzkR4rjSqOUcfPgOr591Dl+z+jvGLAOsbxap1nRLcKV/LriKmndZTGv"
    "b121r99c/VnjXfMfAYn6gQAKAAABAwABAAAAEAAAAAEBAwABAAAADAAAAAIBAwADAAAAJAIAAAMBAwABAAAACAAAAAYBAwABAAAAAgAAABEB"
    "BAABAAAACAAAABUBAwABAAAAAwAAABYBAwABAAAADAAAABcBBAABAAAAnQEAABwBAwABAAAAAQAAAAAAAAAIAAgACAA="
)
CODEC_FILES = {"webp": (WEBP, "WebP", "tiff"), "libtiff": (TIFF_DEFLATE, "libtiff", "webp")}


@pytest.mark.parametrize("codec", sorted(CODEC_FILES))
def test_webp_and_tiff_decode_or_name_the_missing_codec(codec: str) -> None:
    data, name, _ = CODEC_FILES[codec]
    if features.check(codec):
        result = convert_image(data)
        assert (result.width, result.height) == (16, 12) and Image.open(io.BytesIO(result.jpg)).format == "JPEG"
    else:
        with pytest.raises(SkipImage, match=rf"^needs the {name} codec, which this Pillow-SIMD build lacks \(run `make setup`"):
            convert_image(data)


@pytest.mark.parametrize("codec", sorted(CODEC_FILES))
def test_a_missing_codec_is_named_whatever_this_build_has(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason a user gets on a build without the codec, simulated on any build."""
    data, name, _ = CODEC_FILES[codec]
    if codec == "webp":
        from PIL import WebPImagePlugin

        monkeypatch.setattr(WebPImagePlugin, "SUPPORTED", False)
        monkeypatch.setattr(convert.features, "check", lambda feature: feature != "webp")
    else:
        monkeypatch.delattr(Image.core, "libtiff_decoder", raising=False)
    with pytest.raises(SkipImage, match=rf"^needs the {name} codec"):
        convert_image(data)


def test_an_uncompressed_tiff_decodes_on_every_build() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 8), (200, 10, 10)).save(buffer, "TIFF")
    assert "tiff" in convert_image(buffer.getvalue()).actions


def test_a_huge_jpeg_is_admitted_by_max_side_else_skipped_naming_it(tmp_path: Path) -> None:
    data, limit = _jpeg(5, 480, 360), 60_000  # 172,800 pixels
    with pytest.raises(SkipImage, match=r"480x360 pixels exceed the limit of 60000; --max-side 240 \(or smaller\) would admit it"):
        convert_image(data, max_pixels=limit)
    with pytest.raises(SkipImage, match=r"--max-side 240"):
        convert_image(data, max_side=400, max_pixels=limit)  # 400 needs the full decode
    result = convert_image(data, max_side=240, max_pixels=limit)  # decoded at 1/2 scale
    assert Image.open(io.BytesIO(result.jpg)).size == (240, 180) and (result.width, result.height) == (480, 360)
    with pytest.raises(SkipImage, match=r"even decoded at 1/8 scale"):
        convert_image(data, max_side=16, max_pixels=100)
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG")
    with pytest.raises(SkipImage, match=r"only a JPEG can be decoded reduced \(--max-side\), not a PNG"):
        convert_image(png.getvalue(), max_side=100, max_pixels=limit)

    root = _make_source(tmp_path / "src")
    _write(root / "train" / "a" / "huge.jpg", data)
    shard.run(root, tmp_path / "out", workers=1, max_side=240, max_pixels=limit)
    assert (tmp_path / "out" / "skipped.jsonl").read_text() == ""  # admitted, not skipped
