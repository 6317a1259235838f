"""The report of eval-pos: report.json, a self-contained report.html with its figures, the terminal table.

report.json holds every number with the settings that produced them (resolved: the device, precision
and loader actually used), the units, the definitions and the run card. report.html reads on its own:
each section defines its metrics (what, unit, what a ± is over), each figure has a title, labelled axes
and a caption that says what to look at. The files are published together through `droppos.files.publish`.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from droppos import files
from droppos.evalpos.load import INITS
from droppos.evalpos.metrics import PROBE_FILLS, VARIANTS

__all__ = ["DEFINITIONS", "FORMAT", "UNITS", "Figure", "build", "make_figures", "print_table", "resolved_settings",
           "summary_rows", "write", "write_html"]

FORMAT = "droppos-evalpos/2"  # 2: accuracies in percent, run card, resolved settings, definitions
METHOD_DOC = 'docs/METHOD.md of the droppos repository, section "Location-awareness diagnostics"'
UNITS = {
    "percent (0-100)": ["top1", "top5", "chance_top1", "chance_top5", "cell_accuracy", "fit_top1", "top1_agreement",
                        "accuracy", "reference_accuracy", "error_histogram.chance_share"],
    "percentage points": ["accuracy_change"],
    "patches (Euclidean distance on the (row, col) grid)": ["mean_error", "median_error", "mean_distance",
                                                            "chance_mean_error", "error_histogram.bin_edges"],
    "fraction (0-1, as given on the command line)": ["mask_ratio", "pos_mask_ratio", "ratios", "probe_drop",
                                                     "drop_ratio"],
    "unitless": ["cosine_*", "displacement_* (1 = the mean squared distance between two images' features)",
                 "patch_token_rms", "patch_pe_rms"],
    "count": ["images", "patches_evaluated", "errors", "error_histogram.counts", "fit_tokens", "test_tokens"],
}

# Every metric a reader meets: (name, unit, definition). The HTML shows them where the metric appears.
DEFINITIONS: dict[str, tuple[str, str, str]] = {
    "position_top1": ("position top-1", "%", "share of the patches whose PE was dropped for which the DropPos "
                      "position head ranks the patch's true cell first. Counted over every dropped patch of every "
                      "image (no ±: one count over all of them); chance is 100 / L for L cells."),
    "position_top5": ("position top-5", "%", "as top-1, with the true cell among the head's 5 highest scores."),
    "mean_error": ("mean error", "patches", "mean grid distance between the predicted and the true cell, over the "
                   "WRONG answers only: a model that is right more often can have a larger mean error. The distance "
                   "is Euclidean on the (row, col) patch grid; 1 = the neighbouring cell."),
    "median_error": ("median error", "patches", "median of the same distances, over the wrong answers only."),
    "mean_distance": ("mean distance", "patches", "the same distance over ALL answers (a right answer counts 0): how "
                      "often and how far wrong in one number. Lower is better."),
    "chance_mean_error": ("chance mean error", "patches", "mean distance between two different cells: the mean "
                          "error of a uniformly random wrong guess."),
    "displacement": ("displacement", "unitless", "how far the pooled feature moves when the patch tokens are "
                     "permuted: its squared distance to the intact input's feature, divided by the mean squared "
                     "distance between the intact features of two different images. 0 = unchanged, 1 = as far as "
                     "another image. ± is the standard error of the mean over images (each image's value averaged "
                     "over the permutations). The number to compare across models."),
    "cosine": ("cosine", "unitless", "cosine similarity of the pooled feature to the intact input's. Near 1 for "
               "every model, even between different images, because ViT features share one dominant direction "
               "by a margin that differs between models: read the displacement instead. ± as for the displacement."),
    "top1_agreement": ("top-1 agreement", "%", "classifiers only: share of (image, permutation) pairs whose top-1 "
                       "class is the one predicted on the intact image."),
    "accuracy_change": ("accuracy change", "percentage points", "classifiers whose classes are the data's: top-1 "
                        "accuracy under the permutation minus top-1 accuracy on the intact images."),
    "probe_top1": ("position probe top-1", "%", "share of the PE-dropped patches of the test images (odd index) "
                   "whose cell a linear classifier, fitted on the even images' tokens, predicts exactly. One count "
                   "over all test patches (no ±); chance is 100 / L."),
    "probe_fit_top1": ("probe fit top-1", "%", "the same on the fitting images: far above the test top-1 means "
                       "the probe memorised rather than read positions."),
    "pe_rms": ("PE RMS / patch-token RMS", "unitless", "root mean square of the patch PEs and of the patch tokens "
               "they are added to (before any block): how visible the PEs are to the network. A stock timm "
               "initialisation has PEs of std 0.02, far below its tokens, so it is nearly a bag of patches."),
}
VARIANT_TEXT = {
    "with_pe": "(a) the patch tokens are permuted together with their PEs. A ViT has no order bias of its own, so "
               "its feature cannot move: (a) is a check, and must be 0 (cosine 1) up to rounding.",
    "pe_in_place": "(b) the patch tokens are permuted and the PEs left in place: the same patches at the wrong "
                   "positions, i.e. a scrambled image. A model that uses where each patch is moves further.",
    "no_pe": "(c) the patch tokens are permuted and no PE is added at all: every spatial cue is gone (the "
             "permutation then makes no difference). A model that relies on its PEs moves further.",
}
BASELINE_TEXT = (
    "The random baseline (--random-baseline) is the first model's architecture with fresh weights, seeded by "
    "--seed, started where that model's training started. A DropPos model gets DropPosViT's own initialisation "
    "(MAE's: xavier-uniform linear layers and patch projection, normal(0, 0.02) [CLS] and [MASK] tokens) with the "
    "fixed 2-D sin-cos PE that DropPos pre-training never changes; an encoder exported by droppos keeps that "
    "fixed PE under timm's initialisation. Its (b) and (c) therefore show what PEs of the trained model's size do "
    "through a network that has learned nothing: a bag-of-patches reference with the same PEs, and what the "
    "trained model adds above it is learned. Any other timm ViT gets timm's own initialisation, whose learned PE "
    "starts at std 0.02: nearly invisible beside the patch tokens (see the PE RMS row), so its (b) and (c) are "
    "near 0 and any model looks order-aware against it.")


Render = Callable[[Any], bytes]


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its file name, title, what to look at, and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


# ----------------------------------------------------------------------------------------------
# report.json


def resolved_settings(config: Any, *, device: str, precision: dict, loader: str, workers: Optional[int]) -> dict:
    """Every option as given, plus what `auto` and the defaults turned into, plus the units."""
    settings = dataclasses.asdict(config)
    settings.update(
        ratios=[list(r) for r in config.ratio_pairs], probe_fill=f"{config.probe_fill} ({PROBE_FILLS[config.probe_fill]})",
        device=device, device_requested=config.device, loader=loader, loader_requested=config.loader, workers=workers,
        precision=precision, primary="top-level position_accuracy / order_sensitivity / position_probe are models[0]'s",
        units=UNITS)
    return settings


def build(results: list[dict], images: Any, settings: dict, run_card: dict) -> dict:
    """The whole report as one JSON-ready dict (report.json)."""
    return {
        "format": FORMAT,
        "position_accuracy": results[0]["position_accuracy"],
        "order_sensitivity": results[0]["order_sensitivity"],
        "position_probe": results[0]["position_probe"],
        "models": results,
        "data": {"description": images.describe(), "found": images.found, "used": results[0]["images"],
                 "skipped": images.skipped},
        "settings": settings,
        "definitions": {key: f"{name} ({unit}): {text}" for key, (name, unit, text) in DEFINITIONS.items()},
        "references": {"random_baseline": BASELINE_TEXT, "method": METHOD_DOC},
        "run_card": run_card,
    }


# The files a report consists of: a new report replaces every one of a previous report's, never a user's file.
REPORT_FILES = re.compile(r"report\.json|report\.html|skipped\.jsonl|"
                          r"(position_accuracy|heatmap_\d+|error_distance|order_sensitivity|position_probe)\.png")


def write(out: Path, report: dict) -> Path:
    """skipped.jsonl, the PNGs, report.json and report.html under `out`, all together or none (`files.publish`:
    a full disk or a crash leaves the previous report whole); a previous report's files that this one does not
    have (more heatmaps, skipped.jsonl) go with it. Returns report.html."""
    figures = make_figures(report["models"])
    report["plots"] = [f.name for f in figures]
    report["figures"] = [{"file": f.name, "title": f.title, "caption": f.caption} for f in figures]
    previous = [p.name for p in out.iterdir() if REPORT_FILES.fullmatch(p.name)] if out.is_dir() else []
    with files.publish(out, owns=previous) as staged:
        if report["data"]["skipped"]:
            staged.write_text("skipped.jsonl", "".join(json.dumps(s) + "\n" for s in report["data"]["skipped"]))
        for figure in figures:
            staged.write_bytes(figure.name, figure.png)
        staged.write_json("report.json", report, indent=2)
        staged.write_text("report.html", write_html(report, figures))
    return out / "report.html"


# ----------------------------------------------------------------------------------------------
# Numbers as text (the terminal and the HTML share them)


def _num(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _sig(value: Optional[float]) -> str:
    """Three significant digits: a displacement of 2e-15 (rounding) must not read as 0.0000."""
    return "–" if value is None else f"{value:.3g}"


def _pm(entry: dict, name: str) -> str:
    """'mean ± sem' of a spread `_spread` wrote: cosines to 5 decimals, displacements to 3 significant digits."""
    mean, sem = entry.get(f"{name}_mean"), entry.get(f"{name}_sem")
    if mean is None:
        return "–"
    text = (lambda v: f"{v:.5f}") if name == "cosine" else _sig
    return text(mean) + ("" if sem is None else f" ± {text(sem)}")


def _pair(first: str, second: str) -> str:
    return "–" if first == second == "–" else f"{first} / {second}"


def _ratio(a: dict) -> str:
    return f"γ={a['mask_ratio']:g} γpos={a['pos_mask_ratio']:g}"


Row = tuple[str, str, str, str, list[str]]  # (metric, setting, unit, definition key, one cell per model)


def summary_rows(results: list[dict]) -> list[tuple[str, list[Row]]]:
    """(section, rows) of the summary: the terminal table and the HTML summary table."""
    models: list[Row] = [
        ("images", "", "count", "", [str(r["images"]) for r in results]),
        ("grid", "", "rows x cols", "", ["x".join(map(str, r["architecture"]["grid"])) for r in results]),
        ("PE RMS / token RMS", "", "", "pe_rms",
         [_pair(_num(r["architecture"]["patch_pe_rms"], 3), _num(r["architecture"]["patch_token_rms"], 3)) for r in results]),
    ]
    position: list[Row] = []
    ratios = [(a["mask_ratio"], a["pos_mask_ratio"]) for r in results for a in r["position_accuracy"]]
    for g, gp in dict.fromkeys(ratios):
        def pick(r: dict, key: str, digits: int) -> str:
            hit = [a for a in r["position_accuracy"] if (a["mask_ratio"], a["pos_mask_ratio"]) == (g, gp)]
            return _num(hit[0][key], digits) if hit else "–"
        where = f"γ={g:g} γpos={gp:g}"
        position += [
            ("top-1", where, "%", "position_top1", [pick(r, "top1", 2) for r in results]),
            ("top-5", where, "%", "position_top5", [pick(r, "top5", 2) for r in results]),
            ("mean error (wrong only)", where, "patches", "mean_error", [pick(r, "mean_error", 3) for r in results]),
            ("mean distance (all)", where, "patches", "mean_distance", [pick(r, "mean_distance", 3) for r in results]),
        ]
    order: list[Row] = []
    for key in ("pe_in_place", "no_pe", "with_pe"):
        label = VARIANTS[key][0] + (" (check: 0)" if key == "with_pe" else "")
        order.append(("displacement", label, "± sem", "displacement",
                      [_pm(r["order_sensitivity"][key], "displacement") for r in results]))
    for key, (label, _) in VARIANTS.items():
        order.append(("cosine", label, "± sem", "cosine", [_pm(r["order_sensitivity"][key], "cosine") for r in results]))
    for key, (label, _) in VARIANTS.items():
        if any("top1_agreement" in r["order_sensitivity"][key] for r in results):
            order.append(("top-1 agreement", label, "%", "top1_agreement",
                          [_num(r["order_sensitivity"][key].get("top1_agreement"), 2) for r in results]))
        if any("accuracy_change" in r["order_sensitivity"][key] for r in results):
            order.append(("accuracy change", label, "points", "accuracy_change",
                          [_num(r["order_sensitivity"][key].get("accuracy_change"), 2) for r in results]))
    probe: list[Row] = [
        ("top-1", "test images", "%", "probe_top1", [_num(r["position_probe"].get("top1"), 2) for r in results]),
        ("chance", "", "%", "probe_top1", [_num(r["position_probe"].get("chance_top1"), 2) for r in results]),
    ]
    sections = [("models", models), ("position accuracy (DropPos position head)", position),
                ("token-order sensitivity", order), ("position linear probe", probe)]
    return [(title, rows) for title, rows in sections if rows]


def print_table(results: list[dict]) -> None:
    """The summary on stdout: rich on a terminal; as wide as it needs (never squeezed) otherwise."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="droppos eval-pos (± = standard error over images)")
    headers = ["metric", "setting", "unit", *[r["name"] for r in results]]
    for i, name in enumerate(headers):
        table.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)
    lines = [headers]
    for title, rows in summary_rows(results):
        table.add_row(f"[bold]{title}[/bold]")
        lines.append([title, "", "", *[""] * len(results)])
        for metric, setting, unit, _, cells in rows:
            table.add_row(metric, setting, unit, *cells)
            lines.append([metric, setting, unit, *cells])
        table.add_section()
    if sys.stdout.isatty():
        console = Console()
    else:  # as wide as the table: a pipe or a log file must not get it squeezed into 80 columns
        widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
        console = Console(width=max(80, sum(w + 3 for w in widths) + 1), no_color=True)
    console.print(table)


