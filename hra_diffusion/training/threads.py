"""CPU threads for training: ``accelerate launch`` without ``--cpu`` on a machine without a GPU sets
``OMP_NUM_THREADS=1``; training on CPU then uses the physical cores unless the user chose a count."""

from __future__ import annotations

import os

from .run_guard import _say

__all__ = ["accelerate_default_threads", "use_cpu_threads"]


def accelerate_default_threads(env: dict[str, str], parent_env: dict[str, str] | None,
                               parent_cmdline: list[str] | None) -> bool:
    """True when OMP_NUM_THREADS=1 is accelerate launch's default rather than the user's choice.

    accelerate launch (without --cpu, without --num_cpu_threads_per_process) sets OMP_NUM_THREADS=1 in
    the training process when the launcher's own environment has no OMP_NUM_THREADS. So: the value is 1,
    the process was started by accelerate launch (its ACCELERATE_* variables), the launcher (the parent
    process) had no OMP_NUM_THREADS and was not given --num_cpu_threads_per_process. When the parent
    cannot be read, the value is treated as the user's.
    """
    if env.get("OMP_NUM_THREADS") != "1":
        return False
    if not any(k in env for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")):
        return False
    if parent_env is None or parent_cmdline is None:
        return False
    if "OMP_NUM_THREADS" in parent_env:
        return False
    return not any(a.replace("-", "_").startswith("__num_cpu_threads_per_process") for a in parent_cmdline)


def _physical_cores() -> int:
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        physical = os.cpu_count() or 1
    try:
        physical = min(physical, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        pass
    return max(1, physical)


def use_cpu_threads(accelerator) -> int | None:
    """On CPU, replace accelerate launch's default of one thread by the physical cores (shared between
    the processes on this machine); a count the user set (OMP_NUM_THREADS, --num_cpu_threads_per_process)
    is kept. Returns the thread count set, or None when nothing changed."""
    if accelerator.device.type != "cpu":
        return None
    parent_env = parent_cmdline = None
    try:
        import psutil

        parent = psutil.Process(os.getppid())
        parent_env, parent_cmdline = parent.environ(), parent.cmdline()
    except Exception:  # noqa: BLE001 - no access to the parent: keep the setting
        pass
    if not accelerate_default_threads(dict(os.environ), parent_env, parent_cmdline):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = max(1, _physical_cores() // max(1, local))
    if threads <= 1:
        return None
    import torch

    torch.set_num_threads(threads)
    if accelerator.is_local_main_process:
        _say(f"training on CPU with {threads} threads per process (accelerate launch set OMP_NUM_THREADS=1, its "
             "default without --cpu; set OMP_NUM_THREADS or --num_cpu_threads_per_process to choose)")
    return threads
