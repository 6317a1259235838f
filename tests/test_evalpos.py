"""`droppos eval-pos`: the ViT pieces reproduce timm's forward, order invariance with PEs attached, no host
sync in a batch, exact fp32, the random baselines' initialisation, the report's files, keys, units and
figures (five labelled models, no overlapping labels), progress and the table off a terminal, the output
lock and a full disk, a timm model on scikit-image's real photos, user mistakes, and (slow) that the
demo-trained model is location-aware where a random-init one is not."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import droppos
from torch.utils._python_dispatch import TorchDispatchMode

from droppos import UserError
from droppos.evalpos import parse_ratio
from droppos.evalpos.metrics import VARIANTS, OrderSensitivity, PositionAccuracy, _encode, _token_parts, _weighted_median

TINY = [
    "--model", "vit_tiny_patch16", "--img-size", "32", "--patch-size", "8", "--depth", "1",
    "--decoder-width", "64", "--decoder-depth", "1", "--batch-size", "8", "--epochs", "4",
    "--warmup-epochs", "1", "--device", "cpu", "--no-compile", "--loader", "pil", "--workers", "0",
]
FAST = ["--loader", "pil", "--workers", "0", "--batch-size", "16", "--permutations", "2", "--probe-steps", "30"]


@pytest.fixture(scope="module")
def tiny_run(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("evalpos") / "run"
    result = droppos("pretrain", "--data", str(sample_shards), "--out", str(run), *TINY, "--max-steps", "3")
    assert result.returncode == 0, result.stderr
    return run


def _tiny_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kwargs)
    with torch.no_grad():  # strong PEs and sharp attention, so that scrambling tokens under the PEs is visible
        vit.pos_embed.normal_(0, 1.0)
        for block in vit.blocks:
            block.attn.qkv.weight.normal_(0, 0.5)
    return vit.eval()


# --- the pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"no_embed_class": True, "reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}])
def test_pieces_reproduce_timm_and_with_pe_permutation_is_invisible(kwargs):
    vit = _tiny_vit(**kwargs)
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        x, pe, prefix = _token_parts(vit, images)
        assert x.shape == pe.shape == (3, 16, 32) and prefix.shape[1] == vit.num_prefix_tokens
        torch.testing.assert_close(_encode(vit, prefix, x + pe), vit.forward_features(images))
        perms = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
        order = OrderSensitivity(perms, classifier=True, labelled=True)
        order.update(vit, images, torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool))
        result = order.result("test")
    assert set(VARIANTS) <= set(result)
    # (a) a ViT has no order bias of its own: permuting tokens with their PEs changes nothing.
    assert result["with_pe"]["cosine_mean"] > 0.9999 and result["with_pe"]["cosine_std"] < 1e-4
    assert result["with_pe"]["top1_agreement"] == 100.0 and result["with_pe"]["accuracy_change"] == 0.0  # percent
    assert result["with_pe"]["displacement_mean"] < 1e-8
    # (b) with strong PEs left in place, the scrambled image is a different input.
    assert result["pe_in_place"]["cosine_mean"] < 0.999 and result["pe_in_place"]["displacement_mean"] > 1e-3
    # The displacement's unit is the mean squared distance between two different images' features.
    with torch.inference_mode():
        features = vit.forward_head(vit.forward_features(images), pre_logits=True).double()
    pairs = [(features[i] - features[j]).square().sum() for i in range(3) for j in range(3) if i != j]
    assert order.pair_distance() == pytest.approx(float(torch.stack(pairs).mean()), rel=1e-6)
    assert len(result["no_pe"]["cosine_per_permutation"]) == 3


def test_position_accuracy_counts_distances_on_the_grid():
    acc = PositionAccuracy(0.0, 1.0, (3, 4), torch.device("cpu"))
    positions = torch.tensor([[0, 5, 11, 6]])
    dropped = torch.ones(1, 4, dtype=torch.bool)
    logits = torch.full((1, 4, 12), -10.0)
    predicted = [0, 6, 0, 6]  # right, one column off, (2, 3) -> (0, 0): sqrt(13), right
    for i, p in enumerate(predicted):
        logits[0, i, p] = 10.0
    acc.update(logits, positions, dropped, torch.ones(1, dtype=torch.bool))
    # A padded image (valid False) with every answer wrong counts for nothing.
    acc.update(torch.flip(logits, dims=[-1]), positions, dropped, torch.zeros(1, dtype=torch.bool))
    result = acc.result(seed=0)
    assert result["top1"] == 50.0 and result["patches_evaluated"] == 4 and result["errors"] == 2  # percent
    assert result["mean_error"] == pytest.approx((1 + 13 ** 0.5) / 2)  # over the two wrong answers
    assert result["mean_distance"] == pytest.approx((1 + 13 ** 0.5) / 4)  # over all four
    assert result["median_error"] == pytest.approx((1 + 13 ** 0.5) / 2)
    assert sum(result["error_histogram"]["counts"]) == 2
    assert result["cell_accuracy"][0][0] == 100.0 and result["cell_accuracy"][1][1] == 0.0
    assert result["cell_accuracy"][2][2] is None  # never dropped
    assert result["chance_top1"] == pytest.approx(100 / 12)
    assert sum(result["error_histogram"]["chance_share"]) == pytest.approx(100 * 11 / 12)
    assert _weighted_median(np.array([1.0, 2.0, 3.0]), np.array([1, 0, 2])) == 3.0
    assert _weighted_median(np.array([1.0, 2.0, 3.0]), np.array([1, 1, 0])) == 1.5
    assert parse_ratio("0.5:0.75") == (0.5, 0.75)
    with pytest.raises(UserError):
        parse_ratio("half")


# --- no host sync in a batch; padding; exact fp32; the baselines ------------------------------

_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "masked_scatter",
             "bincount", "_unique2", "unique_dim", "unique_consecutive"}


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that makes the host wait for the device: .item() / bool(), data-dependent shapes
    (boolean indexing, nonzero, masked_select), and bincount (it reads its input's maximum)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name in ("index", "index_put", "index_put_", "_index_put_impl_") else ()
        if name in _SYNC_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            raise AssertionError(f"host sync in a batch: aten.{name}")
        return func(*args, **(kwargs or {}))


def test_the_sync_detector_catches_what_it_must():
    x = torch.randn(4, 3)
    for sync in (lambda: x[x[:, 0] > 0], lambda: float(x.sum()), lambda: bool((x > 0).all()),
                 lambda: torch.bincount(torch.tensor([1, 2]), minlength=4)):
        with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
            sync()


class _Batches:
    """An ImageSource stand-in whose batches are consumed with the sync detector on: `evaluate`'s loop
    body runs while this generator is suspended inside the `with`, its final `result`s run outside."""

    def __init__(self, batches: list, num_classes: int) -> None:
        self.fixed, self.data, self.num_classes = batches, "labelled", num_classes

    def batches(self, img_size, device):
        for images, labels, valid in self.fixed:
            with _NoHostSync():
                yield images, labels, valid


def _droppos_subject():
    from droppos.evalpos.load import _subject_from_droppos
    from droppos.model import DropPosViT

    torch.manual_seed(0)
    model = DropPosViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_width=32,
                       decoder_depth=1, decoder_heads=2, timm_name="vit_tiny_patch16_224")
    return _subject_from_droppos(model, "droppos", "test", "droppos-checkpoint", {})


@pytest.mark.parametrize("which", ["droppos with mask-token fill", "timm classifier"])
def test_a_batch_never_waits_for_the_host_and_padding_counts_for_nothing(which):
    from droppos.evalpos import EvalPosConfig, evaluate
    from droppos.evalpos.load import _subject_from_timm

    droppos_model = which.startswith("droppos")
    subject = _droppos_subject() if droppos_model else _subject_from_timm(_tiny_vit(), "vit", "test", "timm", None, {})
    config = EvalPosConfig(out="unused", ratios=[(0.75, 0.75), (0.0, 1.0)], permutations=2, probe_steps=5,
                           probe_fill="mask-token" if droppos_model else "mean")
    torch.manual_seed(1)
    images, labels, valid = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0]), torch.ones(6, dtype=torch.bool)
    plain = [(images[:4], labels[:4], valid[:4]), (images[4:], labels[4:], valid[4:])]
    padded = [plain[0], (torch.cat([images[4:], torch.zeros(2, 3, 32, 32)]), torch.tensor([4, 0, -1, -1]),
                         torch.tensor([True, True, False, False]))]  # the eval loader's padding: zeros labelled -1
    cpu = torch.device("cpu")
    first, second = (evaluate(subject, _Batches(batches, 5), config, cpu) for batches in (plain, padded))
    assert first["images"] == second["images"] == 6
    if droppos_model:
        assert first["position_probe"]["fill"] == "the model's own learnable [MASK] token"
        for a, b in zip(first["position_accuracy"], second["position_accuracy"]):
            assert a["patches_evaluated"] == b["patches_evaluated"] and a["top1"] == pytest.approx(b["top1"])
    else:
        assert first["order_sensitivity"]["with_pe"]["top1_agreement"] == 100.0
        assert first["order_sensitivity"]["reference_accuracy"] == pytest.approx(second["order_sensitivity"]["reference_accuracy"])
    for key in VARIANTS:
        a, b = first["order_sensitivity"][key], second["order_sensitivity"][key]
        assert a["cosine_mean"] == pytest.approx(b["cosine_mean"], rel=1e-5)
        assert a["displacement_mean"] == pytest.approx(b["displacement_mean"], rel=1e-4, abs=1e-9)
    probes = first["position_probe"], second["position_probe"]
    assert probes[0]["fit_tokens"] == probes[1]["fit_tokens"] and probes[0]["test_tokens"] == probes[1]["test_tokens"]


def test_exact_fp32_turns_tf32_off_for_matmul_and_cudnn_and_restores_both():
    from droppos.evalpos import exact_fp32

    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (torch.get_float32_matmul_precision(), cuda.allow_tf32, cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("high")  # what the training stages leave behind on CUDA
        cuda.allow_tf32 = cudnn.allow_tf32 = True
        with exact_fp32() as used:
            assert (cuda.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (False, False, "highest")
            assert used == {"dtype": "float32", "autocast": False, "tf32_matmul": False, "tf32_cudnn": False,
                            "float32_matmul_precision": "highest"}
        assert (cuda.allow_tf32, cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (True, True, "high")
    finally:
        torch.set_float32_matmul_precision(before[0])
        cuda.allow_tf32, cudnn.allow_tf32 = before[1], before[2]


def test_random_baselines_start_where_training_started(tiny_run):
    from droppos.evalpos.load import load_subject, random_like

    run = load_subject(str(tiny_run))
    encoder = load_subject(str(tiny_run / "encoder.safetensors"))
    timm_vit = load_subject("vit_tiny_patch16_224", 32, timm_name=True)
    for source, init in ((run, "droppos"), (encoder, "timm-fixed-pe"), (timm_vit, "timm")):
        fresh = random_like(source, seed=0)
        assert fresh.kind == "random-init" and fresh.info["weights"]["init"] == init
        assert not torch.equal(fresh.vit.blocks[0].attn.qkv.weight, source.vit.blocks[0].attn.qkv.weight)
    # DropPos never trains its sin-cos PE: the DropPos baseline and the exported encoder's keep it ...
    for fixed in (random_like(run, 0), random_like(encoder, 0)):
        torch.testing.assert_close(fixed.vit.pos_embed, encoder.vit.pos_embed)
    assert float(encoder.vit.pos_embed.detach()[0, 1:].square().mean().sqrt()) > 0.5
    # ... while a stock timm ViT's learned PE is drawn again, at std 0.02: nearly a bag of patches.
    assert float(random_like(timm_vit, 0).vit.pos_embed.detach().std()) == pytest.approx(0.02, rel=0.25)
    torch.testing.assert_close(random_like(run, 3).vit.blocks[0].attn.qkv.weight,
                               random_like(run, 3).vit.blocks[0].attn.qkv.weight)  # seeded


# --- the command ----------------------------------------------------------------------------

LABELS = ["DropPos run (tiny, 3 steps)", "its exported encoder", "timm ViT-Ti, random", "timm DeiT-Ti, random",
          "random-init twin of the run"]


@pytest.fixture(scope="module")
def five_models(tiny_run: Path, sample_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """One report of five labelled models (a run, its encoder, two timm ViTs, a random baseline): (out, process)."""
    out = tmp_path_factory.mktemp("five") / "report"
    labels = [arg for label in LABELS for arg in ("--label", label)]
    result = droppos("eval-pos", "--compare", str(tiny_run), str(tiny_run / "encoder.safetensors"),
                     "--timm-model", "vit_tiny_patch16_224", "--timm-model", "deit_tiny_patch16_224", "--img-size", "32",
                     "--random-baseline", *labels, "--data", str(sample_shards), "--out", str(out), "--max-images", "24", *FAST)
    assert result.returncode == 0, result.stderr
    return out, result


def _check_report_files(out: Path, report: dict) -> None:
    from PIL import Image

    html = (out / "report.html").read_text()
    embedded = dict(re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html))
    assert sorted(embedded) == sorted(report["plots"]) and len(embedded) >= 2
    for name, data in embedded.items():
        png = (out / name).read_bytes()
        assert base64.b64decode(data) == png  # the page embeds exactly the PNGs written beside it
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            assert img.format == "PNG" and img.size[0] > 100
    assert "<img" in html and "src='http" not in html and "<table>" in html
    assert not list(out.glob(".*.tmp-*"))  # every file was written atomically


def test_report_of_five_labelled_models(five_models, tiny_run, sample_shards):
    out, result = five_models
    assert f"report: {out / 'report.html'}" in result.stdout
    report = json.loads((out / "report.json").read_text())
    _check_report_files(out, report)
    assert report["format"] == "droppos-evalpos/2"
    assert [m["name"] for m in report["models"]] == LABELS  # --label, in the order the models were given
    run, encoder, vit, deit, random = report["models"]
    assert [m["kind"] for m in report["models"]] == ["droppos-run", "encoder", "timm", "timm", "random-init"]
    assert report["position_accuracy"] == run["position_accuracy"]
    assert [(a["mask_ratio"], a["pos_mask_ratio"]) for a in run["position_accuracy"]] == [(0.75, 0.75), (0.5, 0.75), (0.0, 0.75), (0.0, 1.0)]
    for entry in run["position_accuracy"] + random["position_accuracy"]:
        for key in ("top1", "top5", "mean_error", "median_error", "mean_distance", "cell_accuracy", "error_histogram", "seed"):
            assert key in entry
        assert 0 <= entry["top1"] <= entry["top5"] <= 100 and entry["chance_top1"] == pytest.approx(100 / 16)  # percent
    everything_dropped = run["position_accuracy"][3]
    assert everything_dropped["visible_per_image"] == everything_dropped["dropped_per_image"] == 16
    assert everything_dropped["patches_evaluated"] == 24 * 16
    assert encoder["position_accuracy"] == []  # no position head in an encoder file
    for model in report["models"]:
        for key in VARIANTS:
            assert {"cosine_mean", "cosine_std", "cosine_sem", "displacement_mean", "displacement_sem"} <= set(model["order_sensitivity"][key])
        assert model["order_sensitivity"]["with_pe"]["cosine_mean"] > 0.9999
        assert 0 <= model["position_probe"]["top1"] <= 100 and model["images"] == 24
    # The run's encoder, converted in memory, is the exported encoder: the same numbers.
    for key in VARIANTS:
        assert run["order_sensitivity"][key]["cosine_mean"] == pytest.approx(encoder["order_sensitivity"][key]["cosine_mean"], abs=1e-5)
    assert run["position_probe"]["top1"] == pytest.approx(encoder["position_probe"]["top1"], abs=2.0)
    # What each model's weights are, and the PEs' visibility that makes a reference fair or not.
    assert run["info"]["weights"]["sha256"] == hashlib.sha256((tiny_run / "checkpoints" / "last.pt").read_bytes()).hexdigest()
    assert random["info"]["weights"]["init"] == "droppos" and vit["info"]["weights"]["init"] == "timm"
    assert vit["architecture"]["patch_pe_rms"] < 0.05 < 0.5 < run["architecture"]["patch_pe_rms"]
    settings = report["settings"]
    assert settings["seed"] == 0 and settings["permutations"] == 2 and settings["ratios"][0] == [0.75, 0.75]
    assert settings["device"] == "cpu" and settings["loader"] == "pil" and settings["workers"] == 0
    assert settings["precision"]["tf32_cudnn"] is False and settings["precision"]["tf32_matmul"] is False
    assert "percent (0-100)" in settings["units"] and "top1" in settings["units"]["percent (0-100)"]
    card = report["run_card"]
    assert card["world_size"] == 1 and card["packages"]["torch"] == torch.__version__.split("+")[0]
    assert card["data_manifest_sha256"] == hashlib.sha256((sample_shards / "manifest.json").read_bytes()).hexdigest()
    assert "over the WRONG answers only" in report["definitions"]["mean_error"] and "ALL answers" in report["definitions"]["mean_distance"]


def test_start_line_and_a_table_that_stays_readable_off_a_terminal(five_models):
    _, result = five_models
    start = result.stderr.splitlines()[:2]
    assert start[0].startswith("eval-pos: 5 model(s): DropPos run (tiny, 3 steps) (droppos-run, 32px, grid 4x4")
    assert "device cpu" in start[1] and "ratios 0.75:0.75 0.5:0.75 0:0.75 0:1" in start[1] and "2 permutation(s)" in start[1]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.lstrip("┃ ").startswith("metric"))
    assert all(label in header for label in LABELS)  # not squeezed into 80 columns: no label wrapped
    row = next(line for line in lines if "displacement" in line and "(b) PE in place" in line)
    assert row.count(" ± ") == 5 + 1 and len(row) == len(header)  # one per model, plus the unit "± sem"


def test_html_report_stands_on_its_own(five_models):
    out, _ = five_models
    report = json.loads((out / "report.json").read_text())
    page = (out / "report.html").read_text()
    links = set(re.findall(r"href='#def-([a-z0-9_]+)'", page))
    anchors = re.findall(r"id='def-([a-z0-9_]+)'", page)
    assert links and links <= set(anchors) and len(anchors) == len(set(anchors))  # each metric defined, once
    captions = re.findall(r"<figcaption><b>([^<]+)</b>([^<]+)</figcaption>", page)
    assert len(captions) == len(report["plots"])
    assert all(not title.endswith(".png") and len(text) > 80 for title, text in captions)
    assert 'docs/METHOD.md' in page and "Location-awareness diagnostics" in page
    assert page.count("METHOD.md") == page.count("docs/METHOD.md")
    assert "<th>option</th><th>value</th><th>meaning</th>" in page and '{"' not in page  # settings: a table, no JSON dump
    assert "over the WRONG answers only" in page and "over ALL answers" in page
    assert "bag-of-patches reference" in page and "std 0.02" in page  # what the random baseline is, and why


def _drawn_texts(fig):
    """Every text matplotlib draws: tick labels inside the view, titles, axis labels, bar values, legends."""
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in axis.get_major_ticks():
                if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    yield from (label for label in (tick.label1, tick.label2) if label.get_visible())
            yield axis.label
            yield axis.get_offset_text()
        yield ax.title
        yield from ax.texts
        if ax.get_legend() is not None:
            yield from ax.get_legend().get_texts()
    yield from fig.texts  # suptitle, supxlabel
    for legend in fig.legends:
        yield from legend.get_texts()


def _text_never_overlaps(fig) -> bytes:
    """A `render` for make_figures that fails when two texts of a figure overlap."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer).padded(-0.5)) for t in _drawn_texts(fig)
             if t.get_visible() and t.get_text().strip()]
    clashes = [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]
    plt.close(fig)
    assert len(boxes) > 10 and not clashes, clashes[:5]
    return b"png"