# ----------------------------------------------------------------------------------------------
# Figures


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _colors(results: list[dict]) -> dict[str, Any]:
    """One colour per model, the same in every figure."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(results) <= 10 else "tab20"]
    return {r["name"]: cmap(i % cmap.N) for i, r in enumerate(results)}


def _hbars(ax: Any, names: Sequence[str], values: Sequence[Optional[float]], colors: dict, *,
           errors: Optional[Sequence[Optional[float]]] = None, digits: Optional[int] = 1,
           xmax: Optional[float] = None, chance: Optional[Sequence[Optional[float]]] = None) -> None:
    """One horizontal bar per model, top to bottom in the models' order, its value written past its end;
    `chance` marks each model's chance level with a dashed segment across its bar (grids may differ)."""
    y = np.arange(len(names))
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    errs = None if errors is None else np.array([0.0 if e is None else e for e in errors], dtype=float)
    ax.barh(y, np.nan_to_num(vals), color=[colors[n] for n in names], xerr=errs, capsize=3, height=0.65)
    ends = np.nan_to_num(vals) + (0 if errs is None else errs)
    levels = [level for level in (chance or []) if level is not None]
    top = max([xmax if xmax is not None else float(ends.max()), *levels])
    top = top if top > 0 else 1.0  # every value 0: still a readable axis
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0, top * 1.32)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    for i, v in enumerate(vals):
        end = (0 if np.isnan(v) else v) + (0 if errs is None else errs[i])
        text = "–" if np.isnan(v) else (f"{v:.{digits}f}" if digits is not None else f"{v:.3g}")
        ax.text(end + top * 0.02, i, text, va="center", fontsize=8)
    for i, level in enumerate(chance or []):
        if level is not None:
            ax.vlines(level, i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1.2)
    ax.set_yticks(y, names, fontsize=9)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.grid(axis="x", color="#ddd", lw=0.6)
    ax.set_axisbelow(True)


