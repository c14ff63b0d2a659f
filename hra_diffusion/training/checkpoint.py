"""Training checkpoints: accelerate's save_state/load_state, with hooks that store only trainable tensors.

Layout: ``<output_dir>/checkpoints/checkpoint-<step>/`` holding ``<name>.safetensors`` per trained
module (its trainable tensors only: ``hra_u``, plus e.g. a condition encoder), accelerate's optimizer /
scheduler / RNG files, and ``checkpoint.json`` (the completion marker, written last). The directory is
filled under a temporary name and renamed into place, so a crash leaves only a ``.checkpoint-*.tmp``
folder, which :func:`latest_checkpoint` ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = [
    "MARKER",
    "CheckpointError",
    "checkpoint_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "prune_checkpoints",
    "trainable_state_dict",
    "register_checkpoint_hooks",
    "save_checkpoint",
    "checkpoint_step",
]

MARKER = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing, half-written or does not fit the model."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (named ``checkpoint-<step>`` and holding the marker), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None (half-written ones are ignored)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step recorded in a complete checkpoint's marker."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a complete checkpoint (no {MARKER}: it was never finished or is not a checkpoint)"
        )
    return int(json.loads(marker.read_text())["step"])


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``latest`` -> newest complete checkpoint (None when there is none yet); a path must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {resume!r} is not a folder; pass 'latest' or a checkpoint-<step> folder")
    checkpoint_step(path)
    return path


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints and any leftover temporary folders."""
    root = checkpoint_dir(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".checkpoint-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if keep is not None:
        for _, p in list_checkpoints(output_dir)[:-keep] if keep > 0 else list_checkpoints(output_dir):
            shutil.rmtree(p)
            removed.append(p)
    return removed


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the parameters that require grad (the adapter, never the frozen base)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in module.named_parameters() if p.requires_grad}


def register_checkpoint_hooks(accelerator, names: Sequence[str]) -> None:
    """Make ``save_state``/``load_state`` store only trainable tensors, as ``<name>.safetensors``.

    ``names`` label the models in the order they were passed to ``accelerator.prepare``.
    """

    def _match(models: list) -> list[tuple[str, nn.Module]]:
        if len(models) != len(names):
            raise RuntimeError(f"checkpoint hooks expected {len(names)} models ({list(names)}), got {len(models)}")
        return [(name, accelerator.unwrap_model(m)) for name, m in zip(names, models, strict=True)]

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for name, module in _match(models):
                save_file(trainable_state_dict(module), os.path.join(output_dir, f"{name}.safetensors"))
        while weights:  # accelerate must not write the full (frozen) models
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        pairs = _match(list(models))
        while models:
            models.pop()
        for name, module in pairs:
            path = Path(input_dir) / f"{name}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"checkpoint {input_dir!r} has no {path.name}: it was written for other modules")
            state = load_file(str(path))
            expected = {n for n, p in module.named_parameters() if p.requires_grad}
            if set(state) != expected:
                missing = sorted(expected - set(state))[:3]
                extra = sorted(set(state) - expected)[:3]
                raise CheckpointError(
                    f"checkpoint {path} does not fit the {name}: missing {missing}, unexpected {extra} "
                    "(different targets, r or base model?)"
                )
            params = dict(module.named_parameters())
            with torch.no_grad():
                for key, value in state.items():
                    if params[key].shape != value.shape:
                        raise CheckpointError(f"checkpoint {path}: {key} has shape {tuple(value.shape)}, model {tuple(params[key].shape)}")
                    params[key].copy_(value.to(params[key].device, params[key].dtype))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, keep: int | None = None,
                    info: dict | None = None) -> Path:
    """Atomically write ``checkpoint-<step>`` (all processes call this), then keep the newest ``keep``."""
    root = checkpoint_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(json.dumps({"step": step, **(info or {})}, indent=2) + "\n")
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final
