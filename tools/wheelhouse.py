"""`make wheelhouse`: the wheels an offline GPU node needs, downloaded on a machine with network.

For a target CPython version and platform (default 3.12 and manylinux_2_28_x86_64: set them to the node's),
it downloads the wheels of the project's requirements that a GPU node with its own torch usually lacks, with
their dependencies, into one folder (default `wheelhouse/`, git-ignored), and writes DIR/requirements.txt: what
`make gpu-check WHEELHOUSE=DIR` (benchmarks/gpu_check.py --wheelhouse DIR) installs with
`pip install --no-index --find-links DIR -r DIR/requirements.txt` into a virtual environment of its own,
never into the node's Python.

Taken from the project's requirements.txt, with its pins: everything except
  torch, torchvision  the node's own builds for its CUDA driver (a wheelhouse never replaces them);
  pillow-simd         source only (it compiles); Pillow, which torchvision requires, stands in;
  scikit-image        only the CPU test suite's sample photos (`--add scikit-image==0.26.0` to include it).
timm is downloaded without its dependencies (they include torch) and with the ones it needs besides torch
(huggingface_hub, pyyaml, safetensors). nvidia-dali-cuda130 (DALI for CUDA 13 and its CUDA libraries, a few
hundred MB) is the largest part; `--no-dali` leaves it out (the Pillow loader needs none of it).
Dependencies the node may already have (numpy, pyyaml, ...) are downloaded too, since this machine cannot know
what the node has; pip on the node installs only what is missing there.

Needs only pip (run it with any python3 that has pip; it imports nothing else). A second run downloads only
what the folder lacks.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = "requirements.txt"  # in the wheelhouse: what gpu_check.py installs from it
# Requirements of the project that the wheelhouse leaves out, and why.
EXCLUDED = {
    "torch": "the node's own CUDA build",
    "torchvision": "the node's own CUDA build, matching its torch",
    "pillow-simd": "source only; Pillow (a torchvision dependency) stands in",
    "scikit-image": "only the CPU test suite's photos",
}
# Requirements downloaded without their dependencies (they pull torch), and the dependencies they need besides.
NO_DEPS = {"timm": ("huggingface_hub", "pyyaml", "safetensors")}
DALI = "nvidia-dali-cuda130"
# The oldest glibc of a manylinux tag, and the legacy names of three of them.
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_(\w+)")
_LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def name_of(requirement: str) -> str:
    """The normalised project name of a requirement line ('Foo_Bar[x]==1' -> 'foo-bar')."""
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def read_requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def plan(requirements: list[str], dali: bool = True, add: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """`resolved`: downloaded with their dependencies; `no_deps`: without; `install`: DIR/requirements.txt."""
    keep = [r for r in requirements if name_of(r) not in EXCLUDED and (dali or name_of(r) != DALI)]
    keep += [r for r in add if name_of(r) not in {name_of(k) for k in keep}]
    no_deps = [r for r in keep if name_of(r) in NO_DEPS]
    extra = [d for r in no_deps for d in NO_DEPS[name_of(r)] if d.replace("_", "-") not in {name_of(k) for k in keep}]
    return {"resolved": [r for r in keep if r not in no_deps] + extra, "no_deps": no_deps, "install": keep}


def platform_tags(platform: str) -> list[str]:
    """pip's --platform values for one platform: pip matches each manylinux_2_N exactly, so a node with
    glibc 2.N also takes every older manylinux tag (and the legacy names manylinux2014/2010/1)."""
    match = _MANYLINUX.fullmatch(platform)
    if not match:
        return [platform]
    major, minor, arch = int(match.group(1)), int(match.group(2)), match.group(3)
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    return tags + [f"{legacy}_{arch}" for glibc, legacy in _LEGACY.items() if major == 2 and glibc <= minor]


def download_command(requirements: list[str], dest: Path, python_version: str, platform: str, deps: bool = True,
                     python: str = sys.executable) -> list[str]:
    command = [python, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest)]
    for tag in platform_tags(platform):
        command += ["--platform", tag]
    return command + ([] if deps else ["--no-deps"]) + list(requirements)


def build(dest: Path, python_version: str, platform: str, dali: bool = True, add: tuple[str, ...] = (),
          requirements: Optional[Path] = None) -> dict[str, list[str]]:
    """Download the wheels into `dest` and write dest/requirements.txt."""
    wanted = plan(read_requirements(requirements or ROOT / REQUIREMENTS), dali=dali, add=add)
    dest.mkdir(parents=True, exist_ok=True)
    for group, deps in (("resolved", True), ("no_deps", False)):
        if wanted[group]:
            subprocess.run(download_command(wanted[group], dest, python_version, platform, deps=deps), check=True)
    header = (f"# droppos wheelhouse for CPython {python_version} on {platform}: "
              f"pip install --no-index --find-links {dest.name} -r {REQUIREMENTS}\n")
    (dest / REQUIREMENTS).write_text(header + "".join(f"{r}\n" for r in wanted["install"]))
    return wanted


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default="wheelhouse", help="folder for the wheels (default: wheelhouse)")
    parser.add_argument("--python-version", default="3.12", help="the node's Python, e.g. 3.12")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="the node's platform tag, e.g. manylinux_2_28_x86_64 or manylinux_2_28_aarch64 "
                             "(2_28: glibc 2.28 or newer; `ldd --version` on the node says which)")
    parser.add_argument("--no-dali", action="store_true", help=f"leave out {DALI} and its CUDA libraries")
    parser.add_argument("--add", action="append", default=[], help="another requirement (repeatable)")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    wanted = build(dest, args.python_version, args.platform, dali=not args.no_dali, add=tuple(args.add))
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2 ** 20
    print(f"wheelhouse: {len(wheels)} wheels, {size:.0f} MiB in {dest}/ for CPython {args.python_version} on "
          f"{args.platform}; {dest / REQUIREMENTS} lists {', '.join(name_of(r) for r in wanted['install'])}")
    print(f"On the node: copy {dest}/ into the clone, then `make gpu-check WHEELHOUSE={dest}`")


if __name__ == "__main__":
    main()
