"""The README's code runs as written: its `droppos export demo/run ...` commands, then every code block
marked `<!-- readme-test: NAME -->`, against the demo's own outputs (the cpu-demo run of conftest's
`demo_run`), in a folder where `demo/` is that demo. So the docs cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKED = re.compile(r"<!-- readme-test: (\S+) -->\s*\n\s*```(\w+)\n(.*?)\n\s*```", re.S)


def marked_blocks() -> dict[str, tuple[str, str]]:
    """NAME -> (language, code) of every marked block; indentation of list items removed."""
    blocks = {}
    for name, language, code in MARKED.findall(README.read_text(encoding="utf-8")):
        lines = code.splitlines()
        indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
        blocks[name] = (language, "\n".join(line[indent:] for line in lines))
    return blocks


def export_commands() -> list[str]:
    """The README's `droppos export demo/run ...` lines (comments stripped)."""
    text = README.read_text(encoding="utf-8")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("droppos export demo/run")]


def test_the_readme_marks_the_blocks_this_test_runs():
    assert set(marked_blocks()) >= {"timm", "encoder", "layouts"}
    assert {cmd.split("--format ")[1].split()[0] for cmd in export_commands()} == {"timm", "detectron2", "mmseg"}


@pytest.fixture(scope="module")
def demo_folder(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory whose `demo/` is the demo (data/ and run/), exported as the README says."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "demo").symlink_to(demo_run.parent, target_is_directory=True)
    import os

    from inprocess import droppos

    here = os.getcwd()
    os.chdir(folder)  # the README's commands use paths relative to the folder that holds demo/
    try:
        for command in export_commands():
            result = droppos(*command.split()[1:])
            assert result.returncode == 0, (command, result.stderr)
    finally:
        os.chdir(here)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm", "encoder", "layouts"])
def test_a_readme_block_runs_as_written(demo_folder: Path, name: str):
    language, code = marked_blocks()[name]
    assert language == "python"
    result = subprocess.run([sys.executable, "-c", code], cwd=demo_folder, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README block {name!r} failed:\n{code}\n{result.stderr}"