def test_report_figures_label_five_models_without_overlap(five_models):
    from droppos.evalpos.report import make_figures

    out, _ = five_models
    report = json.loads((out / "report.json").read_text())
    figures = make_figures(report["models"], render=_text_never_overlaps)
    assert {f.name for f in figures} == set(report["plots"])
    import matplotlib.pyplot as plt

    clash = plt.figure()
    for i in range(11):
        clash.text(0.05, 0.08 * i, f"label {i}")
    clash.text(0.06, 0.0, "on top of label 0")
    with pytest.raises(AssertionError, match="on top of label 0"):  # the check itself sees a clash
        _text_never_overlaps(clash)


def test_a_second_writer_on_the_same_out_stops_with_one_line(tiny_run, sample_shards, tmp_path):
    from droppos.files import OutputLock

    out = tmp_path / "report"
    with OutputLock(out, "eval-pos"):
        result = droppos("eval-pos", str(tiny_run), "--data", str(sample_shards), "--out", str(out), *FAST, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "in use by" in result.stderr


def test_a_full_disk_while_writing_the_report_is_one_line_and_exit_2(tiny_run, sample_shards, tmp_path, monkeypatch, capsys):
    import cli
    from droppos import files

    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == "report.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", full_disk)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval-pos", str(tiny_run), "--data", str(sample_shards), "--out", str(out), "--max-images", "8",
                  "--ratio", "0:1", *FAST])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"droppos: error: cannot write {out / 'report.json'}") and "disk is full" in last
    assert not list(out.glob(".*.tmp-*"))  # no temporary file left behind


