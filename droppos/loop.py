"""The one training loop of pretrain, finetune and probe: step-based, resumable, quiet on the host.

A stage describes its training as a `Stage` (its parts, schedule, step, named metrics, evaluation);
`train(stage, config, env, info)` does the rest, the same way for all three:

- the schedule (`Schedule`): steps per epoch, total and stop step, warm-up and peak lr, and the lr
  of every step from one stateless function (MAE's warm-up + half-cycle cosine; each param group's
  `lr_scale`, e.g. layer-wise decay, multiplies it);
- iteration across epochs from the exact resume position (the step alone fixes epoch and batch);
- gradient accumulation: `accum` micro-batches per optimizer step;
- the logging window (`MetricWindow`): the step adds each metric by name on the device; read once per
  `--log-every` steps (the one host synchronisation), written to metrics.jsonl and the progress;
- SIGTERM/SIGINT: every rank stops at the same step, saves a checkpoint, exits 143/130;
- checkpoints every `--ckpt-every` steps, every `--ckpt-minutes`, at every epoch end, atomically,
  never after a non-finite step (a non-finite loss or gradient stops the run with one line, exit 2,
  and the last checkpoint is the last good one);
- evaluation at epoch ends (every `stage.eval_every` epochs) and at the stop step, before the
  checkpoint that records it: a kill during an evaluation makes the resumed run evaluate again;
- metrics.jsonl holds each step once: on resume, records past the checkpoint are dropped;
- the start-up line and the closing summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from droppos import UserError, checkpoint, rundir
from droppos.distributed import DistInfo, all_reduce_max, all_reduce_mean
from droppos.environment import Environment
from droppos.files import json_text, output_error, write_text_atomic
from droppos.progress import Progress
from droppos.recipes import ScheduleOptions, TrainingConfig

EVAL_LINES = 10  # evaluation lines per run on the progress: a 90-epoch probe shows ~10, metrics.jsonl has all


class NonFiniteError(UserError):
    """Training diverged: reported in one line; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# The schedule


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to `peak_lr` (per step), then a half-cycle cosine down to `min_lr` (MAE's schedule)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """Everything the optimizer step count decides, computed once from the options and the data."""

    steps_per_epoch: int
    epochs: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    images_per_step: int  # batch x accum x world size: the effective batch
    max_steps: int = 0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def stop_step(self) -> int:
        return min(self.total_steps, self.max_steps) if self.max_steps else self.total_steps

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, optimizer step within it) of `step`."""
        return divmod(step, self.steps_per_epoch)

    def record(self) -> dict[str, Any]:
        return dict(steps_per_epoch=self.steps_per_epoch, epochs=self.epochs, total_steps=self.total_steps,
                    stop_step=self.stop_step, warmup_steps=self.warmup_steps, peak_lr=self.peak_lr,
                    min_lr=self.min_lr, effective_batch=self.images_per_step)


def make_schedule(optim: ScheduleOptions, batches_per_epoch: int, world_size: int, accum: int = 1) -> Schedule:
    """The schedule of a stage's optimisation section and its data (`batches_per_epoch` per rank)."""
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise UserError(f"an epoch has {batches_per_epoch} batches, fewer than --accum {accum}: "
                        "lower --batch-size or --accum")
    effective = optim.batch_size * accum * world_size
    peak = optim.lr if optim.lr is not None else optim.blr * effective / 256
    return Schedule(steps_per_epoch=steps_per_epoch, epochs=optim.epochs,
                    warmup_steps=int(round(optim.warmup_epochs * steps_per_epoch)), peak_lr=peak,
                    min_lr=optim.min_lr, images_per_step=effective, max_steps=optim.max_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group gets `lr` times its `lr_scale` (timm's layer-decay groups carry one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------------------------
# What a stage supplies


@dataclass(frozen=True)
class Metric:
    """A training metric (averaged over the logging window) or an evaluation's. `percent`: shown as a
    percentage (a step accumulates it as a fraction; the loop writes it x 100). `label`: its name in the
    closing summary."""

    name: str
    percent: bool = False
    label: str = ""


class MetricWindow:
    """The step's metrics, summed by name on the device over a logging window, and a non-finite count apart
    (no stage can move it). `values()` is read once per log step, after the one all-reduce."""

    def __init__(self, metrics: Sequence[Metric], device: torch.device) -> None:
        self.names = [m.name for m in metrics]
        self._index = {name: i for i, name in enumerate(self.names)}
        self.sums = torch.zeros(len(self.names) + 1, device=device)  # the metrics, then the non-finite count
        self.steps = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        """Add a 0-dim tensor to metric `name` (no host sync)."""
        self.sums[self._index[name]] += value

    def check_finite(self, *values: torch.Tensor) -> None:
        """Count the non-finite ones among these 0-dim tensors (a loss, a gradient norm) (no host sync)."""
        for tensor in values:
            self.sums[-1] += (~torch.isfinite(tensor.detach())).float()

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.sums[-1:]

    def reset(self) -> None:
        self.sums.zero_()
        self.steps = 0


class Stage:
    """One stage's training: override what differs. The stage sets `optimizer`, `schedule` (`make_schedule`),
    and, when they are not the defaults, `accum` and `eval_every`. The loop calls, in order: `batches`, then per
    optimizer step `step(step, micro, window)`, `evaluate(...)` at epoch ends, `finish()`."""

    name: str = ""  # pretrain, finetune, probe
    metrics: Sequence[Metric] = ()  # the step's, added to the window by name
    eval_metrics: Sequence[Metric] = ()  # fields of `evaluate`'s result shown in the summary
    eval_every: int = 1  # evaluate after every N epochs (0: only at the stop step)
    accum: int = 1  # micro-batches per optimizer step
    optimizer: torch.optim.Optimizer
    schedule: Schedule

    def parts(self) -> dict[str, Any]:
        """Modules and optimizers saved in the checkpoint under these keys (and loaded on resume)."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """The stage's own checkpoint entries (plain values)."""
        return {}

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        pass

    def batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        """The micro-batches of `epoch` from `start_batch` on."""
        raise NotImplementedError

    def step(self, step: int, micro: list[Any], window: MetricWindow) -> None:
        """One optimizer step from `micro`; add each metric to `window` by name and pass the loss and gradient
        norm to `window.check_finite`, on the device (no host sync). The loop has set the lr."""
        raise NotImplementedError

    def log_fields(self, step: int) -> dict[str, Any]:
        """Extra fields of a metrics record (host values only, e.g. sigma)."""
        return {}

    def evaluate(self, step: int, epoch: float, say: Callable[[str], None]) -> Optional[dict[str, Any]]:
        """Evaluate at `step`, after `epoch` epochs (fractional at a mid-epoch stop); returns fields for
        metrics.jsonl. `say(line)` shows a line on the progress (the loop keeps it to ~10 per run)."""
        return None

    def finish(self) -> list[tuple[str, str]]:
        """After the last step (rank 0): write final outputs; returns summary rows."""
        return []

    def describe(self) -> str:
        """What runs, for the start-up line (model, parameters, data)."""
        return self.name

    def loaders(self) -> list[Any]:
        """The stage's data loaders, whose skipped corrupt samples the loop reports."""
        return []


# ---------------------------------------------------------------------------------------------
# The loop's own pieces


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary."""

    # The elastic launcher forwards a terminal's Ctrl-C to workers that got it from the terminal already:
    # a second SIGINT this soon after the first is that copy, not the user's second Ctrl-C.
    REPEAT_S = 2.0

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal_name is not None:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > self.REPEAT_S:
                raise KeyboardInterrupt  # the user's second Ctrl-C stops at once
            return
        self.signal_name = signal.Signals(signum).name
        self._first_at = time.monotonic()

    def flags(self, checkpoint_due: bool) -> list[float]:
        """This rank's [SIGTERM, SIGINT, timed checkpoint due], reduced across ranks with a log step's metrics."""
        return [float(self.signal_name == "SIGTERM"), float(self.signal_name == "SIGINT"), float(checkpoint_due)]

    def agreed(self, info: DistInfo, at_log: bool, checkpoint_due: bool,
               reduced: Optional[list[float]]) -> tuple[Optional[str], bool]:
        """(the signal to stop by now, or None; save a timed checkpoint now), the same on every rank: alone, at
        once; together, at log steps, from `reduced` (`flags` averaged over the ranks in the log's all-reduce:
        above 0 where any rank raised it). SIGTERM outranks SIGINT: every rank stops, and exits, by the same one."""
        if not info.distributed:
            return self.signal_name, checkpoint_due
        if not at_log or reduced is None:
            return None, False
        sigterm, sigint, due = reduced
        return ("SIGTERM" if sigterm > 0 else "SIGINT" if sigint > 0 else None), due > 0


class MetricsLog:
    """metrics.jsonl (one object per log step and per evaluation), plus TensorBoard when installed."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled, self._file, self._tb = enabled, None, None
        if not enabled:
            return
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists():
            _truncate_after(path, resume_step)
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as err:
            raise output_error(err, path) from None
        self.path = path
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json_text(record) + "\n")
            self._file.flush()
        except OSError as err:  # a full disk: one line, like every other write
            raise output_error(err, self.path) from None
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (the checkpoint's): the resumed run writes the rest again."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class Timer:
    """Wall time between log steps, and the part of it spent waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - t0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint(stage: Stage, step: int, evaluated_step: int, reason: str, run: dict[str, Any]) -> dict:
    """The checkpoint dict: the stage's parts and state, the step, and what the run was started with."""
    return checkpoint.state(stage.parts(), stage=stage.name, step=step, epoch=step // stage.schedule.steps_per_epoch,
                            evaluated_step=evaluated_step, reason=reason, **run, **stage.extra_state())


def _resume(stage: Stage, out: Path, info: DistInfo) -> tuple[int, int, bool]:
    """Load OUT's checkpoint into the stage: (step, the step of its last evaluation, resumed?)."""
    saved = checkpoint.resume(out, info.device, stage.parts())
    if saved is None:
        return 0, 0, False
    stage.load_extra_state(saved)
    step = int(saved["step"])
    return step, int(saved.get("evaluated_step", step)), True


def evaluation_due(step: int, schedule: Schedule, eval_every: int) -> bool:
    """Evaluate at the stop step, and at the end of every `eval_every`-th epoch (0: only at the stop step)."""
    if step >= schedule.stop_step:
        return True
    epoch, within = schedule.position(step)
    return within == 0 and step > 0 and eval_every > 0 and epoch % eval_every == 0


# ---------------------------------------------------------------------------------------------
# The loop


def train(stage: Stage, config: TrainingConfig, env: Environment, info: DistInfo) -> None:
    """Train `stage` from its checkpoint in --out (or from scratch) to the stop step.

    `env` is the run's (its world size is the run's); `info` the group this loop communicates in (rank 0 alone
    for a probe head on cached features).
    """
    schedule, out, output = stage.schedule, Path(config.output.out), config.output
    step, evaluated_step, resumed = _resume(stage, out, info)
    record = rundir.config_record(config, env, schedule)
    if info.is_main:
        rundir.write_config(out, record)
    meta = {"config": {k: v for k, v in record.items() if k not in ("environment", "schedule", "run_card")},
            "environment": record["environment"], "schedule": record["schedule"], "world_size": env.world_size,
            "data_sha256": record["run_card"].get("data_manifest_sha256")}
    stop_step = schedule.stop_step
    if info.is_main:
        where = f"; resumed from step {step}" if resumed else ""
        print(f"{stage.name}: {stage.describe()}; {stop_step} steps of {schedule.images_per_step} images "
              f"({schedule.epochs} epochs of {schedule.steps_per_epoch}), {env.describe()}{where}",
              file=sys.stderr, flush=True)
    pending = evaluation_due(step, schedule, stage.eval_every) and evaluated_step < step
    if step >= stop_step and not pending:
        if info.is_main:
            print(f"{out}: already at step {step} of {stop_step}; nothing to train", file=sys.stderr)
        _finish(stage, out, info, None, step, step, 0.0, {}, {})
        return

    log = MetricsLog(out, info.is_main, step)  # a fresh run (step 0) keeps none of an earlier file's records
    progress = Progress(stage.name, stop_step, start=step, enabled=info.is_main, plain_every_s=None)  # the loop logs
    window = MetricWindow(stage.metrics, info.device)
    start_step, timer, t_start = step, Timer(), time.perf_counter()
    last_ckpt = time.monotonic()
    last_log: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    stopped_by: Optional[str] = None

    def save(reason: str) -> None:
        """Every rank calls it at the same step: all stop together if any rank's step or weights went non-finite."""
        bad = torch.tensor([float(float(window.nonfinite) > 0 or not _finite_weights(stage))], device=info.device)
        if float(all_reduce_max(bad, info)[0]) > 0:
            raise _non_finite(step, out)
        if info.is_main:
            state = _checkpoint(stage, step, evaluated_step, reason, meta)
            checkpoint.save(checkpoint.path(out), state)
            if output.keep_every and step % output.keep_every == 0:
                checkpoint.save(out / "checkpoints" / f"step-{step:08d}.pt", state)
        if info.distributed:  # no rank leaves (a stop, the end) while rank 0 still writes: the launcher would kill it
            torch.distributed.barrier()

    def evaluate() -> None:
        nonlocal evaluated_step, last_eval
        if float(all_reduce_max(window.nonfinite.clone(), info)[0]) > 0:
            raise _non_finite(step, out)
        epoch = epochs_done(step, schedule)
        shown = step >= stop_step or step % max(1, schedule.total_steps // EVAL_LINES) < schedule.steps_per_epoch
        fields = stage.evaluate(step, epoch, progress.log if shown else lambda line: None)
        evaluated_step = step
        if fields:
            last_eval = fields
            log.write({"step": step, "epoch": epoch, **fields})

    try:
        with StopRequest() as stop:
            if pending:  # the evaluation that a kill or a signal interrupted
                evaluate()
                save("epoch" if step % schedule.steps_per_epoch == 0 else "end")
            while step < stop_step and stopped_by is None:
                epoch, within = schedule.position(step)
                batches = stage.batches(epoch, within * stage.accum)
                epoch_end = min((epoch + 1) * schedule.steps_per_epoch, stop_step)
                try:
                    while step < epoch_end:
                        with timer.waiting():
                            micro = [next(batches) for _ in range(stage.accum)]
                        set_lr(stage.optimizer, schedule.lr(step))
                        stage.step(step, micro, window)
                        step += 1
                        window.steps += 1
                        at_log = step % config.logging.log_every == 0 or step == stop_step
                        due = (time.monotonic() - last_ckpt) / 60 >= output.ckpt_minutes
                        reduced = None
                        if at_log:
                            last_log, reduced = _log(stage, window, timer, step, epoch, info, out, log, progress,
                                                     stop.flags(due))
                            window.reset()
                            timer.reset()
                        progress.update(step, last_log.get("status", ""))
                        stopping, timed = stop.agreed(info, at_log, due, reduced)
                        if stopping:
                            stopped_by = stopping
                            break
                        at_boundary = step % schedule.steps_per_epoch == 0 or step == stop_step
                        kept = output.keep_every and step % output.keep_every == 0
                        if not at_boundary and (step % output.ckpt_every == 0 or timed or kept):
                            save("periodic")
                            last_ckpt = time.monotonic()
                finally:
                    with contextlib.suppress(Exception):
                        batches.close()
                if stopped_by is not None:
                    break
                if evaluation_due(step, schedule, stage.eval_every):
                    evaluate()
                save("epoch" if step % schedule.steps_per_epoch == 0 else "end")
                last_ckpt = time.monotonic()
            if stopped_by is not None:
                save(f"stopped by {stopped_by}")
    finally:
        progress.close()
        log.close()
        _write_skipped(stage, out, info)
    if stopped_by is not None:
        if info.is_main:
            print(f"stopped by {stopped_by} at step {step}: checkpoint saved to {checkpoint.path(out)}; "
                  "re-run the same command to resume", file=sys.stderr)
        raise SystemExit(143 if stopped_by == "SIGTERM" else 130)
    _finish(stage, out, info, log, start_step, step, time.perf_counter() - t_start, last_log, last_eval)


def _log(stage: Stage, window: MetricWindow, timer: Timer, step: int, epoch: int, info: DistInfo, out: Path,
         log: MetricsLog, progress: Progress, flags: list[float]) -> tuple[dict[str, Any], list[float]]:
    """(the record, `flags` averaged over the ranks): one all-reduce and the one host sync of a log step carry
    the metrics, the non-finite count, the corrupt samples every rank's loaders skipped so far, and the stop
    flags."""
    schedule = stage.schedule
    skipped = float(sum(loader.skipped for loader in stage.loaders()))
    extra = torch.tensor([skipped, *flags], device=window.sums.device)
    values = all_reduce_mean(torch.cat([window.sums, extra]), info).tolist()
    named = dict(zip(window.names, values))
    nonfinite, skipped, reduced = values[len(window.names)], values[len(window.names) + 1], values[len(window.names) + 2:]
    skipped_all = round(skipped * info.world_size)
    if nonfinite > 0:
        raise _non_finite(step, out)
    elapsed = timer.elapsed()
    record: dict[str, Any] = {"step": step, "epoch": epochs_done(step, schedule)}
    for metric in stage.metrics:
        record[metric.name] = named[metric.name] / window.steps * (100.0 if metric.percent else 1.0)
    record["lr"] = schedule.lr(step - 1)
    record.update(stage.log_fields(step - 1))
    record["img_per_s"] = window.steps * schedule.images_per_step / elapsed
    record["data_wait"] = 100.0 * timer.data_wait / elapsed
    if skipped_all:
        record["skipped_samples"] = skipped_all  # all ranks', this session: the keys are in OUT/skipped.rank<R>.jsonl
    log.write(record)
    shown = " ".join(f"{m.name} {_shown(m, record[m.name])}" for m in stage.metrics)
    extra_text = " ".join(f"{k} {v:.3g}" for k, v in stage.log_fields(step - 1).items())
    progress.log(f"step {step}/{schedule.stop_step} epoch {epoch + 1}/{schedule.epochs} {shown} lr {record['lr']:.3g} "
                 f"{extra_text + ' ' if extra_text else ''}{record['img_per_s']:.1f} img/s data-wait "
                 f"{record['data_wait']:.0f}%")
    return dict(record, status=f"{shown} {record['img_per_s']:.0f} img/s"), reduced


def epochs_done(step: int, schedule: Schedule) -> float:
    """The `epoch` of every record (metrics.jsonl, results.json): epochs completed at `step`, so that an
    evaluation after the first epoch and the first epoch's last step both say 1 (the terminal counts the
    running epoch from 1 too: "epoch 1/8" for its steps)."""
    epoch = step / schedule.steps_per_epoch
    return int(epoch) if epoch == int(epoch) else round(epoch, 3)


def _non_finite(step: int, out: Path) -> NonFiniteError:
    return NonFiniteError(f"non-finite loss or gradient before step {step}; the last good checkpoint "
                          f"({checkpoint.path(out)}) was kept. "
                          "Lower the lr (--blr) or check the data, then re-run to resume")


def _write_skipped(stage: Stage, out: Path, info: DistInfo) -> None:
    """OUT/skipped.rank<R>.jsonl: each corrupt sample this rank's loaders skipped, once, with how often, over
    every session of the run (a resumed session adds its counts to the file's)."""
    path = out / f"skipped.rank{info.rank}.jsonl"
    counts: dict[tuple[str, str], int] = {}
    for loader in stage.loaders():
        for key in loader.skipped_keys:
            counts[(loader.split, key)] = counts.get((loader.split, key), 0) + 1
    if not counts:
        return
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # an earlier session's record (ours; unreadable: started anew)
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            where = (str(entry["split"]), str(entry["key"]))
            counts[where] = counts.get(where, 0) + int(entry["times"])
    write_text_atomic(path, "".join(
        json.dumps({"split": split, "key": key, "times": times, "reason": "undecodable sample, skipped by the "
                    "pil loader (run `droppos shard --verify --decode`)"}) + "\n"
        for (split, key), times in sorted(counts.items())))


def _finite_weights(stage: Stage) -> bool:
    """Whether every floating tensor of the stage's modules is finite (one host sync, at checkpoints only):
    a finite loss can still be followed by an update that overflows the weights."""
    tensors = [t for part in stage.parts().values() if isinstance(part, torch.nn.Module)
               for t in (*part.parameters(), *part.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _finish(stage: Stage, out: Path, info: DistInfo, log: Optional[MetricsLog], start_step: int, step: int, elapsed: float,
            last_log: dict[str, Any], last_eval: dict[str, Any]) -> None:
    if not info.is_main:
        return
    rows = stage.finish()
    if log is None:
        return
    from rich.console import Console
    from rich.table import Table

    schedule = stage.schedule
    images = (step - start_step) * schedule.images_per_step
    table = Table(title=f"droppos {stage.name}: {out}", show_header=False)
    table.add_row("steps", f"{start_step} -> {step} of {schedule.total_steps}")
    table.add_row("images (this run)", f"{images:,}")
    table.add_row("time", f"{elapsed:.1f} s")
    table.add_row("throughput", f"{images / max(elapsed, 1e-9):.1f} img/s")
    for metric in stage.metrics:
        if metric.name in last_log:
            name = metric.name if metric.name.startswith("train_") else f"train {metric.name}"
            table.add_row(metric.label or f"final {name}", _shown(metric, last_log[metric.name]))
    for metric in stage.eval_metrics:
        if metric.name in last_eval:
            table.add_row(metric.label or metric.name, _shown(metric, last_eval[metric.name]))
    for name, value in rows:
        table.add_row(name, value)
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=200)  # logs: never cut paths to 80 columns
    console.print(table)


def _shown(metric: Metric, value: float) -> str:
    return f"{value:.2f}%" if metric.percent else f"{value:.4f}"
