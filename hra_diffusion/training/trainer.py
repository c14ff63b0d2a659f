"""The shared training loop. A trainer supplies a :class:`TrainingTask` (modules, data, loss, validation,
final save); :func:`run_training` does the rest: optimizer, LR schedule, accelerate (DDP, precision,
accumulation), exact resume, checkpoints, the NaN/inf guard, validation calls, logging and the progress bar.
"""

from __future__ import annotations

import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from ..utils import stream_seed
from .checkpoint import latest_checkpoint, register_checkpoint_hooks
from .config import TrainConfig
from .data import StreamSampler
from .recipes import config_to_dict
from .run_guard import RunGuard
from .validation import save_and_log_grid

__all__ = [
    "NonFiniteLossError",
    "TrainingTask",
    "TrainResult",
    "make_accelerator",
    "start_logging",
    "make_optimizer",
    "run_training",
    "step_generator",
]

logger = logging.getLogger("hra_diffusion.training")
STATS_NAME = "train_stats.json"  # <output_dir>/logs/: trainable values, time per step, peak memory


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stopped, no adapter was saved, checkpoints were kept."""

    hra_user_error = True  # an expected error: entry points print it as one line (hra_diffusion.errors)


@dataclass
class TrainResult:
    global_step: int
    adapter_paths: list[Path] = field(default_factory=list)
    validation_grids: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    resume_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # optimisation settings changed on resume
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)  # trainable values, time per step, peak memory


class TrainingTask(ABC):
    """What a trainer plugs into :func:`run_training`.

    ``modules`` are the trainable modules (HRA-injected; e.g. ``{"unet": unet}``, or a UNet plus a text
    encoder, or a ``ControlledUNet`` holding a condition encoder). ``run_training`` wraps them for DDP;
    ``loss`` receives the wrapped ones (call them, never read their attributes), ``validate`` and
    ``save`` receive the unwrapped ones.
    """

    cfg: TrainConfig

    summary_kind = "training"
    """What the end-of-run summary calls the run ("DreamBooth", "Control")."""
    exportable = True
    """Whether ``hra-diffusion export`` takes the adapter (the summary suggests it only then)."""

    def generate_hint(self) -> str:
        """The prompt/condition flags of the summary's suggested ``hra-diffusion generate`` command."""
        return "--prompt 'PROMPT' "

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by name (the names label checkpoint files)."""

    def learning_rates(self) -> dict[str, float]:
        """Learning rate per module (default: cfg.learning_rate for all)."""
        return {name: self.cfg.learning_rate for name in self.modules()}

    @abstractmethod
    def dataset(self) -> tuple[torch.utils.data.Dataset, int, Callable[[list], Any]]:
        """(dataset indexed by stream position, number of distinct items, collate_fn)."""

    @abstractmethod
    def loss(self, modules: dict[str, nn.Module], batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar training loss of one micro-batch (draw all randomness from ``generator``)."""

    def validate(self, modules: dict[str, nn.Module], step: int) -> tuple[list[list[Image.Image]], list[str]] | None:
        """(image rows, row labels) to save as a grid, or None. Runs on the main process only."""
        return None

    @abstractmethod
    def save(self, modules: dict[str, nn.Module], output_dir: Path) -> list[Path]:
        """Write the final adapter(s) from the unwrapped modules (main process only); return their paths."""

    def after_training(self, modules: dict[str, nn.Module], result: TrainResult) -> None:
        """Measure the trained modules once more after the final save (main process only; default: nothing).
        What it finds goes into ``result.stats`` (and so the model card and the summary)."""
        return None


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """The generator for one micro-batch: a pure function of (seed, micro step, rank) -> exact resume."""
    return torch.Generator().manual_seed(stream_seed(seed, "noise", micro_step, process_index))


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for ``cfg``: precision, accumulation, tensorboard logs under ``<output_dir>/logs`` (started
    by :func:`start_logging`). Writes nothing."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    # launched as several processes on a machine without CUDA (e.g. `accelerate launch --multi_gpu
    # --num_processes 2` on CPU): accelerate only forms the gloo process group when told cpu=True
    distributed_cpu = os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=distributed_cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    return accelerator


