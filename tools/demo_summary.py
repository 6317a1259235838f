"""The closing summary of `make demo`: the demo's figures side by side, and where each comes from.

    python tools/demo_summary.py demo

Reads only what the demo's commands wrote (metrics.jsonl, results.json, report.json); a step that did not
run shows as "not run". Percentages throughout, as every droppos output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _held_out(run: Path) -> Optional[float]:
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    values = [r["val_pos_acc"] for r in map(json.loads, lines) if "val_pos_acc" in r]
    return values[-1] if values else None


def _pct(value: Optional[float]) -> str:
    return "not run" if value is None else f"{value:.2f}%"


def _pair(trained: Optional[dict], random: Optional[dict], key: str) -> tuple[str, str]:
    return _pct(trained.get(key) if trained else None), _pct(random.get(key) if random else None)


def rows(demo: Path) -> list[tuple[str, str, str, str]]:
    """(measure, DropPos demo encoder, random-init twin, where to look)."""
    model = (_json(demo / "run" / "config.json") or {}).get("model") or {}
    grid = (model.get("img_size", 48) // (model.get("patch_size") or 8)) ** 2
    out = [("held-out position accuracy (val, 6x6 grid)", _pct(_held_out(demo / "run")),
            f"chance {100 / grid:.2f}%", str(demo / "run" / "metrics.jsonl"))]
    probe = _pair(_json(demo / "probe-pretrained" / "results.json"), _json(demo / "probe-random" / "results.json"),
                  "top1")
    out.append(("linear probe top-1 (mean of the patch tokens)", *probe, str(demo / "probe-*/results.json")))
    seg = _pair(_json(demo / "seg-pretrained" / "results.json"), _json(demo / "seg-random" / "results.json"), "miou")
    if (demo / "seg-pretrained").exists():
        out.append(("segmentation probe mIoU", *seg, str(demo / "seg-*/results.json")))
    report = _json(demo / "eval-pos" / "report.json")
    if report and len(report.get("models", [])) >= 2:
        trained, random = report["models"][:2]
        for entry_t, entry_r in zip(trained["position_accuracy"], random["position_accuracy"]):
            out.append((f"eval-pos position top-1, gamma {entry_t['mask_ratio']:g} : {entry_t['pos_mask_ratio']:g}",
                        _pct(entry_t["top1"]), _pct(entry_r["top1"]), str(demo / "eval-pos" / "report.html")))
        moved = [m["order_sensitivity"]["pe_in_place"].get("displacement_mean") for m in (trained, random)]
        out.append(("eval-pos displacement (b), tokens scrambled under fixed PEs",
                    *(("-" if d is None else f"{d:.4f}") for d in moved), "higher = more order-aware"))
    return out


def main(argv: list[str]) -> int:
    demo = Path(argv[1] if len(argv) > 1 else "demo")
    table = rows(demo)
    width = max(len(r[0]) for r in table)
    print(f"\ndemo summary ({demo}/): the DropPos demo encoder vs the same architecture at random init")
    print(f"  {'measure'.ljust(width)}  {'demo':>10}  {'random':>10}  where")
    for measure, trained, random, where in table:
        print(f"  {measure.ljust(width)}  {trained:>10}  {random:>10}  {where}")
    print("Figures vary with the seed and the CPU (README: 'The demo's figures', three seeds); the report: "
          f"{demo / 'eval-pos' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
