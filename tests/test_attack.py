"""The standing attack suite: generated hostile inputs, not only listed ones (hypothesis).

Each test states the promise it checks: a mistake ends in one line on stderr and exit 2 (never a traceback
or a hang), a damaged file is named, and nothing is silently accepted. The examples are bounded so that the
suite stays a few minutes; `HYPOTHESIS_PROFILE=thorough` runs many more of each.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from inprocess import droppos

from droppos import UserError, checkpoint, recipes
from droppos.files import parse_json

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def one_line_error(result) -> str:
    """The promise for a user mistake: exit 2, one `droppos: error:` line, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.args, result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("droppos: error: "), (result.args, result.stderr)
    return lines[0]


@contextlib.contextmanager
def within(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- every option of every command ------------------------------------------------------------

COMMANDS = {  # a command line that is valid but for inputs that do not exist: every stage stops at its checks
    "shard": (recipes.ShardConfig, ["shard", "no-source", "shards-out"]),
    "pretrain": (recipes.PretrainConfig, ["pretrain", "--data", "no-data", "--out", "run", "--device", "cpu"]),
    "finetune": (recipes.FinetuneConfig, ["finetune", "--data", "no-data", "--out", "ft", "--device", "cpu",
                                          "--timm-model", "vit_tiny_patch16_224"]),
    "probe": (recipes.ProbeConfig, ["probe", "--data", "no-data", "--out", "pr", "--device", "cpu",
                                    "--timm-model", "vit_tiny_patch16_224"]),
    "eval-pos": (recipes.EvalPosConfig, ["eval-pos", "no-source", "--out", "ep", "--device", "cpu"]),
    "export": (recipes.ExportConfig, ["export", "no-source", "--out", "ex"]),
}
OPTIONS = [(command, opt) for command, (cls, _) in COMMANDS.items() for opt in recipes.options(cls)
           if opt.spec.cli and not opt.spec.positional]
HOSTILE = ["nan", "NaN", "inf", "-inf", "+inf", "1e309", "-1e309", "-1", "0", "-0", "1e-320", "3.5",
           str(2**31), str(2**63), str(2**64), "-" + str(2**64), "９", "²", "٣", "1_000", "0x10", "", " ", "-", "--",
           "é" * 3, "a" * 300, "../" * 40 + "etc/passwd", "/dev/zero", "/dev/null", "/proc/self/mem", "x\ny",
           "vit_base_patch16", "auto", "cuda", "dali", "true", "none"]
VALUES = st.one_of(st.sampled_from(HOSTILE), st.integers(-2**70, 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(OPTIONS), value=VALUES)
def test_any_value_of_any_option_ends_in_one_line(target, value, monkeypatch):
    """Whatever a user types for an option, every command stops with one line: the value is refused
    (NaN, inf, out of range, not a number, unknown choice), or the next check refuses the missing input."""
    command, opt = target
    base = COMMANDS[command][1]
    flag = opt.spec.flag or recipes.flag_name(opt.name)
    with tempfile.TemporaryDirectory() as folder:
        monkeypatch.chdir(folder)
        with within(60):
            result = droppos(*base, flag, value)
    one_line_error(result)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_numeric_option_refuses_nan_and_inf_itself(command, tmp_path, monkeypatch):
    """Not by luck of a later check: the option's own check names the option."""
    monkeypatch.chdir(tmp_path)
    cls, base = COMMANDS[command]
    floats = [o for o in recipes.options(cls) if o.spec.cli and not o.spec.positional
              and recipes._base_type(o.annotation) is float]
    for opt in floats:
        for value in ("nan", "inf", "-inf"):
            line = one_line_error(droppos(*base, recipes.flag_name(opt.name), value))
            assert recipes.flag_name(opt.name) in line and "finite" in line, line
    ints = [o for o in recipes.options(cls) if o.spec.cli and not o.spec.positional
            and recipes._base_type(o.annotation) is int]
    for opt in ints:
        line = one_line_error(droppos(*base, recipes.flag_name(opt.name), str(2**64)))
        assert recipes.flag_name(opt.name) in line and "range" in line, line


# --- JSON that someone else wrote ---------------------------------------------------------------

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(allow_nan=False),
                        st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=30)


@given(value=JSON_VALUES, depth=st.integers(0, 3000), junk=st.binary(max_size=40))
def test_parsing_json_is_bounded_and_never_a_traceback(value, depth, junk):
    """Deep nesting (a RecursionError in `json`), NaN literals, junk bytes: a UserError or the value."""
    text = "[" * depth + json.dumps(value) + "]" * depth
    for data in (text.encode(), junk, text.encode()[: len(text) // 2], text.replace("0", "NaN").encode()):
        try:
            parse_json(data, "test.json")
        except UserError:
            pass


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    import timm

    import droppos.model  # noqa: F401 - registers the droppos_* names
    from droppos.export import export_encoder

    torch.manual_seed(0)
    model = timm.create_model("droppos_vit_tiny_patch16", img_size=32, patch_size=8, depth=1)
    return export_encoder(model, tmp_path_factory.mktemp("attack-encoder") / "encoder.safetensors")


def _mutate(meta, path, replacement):
    """`meta` with the value at `path` (a list of keys) replaced (or added)."""
    node = meta
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node
    if isinstance(node, dict):
        node[path[-1]] = replacement
    return meta


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from([["model"], ["model_args"], ["model_args", "img_size"], ["model_args", "depth"],
                              ["model_args", "embed_dim"], ["model_args", "num_heads"], ["model_args", "patch_size"],
                              ["model_args", "mlp_ratio"], ["pretrained_cfg"], ["pretrained_cfg", "mean"],
                              ["droppos"], ["extra"]]),
       replacement=JSON_VALUES)
def test_a_generated_sidecar_is_refused_in_one_line_or_exported(where, replacement, encoder_file, tmp_path):
    """An encoder's sidecar names the timm model to build: any value is bounded before anything is built."""
    folder = tmp_path / "enc"
    folder.mkdir(exist_ok=True)
    target = folder / "encoder.safetensors"
    target.write_bytes(encoder_file.read_bytes())
    meta = json.loads(encoder_file.with_suffix(".json").read_text())
    target.with_suffix(".json").write_text(json.dumps(_mutate(meta, where, replacement)))
    out = tmp_path / "timm-out"
    with within(60):
        result = droppos("export", str(target), "--format", "timm", "--out", str(out))
    if result.returncode != 0:
        one_line_error(result)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(manifest=st.one_of(JSON_VALUES, st.fixed_dictionaries({
    "format": st.one_of(st.just("droppos-shards/1"), JSON_LEAVES),
    "classes": st.one_of(st.lists(st.text(max_size=5), max_size=3), JSON_VALUES),
    "splits": st.one_of(JSON_VALUES, st.fixed_dictionaries({"train": st.fixed_dictionaries({
        "num_samples": st.one_of(st.integers(-5, 2**70), JSON_LEAVES),
        "shards": st.lists(st.fixed_dictionaries({
            "tar": st.sampled_from(["train-000000.tar", "../outside.tar", "/etc/passwd", "", "a\x00b", "x" * 300]),
            "index": st.sampled_from(["train-000000.idx", "../outside.idx", "/dev/zero"]),
            "num_samples": st.one_of(st.integers(-5, 2**70), JSON_LEAVES),
            "bytes": st.one_of(st.integers(-5, 2**70), JSON_LEAVES),
            "sha256": st.one_of(st.text(max_size=64), JSON_LEAVES)}), max_size=3)})}))})))
def test_a_generated_manifest_is_refused_in_one_line(manifest, tmp_path):
    """manifest.json is read by every training stage and eval-pos: whatever it holds, `shard --verify` (which
    reads it all) and a training stage stop with one line; no file it names outside the dataset is read."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text(json.dumps(manifest))
    with within(60):
        verify = droppos("shard", "--verify", str(data))
        train = droppos("pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu")
    one_line_error(verify)
    one_line_error(train)


# --- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sealed_checkpoint(tmp_path_factory) -> Path:
    """A small checkpoint written the way the loop writes one (last.pt), with a previous one beside it."""
    folder = tmp_path_factory.mktemp("sealed") / "checkpoints"
    torch.manual_seed(0)
    model, config = torch.nn.Linear(64, 32), recipes.to_record(recipes.PretrainConfig())
    for step in (1, 2):
        checkpoint.save(folder / "last.pt", checkpoint.state({"model": model}, stage="pretrain", step=step,
                                                             config=config))
    return folder / "last.pt"


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(position=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_anywhere_in_a_checkpoint_is_caught_or_harmless(position, bit, sealed_checkpoint, tmp_path):
    """torch.load does not check the zip records' CRC: the digest must. A flip is either reported in one line
    that names the file and the kept previous checkpoint, or lands where it changes nothing that is read."""
    original = checkpoint.load(sealed_checkpoint)
    data = bytearray(sealed_checkpoint.read_bytes())
    data[int(position * len(data))] ^= 1 << bit
    damaged = tmp_path / "checkpoints" / "last.pt"
    damaged.parent.mkdir(exist_ok=True)
    damaged.write_bytes(bytes(data))
    (damaged.parent / "previous.pt").write_bytes(sealed_checkpoint.with_name("previous.pt").read_bytes())
    try:
        loaded = checkpoint.load(damaged)
    except UserError as err:
        assert str(damaged) in str(err) and "previous.pt" in str(err) and "\n" not in str(err), str(err)
        return
    assert loaded["digest"] == original["digest"]
    assert checkpoint.digest({k: v for k, v in loaded.items() if k != "digest"}) == original["digest"]


# --- files that are not what they claim to be ---------------------------------------------------------


def _shapes(root: Path) -> dict[str, Path]:
    """Paths that are not regular files, or not reachable: each must be refused, never opened."""
    root.mkdir(parents=True, exist_ok=True)
    fifo = root / "fifo.safetensors"
    if not fifo.exists():
        os.mkfifo(fifo)
    loop = root / "loop.pt"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    return {"fifo": fifo, "device": Path("/dev/zero"), "directory": root, "link loop": loop,
            "long name": root / ("x" * 300 + ".pt"), "missing": root / "missing.pt"}


def test_weights_and_encoders_that_are_not_files_are_refused_unopened(tmp_path, monkeypatch):
    """--weights, --encoder, export's SOURCE and eval-pos's SOURCE given a FIFO, a device, a folder, a link loop,
    a name too long or nothing: one line each, at once (a FIFO opened for reading would block forever)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    data = ["--data", "no-data", "--device", "cpu"]
    for name, path in _shapes(tmp_path / "shapes").items():
        lines = {}
        with within(60):
            lines["weights"] = one_line_error(droppos("eval-pos", "--timm-model", "vit_tiny_patch16_224", "--weights",
                                                      str(path), "--images", "images", "--out", "ep"))
            lines["export"] = one_line_error(droppos("export", str(path), "--out", "ex"))
            if name != "directory":
                lines["encoder"] = one_line_error(droppos("probe", "--encoder", str(path), "--out", "pr", *data))
        for where, line in lines.items():
            assert str(path)[:40] in line or "no such" in line or "not" in line, (name, where, line)


def test_a_fifo_or_device_as_a_dataset_manifest_or_sidecar_never_blocks(encoder_file, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "manifest.json")
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "encoder.safetensors").write_bytes(encoder_file.read_bytes())
    os.mkfifo(enc / "encoder.json")
    with within(60):
        assert "FIFO" in one_line_error(droppos("pretrain", "--data", str(data), "--out", str(tmp_path / "r"),
                                                "--device", "cpu"))
        assert "FIFO" in one_line_error(droppos("export", str(enc / "encoder.safetensors"), "--out",
                                                str(tmp_path / "x")))
