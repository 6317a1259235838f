"""`make gpu-wheels`: download here, from PyPI, the wheels the GPU machine lacks, packed for the device tool.

The GPU machine (Python 3.12, torch 2.11+cu130, timm, no package index) has no webdataset, braceexpand or
DALI. This downloads them for CPython 3.12 on manylinux x86_64 (no dependency resolution: the list below names
every missing dependency, none that the machine already has, such as numpy, packaging, six or pyyaml), and
packs them into git-ignored carry folders of at most `--folder-mib` MiB each, since one device call carries at
most 64 MiB with the working tree:

  .gpu-wheels/carry-1/    webdataset + braceexpand (enough for the Pillow loader, the tests and pretrain)
  .gpu-wheels/carry-2.../ DALI for CUDA 13 (torch 2.11's cu130 build) and its dependencies; the DALI wheel
                          (~199 MB) split into NAME.whl.part-000, -001, ... of at most `--chunk-mib` MiB
  every folder: wheels.json, the manifest of all wheels (sha256, size, parts), so any folder can check the set

Join step (benchmarks/gpu_check.py does it itself, then checks the sha256 against wheels.json):
  cat NAME.whl.part-* > NAME.whl && sha256sum NAME.whl
The `run` calls that carry the folders one per call are in gpu_check.py's docstring; this script prints them too.
Needs only pip (run it with any python3 that has pip; it imports nothing else).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

# pip's platform tags, newest first: pip matches each N of manylinux_2_N exactly.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")
# For the Pillow loader (webdataset 1.0.2 needs braceexpand, numpy and pyyaml; the last two are there).
ESSENTIAL = ("webdataset==1.0.2", "braceexpand==0.1.7")
# DALI 2.4 for CUDA 13 and what it requires that the machine lacks (its other needs, numpy, packaging and six,
# are there). nvidia-nvjpeg pinned to CUDA 13.0, the CUDA of torch 2.11's cu130 build and of driver 580.
DALI = ("nvidia-dali-cuda130==2.4.0", "astunparse==1.6.3", "gast==0.7.0", "optree==0.20.0", "nvtx==0.2.17",
        "makefun==1.16.0", "libcst==1.9.0", "nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-libnvcomp-cu13==5.3.0.16",
        "nvidia-nvjpeg==13.0.4.44", "nvidia-nvjpeg2k-cu13==0.11.0.51", "nvidia-nvtiff-cu13==0.8.0.82")
MANIFEST = "wheels.json"
MIB = 1 << 20


def download(requirements: tuple[str, ...], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "--progress-bar", "off", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + list(requirements), check=True)


def _wheel_of(requirement: str, folder: Path) -> Path:
    """The downloaded wheel of `name==version` (wheel names normalise '-' to '_')."""
    name, version = requirement.split("==")
    stem = name.replace("-", "_").lower()
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if len(found) != 1:
        raise SystemExit(f"gpu_wheels: expected one wheel of {requirement} in {folder}, found {len(found)}")
    return found[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(download_dir: Path, dest: Path, essential: tuple[str, ...], optional: tuple[str, ...],
         chunk_mib: float, folder_mib: float) -> list[Path]:
    """carry-1: the `essential` wheels; carry-2..: the `optional` (DALI) set, big wheels split, first-fit decreasing."""
    chunk, capacity = int(chunk_mib * MIB), int(folder_mib * MIB)
    if chunk > capacity:
        raise SystemExit("gpu_wheels: --chunk-mib must not exceed --folder-mib")
    manifest: dict[str, dict] = {}
    pieces: list[tuple[int, str, Path, int, int]] = []  # (size, file name, wheel, offset, length) of the DALI set
    for requirement in essential + optional:
        wheel = _wheel_of(requirement, download_dir)
        size = wheel.stat().st_size
        parts = math.ceil(size / chunk) if size > chunk else 0
        names = [f"{wheel.name}.part-{i:03d}" for i in range(parts)]
        manifest[wheel.name] = {"requirement": requirement, "sha256": sha256_file(wheel), "size": size,
                                "parts": names, "essential": requirement in essential}
        if requirement in essential:
            continue
        if parts:
            pieces += [(min(chunk, size - i * chunk), n, wheel, i * chunk, min(chunk, size - i * chunk))
                       for i, n in enumerate(names)]
        else:
            pieces.append((size, wheel.name, wheel, 0, size))
    bins: list[list[tuple[int, str, Path, int, int]]] = []
    for piece in sorted(pieces, key=lambda p: -p[0]):
        for folder in bins:
            if sum(p[0] for p in folder) + piece[0] <= capacity:
                folder.append(piece)
                break
        else:
            bins.append([piece])
    for old in dest.glob("carry-*"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    folders = []
    essential = [(m["size"], name, download_dir / name, 0, m["size"]) for name, m in manifest.items() if m["essential"]]
    for index, content in enumerate([essential] + bins, start=1):
        folder = dest / f"carry-{index}"
        folder.mkdir(parents=True)
        for _, name, wheel, offset, length in content:
            with open(wheel, "rb") as src:
                src.seek(offset)
                (folder / name).write_bytes(src.read(length))
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        folders.append(folder)
    return folders


def _size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / MIB


def print_calls(folders: list[Path]) -> None:
    rel = [str(f) for f in folders]
    print("\nFolders (each carried by one device call; the working tree travels too, 64 MiB in all):")
    for folder, name in zip(folders, rel):
        print(f"  {name}: {_size_mib(folder):.1f} MiB, {len(list(folder.iterdir())) - 1} files")
    print("\nThe device calls (gpu_check.py's docstring explains them), with DALI:")
    for name in rel[1:-1]:
        print(f"  run(carry=[{name!r}], timeout_s=120, command='mkdir -p /tmp/droppos-wheels && "
              f"cp {name}/* /tmp/droppos-wheels/ && ls /tmp/droppos-wheels | wc -l')")
    final = [rel[0]] + ([rel[-1]] if len(rel) > 1 else [])
    print(f"  run(carry={final!r}, timeout_s=540, command='PYTHONUNBUFFERED=1 make gpu-check GPU_CHECK_OUT=$OUT')")
    print(f"Without DALI, one call: run(carry=[{rel[0]!r}], timeout_s=540, "
          "command='PYTHONUNBUFFERED=1 make gpu-check GPU_CHECK_OUT=$OUT')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default=".gpu-wheels", help="git-ignored folder for downloads and carry folders")
    parser.add_argument("--chunk-mib", type=float, default=50, help="largest piece of a split wheel")
    parser.add_argument("--folder-mib", type=float, default=55, help="largest carry folder")
    parser.add_argument("--no-dali", action="store_true", help="only webdataset and braceexpand")
    args = parser.parse_args()
    dest = Path(args.dest)
    optional = () if args.no_dali else DALI
    download(ESSENTIAL + optional, dest / "download")
    print_calls(pack(dest / "download", dest, ESSENTIAL, optional, args.chunk_mib, args.folder_mib))


if __name__ == "__main__":
    main()
