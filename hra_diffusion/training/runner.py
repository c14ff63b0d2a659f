"""The trainer tasks by name, their configs parsed as their entry scripts parse them, and the one runner.

    cfg = parse_task_config("dreambooth", ["--max_train_steps", "50"])   # recipe < overrides, as the script
    result = run_task(DreamBoothTask, cfg)   # accelerator, config.yaml, the loop, adapter, model card

``train/dreambooth_hra.py`` and ``train/control_hra.py`` are :func:`run_script` calls; ``eval/`` parses a
task's config here, never through ``train/``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import error_boundary, pop_debug_flag
from ..paths import REPO_ROOT
from .config import ConfigError, ControlConfig, DreamBoothConfig, TrainConfig
from .lock import OutputLock
from .recipes import parse_config, save_resolved_config
from .run_guard import _is_main_rank, check_run_start
from .summary import print_summary
from .threads import use_cpu_threads
from .trainer import TrainResult, make_accelerator, run_training, start_logging

__all__ = ["TaskSpec", "TASKS", "task_spec", "parse_task_config", "run_task", "run_script"]


@dataclass(frozen=True)
class TaskSpec:
    """One trainer task: its config class, its task class (``module:Class``, imported when run), its entry
    script and its default recipe (both relative to the repository root)."""

    name: str
    config_class: type[TrainConfig]
    task_class: str
    script: str
    default_recipe: str

    @property
    def program(self) -> str:
        """How the entry script is launched (recorded in config.yaml and the model card)."""
        return f"accelerate launch {self.script}"

    def load_task_class(self) -> type:
        module, _, name = self.task_class.partition(":")
        return getattr(importlib.import_module(module), name)


TASKS: dict[str, TaskSpec] = {
    "dreambooth": TaskSpec("dreambooth", DreamBoothConfig, "hra_diffusion.training.dreambooth:DreamBoothTask",
                           "train/dreambooth_hra.py", "configs/dreambooth/tiny.yaml"),
    "control": TaskSpec("control", ControlConfig, "hra_diffusion.training.control_task:ControlTask",
                        "train/control_hra.py", "configs/control/tiny.yaml"),
}


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ConfigError(f"unknown training task {task!r}: choose one of {', '.join(TASKS)}")
    return TASKS[task]


def parse_task_config(task: str, argv: Sequence[str] | None = None) -> TrainConfig:
    """``task``'s config from ``[--config recipe.yaml] [--key value ...]`` exactly as its entry script reads
    it: the default recipe (``configs/<task>/tiny.yaml``) unless ``--config`` is given, then the overrides.
    ``argv`` None: ``sys.argv[1:]``. Bad keys or values raise ConfigError naming the key."""
    spec = task_spec(task)
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = REPO_ROOT / spec.default_recipe
    given = any(a == "--config" or a.startswith("--config=") for a in argv)
    if not recipe.is_file() and not given and not {"-h", "--help"} & set(argv):
        raise ConfigError(f"the default {task} recipe {str(recipe)!r} is missing (hra_diffusion is used outside "
                          "its repository?); pass --config RECIPE.yaml")
    return parse_config(spec.config_class, argv, recipe, program=spec.program)


def run_task(task_class: type, cfg: TrainConfig) -> TrainResult:
    """Run a :class:`~hra_diffusion.training.sd_task.StableDiffusionTask` end to end: config checks, the
    accelerator, the task (data and model checks), ``config.yaml``, training, the adapter, the model card."""
    cfg = task_class.check_config(cfg)
    lock = OutputLock(cfg.output_dir, command=cfg.command) if _is_main_rank() else None
    if lock is not None:
        lock.acquire()  # one run per output folder: a second one stops here, having touched nothing
        if lock.stale_note:
            print(lock.stale_note)
    try:
        return _run_locked(task_class, cfg)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(task_class: type, cfg: TrainConfig) -> TrainResult:
    check_run_start(cfg)  # never silently replace a previous run, nor resume another run's checkpoint
    accelerator = make_accelerator(cfg)
    use_cpu_threads(accelerator)
    try:
        task = task_class(cfg, accelerator)  # checks the data first, then loads the models
        start_logging(accelerator, cfg, task_class.trainer)
        if accelerator.is_main_process:
            save_resolved_config(cfg, Path(cfg.output_dir))
        result = run_training(task, accelerator)
        if accelerator.is_main_process:
            task.write_card(result)
            print_summary(cfg, result, task.summary_kind, task.generate_hint(), task.exportable)
        accelerator.wait_for_everyone()
        return result
    finally:
        accelerator.end_training()


def run_script(task: str, argv: Sequence[str] | None = None) -> TrainResult:
    """An entry script's ``__main__``: parse ``task``'s config and train, inside the error boundary: an
    expected error (a bad key or value, data, checkpoint, adapter file, weights not here) prints one line
    naming it and exits with status 2, no traceback (``--debug`` or $HRA_DIFFUSION_DEBUG=1 shows it); a bug
    keeps its traceback; Ctrl-C exits with 130 after the trainer's own checkpoint-and-resume message."""
    spec = task_spec(task)
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = pop_debug_flag(argv)
    with error_boundary(Path(spec.script).name, debug=debug):
        try:
            cfg = parse_task_config(task, argv)
        except ConfigError as err:
            raise ConfigError(f"{err} (run with --help for every key)") from None
        return run_task(spec.load_task_class(), cfg)
