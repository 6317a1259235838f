"""Throughput of one full DropPos pre-training step (forward, loss, backward, AdamW) and its FLOP/s.

Runs every combination of the chosen batch sizes, dtypes (fp32 / bf16 autocast, on CPU and CUDA), modes
(eager / torch.compile), attentive reconstruction (on / off) and, with it on, how the attentive pass runs
(`inline` in the step's forward, or `separate`: its own no-grad call, which compiled is droppos.model.compile_step:
its own graph, a CUDA graph on CUDA), on synthetic images, and compares the achieved FLOP/s with this
machine's matmul peak for that dtype, measured in the same run: the best torch.mm FLOP/s over a few large
square sizes, re-measured around every configuration and the best kept (a conservative denominator).
It also times the attentive pass alone (eager and compiled) and, on CPU, every GEMM of the step at its own
shapes, strides and dtype in isolation, which bounds what the step could reach.

FLOPs are counted from the configuration by DropPosViT.flops_per_image (matmuls only, 2 per multiply-add):
  step      = 3 x forward(encoder over 1 + V tokens + position decoder over 1 + V tokens)
              + 2 x patch embedding over all L patches (forward and weight gradient; images need no gradient)
  attentive = patch embedding + encoder over all 1 + L tokens (no-grad forward)
with a block over n tokens of width d costing 2 n (4 + 2 mlp_ratio) d^2 + 4 n^2 d. For ViT-B/16 at 224
(V = 49, decoder 512 x 2) that is 28.3 + 35.1 GFLOPs per image, the figures in docs/METHOD.md.
The optimizer, norms, softmax and GELU are not counted (they are memory-bound and small).

With --interleave every configuration is built (and compiled) first and their timed steps then taken in turn,
one each, so that on a busy shared machine all of them see the same load: use it to compare dtypes or modes.

Per configuration it also reports the peak memory on CUDA and torch.compile's counts (torch._dynamo counters):
graphs compiled, recompiles (graphs compiled after the first step: should be 0, sigma changes every step)
and graph breaks.

On CPU with glibc the script first tells malloc to serve large blocks from the heap and never give them back
(--keep-heap, on by default): otherwise every step mmaps and unmaps its activations and pays their page faults
again (docs/measurements.md). Training processes on the CPU make the same call (fastpaths.keep_heap, from
launch.run_worker).

Usage:  python benchmarks/bench_step.py [--model droppos_vit_tiny_patch16 | --preset cpu-demo] [--img-size 224]
            [--batch-sizes 32,64] [--dtypes fp32,bf16] [--modes eager,compiled] [--attentive on|off|both]
            [--saliency-graph inline|separate|both] [--device auto|cpu|cuda] [--steps 10] [--json FILE]
Defaults: dtypes fp32,bf16 on CPU and bf16 alone on CUDA (fp32 there only when asked).
Prints a table, then (last line) one JSON object (also written to --json FILE) with `gemm_peaks` per dtype,
`best_peak_fraction` and one row per configuration under `results`.
Timings on a shared machine are noisy: compare ratios measured within one run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import droppos.model  # noqa: F401  (registers the droppos_vit_* names with timm)
from droppos import environment, fastpaths
from droppos.model import DropPosViT, compile_step

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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the step."""

    batch: int
    dtype: str  # 'fp32' or 'bf16' (autocast)
    mode: str  # 'eager' or 'compiled'
    attentive: bool
    saliency_graph: str  # 'inline' (inside forward), 'separate' (its own call / graph), 'none' (attentive off)

    def label(self) -> str:
        return f"batch {self.batch} {self.mode} {self.dtype} attentive={self.attentive} ({self.saliency_graph})"


def _build(args: argparse.Namespace, device: torch.device, attentive: bool) -> DropPosViT:
    """The benchmarked model: a timm name, or the architecture of a pretrain preset (as pretrain builds it)."""
    torch.manual_seed(0)
    if args.preset:
        from droppos.model import create_from_config
        from droppos.recipes import PretrainConfig, make_config

        config = make_config(PretrainConfig, {"preset": args.preset, "img_size": args.img_size, "attentive": attentive})
        model = create_from_config(config)
    else:
        model = timm.create_model(args.model, img_size=args.img_size, attentive=attentive)
    return model.to(device).train()


