"""Throughput of one full DropPos pre-training step (forward, loss, backward, AdamW) and its FLOP/s.

Runs every combination of eager / torch.compile, attentive reconstruction on / off, and fp32 / bf16
(bf16 only on CUDA), on synthetic images, and compares the achieved FLOP/s with this machine's GEMM peak,
measured in the same run by a large torch.mm (fp32 sgemm; also bf16 on CUDA).

FLOPs are counted from the configuration by DropPosViT.flops_per_image (matmuls only, 2 per multiply-add):
  step      = 3 x forward(encoder over 1 + V tokens + position decoder over 1 + V tokens)
              + 2 x patch embedding over all L patches (forward and weight gradient; images need no gradient)
  attentive = patch embedding + encoder over all 1 + L tokens (no-grad forward)
with a block over n tokens of width d costing 2 n (4 + 2 mlp_ratio) d^2 + 4 n^2 d. For ViT-B/16 at 224
(V = 49, decoder 512 x 2) that is 28.3 + 35.1 GFLOPs per image, the figures in METHOD.md.
The optimizer, norms, softmax and GELU are not counted (they are memory-bound and small).

Usage:  python benchmarks/bench_step.py [--model droppos_vit_tiny_patch16] [--batch-size 32] [--steps 10]
Prints a table, then (last line) one JSON object with `gemm_peak_flops` and `best_peak_fraction`.
Timings on a shared machine are noisy: compare ratios measured within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import timm
import torch

import droppos.model  # noqa: F401  (registers the droppos_vit_* names with timm)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def bench_config(args: argparse.Namespace, device: torch.device, compiled: bool, attentive: bool,
                 dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(args.model, img_size=args.img_size, attentive=attentive).to(device).train()
    flops = model.flops_per_image()
    flops_img = flops["step"] + flops["attentive"]
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

    start = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - start
    wall, cpu = _timed(step, device, args.steps, args.warmup)
    seconds, cpu_seconds = statistics.median(wall), statistics.median(cpu)
    del forward, model, opt
    if compiled:
        torch.compiler.reset()
    return {
        "mode": "compiled" if compiled else "eager",
        "attentive": attentive,
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "step_s": seconds,
        "step_cpu_s": cpu_seconds,
        "first_step_s": first_s,
        "img_per_s": args.batch_size / seconds,
        "gflops_per_img": flops_img / 1e9,
        "train_gflops_per_img": flops["step"] / 1e9,
        "attentive_gflops_per_img": flops["attentive"] / 1e9,
        "achieved_flops": flops_img * args.batch_size / seconds,
        "achieved_flops_per_cpu_s": flops_img * args.batch_size / cpu_seconds,
    }


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
    parser.add_argument("--gemm-size", type=int, default=0, help="matmul size for the peak (0: 2048 CPU, 8192 GPU)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gemm_size = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    peaks: dict[str, float] = {}
    cpu_peaks: dict[str, float] = {}

    def measure_peaks() -> None:
        # Re-measured around every configuration and the best kept: on a shared machine a single
        # measurement can land on a busy moment and understate the peak (overstating the fractions).
        for dtype in dtypes:
            key = "bf16" if dtype == torch.bfloat16 else "fp32"
            wall_peak, cpu_peak = gemm_peak(device, dtype, gemm_size, repeats=5)
            peaks[key] = max(peaks.get(key, 0.0), wall_peak)
            cpu_peaks[key] = max(cpu_peaks.get(key, 0.0), cpu_peak)

    measure_peaks()
    rows = []
    for dtype in dtypes:
        for mode in args.modes.split(","):
            for att in args.attentive.split(","):
                row = bench_config(args, device, mode.strip() == "compiled", att.strip() == "on", dtype)
                rows.append(row)
                print(f"  done: {row['mode']} attentive={row['attentive']} {row['dtype']}: "
                      f"{row['img_per_s']:.1f} img/s", flush=True)
                measure_peaks()
    for row in rows:
        row["peak_fraction"] = row["achieved_flops"] / peaks[row["dtype"]]
        if device.type == "cpu":
            row["cpu_time_peak_fraction"] = row["achieved_flops_per_cpu_s"] / cpu_peaks[row["dtype"]]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"\n{args.model} img {args.img_size} batch {args.batch_size} on {device.type} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("GEMM peak ({}^3 mm): ".format(gemm_size)
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    header = f"{'mode':<9} {'attentive':<9} {'dtype':<5} {'step ms':>9} {'1st step s':>10} {'img/s':>8} " \
             f"{'GFLOP/img':>9} {'GFLOP/s':>9} {'of peak':>8} {'CPU-time':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<9} {str(r['attentive']):<9} {r['dtype']:<5} {r['step_s'] * 1e3:>9.1f} "
              f"{r['first_step_s']:>10.1f} {r['img_per_s']:>8.1f} {r['gflops_per_img']:>9.2f} "
              f"{r['achieved_flops'] / 1e9:>9.1f} {r['peak_fraction']:>8.1%} "
              f"{r.get('cpu_time_peak_fraction', float('nan')):>8.1%}")
    best = max(rows, key=lambda r: r["peak_fraction"])
    speedups = {}
    for r in rows:
        if r["mode"] == "compiled":
            eager = [e for e in rows if e["mode"] == "eager" and e["attentive"] == r["attentive"]
                     and e["dtype"] == r["dtype"]]
            if eager:
                speedups[f"compile_speedup_{'att' if r['attentive'] else 'noatt'}_{r['dtype']}"] = \
                    eager[0]["step_s"] / r["step_s"]
    # The attentive pass's own cost: the step time it adds, against the FLOPs it adds.
    attentive_pass = {}
    for r in rows:
        if r["attentive"]:
            plain = [e for e in rows if not e["attentive"] and e["mode"] == r["mode"] and e["dtype"] == r["dtype"]]
            if plain:
                key = "step_cpu_s" if device.type == "cpu" else "step_s"  # CPU time: steadier on a shared CPU
                extra_s = r[key] - plain[0][key]
                flops = r["attentive_gflops_per_img"] * 1e9 * args.batch_size / extra_s if extra_s > 0 else None
                attentive_pass[f"{r['mode']}_{r['dtype']}"] = {"extra_step_s": extra_s, "achieved_flops": flops}
                rate = f", {flops / 1e9:.1f} GFLOP/s" if flops else " (not slower: timing noise)"
                print(f"attentive pass ({r['mode']}, {r['dtype']}): +{extra_s * 1e3:.0f} ms per step "
                      f"({'CPU time' if device.type == 'cpu' else 'wall'}){rate}")
    print(json.dumps({
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "device": device.type,
        "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "gemm_peak_flops": peaks[best["dtype"]], "gemm_peaks": peaks,
        "gemm_peaks_per_cpu_s": cpu_peaks if device.type == "cpu" else None,
        "best_peak_fraction": best["peak_fraction"], "best_config": {k: best[k] for k in ("mode", "attentive", "dtype")},
        **speedups, "attentive_pass": attentive_pass, "results": rows,
    }))


if __name__ == "__main__":
    main()