def start_logging(accelerator, cfg: TrainConfig, project_name: str) -> None:
    """Create the output folder and start the trackers (main process): called once the inputs are checked, so
    that a refused run writes nothing."""
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.report_to != "none":
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                       for k, v in config_to_dict(cfg).items()}
            accelerator.init_trackers(project_name, config=hparams)


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW when ``use_8bit_adam``) over the parameter groups."""
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "use_8bit_adam: true needs bitsandbytes (pip install bitsandbytes, on a CUDA machine); "
                "or set use_8bit_adam: false"
            ) from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def _all_finite(accelerator, loss: torch.Tensor) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def _mean_logs(accelerator, logs: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in logs for k in d})
    values = torch.tensor([sum(d.get(k, 0.0) for d in logs) / len(logs) for k in keys], dtype=torch.float64,
                          device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist(), strict=True))


def run_training(task: TrainingTask, accelerator) -> TrainResult:
    """Train ``task`` for ``cfg.max_train_steps`` optimizer steps (resuming if asked) and save its adapter."""
    from tqdm.auto import tqdm

    cfg = task.cfg
    started = time.time()
    run = _prepare(task, accelerator)
    result = TrainResult(global_step=0)
    _resume(run, result)
    batches = _batches(run)
    meter = _StepMeter(accelerator.device)
    progress = tqdm(total=cfg.max_train_steps, initial=result.global_step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    run.guard.start()
    try:
        while result.global_step < cfg.max_train_steps:
            meter.start()
            step_logs = _optimizer_step(run, batches, result.global_step)
            meter.stop()
            result.global_step += 1
            logs = _after_step(run, result, step_logs, progress)
            run.guard.after_step(result.global_step, logs)  # a pending Ctrl-C: save a checkpoint, then stop
    except BaseException as err:
        _note_where_it_stopped(err, run, result.global_step)
        progress.close()
        run.guard.close()
        raise
    progress.close()
    run.guard.close()
    _finish(run, result, meter)
    result.seconds = time.time() - started
    return result


@dataclass
class _Run:
    """One training run after ``accelerator.prepare``: what its steps share."""

    task: TrainingTask
    accelerator: Any
    wrapped: dict[str, nn.Module]  # for the loss (DDP-wrapped)
    unwrapped: dict[str, nn.Module]  # for validation and saving
    optimizer: Any
    lr_scheduler: Any
    trainable: list[torch.Tensor]
    guard: RunGuard  # resume, checkpoints, the Ctrl-C stop (run_guard)

    @property
    def cfg(self) -> TrainConfig:
        return self.task.cfg

    @property
    def out(self) -> Path:
        return Path(self.task.cfg.output_dir)


def _prepare(task: TrainingTask, accelerator) -> _Run:
    """Parameter groups (fp32 trainables, per-module learning rates), optimizer, LR schedule, accelerate."""
    from diffusers.optimization import get_scheduler

    cfg = task.cfg
    modules = task.modules()
    names = list(modules)
    lrs = task.learning_rates()
    scale = cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes if cfg.scale_lr else 1
    groups = []
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"the {name} has no trainable parameters (was HRA injected?)")
        bad = [p.dtype for p in params if p.dtype != torch.float32]
        if bad:
            raise TypeError(f"the {name}'s trainable parameters must be fp32 (mixed precision keeps them fp32), got {bad[0]}")
        groups.append({"params": params, "lr": lrs[name] * scale})
    optimizer = make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
        num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
    )
    prepared = accelerator.prepare(*modules.values(), optimizer, lr_scheduler)
    wrapped = dict(zip(names, prepared[: len(names)], strict=True))
    optimizer, lr_scheduler = prepared[len(names):]
    register_checkpoint_hooks(accelerator, names)
    unwrapped = {name: accelerator.unwrap_model(m) for name, m in wrapped.items()}
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return _Run(task, accelerator, wrapped, unwrapped, optimizer, lr_scheduler, trainable, RunGuard(cfg, accelerator))


def _resume(run: _Run, result: TrainResult) -> None:
    """Load ``cfg.resume_from_checkpoint`` into the run: the newest intact checkpoint, its identity checked,
    changed optimisation settings applied (run_guard.RunGuard.resume)."""
    resumed = run.guard.resume()
    if resumed is not None:
        result.resumed_from, result.global_step = resumed
        result.resume_changes = run.guard.resume_changes


def _batches(run: _Run):
    """The micro-batches from the resumed position on (the sampler's stream skips the ones already seen)."""
    cfg, accelerator = run.cfg, run.accelerator
    dataset, n_items, collate = run.task.dataset()
    sampler = StreamSampler(
        n_items, cfg.train_batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes,
        start_batch=run.guard.micro_batches,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.dataloader_num_workers,
    )
    return iter(loader)


def _optimizer_step(run: _Run, batches, global_step: int) -> list[dict[str, float]]:
    """One optimizer step (``gradient_accumulation_steps`` micro-batches); the logs of each micro-batch."""
    cfg, accelerator = run.cfg, run.accelerator
    step_logs = []
    for _micro in range(cfg.gradient_accumulation_steps):
        micro_step = run.guard.next_micro_batch()
        batch = next(batches)
        generator = step_generator(cfg.seed, micro_step, accelerator.process_index)
        with accelerator.accumulate(*run.wrapped.values()):
            loss, logs = run.task.loss(run.wrapped, batch, generator)
            if not _all_finite(accelerator, loss):
                raise NonFiniteLossError(
                    f"the loss became {loss.item()} at step {global_step + 1} (micro-batch {micro_step}); "
                    f"stopping without saving an adapter; {run.guard.kept()}. Lower learning_rate, use bf16 "
                    "instead of fp16, or check the data."
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_logs.append({"loss": loss.item(), **logs})
    if not accelerator.sync_gradients:  # pragma: no cover - accelerate's step counter drifted
        raise RuntimeError("gradient accumulation out of step with accelerate's counter")
    return step_logs


def _after_step(run: _Run, result: TrainResult, step_logs: list[dict[str, float]], progress) -> dict[str, float]:
    """Logs and the progress bar; a checkpoint and a validation grid when their step comes (not the last).
    Returns the step's logs."""
    cfg, accelerator = run.cfg, run.accelerator
    step = result.global_step
    logs = _mean_logs(accelerator, step_logs)
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    progress.update(1)
    progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
    if step % cfg.logging_steps == 0 or step == cfg.max_train_steps:
        accelerator.log(logs, step=step)
    if step % cfg.checkpointing_steps == 0 and step < cfg.max_train_steps:
        path = run.guard.save(step)
        progress.write(f"saved checkpoint {path}")
    every = cfg.adapter_snapshot_steps
    if every and step % every == 0 and step < cfg.max_train_steps:
        if accelerator.is_main_process:
            paths = run.task.save(run.unwrapped, run.out / "snapshots" / f"step-{step:06d}")
            progress.write(f"saved adapter snapshot {paths[0]}")
        accelerator.wait_for_everyone()
    if step % cfg.validation_steps == 0 and step < cfg.max_train_steps:
        grid = _validate(run.task, accelerator, run.unwrapped, step, run.out)
        if grid is not None:
            result.validation_grids.append(grid)
    return logs


def _note_where_it_stopped(err: BaseException, run: _Run, global_step: int) -> None:
    """Add to ``err`` where training stopped and which checkpoint to resume from (main process)."""
    accelerator = run.accelerator
    last = latest_checkpoint(run.out) if accelerator.is_main_process else None
    if hasattr(err, "add_note") and accelerator.is_main_process:
        err.add_note(
            f"training stopped at step {global_step}; "
            + (f"the last checkpoint {last} is kept: resume with --resume_from_checkpoint latest"
               if last else "no checkpoint was written yet")
        )


def _finish(run: _Run, result: TrainResult, meter: _StepMeter) -> None:
    """Check the ranks agree, write logs/train_stats.json, save the adapter, the final validation grid."""
    cfg, out, accelerator = run.cfg, run.out, run.accelerator
    _check_ranks_agree(accelerator, run.trainable, out)
    result.stats = {"adapter": getattr(cfg, "adapter", "hra"),
                    "trainable_parameters": {n: sum(p.numel() for p in m.parameters() if p.requires_grad)
                                             for n, m in run.unwrapped.items()},
                    "final_loss": run.guard.final_loss, **meter.summary()}
    if accelerator.is_main_process:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / STATS_NAME).write_text(json.dumps(result.stats, indent=2) + "\n")
        result.adapter_paths = run.task.save(run.unwrapped, out)
    grid = _validate(run.task, accelerator, run.unwrapped, result.global_step, out)
    if grid is not None:
        result.validation_grids.append(grid)
    if accelerator.is_main_process:
        run.task.after_training(run.unwrapped, result)
    accelerator.wait_for_everyone()


class _StepMeter:
    """Wall time of each optimizer step (data, forward, backward, update; not checkpoints or validation)
    and the process's peak memory: resident set size, and CUDA's allocator peak over the steps on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.times: list[float] = []
        self.rss_before_kib = peak_rss_kib()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self.t0)

    def summary(self) -> dict[str, Any]:
        import statistics

        times = self.times[1:] if len(self.times) > 1 else self.times  # the first step warms up
        out: dict[str, Any] = {
            "steps_timed": len(times),
            "step_seconds_median": statistics.median(times) if times else None,
            "step_seconds_mean": statistics.fmean(times) if times else None,
            "peak_rss_mib": peak_rss_kib() / 1024,
            "peak_rss_mib_before_training": self.rss_before_kib / 1024,
            **machine_sharing(),
        }
        if self.cuda:
            out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def machine_sharing() -> dict[str, Any]:
    """What a CPU step time depends on besides the model: torch's threads, the CPUs this process may use, and the
    15-minute load average at the end (above the CPU count: the run shared the machine, its steps ran slower)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[2] if hasattr(os, "getloadavg") else None
    return {"torch_threads": torch.get_num_threads(), "cpus": cpus, "load_average_15min": load}


def peak_rss_kib() -> float:
    """This process's own peak resident set size so far, in KiB.

    Linux: VmHWM from /proc/self/status, the high-water mark of this process's memory map. Not
    ``ru_maxrss``: Linux carries a parent's peak into a child across fork + exec, so a trainer or benchmark
    child started by a large parent (a test run, the comparison, the benchmark's timing process) would
    report the parent's peak. Elsewhere: ``ru_maxrss`` (macOS reports it in bytes).
    """
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])  # "VmHWM:   123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else float(peak)


