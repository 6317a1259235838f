"""Throughput of one full DropPos pre-training step (forward, loss, backward, AdamW) and its FLOP/s.

Runs every combination of eager / torch.compile, attentive reconstruction on / off, and fp32 / bf16
(bf16 only on CUDA), on synthetic images, and compares the achieved FLOP/s with this machine's GEMM peak,
measured in the same run: the best torch.mm FLOP/s over a few large square sizes (fp32 sgemm; also bf16 on
CUDA), re-measured around every configuration and the best kept (a conservative denominator).
It also times the attentive pass alone (DropPosViT.saliency, eager and compiled) and, on CPU, every GEMM of
the step at its own shapes and strides in isolation, which bounds what the step could reach.

FLOPs are counted from the configuration by DropPosViT.flops_per_image (matmuls only, 2 per multiply-add):
  step      = 3 x forward(encoder over 1 + V tokens + position decoder over 1 + V tokens)
              + 2 x patch embedding over all L patches (forward and weight gradient; images need no gradient)
  attentive = patch embedding + encoder over all 1 + L tokens (no-grad forward)
with a block over n tokens of width d costing 2 n (4 + 2 mlp_ratio) d^2 + 4 n^2 d. For ViT-B/16 at 224
(V = 49, decoder 512 x 2) that is 28.3 + 35.1 GFLOPs per image, the figures in METHOD.md.
The optimizer, norms, softmax and GELU are not counted (they are memory-bound and small).

On CPU with glibc the script first tells malloc to serve large blocks from the heap and never give them back
(--keep-heap, on by default): otherwise every step mmaps and unmaps its activations and pays ~15k page
faults (ViT-Ti, batch 32), 4-6 % of the step on a 2-core machine. Training processes on the CPU make the same call (runtime.run_worker).

Usage:  python benchmarks/bench_step.py [--model droppos_vit_tiny_patch16] [--batch-size 32] [--steps 10]
Prints a table, then (last line) one JSON object with `gemm_peak_flops` and `best_peak_fraction`.
Timings on a shared machine are noisy: compare ratios measured within one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import statistics
import time
from typing import Callable, Optional

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import droppos.model  # noqa: F401  (registers the droppos_vit_* names with timm)
from droppos import runtime

_ATEN = torch.ops.aten
_GEMM_OPS = (_ATEN.mm.default, _ATEN.addmm.default, _ATEN.bmm.default)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each of `steps` calls after `warmup` untimed ones.

    On a CPU shared with other jobs the wall time depends on their load; the process CPU time (all threads)
    much less so, which makes a CPU-time-based peak fraction the steadier figure there.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def gemm_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> tuple[float, float]:
    """Best-of FLOP/s of a size^3 matmul, per wall second and per process-CPU second: the practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    wall, cpu = _timed(lambda: torch.mm(a, b, out=out), device, repeats, warmup=2)
    return 2.0 * size ** 3 / min(wall), 2.0 * size ** 3 / max(min(cpu), 1e-9)