def test_a_downloaded_checkpoint_is_compared_by_its_own_name_and_sha256(sample_shards, tmp_path):
    """--weights FILE (an MAE-layout {'model': ...} file of a 224-px ViT-Ti/16, written here) for a --timm-model
    at 64 px: loaded with its PE resampled, named after its weights, its sha256 in report.json, beside a
    random-init baseline. A file of another architecture is one line, not a silent mismatch."""
    import timm

    from droppos.files import file_sha256

    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "mae-like.pth"
    torch.save({"model": vit.state_dict(), "epoch": 3}, path)
    out = tmp_path / "report"
    result = droppos("eval-pos", "--timm-model", "vit_tiny_patch16_224", "--weights", str(path), "--img-size", "64",
                     "--data", str(sample_shards), "--out", str(out), "--max-images", "16", "--random-baseline",
                     "--compare", *FAST)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    loaded, random = report["models"]
    weights = loaded["info"]["weights"]
    assert weights["sha256"] == file_sha256(path) and weights["source"] == "file" and weights["layout"] == "mae-deit"
    assert "random-init" not in loaded["name"] and random["kind"] == "random-init"
    assert loaded["architecture"]["grid"] == [4, 4]
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    torch.save({"model": small.state_dict()}, tmp_path / "other.pth")
    result = droppos("eval-pos", "--timm-model", "vit_tiny_patch16_224", "--weights", str(tmp_path / "other.pth"),
                     "--data", str(sample_shards), "--out", str(tmp_path / "r2"), *FAST, timeout=120)
    assert result.returncode == 2 and "pick the --timm-model of its architecture" in result.stderr.strip().splitlines()[-1]