def _bar_grid(panels: int, models: int, columns: int = 2) -> tuple[Any, np.ndarray]:
    import matplotlib.pyplot as plt

    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 1.6, (1.1 + 0.34 * models) * rows + 0.6),
                             squeeze=False, sharey=True, layout="constrained")
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, axes


def _position_figures(results: list[dict], colors: dict, render: Render) -> list[Figure]:
    import matplotlib.pyplot as plt

    with_pos = [r for r in results if r["position_accuracy"]]
    if not with_pos:
        return []
    names = [r["name"] for r in with_pos]
    entries = with_pos[0]["position_accuracy"]
    figures = []
    fig, axes = _bar_grid(len(entries), len(names))
    top = max(a["top1"] or 0 for r in with_pos for a in r["position_accuracy"])
    for j, (ax, a) in enumerate(zip(axes.flat, entries)):
        _hbars(ax, names, [r["position_accuracy"][j]["top1"] for r in with_pos], colors, xmax=top,
               chance=[r["position_accuracy"][j]["chance_top1"] for r in with_pos])
        ax.set_title(f"{_ratio(a)}: {a['dropped_per_image']} of {a['visible_per_image']} visible patches lose their PE",
                     fontsize=9)
    fig.supxlabel("position top-1 on the patches whose PE was dropped (%); dashed: chance", fontsize=10)
    fig.suptitle("Position accuracy: does the position head find where a patch without PE belongs?", fontsize=11)
    figures.append(Figure("position_accuracy.png", "Position top-1 per mask setting",
                          "One panel per (γ, γpos): γ is the fraction of patches removed, γpos the fraction of the visible "
                          "ones whose PE is dropped. Look at how far each bar is beyond its dashed chance mark, and at the "
                          "random baseline, which should sit on it. γ=0 γpos=1 (every patch visible, no PE at all) asks "
                          "for positions from content alone.", render(fig)))

    best_cell = max((v for r in with_pos for a in r["position_accuracy"] for row in a["cell_accuracy"] for v in row
                     if v is not None), default=100.0)
    vmax = max(10.0, math.ceil(best_cell / 10) * 10)  # one colour scale for every model's map
    for index, r in enumerate(results):
        if not r["position_accuracy"]:
            continue
        cells = r["position_accuracy"]
        fig, axes = plt.subplots(1, len(cells), figsize=(2.5 * len(cells) + 1.2, 3.2), squeeze=False, layout="constrained")
        rows, cols = r["architecture"]["grid"]
        step = max(1, math.ceil(max(rows, cols) / 8))
        for ax, a in zip(axes[0], cells):
            grid = np.array([[np.nan if v is None else v for v in row] for row in a["cell_accuracy"]], dtype=float)
            image = ax.imshow(grid, vmin=0, vmax=vmax, cmap="viridis", origin="upper")
            ax.set_xticks(range(0, cols, step))
            ax.set_yticks(range(0, rows, step))
            ax.tick_params(labelsize=7)
            ax.set_xlabel("column (0 = left edge)", fontsize=8)
            ax.set_title(f"{_ratio(a)}\ntop-1 {a['top1'] or 0:.1f}%", fontsize=9)
        axes[0][0].set_ylabel("row (0 = top edge)", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label=f"top-1 of the cell (%), 0-{vmax:g}")
        fig.suptitle(f"{r['name']}: position top-1 per cell of the image", fontsize=10)
        figures.append(Figure(f"heatmap_{index}.png", f"{r['name']}: position top-1 per cell",
                              f"Each square is one patch position of the image as seen (row 0 at the top, column 0 at "
                              f"the left); its colour is how often a patch there, with its PE dropped, is put back in "
                              f"that cell. The colour scale (0-{vmax:g}%) is the same for every model. Look for where "
                              f"positions are found: the corners and edges, whose content differs most, or everywhere.",
                              render(fig)))

    fig, axes = plt.subplots(1, len(entries), figsize=(3.0 * len(entries) + 0.8, 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    for j, (ax, a) in enumerate(zip(axes[0], entries)):
        edges = np.array(a["error_histogram"]["bin_edges"][:-1])
        for r in with_pos:
            e = r["position_accuracy"][j]
            share = 100.0 * np.array(e["error_histogram"]["counts"], dtype=float) / max(1, e["patches_evaluated"])
            ax.step(edges, share, where="post", color=colors[r["name"]], label=r["name"])
        ax.step(edges, a["error_histogram"]["chance_share"], where="post", color="k", ls="--", lw=1, label="random guess")
        ax.set_title(_ratio(a), fontsize=9)
        ax.set_xlabel("distance of a wrong answer (patches)")
        ax.grid(color="#eee", lw=0.6)
    axes[0][0].set_ylabel("share of dropped patches (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("How far off are the wrong answers?", fontsize=11)
    figures.append(Figure("error_distance.png", "Distance of the wrong position answers",
                          "For each model, the share of dropped patches put back that far from their true cell (bins of "
                          "one patch; right answers, at distance 0, are left out, so each curve sums to 100 minus the "
                          "top-1). The dashed line is a uniformly random guess. Mass at distance 1-2 means the model "
                          "knows roughly where a patch goes even when it misses the cell.", render(fig)))
    return figures


def _order_figure(results: list[dict], colors: dict, render: Render) -> Figure:
    names = [r["name"] for r in results]
    fig, axes = _bar_grid(2, len(names))
    for ax, key in zip(axes.flat, ("pe_in_place", "no_pe")):
        entries = [r["order_sensitivity"][key] for r in results]
        _hbars(ax, names, [e["displacement_mean"] for e in entries], colors,
               errors=[e.get("displacement_sem") for e in entries], digits=None)
        ax.set_title(f"{VARIANTS[key][0]}: {VARIANTS[key][1]}", fontsize=9)
    fig.supxlabel("displacement of the pooled feature (0 = unchanged, 1 = as far as another image)", fontsize=10)
    fig.suptitle("Token-order sensitivity: how far the pooled feature moves", fontsize=11)
    return Figure("order_sensitivity.png", "Token-order sensitivity (displacement)",
                  "Left, (b): the patches are shuffled under PEs left in place (a scrambled image); a model that uses "
                  "where each patch is moves further than its random baseline. Right, (c): no PE at all; a model that "
                  "does not depend on its PEs (as DropPos is trained to) moves less. Each panel has its own scale; "
                  "error bars are the standard error over images. (a), the check, is in the table: it is 0 for every ViT.",
                  render(fig))


def _probe_figure(results: list[dict], colors: dict, render: Render) -> Figure:
    names = [r["name"] for r in results]
    fig, axes = _bar_grid(1, len(names))
    ax = axes[0][0]
    _hbars(ax, names, [r["position_probe"].get("top1") for r in results], colors,
           chance=[r["position_probe"].get("chance_top1") for r in results])
    ax.set_xlabel("position probe top-1 on the test images (%); dashed: chance (100 / cells)")
    fig.suptitle("Position linear probe: is a patch's position readable from its output token?", fontsize=11)
    fill = results[0]["position_probe"].get("fill", "")
    return Figure("position_probe.png", "Position linear probe",
                  f"A linear classifier reads the cell of patches whose PE was replaced by {fill} from their frozen "
                  f"output tokens (fitted on even images, scored on odd ones). Compare each model with its dashed "
                  f"chance mark (models with other grids have other chances) and with the random baseline: what is above it the network encodes from content.",
                  render(fig))


def make_figures(results: list[dict], render: Optional[Render] = None) -> list[Figure]:
    """Every figure of the report, in reading order; `render` turns a matplotlib figure into bytes (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    render = render or _png
    colors = _colors(results)
    return [*_position_figures(results, colors, render), _order_figure(results, colors, render),
            _probe_figure(results, colors, render)]


# ----------------------------------------------------------------------------------------------
# report.html

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; padding: 1.5em 2em 4em;
       max-width: 1320px; color: #1d1d1f; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { margin-top: 1.5em; font-size: 1.05em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
td { overflow-wrap: break-word; }
th, td { border: 1px solid #d5d5d5; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f3f3f5; text-align: left; overflow-wrap: anywhere; min-width: 6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.unit { color: #666; white-space: nowrap; }
tr.section td { background: #fafafa; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.25em 1em; max-width: 70em; }
dt { font-weight: 600; } dd { margin: 0; }
figure { margin: 1.2em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { max-width: 70em; color: #333; } figcaption b { display: block; }
.note { background: #f6f8fa; border-left: 4px solid #8aa; padding: 0.6em 1em; max-width: 70em; }
code { background: #f3f3f3; padding: 0 0.2em; }
.pm { color: #666; font-size: 0.9em; }
@media (max-width: 1100px) { body { padding: 1em; font-size: 14px; } }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<div class=scroll><table><tr>{head}</tr>{body}</table></div>"


def _definitions(keys: Sequence[str], anchored: set[str]) -> str:
    """A definition list; the first definition of a metric on the page is the summary's link target."""
    items = []
    for k in keys:
        anchor = "" if k in anchored else f" id='def-{k}'"
        anchored.add(k)
        items.append(f"<dt{anchor}>{_e(DEFINITIONS[k][0])} ({_e(DEFINITIONS[k][1])})</dt><dd>{_e(DEFINITIONS[k][2])}</dd>")
    return f"<dl>{''.join(items)}</dl>"


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode()
    return (f"<figure><img alt='{_e(figure.name)}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>{_e(figure.title)}</b>{_e(figure.caption)}</figcaption></figure>")


def _summary_table(results: list[dict]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in ["metric", "setting", "unit", *[r["name"] for r in results]])
    body = []
    for title, rows in summary_rows(results):
        body.append(f"<tr class=section><td colspan={len(results) + 3}>{_e(title)}</td></tr>")
        for metric, setting, unit, key, cells in rows:
            name = f"<a href='#def-{key}'>{_e(metric)}</a>" if key else _e(metric)
            body.append(f"<tr><td>{name}</td><td class=unit>{_e(setting)}</td><td class=unit>{_e(unit)}</td>"
                        + "".join(f"<td class=num>{_stacked(c)}</td>" for c in cells) + "</tr>")
    return f"<div class=scroll><table><tr>{head}</tr>{''.join(body)}</table></div>"


def _stacked(cell: str) -> str:
    """'mean ± sem' on two lines, so that five models and more fit a laptop's width."""
    mean, sep, sem = cell.partition(" ± ")
    return _e(mean) + (f"<br><span class=pm>± {_e(sem)}</span>" if sep else "")


def _weights_text(weights: dict) -> str:
    if weights.get("source") == "random-init":
        return f"random: {INITS[weights['init']][0]}, seed {weights.get('seed')}"
    sha = weights.get("sha256")
    return f"{weights.get('source', '?')}: {weights.get('path', '?')}" + (f" (sha256 {sha[:12]}…)" if sha else "")


def _models_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        a = r["architecture"]
        parts = [p for p, has in (("position head", a["position_head"]), ("[MASK] token", a["mask_token"])) if has]
        rows.append([r["name"], r["kind"], _weights_text(r["info"].get("weights") or {}),
                     f"{a['timm_model'] or '?'} · {a['img_size']} px · grid {a['grid'][0]}x{a['grid'][1]} · "
                     f"depth {a['depth']} · width {a['embed_dim']}", ", ".join(parts) or "–",
                     _pair(_num(a["patch_pe_rms"], 3), _num(a["patch_token_rms"], 3)), r["images"], f"{r['seconds']:.0f}"])
    return _table(["model", "kind", "weights", "architecture", "DropPos parts", "PE RMS / token RMS", "images",
                   "seconds"], rows, numeric_from=5)


def _position_tables(results: list[dict]) -> str:
    parts = []
    for r in results:
        if not r["position_accuracy"]:
            continue
        rows = [[f"{a['mask_ratio']:g}", f"{a['pos_mask_ratio']:g}", _num(a["top1"], 2), _num(a["top5"], 2),
                 _num(a["mean_error"], 3), _num(a["median_error"], 3), _num(a["mean_distance"], 3),
                 _num(a["chance_top1"], 2), _num(a["chance_mean_error"], 3),
                 f"{a['dropped_per_image']} / {a['visible_per_image']}", a["patches_evaluated"]] for a in r["position_accuracy"]]
        parts.append(f"<h3>{_e(r['name'])}</h3>" + _table(
            ["γ", "γpos", "top-1 (%)", "top-5 (%)", "mean error, wrong only (patches)", "median error, wrong only",
             "mean distance, all (patches)", "chance top-1 (%)", "chance mean error", "dropped / visible per image",
             "patches scored"], rows, numeric_from=0))
    return "".join(parts)


def _order_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for key, (label, _) in VARIANTS.items():
            e = r["order_sensitivity"][key]
            rows.append([r["name"], label, _pm(e, "displacement"), _sig(e.get("displacement_std")),
                         _pm(e, "cosine"), ", ".join(_sig(v) for v in e.get("displacement_per_permutation") or []),
                         _num(e.get("top1_agreement"), 2), _num(e.get("accuracy_change"), 2)])
    return _table(["model", "variant", "displacement ± sem", "displacement std over (image, permutation)",
                   "cosine ± sem", "displacement per permutation", "top-1 agreement (%)", "accuracy change (points)"],
                  rows, numeric_from=2)


def _probe_table(results: list[dict]) -> str:
    rows = [[r["name"], _num(p.get("top1"), 2), _num(p.get("top5"), 2), _num(p.get("fit_top1"), 2),
             _num(p.get("mean_error"), 3), _num(p.get("mean_distance"), 3), _num(p.get("chance_top1"), 2),
             p.get("fill", "–"), f"{p.get('fit_tokens', '–')} / {p.get('test_tokens', '–')}"]
            for r in results for p in [r["position_probe"]]]
    return _table(["model", "test top-1 (%)", "test top-5 (%)", "fit top-1 (%)", "mean error, wrong only (patches)",
                   "mean distance, all (patches)", "chance (%)", "dropped PE replaced by", "fit / test tokens"],
                  rows, numeric_from=1)


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    if isinstance(value, (list, tuple)):
        return [(prefix, ", ".join(":".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value) or "–")]
    return [(prefix, "–" if value is None or value == "" else str(value))]


SETTINGS_TEXT = {  # report.json settings key -> (option, what it is)
    "sources": ("SOURCE", "pretrain runs, checkpoints, finetune checkpoints or encoder files, in report order"),
    "timm_models": ("--timm-model", "timm ViTs by name, after the SOURCEs"),
    "pretrained": ("--pretrained", "the --timm-model ViT with timm's pretrained weights (from its hub cache)"),
    "weights": ("--weights", "a local checkpoint for the one --timm-model (its layout recognised from its keys)"),
    "compare": ("--compare", "every model given, side by side in one report"),
    "random_baseline": ("--random-baseline", "the first model's architecture with fresh weights, last"),
    "labels": ("--label", "the models' names in this report, in order"),
    "data": ("--data", "dataset directory (shards)"),
    "split": ("--split", "split of --data"),
    "images": ("--images", "folder of images (instead of --data)"),
    "max_images": ("--max-images", "at most this many images (0: all)"),
    "img_size": ("--img-size", "input size of encoders and timm models (none: the model's own)"),
    "batch_size": ("--batch-size", "images per batch"),
    "ratios": ("--ratio", "(γ, γpos) pairs of the position accuracy: fractions removed / PE-dropped"),
    "permutations": ("--permutations", "seeded token permutations per image"),
    "probe_drop": ("--probe-drop", "fraction of patch PEs the position probe drops"),
    "probe_fill": ("--probe-fill", "what replaces a dropped PE in the position probe"),
    "probe_images": ("--probe-images", "images the probe uses, half to fit, half to test (0: all)"),
    "probe_steps": ("--probe-steps", "L-BFGS iterations of the probe"),
    "seed": ("--seed", "seed of masks, permutations, the probe and the random baseline"),
    "device": ("--device", "device used (resolved from --device)"),
    "loader": ("--loader", "input pipeline used (resolved from --loader)"),
    "workers": ("--workers", "decode workers used"),
    "out": ("--out", "this report's folder"),
}


def _settings_table(settings: dict) -> str:
    """Options as a table (option, value, meaning); the precision as one statement with its flags."""
    rows = []
    for key, value in settings.items():
        if key in ("units", "precision", "primary") or key.endswith("_requested"):
            continue
        option, meaning = SETTINGS_TEXT.get(key, (key, ""))
        text = ("yes" if value else "no") if isinstance(value, bool) else _flatten("", value)[0][1]
        if f"{key}_requested" in settings and settings[f"{key}_requested"] != value:
            text += f" (given: {settings[f'{key}_requested']})"
        rows.append((option, text, meaning))
    precision = settings.get("precision", {})
    flags = ", ".join(f"{k} {v}" for k, v in precision.items() if k != "statement")
    rows.append(("precision", precision.get("statement", "–"), f"what ran (read back from torch): {flags}"))
    units = [(unit, ", ".join(keys)) for unit, keys in settings.get("units", {}).items()]
    return (_table(["option", "value", "meaning"], rows, numeric_from=9) + "<h3>Units in report.json</h3>"
            + _table(["unit", "keys"], units, numeric_from=9))


def write_html(report: dict, figures: Sequence[Figure]) -> str:
    """One self-contained page: every figure inline (base64 PNG), every metric defined where it appears."""
    results, data = report["models"], report["data"]
    by_name = {f.name: f for f in figures}
    anchored: set[str] = set()
    models = _definitions(["pe_rms"], anchored)
    heatmaps = "".join(_figure(f) for f in figures if f.name.startswith("heatmap_"))
    position = ""
    if any(r["position_accuracy"] for r in results):
        position = (
            "<h2 id='position'>Position accuracy</h2><p>Only models with a DropPos position head. Each image is "
            "masked as in pre-training: a fraction γ of the patches is removed, and of the visible ones a fraction "
            "γpos loses its PE (it gets the model's [MASK] token instead). The position head then names a cell for "
            "every visible patch; only the patches whose PE was dropped are scored. The masks are seeded: every model "
            "sees the same ones.</p>"
            + _definitions(["position_top1", "position_top5", "mean_error", "median_error", "mean_distance",
                            "chance_mean_error"], anchored)
            + _figure(by_name["position_accuracy.png"]) + heatmaps + _figure(by_name["error_distance.png"])
            + _position_tables(results))
    variants = "".join(f"<li>{_e(VARIANT_TEXT[k])}</li>" for k in VARIANTS)
    order = (
        "<h2 id='order'>Token-order sensitivity</h2><p>Any ViT. The patch tokens of each image are permuted "
        f"(--permutations seeded permutations) in three ways, and the pooled feature "
        f"({_e(results[0]['order_sensitivity']['settings']['feature'])} for the first model) is compared with the "
        f"intact image's. The [CLS] and register tokens keep their PE throughout.</p><ul>{variants}</ul>"
        + _definitions(["displacement", "cosine", "top1_agreement", "accuracy_change"], anchored)
        + _figure(by_name["order_sensitivity.png"]) + _order_table(results))
    probe = (
        "<h2 id='probe'>Position linear probe</h2><p>Any ViT, frozen. For each image a seeded fraction "
        f"(--probe-drop) of the patch PEs is replaced by {_e(results[0]['position_probe'].get('fill', '–'))}; the output "
        "tokens of those patches, standardised, train a linear softmax classifier over the cells (L-BFGS, small L2) "
        "on the even-indexed images and are scored on the odd ones.</p>"
        + _definitions(["probe_top1", "probe_fit_top1", "mean_error", "mean_distance"], anchored)
        + _figure(by_name["position_probe.png"]) + _probe_table(results))
    skipped = ""
    if data["skipped"]:
        shown = data["skipped"][:20]
        skipped = (f"<h3>Skipped inputs ({len(data['skipped'])}; all in skipped.jsonl)</h3>"
                   + _table(["file", "reason"], [[s["path"], s["reason"]] for s in shown], numeric_from=9))
    precision = report["settings"]["precision"].get("statement", "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>droppos eval-pos: location awareness of {_e(', '.join(r['name'] for r in results))}</title>
<style>{_CSS}</style></head><body>
<h1>Location awareness: droppos eval-pos</h1>
<p>{len(results)} model(s) on {data['used']} images ({_e(data['description'])}; {data['found']} found,
{len(data['skipped'])} skipped), device {_e(report['settings']['device'])}, {_e(precision)}.
Every metric is defined in its section below and in {_e(METHOD_DOC)}.
Accuracies are percentages (0-100), distances are in patches, displacements and cosines have no unit.</p>
<h2>Models</h2>{_models_table(results)}
{models}<p class=note>{_e(BASELINE_TEXT)}</p>
<h2>Summary</h2><p>Each metric links to its definition. ± is the standard error of the mean over images;
accuracies without ± are one count over every scored patch.</p>{_summary_table(results)}
{position}{order}{probe}
<h2>Settings</h2><p>Every option as given, and what <code>auto</code> turned into (device, precision, loader).</p>
{_settings_table(report['settings'])}{skipped}
<h2>Run card</h2><p>What produced this report.</p>{_table(["field", "value"], _flatten("", report['run_card']), numeric_from=9)}
</body></html>
"""
    return page