class _GemmRecorder(TorchDispatchMode):
    """Counts every mm / addmm / bmm call with its operands' shapes and strides (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _GEMM_OPS:
            mats = args[1:3] if func is _ATEN.addmm.default else args[:2]
            self.calls[(func, tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in mats))] += 1
        return func(*args, **(kwargs or {}))


def gemm_ceiling(make_step: Callable[[], Callable[[], object]], device: torch.device, repeats: int = 5) -> dict:
    """Every GEMM of one eager step, each timed alone at its shapes and strides (hot cache): what they need.

    Returns their FLOPs and seconds per step and the FLOP/s that gives, i.e. how fast the step's matmuls can run
    on this machine when nothing else runs (the patch-embedding convolution is not a GEMM op and not included).
    """
    step = make_step()
    recorder = _GemmRecorder()
    with recorder:
        step()
    flops = seconds = 0.0
    for (func, mats), count in recorder.calls.items():
        operands = [torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()
                    for shape, stride, dtype in mats]
        if func is _ATEN.addmm.default:
            bias = torch.randn(mats[1][0][-1], dtype=mats[1][2], device=device)
            call = lambda f=func, o=operands, b=bias: f(b, *o)  # noqa: E731
        else:
            call = lambda f=func, o=operands: f(*o)  # noqa: E731
        wall, _ = _timed(call, device, repeats, warmup=2)
        (a_shape, _, _), (b_shape, _, _) = mats
        batch = a_shape[0] if len(a_shape) == 3 else 1
        flops += count * 2.0 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]
        seconds += count * statistics.median(wall)
    return {"gemm_gflop_per_step": flops / 1e9, "gemm_s_per_step": seconds, "gemm_flops": flops / seconds,
            "gemm_calls_per_step": sum(recorder.calls.values())}


def _build(args: argparse.Namespace, device: torch.device, attentive: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(args.model, img_size=args.img_size, attentive=attentive).to(device).train()


def _make_step(args: argparse.Namespace, device: torch.device, compiled: bool, attentive: bool, dtype: torch.dtype
               ) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """A fresh model and a closure running one full training step on fixed synthetic images."""
    model = _build(args, device, attentive)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    forward = torch.compile(model, fullgraph=True) if compiled else model
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    sigma = torch.tensor(1.0, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step() -> torch.Tensor:
        with autocast:
            out = forward(imgs, sigma)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sigma.sub_(1e-4)  # a new sigma every step, as in training (must not recompile)
        return out["loss"]

    return model, step


def bench_config(args: argparse.Namespace, device: torch.device, compiled: bool, attentive: bool,
                 dtype: torch.dtype) -> dict:
    model, step = _make_step(args, device, compiled, attentive, dtype)
    flops = model.flops_per_image()
    flops_img = flops["step"] + flops["attentive"]
    start = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - start
    faults = _page_faults()
    wall, cpu = _timed(step, device, args.steps, args.warmup)
    faults = (_page_faults() - faults) / (args.steps + args.warmup)
    seconds, cpu_seconds = statistics.median(wall), statistics.median(cpu)
    del step, model
    if compiled:
        torch.compiler.reset()
    return {
        "mode": "compiled" if compiled else "eager",
        "attentive": attentive,
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "step_s": seconds,
        "step_cpu_s": cpu_seconds,
        "first_step_s": first_s,
        "page_faults_per_step": faults,
        "img_per_s": args.batch_size / seconds,
        "gflops_per_img": flops_img / 1e9,
        "train_gflops_per_img": flops["step"] / 1e9,
        "attentive_gflops_per_img": flops["attentive"] / 1e9,
        "achieved_flops": flops_img * args.batch_size / seconds,
        "achieved_flops_per_cpu_s": flops_img * args.batch_size / cpu_seconds,
    }


def bench_attentive_pass(args: argparse.Namespace, device: torch.device, compiled: bool, dtype: torch.dtype) -> dict:
    """The attentive pass alone: DropPosViT.saliency (no-grad full-image forward + weights), as the step runs it."""
    model = _build(args, device, attentive=True)
    saliency = torch.compile(model.saliency, fullgraph=True) if compiled else model.saliency
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run() -> torch.Tensor:
        with autocast:
            return saliency(imgs)

    run()
    wall, cpu = _timed(run, device, args.steps, args.warmup)
    flops = model.flops_per_image()["attentive"] * args.batch_size
    del model, saliency
    if compiled:
        torch.compiler.reset()
    seconds, cpu_seconds = statistics.median(wall), statistics.median(cpu)
    return {"mode": "compiled" if compiled else "eager", "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "pass_s": seconds, "pass_cpu_s": cpu_seconds, "img_per_s": args.batch_size / seconds,
            "achieved_flops": flops / seconds, "achieved_flops_per_cpu_s": flops / cpu_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="droppos_vit_tiny_patch16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compile) step")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    parser.add_argument("--attentive", default="on,off", help="comma list of on, off")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--gemm-sizes", default="", help="comma list of square matmul sizes for the peak "
                        "(default: 2048,4096 on CPU, 8192 on GPU); the best is the peak")
    parser.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU, glibc: keep freed memory in the heap (no page faults every step)")
    parser.add_argument("--attentive-pass", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the attentive pass alone, in each mode")
    parser.add_argument("--gemm-ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: also time every GEMM of the step alone at its shapes")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    heap_kept = device.type == "cpu" and args.keep_heap and runtime.keep_heap()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gemm_sizes = [int(s) for s in args.gemm_sizes.split(",") if s.strip()] or \
        ([8192] if device.type == "cuda" else [2048, 4096])
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    modes = [m.strip() for m in args.modes.split(",")]
    peaks: dict[str, float] = {}
    cpu_peaks: dict[str, float] = {}
    size_peaks: dict[str, dict[int, float]] = {}

    def measure_peaks() -> None:
        # Re-measured around every configuration and the best kept: on a shared machine a single
        # measurement can land on a busy moment and understate the peak (overstating the fractions).
        for dtype in dtypes:
            key = "bf16" if dtype == torch.bfloat16 else "fp32"
            for size in gemm_sizes:
                wall_peak, cpu_peak = gemm_peak(device, dtype, size, repeats=5)
                peaks[key] = max(peaks.get(key, 0.0), wall_peak)
                cpu_peaks[key] = max(cpu_peaks.get(key, 0.0), cpu_peak)
                size_peaks.setdefault(key, {})[size] = max(size_peaks.get(key, {}).get(size, 0.0), wall_peak)

    measure_peaks()
    rows = []
    for dtype in dtypes:
        for mode in modes:
            for att in args.attentive.split(","):
                row = bench_config(args, device, mode == "compiled", att.strip() == "on", dtype)
                rows.append(row)
                print(f"  done: {row['mode']} attentive={row['attentive']} {row['dtype']}: "
                      f"{row['img_per_s']:.1f} img/s", flush=True)
                measure_peaks()
    passes = []
    if args.attentive_pass:
        for dtype in dtypes:
            for mode in modes:
                passes.append(bench_attentive_pass(args, device, mode == "compiled", dtype))
                print(f"  done: attentive pass alone, {mode} {passes[-1]['dtype']}", flush=True)
        measure_peaks()
    ceiling: Optional[dict] = None
    if args.gemm_ceiling and device.type == "cpu":
        best_noatt = "off" in args.attentive
        ceiling = gemm_ceiling(lambda: _make_step(args, device, False, not best_noatt, torch.float32)[1], device)
        ceiling["attentive"] = not best_noatt
    for row in rows + passes:
        row["peak_fraction"] = row["achieved_flops"] / peaks[row["dtype"]]
        if device.type == "cpu":
            row["cpu_time_peak_fraction"] = row["achieved_flops_per_cpu_s"] / cpu_peaks[row["dtype"]]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\n{args.model} img {args.img_size} batch {args.batch_size} on {device.type} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", heap kept: {heap_kept}" if device.type == "cpu" else ""))
    print("GEMM peak (best of {} square mm): ".format("/".join(map(str, gemm_sizes)))
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s ("
                      + ", ".join(f"{s}: {p / 1e9:.1f}" for s, p in size_peaks[k].items()) + ")"
                      for k, v in peaks.items()))
    header = f"{'mode':<9} {'attentive':<9} {'dtype':<5} {'step ms':>9} {'1st step s':>10} {'img/s':>8} " \
             f"{'GFLOP/img':>9} {'GFLOP/s':>9} {'of peak':>8} {'CPU-time':>8} {'faults':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<9} {str(r['attentive']):<9} {r['dtype']:<5} {r['step_s'] * 1e3:>9.1f} "
              f"{r['first_step_s']:>10.1f} {r['img_per_s']:>8.1f} {r['gflops_per_img']:>9.2f} "
              f"{r['achieved_flops'] / 1e9:>9.1f} {r['peak_fraction']:>8.1%} "
              f"{r.get('cpu_time_peak_fraction', float('nan')):>8.1%} {r['page_faults_per_step']:>7.0f}")
    best = max(rows, key=lambda r: r["peak_fraction"])
    speedups = {}
    for r in rows:
        if r["mode"] == "compiled":
            eager = [e for e in rows if e["mode"] == "eager" and e["attentive"] == r["attentive"]
                     and e["dtype"] == r["dtype"]]
            if eager:
                speedups[f"compile_speedup_{'att' if r['attentive'] else 'noatt'}_{r['dtype']}"] = \
                    eager[0]["step_s"] / r["step_s"]
    # The attentive pass: alone, and as the step time it adds against the FLOPs it adds.
    for p in passes:
        print(f"attentive pass alone ({p['mode']}, {p['dtype']}): {p['pass_s'] * 1e3:.0f} ms, "
              f"{p['achieved_flops'] / 1e9:.1f} GFLOP/s = {p['peak_fraction']:.1%} of peak"
              + (f" (CPU time: {p['cpu_time_peak_fraction']:.1%})" if device.type == "cpu" else ""))
    attentive_pass = {}
    for r in rows:
        if r["attentive"]:
            plain = [e for e in rows if not e["attentive"] and e["mode"] == r["mode"] and e["dtype"] == r["dtype"]]
            if plain:
                extra_s = r["step_s"] - plain[0]["step_s"]
                extra_cpu_s = r["step_cpu_s"] - plain[0]["step_cpu_s"]
                flops = r["attentive_gflops_per_img"] * 1e9 * args.batch_size
                rate = flops / extra_s if extra_s > 0 else None
                entry = {"extra_step_s": extra_s, "extra_step_cpu_s": extra_cpu_s, "achieved_flops": rate,
                         "peak_fraction": rate / peaks[r["dtype"]] if rate else None}
                if device.type == "cpu" and extra_cpu_s > 0:
                    entry["cpu_time_peak_fraction"] = flops / extra_cpu_s / cpu_peaks[r["dtype"]]
                attentive_pass[f"{r['mode']}_{r['dtype']}"] = entry
                text = (f", {rate / 1e9:.1f} GFLOP/s = {entry['peak_fraction']:.1%} of peak" if rate
                        else " (not slower: timing noise)")
                print(f"attentive pass in the step ({r['mode']}, {r['dtype']}): +{extra_s * 1e3:.0f} ms per step{text}")
    if ceiling:
        ref = [r for r in rows
               if r["dtype"] == "fp32" and r["mode"] == "eager" and r["attentive"] == ceiling["attentive"]]
        share = f", {ceiling['gemm_s_per_step'] / ref[0]['step_s']:.0%} of the eager step" if ref else ""
        print(f"GEMMs of the step alone (attentive={ceiling['attentive']}, {ceiling['gemm_calls_per_step']} calls, "
              f"{ceiling['gemm_gflop_per_step']:.1f} GFLOP): {ceiling['gemm_s_per_step'] * 1e3:.0f} ms at "
              f"{ceiling['gemm_flops'] / 1e9:.1f} GFLOP/s = {ceiling['gemm_flops'] / peaks['fp32']:.1%} of peak{share}")
        ceiling["peak_fraction"] = ceiling["gemm_flops"] / peaks["fp32"]
    print(json.dumps({
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "device": device.type,
        "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "heap_kept": heap_kept, "gemm_sizes": gemm_sizes,
        "gemm_peak_flops": peaks[best["dtype"]], "gemm_peaks": peaks,
        "gemm_peaks_by_size": {k: {str(s): p for s, p in v.items()} for k, v in size_peaks.items()},
        "gemm_peaks_per_cpu_s": cpu_peaks if device.type == "cpu" else None,
        "best_peak_fraction": best["peak_fraction"],
        "best_config": {k: best[k] for k in ("mode", "attentive", "dtype")},
        **speedups, "attentive_pass": attentive_pass, "attentive_pass_alone": passes, "gemm_ceiling": ceiling,
        "results": rows,
    }))


if __name__ == "__main__":
    main()