def _autocast(device: torch.device, dtype: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


def _make_step(args: argparse.Namespace, device: torch.device, case: Case
               ) -> tuple[DropPosViT, Callable[[], torch.Tensor]]:
    """A fresh model and a closure running one full training step on fixed synthetic images."""
    model = _build(args, device, case.attentive)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    compiled = case.mode == "compiled"
    if case.saliency_graph == "separate":
        saliency_fn, forward = compile_step(model, device) if compiled else (model.saliency, model)
    else:
        saliency_fn, forward = None, (torch.compile(model, fullgraph=True) if compiled else model)
    imgs = torch.randn(case.batch, 3, args.img_size, args.img_size, device=device)
    sigma = torch.tensor(1.0, device=device)
    autocast = _autocast(device, case.dtype)

    def step() -> torch.Tensor:
        with autocast:
            weights = saliency_fn(imgs) if saliency_fn is not None else None
            out = forward(imgs, sigma, saliency=weights)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sigma.sub_(1e-4)  # a new sigma every step, as in training (must not recompile)
        return out["loss"]

    return model, step


def _start_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


class StepBench:
    """One configuration: a fresh model whose first step (compiling, when compiled) is timed alone, then timed
    steps, all at once or a few at a time (interleaved with other configurations, so that they share the load of
    a busy machine)."""

    def __init__(self, args: argparse.Namespace, device: torch.device, case: Case) -> None:
        self.case, self.device = case, device
        _start_memory(device)
        self.counts0 = _dynamo_counts()
        self.model, self.step = _make_step(args, device, case)
        start = time.perf_counter()
        self.step()
        _sync(device)
        self.first_s = time.perf_counter() - start
        self.counts1 = _dynamo_counts()
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.faults = 0

    def run(self, steps: int, warmup: int = 0) -> None:
        for _ in range(warmup):
            self.step()
        faults = _page_faults()
        wall, cpu = _timed(self.step, self.device, steps, 0)
        self.faults += _page_faults() - faults
        self.wall += wall
        self.cpu += cpu

    def row(self, built: Optional[dict[str, int]] = None) -> dict:
        """The figures. `built`: the compile counts once every interleaved configuration was built; then the
        recompiles (and peak memory) are those of all of them together."""
        counts2 = _dynamo_counts()
        shared = built is not None
        counts1 = built if shared else self.counts1
        flops = self.model.flops_per_image()
        flops_img = flops["step"] + flops["attentive"]
        seconds, cpu_seconds = statistics.median(self.wall), statistics.median(self.cpu)
        batch = self.case.batch
        return {
            **dataclasses.asdict(self.case),
            "batch_size": batch,
            "step_s": seconds,
            "step_s_all": self.wall,
            "step_cpu_s": cpu_seconds,
            "first_step_s": self.first_s,
            "page_faults_per_step": self.faults / len(self.wall),
            "img_per_s": batch / seconds,
            "gflops_per_img": flops_img / 1e9,
            "train_gflops_per_img": flops["step"] / 1e9,
            "attentive_gflops_per_img": flops["attentive"] / 1e9,
            "achieved_flops": flops_img * batch / seconds,
            "achieved_flops_per_cpu_s": flops_img * batch / cpu_seconds,
            "peak_memory_bytes": None if shared else _peak_memory(self.device),
            "graphs": counts2["graphs"] - self.counts0["graphs"],
            "recompiles": counts2["graphs"] - counts1["graphs"],
            "graph_breaks": counts2["graph_breaks"] - self.counts0["graph_breaks"],
            "interleaved": shared,
        }

    def close(self) -> None:
        del self.step, self.model
        if self.case.mode == "compiled":
            torch.compiler.reset()


def bench_config(args: argparse.Namespace, device: torch.device, case: Case) -> dict:
    bench = StepBench(args, device, case)
    bench.run(args.steps, args.warmup)
    row = bench.row()
    bench.close()
    return row


def bench_interleaved(args: argparse.Namespace, device: torch.device, todo: list[Case]) -> list[dict]:
    """Every configuration built and compiled first, then their timed steps taken in turn, one each."""
    benches: list[StepBench] = []
    rows: list[dict] = []
    for case in todo:
        built = _guarded(case.label(), lambda c=case: {"bench": StepBench(args, device, c)},
                         {**dataclasses.asdict(case), "batch_size": case.batch})
        if "bench" in built:
            benches.append(built["bench"])
        else:
            rows.append(built)
    built = _dynamo_counts()
    for bench in benches:
        bench.run(0, args.warmup)
    for _ in range(args.steps):
        for bench in benches:
            bench.run(1)
    rows += [bench.row(built) for bench in benches]
    for bench in benches:
        print(f"  done: {bench.case.label()}: {bench.case.batch / statistics.median(bench.wall):.1f} img/s", flush=True)
        bench.close()
    return rows


def bench_attentive_pass(args: argparse.Namespace, device: torch.device, batch: int, mode: str, dtype: str) -> dict:
    """The attentive pass alone, as the step runs it when separate: DropPosViT.saliency, or compile_step's graph."""
    _start_memory(device)
    model = _build(args, device, attentive=True)
    saliency = compile_step(model, device)[0] if mode == "compiled" else model.saliency
    imgs = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    autocast = _autocast(device, dtype)

    def run() -> torch.Tensor:
        with autocast:
            return saliency(imgs)

    run()
    wall, cpu = _timed(run, device, args.steps, args.warmup)
    flops = model.flops_per_image()["attentive"] * batch
    peak_memory = _peak_memory(device)
    del model, saliency
    if mode == "compiled":
        torch.compiler.reset()
    seconds, cpu_seconds = statistics.median(wall), statistics.median(cpu)
    return {"batch_size": batch, "mode": mode, "dtype": dtype, "pass_s": seconds, "pass_cpu_s": cpu_seconds,
            "img_per_s": batch / seconds, "achieved_flops": flops / seconds,
            "achieved_flops_per_cpu_s": flops / cpu_seconds, "peak_memory_bytes": peak_memory}


def _guarded(label: str, fn: Callable[[], dict], base: dict) -> dict:
    """Run one measurement; a failure (e.g. CUDA out of memory) is recorded in its row, not fatal."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one configuration's failure must not lose the others
        traceback.print_exc(file=sys.stderr)
        print(f"  FAILED: {label}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch.compiler.reset()
        return {**base, "error": f"{type(err).__name__}: {str(err)[:500]}"}


def _choices(value: str, allowed: tuple[str, ...], both: tuple[str, ...], name: str) -> list[str]:
    """A comma list of `allowed` names ('both' = the pair `both`)."""
    items: list[str] = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        for name_ in (both if item == "both" else (item,)):
            if name_ not in allowed:
                raise SystemExit(f"bench_step: --{name} {item!r}: choose from {', '.join(allowed)} (or both)")
            if name_ not in items:
                items.append(name_)
    return items


def _cpu_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in CPU_FLAGS if f in flags]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="droppos_vit_tiny_patch16", help="a droppos_vit_* timm name")
    parser.add_argument("--preset", default="", help="benchmark a pretrain preset's architecture instead "
                        "(e.g. cpu-demo; its image size and batch size unless given)")
    parser.add_argument("--img-size", type=int, default=None, help="default: 224, or the preset's")
    parser.add_argument("--batch-sizes", "--batch-size", dest="batch_sizes", default="",
                        help="comma list (default: 32, or the preset's)")
    parser.add_argument("--dtypes", default="", help="comma list of fp32, bf16 (default: fp32,bf16 on CPU, bf16 on CUDA)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compile) step")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    parser.add_argument("--attentive", default="both", help="on, off or both (or a comma list)")
    parser.add_argument("--saliency-graph", default="inline", help="with the attentive pass on: inline (inside "
                        "forward), separate (its own call; compiled: compile_step's own graph) or both")
    parser.add_argument("--interleave", action="store_true", help="build every configuration first, then time "
                        "their steps in turn (one each): on a busy machine they then share its load alike")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--gemm-sizes", default="", help="comma list of square matmul sizes for the peak "
                        "(default: 2048,4096 on CPU, 8192 on GPU); the best is the peak")
    parser.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU, glibc: keep freed memory in the heap (no page faults every step)")
    parser.add_argument("--attentive-pass", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the attentive pass alone, in each mode and dtype")
    parser.add_argument("--gemm-ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: also time every GEMM of the step alone at its shapes, per dtype")
    parser.add_argument("--json", default="", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    preset: dict = {}
    if args.preset:
        from droppos.recipes import PRETRAIN_PRESETS

        if args.preset not in PRETRAIN_PRESETS:
            parser.error(f"--preset {args.preset!r}: choose one of {', '.join(PRETRAIN_PRESETS)}")
        preset = PRETRAIN_PRESETS[args.preset]
    args.img_size = args.img_size or preset.get("img_size", 224)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()] or [preset.get("batch_size", 32)]
    args.modes = _choices(args.modes, ("eager", "compiled"), ("eager", "compiled"), "modes")
    args.attentive = [a == "on" for a in _choices(args.attentive, ("on", "off"), ("on", "off"), "attentive")]
    args.saliency_graph = _choices(args.saliency_graph, ("inline", "separate"), ("inline", "separate"),
                                   "saliency-graph")
    return args


def cases(args: argparse.Namespace, dtypes: list[str]) -> list[Case]:
    out = []
    for batch, dtype, mode, attentive in itertools.product(args.batch_sizes, dtypes, args.modes, args.attentive):
        for graph in (args.saliency_graph if attentive else ["none"]):
            out.append(Case(batch, dtype, mode, attentive, graph))
    return out


def _match(rows: list[dict], row: dict, **changes: object) -> Optional[dict]:
    """The successful row equal to `row` in every Case field except `changes`."""
    want = {f.name: row[f.name] for f in dataclasses.fields(Case)} | changes
    for other in rows:
        if "error" not in other and all(other[k] == v for k, v in want.items()):
            return other
    return None


def summarise(rows: list[dict], peaks: dict[str, float], cpu_peaks: dict[str, float], device: torch.device
              ) -> tuple[dict[str, float], dict[str, dict]]:
    """Speed-ups (compile, bf16, separate attentive graph) and what the attentive pass adds to the step."""
    ratios: dict[str, float] = {}
    attentive_pass: dict[str, dict] = {}
    good = [r for r in rows if "error" not in r]
    for r in good:
        tag = f"{'att' if r['attentive'] else 'noatt'}_{r['saliency_graph']}_b{r['batch']}"
        if r["mode"] == "compiled" and (eager := _match(good, r, mode="eager")):
            ratios[f"compile_speedup_{tag}_{r['dtype']}"] = eager["step_s"] / r["step_s"]
        if r["dtype"] == "bf16" and (fp32 := _match(good, r, dtype="fp32")):
            ratios[f"bf16_speedup_{tag}_{r['mode']}"] = fp32["step_s"] / r["step_s"]
        if r["saliency_graph"] == "separate" and (inline := _match(good, r, saliency_graph="inline")):
            ratios[f"separate_speedup_b{r['batch']}_{r['mode']}_{r['dtype']}"] = inline["step_s"] / r["step_s"]
        if r["attentive"] and (plain := _match(good, r, attentive=False, saliency_graph="none")):
            extra_s = r["step_s"] - plain["step_s"]
            extra_cpu_s = r["step_cpu_s"] - plain["step_cpu_s"]
            flops = r["attentive_gflops_per_img"] * 1e9 * r["batch"]
            rate = flops / extra_s if extra_s > 0 else None
            entry = {"extra_step_s": extra_s, "extra_step_cpu_s": extra_cpu_s, "achieved_flops": rate,
                     "peak_fraction": rate / peaks[r["dtype"]] if rate else None}
            if device.type == "cpu" and extra_cpu_s > 0:
                entry["cpu_time_peak_fraction"] = flops / extra_cpu_s / cpu_peaks[r["dtype"]]
            attentive_pass[f"{r['saliency_graph']}_b{r['batch']}_{r['mode']}_{r['dtype']}"] = entry
    return ratios, attentive_pass


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    heap_kept = device.type == "cpu" and args.keep_heap and fastpaths.keep_heap()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = _choices(args.dtypes or ("bf16" if device.type == "cuda" else "fp32,bf16"), tuple(DTYPES), (), "dtypes")
    gemm_sizes = [int(s) for s in args.gemm_sizes.split(",") if s.strip()] or \
        ([8192] if device.type == "cuda" else [2048, 4096])
    peaks: dict[str, float] = {}
    cpu_peaks: dict[str, float] = {}
    size_peaks: dict[str, dict[int, float]] = {}

    def measure_peaks() -> None:
        # Re-measured around every configuration and the best kept: on a shared machine a single
        # measurement can land on a busy moment and understate the peak (overstating the fractions).
        for key in dtypes:
            for size in gemm_sizes:
                wall_peak, cpu_peak = gemm_peak(device, DTYPES[key], size, repeats=5)
                peaks[key] = max(peaks.get(key, 0.0), wall_peak)
                cpu_peaks[key] = max(cpu_peaks.get(key, 0.0), cpu_peak)
                size_peaks.setdefault(key, {})[size] = max(size_peaks.get(key, {}).get(size, 0.0), wall_peak)

    measure_peaks()
    rows = []
    if args.interleave:
        rows = bench_interleaved(args, device, cases(args, dtypes))
        measure_peaks()
    for case in [] if args.interleave else cases(args, dtypes):
        row = _guarded(case.label(), lambda c=case: bench_config(args, device, c),
                       {**dataclasses.asdict(case), "batch_size": case.batch})
        rows.append(row)
        if "error" not in row:
            print(f"  done: {case.label()}: {row['img_per_s']:.1f} img/s", flush=True)
        measure_peaks()
    passes = []
    if args.attentive_pass and True in args.attentive:
        for batch, dtype, mode in itertools.product(args.batch_sizes, dtypes, args.modes):
            label = f"attentive pass alone, batch {batch} {mode} {dtype}"
            passes.append(_guarded(label, lambda b=batch, d=dtype, m=mode: bench_attentive_pass(args, device, b, m, d),
                                   {"batch_size": batch, "mode": mode, "dtype": dtype}))
            print(f"  done: {label}", flush=True)
        measure_peaks()
    ceilings: dict[str, dict] = {}
    if args.gemm_ceiling and device.type == "cpu":
        attentive = True in args.attentive
        for dtype in dtypes:
            case = Case(args.batch_sizes[0], dtype, "eager", attentive, "inline" if attentive else "none")
            ceiling = gemm_ceiling(lambda c=case: _make_step(args, device, c)[1], device)
            ref = _match(rows, {**dataclasses.asdict(case)})
            ceiling.update(case=dataclasses.asdict(case), peak_fraction=ceiling["gemm_flops"] / peaks[dtype],
                           share_of_step=ceiling["gemm_s_per_step"] / ref["step_s"] if ref else None)
            ceilings[dtype] = ceiling
    for row in rows + passes:
        if "error" not in row:
            row["peak_fraction"] = row["achieved_flops"] / peaks[row["dtype"]]
            if device.type == "cpu":
                row["cpu_time_peak_fraction"] = row["achieved_flops_per_cpu_s"] / cpu_peaks[row["dtype"]]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (environment.run_card()["hardware"]["cpu"] or platform.machine())
    model_name = f"preset {args.preset}" if args.preset else args.model
    print(f"\n{model_name} img {args.img_size} on {device.type} ({name}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}" + (f", CPU flags {' '.join(_cpu_flags())}, heap kept: {heap_kept}"
                                          if device.type == "cpu" else ""))
    print("matmul peak (best of {} square mm): ".format("/".join(map(str, gemm_sizes)))
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s ("
                      + ", ".join(f"{s}: {p / 1e9:.1f}" for s, p in size_peaks[k].items()) + ")"
                      for k, v in peaks.items()))
    last = "peak GiB" if device.type == "cuda" else "faults"
    header = f"{'batch':>5} {'mode':<9} {'attentive':<9} {'graph':<8} {'dtype':<5} {'step ms':>9} {'1st s':>7} " \
             f"{'img/s':>8} {'GFLOP/img':>9} {'GFLOP/s':>9} {'of peak':>8} {'CPU-time':>8} {last:>8} {'recomp':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        lead = f"{r['batch']:>5} {r['mode']:<9} {str(r['attentive']):<9} {r['saliency_graph']:<8} {r['dtype']:<5}"
        if "error" in r:
            print(f"{lead} FAILED: {r['error'][:80]}")
            continue
        tail = r["peak_memory_bytes"] / 2 ** 30 if device.type == "cuda" else r["page_faults_per_step"]
        print(f"{lead} {r['step_s'] * 1e3:>9.1f} {r['first_step_s']:>7.1f} {r['img_per_s']:>8.1f} "
              f"{r['gflops_per_img']:>9.2f} {r['achieved_flops'] / 1e9:>9.1f} {r['peak_fraction']:>8.1%} "
              f"{r.get('cpu_time_peak_fraction', float('nan')):>8.1%} {tail:>8.1f} {r['recompiles']:>6}")
    ratios, attentive_pass = summarise(rows, peaks, cpu_peaks, device)
    for key, value in ratios.items():
        print(f"{key}: x{value:.2f}")
    for p in passes:
        if "error" not in p:
            print(f"attentive pass alone (batch {p['batch_size']}, {p['mode']}, {p['dtype']}): {p['pass_s'] * 1e3:.0f} ms, "
                  f"{p['achieved_flops'] / 1e9:.1f} GFLOP/s = {p['peak_fraction']:.1%} of the {p['dtype']} peak"
                  + (f" (CPU time: {p['cpu_time_peak_fraction']:.1%})" if device.type == "cpu" else ""))
    for key, entry in attentive_pass.items():
        text = (f", {entry['achieved_flops'] / 1e9:.1f} GFLOP/s = {entry['peak_fraction']:.1%} of peak"
                if entry["achieved_flops"] else " (not slower: timing noise)")
        print(f"attentive pass in the step ({key}): +{entry['extra_step_s'] * 1e3:.0f} ms per step{text}")
    for dtype, c in ceilings.items():
        share = f", {c['share_of_step']:.0%} of the eager step" if c["share_of_step"] else ""
        print(f"GEMMs of the {dtype} step alone (attentive={c['case']['attentive']}, {c['gemm_calls_per_step']} calls, "
              f"{c['gemm_gflop_per_step']:.1f} GFLOP): {c['gemm_s_per_step'] * 1e3:.0f} ms at "
              f"{c['gemm_flops'] / 1e9:.1f} GFLOP/s = {c['peak_fraction']:.1%} of the {dtype} peak{share}")
    good = [r for r in rows if "error" not in r]
    best = max(good, key=lambda r: r["peak_fraction"]) if good else None
    summary = {
        "model": args.model if not args.preset else None, "preset": args.preset or None,
        "img_size": args.img_size, "batch_sizes": args.batch_sizes, "dtypes": dtypes, "modes": args.modes,
        "device": device.type, "device_name": name, "cpu_flags": _cpu_flags() if device.type == "cpu" else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "heap_kept": heap_kept,
        "steps": args.steps, "warmup": args.warmup, "gemm_sizes": gemm_sizes, "gemm_peaks": peaks,
        "gemm_peaks_by_size": {k: {str(s): p for s, p in v.items()} for k, v in size_peaks.items()},
        "gemm_peaks_per_cpu_s": cpu_peaks if device.type == "cpu" else None,
        "best_peak_fraction": best["peak_fraction"] if best else None,
        "best_config": {f.name: best[f.name] for f in dataclasses.fields(Case)} if best else None,
        **ratios, "attentive_pass": attentive_pass, "attentive_pass_alone": passes, "gemm_ceiling": ceilings or None,
        "errors": [r for r in rows + passes if "error" in r], "results": rows,
    }
    text = json.dumps(summary)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