def _check_ranks_agree(accelerator, params: list[torch.Tensor], out: Path) -> None:
    """Every process must hold the same adapter after training (DDP keeps them in sync); raise if not.

    The per-rank checksums are recorded in ``<output_dir>/logs/ranks.json``.
    """
    digest = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                          for p in params]).flatten().to(accelerator.device)  # (2·n_params,)
    everyone = accelerator.gather(digest[None]) if accelerator.num_processes > 1 else digest[None]  # (world, ·)
    if accelerator.is_main_process:
        sums = [float(row.sum()) for row in everyone.cpu()]
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / "ranks.json").write_text(json.dumps(
            {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
             "adapter_checksums": sums}, indent=2) + "\n")
        if accelerator.num_processes > 1:
            accelerator.print(f"adapter checksums per rank: {sums}")
    if not bool((everyone == everyone[0]).all()):
        raise RuntimeError("the processes ended with different adapters (DDP out of sync); not saving")
    accelerator.wait_for_everyone()


def _validate(task: TrainingTask, accelerator, unwrapped: dict[str, nn.Module], step: int, out: Path) -> Path | None:
    grid = None
    if accelerator.is_main_process:
        produced = task.validate(unwrapped, step)
        if produced is not None:
            rows, labels = produced
            grid = save_and_log_grid(accelerator, rows, labels, out, step)
    accelerator.wait_for_everyone()
    return grid