def test_a_finetune_checkpoint_is_built_from_what_it_records_and_bounded_first(tmp_path):
    """eval-pos on a `droppos finetune` checkpoint: the classifier from the timm name and model_args it records (a
    384-px fine-tune of a patch-16 ViT, which names no patch size of its own), with its own weights. A tampered
    record (an unknown pool, heads that do not divide the width, an architecture other than its weights', a huge
    one) is one line, and the huge one is refused without allocating it."""
    import resource

    import timm

    from droppos.evalpos.load import load_subject

    torch.manual_seed(0)
    args = {"img_size": 384, "depth": 1}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, global_pool="avg", **args)

    def checkpoint(name: str, model_args: dict, pool: object = "avg") -> str:
        path = tmp_path / f"{name}.pt"
        torch.save({"format": "droppos-checkpoint/2", "stage": "finetune", "step": 7, "config": {"pool": pool},
                    "model": vit.state_dict(), "encoder": {"model": "vit_tiny_patch16_224", "model_args": model_args}},
                   path)
        return str(path)

    subject = load_subject(checkpoint("good", args))
    assert subject.kind == "finetune" and subject.img_size == 384
    images = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(subject.vit(images), vit.eval()(images))
    tampered = {
        "pool": (checkpoint("pool", args, pool="bogus"), "pool"),
        "heads": (checkpoint("heads", {**args, "embed_dim": 190, "num_heads": 3}), "not divisible"),
        "deeper": (checkpoint("deeper", {**args, "depth": 2}), "do not match"),
    }
    for name, (path, message) in tampered.items():
        with pytest.raises(UserError, match=message):
            load_subject(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match="do not match"):  # ~200 billion parameters, if it were built
        load_subject(checkpoint("huge", {**args, "embed_dim": 8192, "depth": 256, "num_heads": 256}))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: less than 1 GiB more


