"""What keeps a training run from losing or mixing up the user's work.

- :func:`check_output_dir`: an output folder holding a finished run is never silently replaced (refused
  unless resuming, or ``overwrite_output_dir``, which says what it removes); a folder holding only
  checkpoints (a crashed run) points to ``--resume_from_checkpoint latest``.
- :func:`run_identity` / :func:`optimisation_settings`: what a checkpoint records about its run. On
  resume, a changed identity (data and a fingerprint of its files, prompts, base model, adapter, seed,
  resolution) is refused, listing the changed keys, unless ``resume_allow_changes``; changed
  optimisation settings are applied to the restored optimizer and schedule, and logged.
- :class:`RunGuard`: the training loop's side of it: resume (newest intact checkpoint), checkpoints with
  the run's identity, a stop on Ctrl-C (SIGINT) or SIGTERM at the next step boundary that saves a
  checkpoint first, and the words for NaN stops.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from .config import ConfigError
from .recipes import RESOLVED_CONFIG_NAME

__all__ = [
    "IDENTITY_KEYS",
    "OPTIMISATION_KEYS",
    "TrainingInterrupted",
    "RunGuard",
    "check_output_dir",
    "check_run_start",
    "run_identity",
    "optimisation_settings",
    "identity_changes",
    "folder_fingerprint",
    "resume_command",
]

# a change to any of these makes a resumed run continue another run's checkpoint (refused unless
# resume_allow_changes); keys a config class does not have are skipped
IDENTITY_KEYS = (
    "pretrained_model", "revision", "variant", "pretrained_vae_model", "adapter", "r", "target_modules", "apply_gs",
    "train_bias", "block_size", "lora_alpha", "seed", "resolution", "use_8bit_adam",
    # DreamBooth
    "instance_data_dir", "instance_prompt", "instance_caption_extension", "instance_mask_dir",
    "with_prior_preservation", "class_prompt", "class_prompts_from_captions", "class_caption_extension",
    "class_caption_dropout", "class_mask_dir",
    "train_text_encoder",
    "text_encoder_r", "text_encoder_target_modules",
    # control
    "train_data_dir", "dataset_name", "dataset_config_name", "dataset_split", "image_column",
    "conditioning_image_column", "caption_column", "condition", "canny_low_threshold", "canny_high_threshold",
    "max_train_samples",
)
# prior-preservation keys: part of the identity only with prior preservation on
_PRIOR_KEYS = ("class_prompt", "class_prompts_from_captions", "class_caption_extension", "class_caption_dropout",
               "class_mask_dir")
_RECORDED_WHEN_SET = _PRIOR_KEYS[1:]  # options added later: recorded only when set
DATA_DIR_KEYS = ("instance_data_dir", "instance_mask_dir", "class_mask_dir", "train_data_dir")  # also fingerprinted: "<key> files"
# changed on resume: applied to the restored optimizer / LR schedule from the resumed step on, and logged
OPTIMISATION_KEYS = (
    "learning_rate", "text_encoder_lr", "encoder_learning_rate", "scale_lr", "max_train_steps", "lr_scheduler",
    "lr_warmup_steps", "lr_num_cycles", "lr_power", "gradient_accumulation_steps", "train_batch_size",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "orth_lambda",
    "prior_loss_weight", "mask_loss_weight",
)
# what a training run writes into its output folder (removed by overwrite_output_dir); caches are kept
RUN_OUTPUTS = ("adapter", "README.md", RESOLVED_CONFIG_NAME, "checkpoints", "logs", "validation", "snapshots")
KEPT_CACHES = ("class_images", "condition_cache")
CONTENT_HASH_BUDGET = 256 * 2**20  # data folders up to this size are hashed whole; larger: names and sizes


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training at a step boundary (a checkpoint was saved first)."""


def _say(message: str, warn: bool = False) -> None:
    """Print a line (warnings to stderr), above a progress bar if one is showing."""
    from tqdm import tqdm

    tqdm.write(("warning: " if warn else "") + message, file=sys.stderr if warn else sys.stdout)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


# ---- the output folder ----------------------------------------------------------------------------

