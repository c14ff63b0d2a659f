"""Training checkpoints: safetensors + JSON only, checksummed, written atomically, verified before a resume.

Layout: ``<output_dir>/checkpoints/checkpoint-<step>/`` holding

- ``<name>.safetensors`` per trained module: its trainable tensors only (``hra_u``, a condition encoder...);
- ``optimizer.safetensors``: the optimizer's state tensors (AdamW's moments and step counts), with its
  parameter groups and any non-tensor state as JSON in the file's metadata;
- ``checkpoint.json``, written last: the step, the micro-batches consumed, the LR-schedule position, the
  mixed-precision loss scale, the run's identity and optimisation settings (see ``run_guard``), and the
  size and SHA-256 of every other file. It is the completion marker: a folder without it is incomplete.

Nothing here is pickled (no ``optimizer.bin``/``*.pkl``; accelerate's ``save_state`` is not used), so
resuming never unpickles a file. The folder is filled under a temporary name and renamed into place, so a
crash leaves only a ``.checkpoint-*.tmp`` folder, which is ignored and removed by the next save.
:func:`resolve_resume` verifies the checksums; with ``latest`` it skips a damaged newest checkpoint
(warning, naming it) for the newest intact one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..state import pack, unpack
from ..utils import sha256_file

__all__ = [
    "MARKER",
    "FORMAT",
    "OPTIMIZER_FILE",
    "CheckpointError",
    "checkpoint_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "verify_checkpoint",
    "prune_checkpoints",
    "trainable_state_dict",
    "register_checkpoint_hooks",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_step",
]

MARKER = "checkpoint.json"
FORMAT = "hra-diffusion-checkpoint/3"
READABLE = ("hra-diffusion-checkpoint/2", FORMAT)  # 2: the optimizer state in its own layout
OPTIMIZER_FILE = "optimizer.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_NAMES_ATTR = "_hra_checkpoint_names"


class CheckpointError(UserError):
    """A checkpoint to resume from is missing, half-written, damaged or does not fit the model.

    ``reason`` is the message without the checkpoint's path (for lists of several checkpoints)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def _damaged(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r}: {reason}", reason)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _candidates(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoint-<step>`` folder, complete or not, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (named ``checkpoint-<step>`` and holding the marker), oldest first."""
    return [(s, p) for s, p in _candidates(output_dir) if (p / MARKER).is_file()]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None (half-written ones are ignored; checksums are not read)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _read_marker(path: Path) -> dict[str, Any]:
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a complete checkpoint (no {MARKER}: it was never finished or is not a checkpoint)",
            f"no {MARKER} (it was never finished, or is not a checkpoint)",
        )
    try:
        doc = json.loads(marker.read_text())
        int(doc["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _damaged(path, f"{MARKER} is damaged ({type(err).__name__}: {err})") from None
    return doc


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step recorded in a complete checkpoint's marker."""
    return int(_read_marker(Path(path))["step"])


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's marker, after checking that every file it lists is there, whole and unchanged.

    Raises CheckpointError naming the checkpoint and the first bad file (missing, truncated, checksum).
    """
    path = Path(path)
    doc = _read_marker(path)
    if doc.get("format") not in READABLE or not isinstance(doc.get("files"), dict):
        raise _damaged(path, "written by an older hra-diffusion (no checksums; its optimizer state is a pickle, "
                             "which is never read): it cannot be resumed; start a new run or use a newer checkpoint")
    for name, meta in doc["files"].items():
        f = path / name
        if not f.is_file():
            raise _damaged(path, f"{name} is missing")
        size = f.stat().st_size
        if size != meta.get("size"):
            raise _damaged(path, f"{name} is truncated or altered ({size} bytes, {meta.get('size')} written)")
        if sha256_file(f) != meta.get("sha256"):
            raise _damaged(path, f"{name} fails its SHA-256 checksum (damaged)")
    return doc


def resolve_resume(resume: str | None, output_dir: str | os.PathLike,
                   warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from, verified.

    ``latest``: the newest intact ``checkpoint-<step>`` under ``output_dir`` (None when there is none yet);
    a damaged or incomplete newer one is skipped with a warning naming it, and when none is intact one
    CheckpointError says so. A path: that checkpoint, which must be intact (no fallback).
    """
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"resume_from_checkpoint: {resume!r} is not a folder; pass 'latest' or a checkpoint-<step> folder")
        verify_checkpoint(path)
        return path
    if warn is None:
        def warn(message: str) -> None:
            print(f"warning: {message}", file=sys.stderr)
    found = _candidates(output_dir)
    problems = []
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            problems.append(f"{path.name}: {err.reason}")
            warn(f"skipping checkpoint {path}: {err.reason}")
            continue
        return path
    if problems:
        raise CheckpointError(
            f"no intact checkpoint to resume from under {str(checkpoint_dir(output_dir))!r} ({'; '.join(problems)}); "
            "start again with --overwrite_output_dir true, or into another --output_dir"
        )
    return None


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
    """Name the prepared models for :func:`save_checkpoint` / :func:`load_checkpoint`.

    ``names`` label the models in the order they were passed to ``accelerator.prepare``; each is stored
    as ``<name>.safetensors`` (trainable tensors only).
    """
    setattr(accelerator, _NAMES_ATTR, list(names))


def _named_models(accelerator) -> list[tuple[str, nn.Module]]:
    names = getattr(accelerator, _NAMES_ATTR, None)
    models = list(accelerator._models)
    if names is None:
        raise RuntimeError("call register_checkpoint_hooks(accelerator, names) after accelerator.prepare(...)")
    if len(models) != len(names):
        raise RuntimeError(f"checkpoints expected {len(names)} models ({names}), the accelerator holds {len(models)}")
    return [(name, accelerator.unwrap_model(m)) for name, m in zip(names, models, strict=True)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _optimizer_payload(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer state_dict as (tensors, metadata) through the one state store's :func:`~hra_diffusion.state.pack`."""
    tensors, doc = pack(optimizer.state_dict())
    return tensors, {"state": json.dumps(doc)}


def _optimizer_state(path: Path) -> dict[str, Any]:
    """Rebuild an optimizer state_dict from :func:`_optimizer_payload`'s file (or a format-2 checkpoint's)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    if "state" in meta:
        sd = unpack(tensors, json.loads(meta["state"]))
        sd["state"] = {int(k): v for k, v in sd["state"].items()}
    elif "param_groups" in meta:  # format 2: tensors keyed "<param index>.<name>", the rest as JSON
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        for idx, values in json.loads(meta.get("scalars", "{}")).items():
            state.setdefault(int(idx), {}).update(values)
        sd = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    else:
        raise CheckpointError(f"{path} holds no optimizer state (not written by hra-diffusion)")
    for g in sd["param_groups"]:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return sd


def _check_finite(models: list[tuple[str, nn.Module]], step: int) -> None:
    for name, module in models:
        for key, p in module.named_parameters():
            if p.requires_grad and not torch.isfinite(p.detach()).all():
                raise CheckpointError(
                    f"not writing checkpoint-{step}: the {name}'s {key} holds NaN/inf values (training diverged); "
                    "the earlier checkpoints are kept"
                )


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, keep: int | None = None,
                    info: dict | None = None) -> Path:
    """Atomically write ``checkpoint-<step>`` (all processes call this), then keep the newest ``keep``.

    ``info`` is recorded in the marker (e.g. the run's identity, the micro-batches consumed).
    """
    root = checkpoint_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    models = _named_models(accelerator)
    _check_finite(models, step)  # every rank holds the same adapter: all raise together
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, module in models:
            save_file(trainable_state_dict(module), str(tmp / f"{name}.safetensors"))
        optimizers = list(accelerator._optimizers)
        if len(optimizers) != 1:
            raise RuntimeError(f"checkpoints hold one optimizer, the accelerator has {len(optimizers)}")
        tensors, meta = _optimizer_payload(optimizers[0])
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=meta)
        schedulers = list(accelerator._schedulers)
        sched = schedulers[0].scheduler if schedulers else None
        scaler = getattr(accelerator, "scaler", None)
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        doc = {
            "format": FORMAT,
            "step": step,
            **(info or {}),
            "scheduler": {"last_epoch": sched.last_epoch, "last_lr": _jsonable(sched.get_last_lr())} if sched else None,
            "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
            "num_processes": accelerator.num_processes,
            "files": files,
        }
        with open(tmp / MARKER, "w") as fh:  # the marker last: a checkpoint without it is incomplete
            fh.write(json.dumps(doc, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike, steps_per_update: int | None = None) -> dict[str, Any]:
    """Restore a verified checkpoint into the prepared models, optimizer, LR scheduler and loss scaler.

    The optimizer gets the checkpoint's state (moments, step counts) but keeps its *current* settings
    (learning rate, betas, weight decay...), and the LR schedule is the current one, placed at the
    checkpoint's step: changed optimisation settings apply from the resumed step on. ``steps_per_update``
    is how many scheduler steps one optimizer step makes (accelerate steps it once per process).
    Returns the checkpoint's marker.
    """
    path = Path(path)
    doc = verify_checkpoint(path)
    for name, module in _named_models(accelerator):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no {file.name}: it was written for other modules")
        state = load_file(str(file))
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if set(state) != set(params):
            missing = sorted(set(params) - set(state))[:3]
            extra = sorted(set(state) - set(params))[:3]
            raise CheckpointError(
                f"checkpoint {file} does not fit the {name}: missing {missing}, unexpected {extra} "
                "(different targets, r or base model?)"
            )
        with torch.no_grad():
            for key, value in state.items():
                if params[key].shape != value.shape:
                    raise CheckpointError(f"checkpoint {file}: {key} has shape {tuple(value.shape)}, model {tuple(params[key].shape)}")
                params[key].copy_(value.to(params[key].device, params[key].dtype))
    optimizer = list(accelerator._optimizers)[0]
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(_optimizer_state(path / OPTIMIZER_FILE))
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path / OPTIMIZER_FILE} does not fit the optimizer: {err}") from None
    for group, settings in zip(optimizer.param_groups, current, strict=True):
        group.update(settings)  # the current learning rate, betas, weight decay (and initial_lr for the schedule)
    schedulers = list(accelerator._schedulers)
    if schedulers:
        sched = schedulers[0].scheduler
        if not hasattr(sched, "lr_lambdas"):
            raise CheckpointError(f"cannot place a {type(sched).__name__} at a resumed step (LambdaLR schedules only)")
        per = steps_per_update or accelerator.num_processes
        sched.last_epoch = int(doc["step"]) * per
        for group, base, fn in zip(optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and doc.get("scaler"):
        scaler.load_state_dict(doc["scaler"])
    return doc