def test_timm_model_on_scikit_image_photos(tmp_path):
    from PIL import Image
    from skimage import data

    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(photos / "astronaut.png")
    Image.fromarray(data.coffee()).resize((300, 200)).save(photos / "coffee.jpg", quality=85)
    Image.fromarray(data.chelsea()).save(photos / "nested" / "chelsea.tiff")
    Image.fromarray(data.camera()).resize((96, 160)).save(photos / "nested" / "camera.bmp")  # grayscale
    rgba = np.dstack([data.rocket()[:200, :200], np.full((200, 200), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(photos / "rocket_alpha.png")
    (photos / "notes.txt").write_text("not an image")
    (photos / "truncated.jpg").write_bytes((photos / "coffee.jpg").read_bytes()[:200])
    out = tmp_path / "report"
    result = droppos("eval-pos", "--timm-model", "vit_tiny_patch16_224", "--img-size", "64", "--images", str(photos),
                     "--out", str(out), "--permutations", "2", "--probe-steps", "20")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["found"] == 7 and report["data"]["used"] == 5
    assert sorted(s["path"] for s in report["data"]["skipped"]) == ["notes.txt", "truncated.jpg"]
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 2
    model = report["models"][0]
    assert model["kind"] == "timm" and model["architecture"]["grid"] == [4, 4]
    assert report["position_accuracy"] == []
    assert model["order_sensitivity"]["with_pe"]["cosine_mean"] > 0.9999
    assert model["order_sensitivity"]["with_pe"]["top1_agreement"] == 100.0  # a classifier head: agreement reported (%)
    assert model["name"] == "random-init vit_tiny_patch16_224" and model["info"]["weights"]["source"] == "random-init"
    assert report["position_probe"]["top1"] is not None
    _check_report_files(out, report)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{run}", "--data", "{shards}"], "--out is required"),
        (["{run}", "--out", "{tmp}/r"], "exactly one of --data"),
        (["{run}", "{run}", "--data", "{shards}", "--out", "{tmp}/r"], "--compare"),
        (["/nonexistent/run", "--data", "{shards}", "--out", "{tmp}/r"], "does not exist"),
        (["--timm-model", "resnet18", "--data", "{shards}", "--out", "{tmp}/r"], "not a timm VisionTransformer"),
        (["--timm-model", "vit_enormous", "--data", "{shards}", "--out", "{tmp}/r"], "unknown timm model"),
        (["{run}", "--data", "{shards}", "--split", "test", "--out", "{tmp}/r"], "no split"),
        (["{run}", "--images", "{tmp}/missing", "--out", "{tmp}/r"], "not a directory"),
        (["{run}/encoder.safetensors", "--probe-fill", "mask-token", "--data", "{shards}", "--out", "{tmp}/r"],
         "has no learnable [MASK] token"),
        (["{run}", "--probe-fill", "noise", "--data", "{shards}", "--out", "{tmp}/r"], "--probe-fill 'noise': choose one of"),
        (["{run}", "--label", "a", "--label", "b", "--data", "{shards}", "--out", "{tmp}/r"], "2 --label given for 1 model"),
    ],
)
def test_user_mistakes_are_one_line(tiny_run, sample_shards, tmp_path, args, message):
    args = [a.format(run=tiny_run, shards=sample_shards, tmp=tmp_path) for a in args]
    result = droppos("eval-pos", *args, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# --- on the demo-trained model (slow) ---------------------------------------------------------


@pytest.mark.slow
def test_demo_model_is_location_aware(demo_run, sample_shards, tmp_path):
    out = tmp_path / "report"
    result = droppos("eval-pos", str(demo_run), "--random-baseline", "--data", str(sample_shards), "--out", str(out),
                     "--max-images", "250", "--permutations", "3", "--loader", "pil", "--workers", "0", timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    trained, random = report["models"]
    for entry in trained["position_accuracy"]:
        assert entry["top1"] > 2 * entry["chance_top1"], entry
    for entry in random["position_accuracy"]:
        assert entry["top1"] < 2 * entry["chance_top1"], entry
    # (a) a ViT cannot notice tokens permuted together with their PEs.
    assert trained["order_sensitivity"]["with_pe"]["cosine_mean"] > 0.9999
    # (c) trained with 3/4 of its PEs dropped, the model relies far less on PEs than at random init
    # (measured on 2026-11-24: cosine 0.98 vs 0.71 on these images).
    assert trained["order_sensitivity"]["no_pe"]["cosine_mean"] > random["order_sensitivity"]["no_pe"]["cosine_mean"] + 0.1
    # (b) scrambling the image under fixed PEs moves the trained model's [CLS] feature further than the
    # random-init model's, measured in units of the distance between two images' features. (The raw cosine
    # says the opposite, 0.9977 vs 0.9942 on 2026-11-24: it is dominated by the direction all features share.)
    moved = [m["order_sensitivity"]["pe_in_place"]["displacement_mean"] for m in (trained, random)]
    assert moved[0] > 1.2 * moved[1], moved