def _ours(path: Path) -> bool:
    """Whether ``path`` (one of RUN_OUTPUTS) exists and was written by a trainer: the model card and the
    resolved config are recognised by their contents, folders by their names."""
    if path.name in ("README.md", RESOLVED_CONFIG_NAME):
        if not path.is_file():
            return False
        try:
            head = path.read_text(errors="replace")[:4000]
        except OSError:
            return False
        return "library_name: hra-diffusion" in head if path.name == "README.md" else (
            head.startswith("# resolved") or "pretrained_model:" in head)
    return path.exists()


def check_output_dir(cfg, is_main: bool | None = None) -> list[str]:
    """Refuse to silently replace a previous run in ``cfg.output_dir``; with ``overwrite_output_dir``
    remove it (on the main process) and return what was removed. Call before anything is written."""
    out = Path(cfg.output_dir)
    resuming = cfg.resume_from_checkpoint is not None
    overwrite = bool(getattr(cfg, "overwrite_output_dir", False))
    if overwrite and resuming:
        raise ConfigError("overwrite_output_dir and resume_from_checkpoint exclude each other: drop "
                          "--overwrite_output_dir to continue the run, or --resume_from_checkpoint to start over")
    if not out.exists():
        return []
    if not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} is a file, not a folder; choose another --output_dir")
    finished = [n for n in ("adapter", "README.md") if _ours(out / n)]
    ckpts = [p.name for _, p in list_checkpoints(out)] or sorted(  # complete ones, else any, oldest first
        (p.name for p in checkpoint_dir(out).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
        key=lambda name: int(name[11:]))
    present = [n for n in RUN_OUTPUTS if _ours(out / n)]  # a README.md or config.yaml of yours is left alone
    removes = ", ".join(n + ("/" if (out / n).is_dir() else "") for n in present)
    if overwrite:
        if not present:
            return []
        if is_main if is_main is not None else _is_main_rank():
            for n in present:
                p = out / n
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            kept = [n + "/" for n in KEPT_CACHES if (out / n).exists()]
            _say(f"overwrite_output_dir: removed the previous run in {out}: {removes}"
                 + (f" (kept the cache {', '.join(kept)})" if kept else ""))
        return present
    resume_hint = f"continue it with --resume_from_checkpoint latest (newest: {ckpts[-1]}), " if ckpts else ""
    if finished and not (resuming and (ckpts or cfg.resume_from_checkpoint != "latest")):
        raise ConfigError(
            f"output_dir {str(out)!r} holds a finished run ({', '.join(finished)}): choose another --output_dir, "
            f"{resume_hint}or replace it with --overwrite_output_dir true (removes {removes})"
        )
    if ckpts and not resuming:
        raise ConfigError(
            f"output_dir {str(out)!r} holds checkpoints of an unfinished run ({ckpts[-1]} is the newest): continue "
            f"it with --resume_from_checkpoint latest, or start over with --overwrite_output_dir true (removes {removes})"
        )
    return []


def check_run_start(cfg) -> None:
    """Everything that can refuse a run before it writes anything: the output folder (see
    :func:`check_output_dir`) and, when resuming, that an intact checkpoint exists and belongs to this run."""
    check_output_dir(cfg)
    if cfg.resume_from_checkpoint is not None:
        path = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, warn=lambda message: None)  # warned later
        if path is not None:
            _check_identity(cfg, path, run_identity(cfg))


def _check_identity(cfg, path: Path, identity: dict[str, Any]) -> list[str]:
    """The identity changes between checkpoint ``path`` and this run; raise unless resume_allow_changes."""
    changed = identity_changes(verify_checkpoint(path).get("identity") or {}, identity)
    if changed and not getattr(cfg, "resume_allow_changes", False):
        raise CheckpointError(
            f"checkpoint {path} belongs to another run; changed: {'; '.join(changed)}. Resume with that run's "
            "settings, train into a new --output_dir, or accept the changes with --resume_allow_changes true"
        )
    return changed


# ---- a run's identity -----------------------------------------------------------------------------

def folder_fingerprint(folder: str | os.PathLike, budget: int = CONTENT_HASH_BUDGET) -> dict[str, Any]:
    """Files, bytes and a SHA-256 of a data folder (recursive, hidden files skipped): of every file's
    contents when the folder holds at most ``budget`` bytes, else of names and sizes (and the contents of
    metadata files: .json, .jsonl, .csv, .txt)."""
    root = Path(folder)
    if not root.is_dir():
        return {"files": 0, "bytes": 0, "sha256": None}
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    sizes = [p.stat().st_size for p in files]
    whole = sum(sizes) <= budget
    h = hashlib.sha256()
    for p, size in zip(files, sizes, strict=True):
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        if whole or p.suffix.lower() in (".json", ".jsonl", ".csv", ".txt"):
            with open(p, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
    return {"files": len(files), "bytes": sum(sizes), "sha256": h.hexdigest(),
            "hashed": "contents" if whole else "names and sizes"}


def _norm_path(value: Any) -> Any:
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def run_identity(cfg) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint (local paths resolved, data fingerprinted)."""
    ident: dict[str, Any] = {}
    for key in IDENTITY_KEYS:
        if not hasattr(cfg, key):
            continue
        value = getattr(cfg, key)
        if key in _PRIOR_KEYS and not getattr(cfg, "with_prior_preservation", False):
            continue
        if key in _RECORDED_WHEN_SET and not value:
            continue  # recorded only when set: checkpoints from before the option stay resumable
        if key.startswith("canny_") and getattr(cfg, "condition", None) != "canny":
            continue
        ident[key] = _norm_path(value) if key in ("pretrained_model", "pretrained_vae_model", *DATA_DIR_KEYS) else value
        if key in DATA_DIR_KEYS and value:
            ident[f"{key} files"] = folder_fingerprint(value)
    return ident


def optimisation_settings(cfg) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in OPTIMISATION_KEYS if hasattr(cfg, k)}


def _short(value: Any) -> str:
    if isinstance(value, dict) and "files" in value:
        return f"{value['files']} files, {value['bytes']} bytes, sha256 {str(value.get('sha256'))[:12]}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key (old -> new)`` for each identity key that differs. A data folder that moved but holds the
    same files (same fingerprint) is not a change."""
    changes = []
    for key in [*current, *(k for k in saved if k not in current)]:
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key in DATA_DIR_KEYS and old and new and saved.get(f"{key} files") == current.get(f"{key} files"):
            continue  # the folder moved, its files did not change
        changes.append(f"{key} ({_short(old)} -> {_short(new)})")
    return changes


# ---- the training loop's guard --------------------------------------------------------------------

def resume_command(cfg) -> str:
    """``cfg.command`` with ``--resume_from_checkpoint latest`` (and without ``--overwrite_output_dir``)."""
    try:
        parts = shlex.split(cfg.command or "")
    except ValueError:
        parts = []
    if not parts:
        return "the same command with --resume_from_checkpoint latest"
    out, i = [], 0
    while i < len(parts):
        p = parts[i]
        key = p.split("=", 1)[0]
        if key in ("--overwrite_output_dir", "--resume_from_checkpoint", "--overwrite-output-dir",
                   "--resume-from-checkpoint"):
            i += 1 if "=" in p or i + 1 >= len(parts) or parts[i + 1].startswith("--") else 2
            continue
        out.append(p)
        i += 1
    return shlex.join(out) + " --resume_from_checkpoint latest"


class RunGuard:
    """Resume, checkpoints, the Ctrl-C stop and the NaN wording for one run of :func:`run_training`."""

    def __init__(self, cfg, accelerator, steps_per_update: int | None = None) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.out = Path(cfg.output_dir)
        self.identity = run_identity(cfg)
        self.optimisation = optimisation_settings(cfg)
        self.steps_per_update = steps_per_update
        self.micro_batches = 0  # consumed so far (a resumed run continues the stream where it stopped)
        self.last_saved_step: int | None = None
        self.final_loss: float | None = None
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        self._stop: str | None = None
        self._launcher_term = False
        self._previous: dict[int, Any] = {}

    def say(self, message: str, warn: bool = False) -> None:
        if self.accelerator.is_main_process:
            _say(message, warn)

    # -- resume
    def resume(self) -> tuple[Path, int] | None:
        """Restore the newest intact checkpoint (or the one named); return (path, step), or None."""
        cfg = self.cfg
        path = resolve_resume(cfg.resume_from_checkpoint, self.out, warn=lambda m: self.say(m, warn=True))
        if path is None:
            if cfg.resume_from_checkpoint == "latest":
                self.say(f"no checkpoint under {checkpoint_dir(self.out)} yet: starting from step 0")
            return None
        changed = _check_identity(cfg, path, self.identity)
        if changed:
            self.say(f"resuming {path} with changed run settings (resume_allow_changes): {'; '.join(changed)}", warn=True)
        doc = load_checkpoint(self.accelerator, path, self.steps_per_update)
        step = int(doc["step"])
        self.micro_batches = int(doc.get("micro_batches", step * cfg.gradient_accumulation_steps))
        self.last_saved_step = step
        before = doc.get("optimisation") or {}
        self.resume_changes = {k: (before[k], v) for k, v in self.optimisation.items() if k in before and before[k] != v}
        self.say(f"resumed from {path} at step {step}")
        if self.resume_changes:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.resume_changes.items())
            self.say(f"changed optimisation settings, applied to the restored optimizer and LR schedule from step "
                     f"{step + 1}: {listed}")
        if self.accelerator.is_main_process:
            self._note_in_config(path, step, changed)
        return path, step

    def _note_in_config(self, path: Path, step: int, changed: list[str]) -> None:
        """Record the resume in config.yaml (its values are the ones used from the resumed step on)."""
        config = self.out / RESOLVED_CONFIG_NAME
        if not config.is_file():
            return
        lines = [f"# resumed from {path} at step {step}; the values above are the ones used from step {step + 1}"]
        for k, (old, new) in self.resume_changes.items():
            lines.append(f"#   {k}: {old!r} before step {step + 1} (changed on resume to {new!r})")
        for c in changed:
            lines.append(f"#   accepted identity change (resume_allow_changes): {c}")
        with open(config, "a") as fh:
            fh.write("\n".join(lines) + "\n")

    # -- the stream and checkpoints
    def next_micro_batch(self) -> int:
        """The index of the next micro-batch in the run's stream (for its noise generator)."""
        index = self.micro_batches
        self.micro_batches += 1
        return index

    def save(self, step: int) -> Path:
        info = {"micro_batches": self.micro_batches, "identity": self.identity, "optimisation": self.optimisation}
        path = save_checkpoint(self.accelerator, self.out, step, self.cfg.checkpoints_total_limit, info)
        self.last_saved_step = step
        return path

    def kept(self) -> str:
        """Words for the checkpoint that survives a stop."""
        last = latest_checkpoint(self.out)
        if last is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {last} is kept (resume with --resume_from_checkpoint latest)"

    # -- Ctrl-C / SIGTERM
    def start(self) -> None:
        """Catch SIGINT and SIGTERM: the loop stops at the next step boundary, saving a checkpoint first."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # pragma: no cover - not allowed here
                pass

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self._stop is not None:
            if self._stop == "Ctrl-C" and signum == signal.SIGTERM and not self._launcher_term:
                # accelerate launch passes a Ctrl-C on as SIGTERM (and kills the trainer a few seconds
                # later): the same request, not a second one. The checkpoint is still saved.
                self._launcher_term = True
                return
            self.close()  # a second request stops at once
            raise KeyboardInterrupt(f"{name} again: stopped at once, without saving")
        self._stop = name
        if self.accelerator.is_local_main_process:  # plain print: a signal handler must not take tqdm's lock
            print(f"\n{name}: stopping after this step and saving a checkpoint "
                  "(press Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def stop_requested(self) -> bool:
        stop = self._stop is not None
        if self.accelerator.num_processes > 1:  # every rank stops at the same step
            import torch

            flag = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop

    def after_step(self, step: int, logs: dict[str, float]) -> None:
        """Record the step's loss; on a pending Ctrl-C/SIGTERM save a checkpoint (unless this step has
        one) and raise :class:`TrainingInterrupted`."""
        self.final_loss = logs.get("loss", self.final_loss)
        if not self.stop_requested():
            return
        why = self._stop or "a stop on another process"
        path = self.save(step) if self.last_saved_step != step else latest_checkpoint(self.out)
        message = (f"training interrupted ({why}) after step {step}: checkpoint {path} is saved. "
                   f"Resume with: {resume_command(self.cfg)}")
        self.say(message)
        raise TrainingInterrupted(message)
