"""One comparison run: its trainer command line, training it in its own process (kept under ``--reuse``), its
adapters at each scored step count, and the parameter budgets that size the baselines."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import BUDGETS, LR_FLAGS, METHODS, CompareConfig, adapter_kind, method_args

__all__ = ["common_args", "label", "match_budgets", "trainer_config", "recipe_rates", "train_argv", "run_dir",
           "train_run", "adapter_at", "cached", "prepare_class_images", "code_version", "REUSED_OTHER_CODE"]

# the sizes --budget match tries (OFT/BOFT blocks must divide every adapted layer's input width)
CANDIDATES = {"lora": ("--r", range(1, 65)), "oft": ("--block_size", (2, 4, 8, 16, 32, 64, 128)),
              "boft": ("--block_size", (2, 4, 8, 16, 32, 64))}
DIVERGED = "diverged.json"  # in a run's folder: training stopped on a non-finite loss (its earlier snapshots stand)
CODE_FILE = "compare_code.json"  # in a run's folder: the code version it was trained with
# what --reuse kept although it was made by other code ({path: its code version, None if unrecorded}); reported, not
# redone: a code change need not change results, and a BOFT run costs an hour on CPU
REUSED_OTHER_CODE: dict[str, str | None] = {}


@functools.cache
def code_version() -> str:
    """A short hash of this package's source (training, sampling, scoring) and the recipes in configs/."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    files = sorted(root.rglob("*.py")) + sorted((root.parent / "configs").rglob("*.yaml"))
    for path in files:
        digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _reused(path: Path, recorded: str | None) -> None:
    if recorded != code_version() and str(path) not in REUSED_OTHER_CODE:
        REUSED_OTHER_CODE[str(path)] = recorded
        print(f"note: --reuse keeps {path}, made by code {recorded or '(not recorded)'}, not this code "
              f"({code_version()}); delete it to redo it", flush=True)


def common_args(cfg: CompareConfig) -> list[str]:
    """Overrides every run shares: the steps, adapter snapshots at the scored steps, no checkpoints, validation
    grids, TensorBoard or showroom (the comparison measures its own), the UNet adapters alone for DreamBooth
    (the baselines have no text-encoder path; a variant may turn it back on)."""
    args = ["--report_to", "none", "--checkpointing_steps", "1000000", "--validation_steps", "1000000",
            "--max_train_steps", str(cfg.eval_at[-1])]
    if cfg.config:
        args = ["--config", cfg.config, *args]
    every = cfg.snapshot_every()
    if every:
        args += ["--adapter_snapshot_steps", str(every)]
    if cfg.task == "dreambooth":
        args += ["--train_text_encoder", "false", "--showroom_rates", "false"]
    else:
        args += ["--showroom_f1", "false"]
    return args + list(cfg.train_args)


def label(method: str, args: list[str]) -> str:
    """The table's name of a method at its size, e.g. "LoRA r=3 (PEFT)"."""
    opts = dict(zip(args[::2], args[1::2], strict=True))
    kind = opts["--adapter"]
    where = ", attention only" if opts.get("--target_modules") else ""
    where += " + text encoder" if opts.get("--train_text_encoder") == "true" else ""
    if kind == "hra":
        extra = (", GS" if opts.get("--apply_gs") == "true" else "") + (
            f", λ={opts['--orth_lambda']}" if float(opts.get("--orth_lambda", 0)) else "") + (
            ", biases trained" if opts.get("--train_bias") == "true" else "")
        return f"HRA r={opts['--r']}{extra}{where} (ours)"
    if kind == "lora":
        return f"LoRA r={opts['--r']}{where} (PEFT)"
    return f"{kind.upper()} block {opts['--block_size']}{where} (PEFT)"


def trainer_config(cfg: CompareConfig, method: str = "hra", run: Path | None = None):
    """The resolved trainer config of one method at the recipe's rate (parsed exactly as its command line will be)."""
    from ..training import parse_task_config

    return parse_task_config(cfg.task, train_argv(cfg, method, run or cfg.out / "recipe"))


def recipe_rates(cfg: CompareConfig) -> dict[str, float]:
    """The rates the grid multiplies: the recipe's learning rates (with --config and --train_args applied), all
    scaled so that learning_rate is ``cfg.lr_centre`` when that is set."""
    tcfg = trainer_config(cfg)
    rates = {flag: float(getattr(tcfg, flag) or tcfg.learning_rate) for flag in LR_FLAGS[cfg.task]}
    scale = cfg.lr_centre / rates["learning_rate"] if cfg.lr_centre else 1.0
    return {flag: float(f"{value * scale:.6g}") for flag, value in rates.items()}


def train_argv(cfg: CompareConfig, method: str, folder: Path, sizes: dict | None = None, seed: int | None = None,
               factor: float = 1.0, rates: dict[str, float] | None = None) -> list[str]:
    """One run's trainer command line; ``sizes``: {method: size arguments} (None: the fixed sizes); ``rates``: the
    grid's centre rates (:func:`recipe_rates`), scaled by ``factor`` and always written out (None: the recipe's)."""
    args = (sizes or {}).get(method) or method_args(method)
    argv = [*common_args(cfg), "--seed", str(cfg.seeds[0] if seed is None else seed), *args, "--output_dir", str(folder)]
    for flag, value in (rates or {}).items():
        argv += [f"--{flag}", f"{value * factor:.6g}"]
    return argv + _shared_class_images(cfg)


def _shared_class_images(cfg: CompareConfig) -> list[str]:
    """DreamBooth: a recipe with its own class images gives them to every run; otherwise one set drawn by the base
    under <output_dir>/class_images is every run's (drawn once, by prepare_class_images)."""
    if cfg.task != "dreambooth":
        return []
    from ..training import parse_task_config

    recipe = parse_task_config(cfg.task, [*common_args(cfg), "--output_dir", str(cfg.out / "recipe")])
    return [] if recipe.class_data_dir else ["--class_data_dir", str(cfg.out / "class_images")]


def run_dir(cfg: CompareConfig, method: str, factor: float, seed: int) -> Path:
    return cfg.out / method / f"lr{factor:.6g}-seed{seed}"


def prepare_class_images(cfg: CompareConfig) -> None:
    """Generate the prior-preservation class images once, before any timing, for every run to share."""
    from ..training.dreambooth import apply_subject_file

    tcfg = apply_subject_file(trainer_config(cfg))
    if not tcfg.with_prior_preservation:
        return
    from ..models import load_sd_components
    from ..training.prior import class_prompts, generate_class_images

    made = generate_class_images(load_sd_components(tcfg.pretrained_model, tcfg.revision, tcfg.variant),
                                 tcfg.class_data_dir, class_prompts(tcfg), tcfg.num_class_images,
                                 batch_size=tcfg.sample_batch_size, seed=tcfg.seed,
                                 steps=tcfg.class_inference_steps, resolution=tcfg.resolution,
                                 guidance_scale=tcfg.class_guidance_scale)
    if made:
        print(f"generated {made} class images in {tcfg.class_data_dir}", flush=True)


def train_run(cfg: CompareConfig, method: str, sizes: dict, seed: int, factor: float, rates: dict[str, float]) -> dict:
    """Train one (method, rate, seed) in its own process (clean memory figures); returns its train_stats.json
    plus ``argv``, ``folder`` and ``diverged`` (the step whose loss was not finite, or None)."""
    folder = run_dir(cfg, method, factor, seed)
    train = folder / "train"
    stats_file = train / "logs" / "train_stats.json"
    argv = train_argv(cfg, method, train, sizes, seed, factor, rates)
    argv_file = folder / "compare_argv.json"  # a reused run must have been trained with the same arguments
    same = argv_file.is_file() and json.loads(argv_file.read_text()) == argv
    done = stats_file.is_file() and (train / "adapter" / "adapter_config.json").is_file()
    if not (cfg.reuse and same and (done or (folder / DIVERGED).is_file())):
        (folder / DIVERGED).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "hra_diffusion.training", cfg.task, *argv, "--overwrite_output_dir", "true"]
        print("+ " + shlex.join(cmd), flush=True)
        started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)  # same cwd: same relative paths
        folder.mkdir(parents=True, exist_ok=True)
        if proc.returncode != 0:
            if "the loss became" not in proc.stderr:
                raise RuntimeError(f"training {method} (lr x{factor:g}, seed {seed}) failed (exit {proc.returncode}):"
                                   f"\n{proc.stderr[-3000:]}")
            line = next(x for x in proc.stderr.splitlines() if "the loss became" in x)
            (folder / DIVERGED).write_text(json.dumps({"message": line.strip()}) + "\n")
        argv_file.write_text(json.dumps(argv) + "\n")
        (folder / CODE_FILE).write_text(json.dumps({"code": code_version()}) + "\n")
        print(f"  {method} lr x{factor:g} seed {seed}: trained in {time.time() - started:.0f} s"
              + (" (diverged)" if (folder / DIVERGED).is_file() else ""), flush=True)
    else:
        _reused(folder, json.loads((folder / CODE_FILE).read_text())["code"] if (folder / CODE_FILE).is_file() else None)
    if (folder / DIVERGED).is_file():
        return {"argv": argv, "folder": str(folder), "diverged": json.loads((folder / DIVERGED).read_text())["message"]}
    stats = json.loads(stats_file.read_text())
    return {**stats, "argv": argv, "folder": str(folder), "diverged": None}


def adapter_at(stats: dict, step: int, last: int) -> Path | None:
    """A run's adapter after ``step`` steps (its snapshot, or the final adapter at ``last``); None when the run
    diverged before it."""
    train = Path(stats["folder"]) / "train"
    path = train / "adapter" if step == last else train / "snapshots" / f"step-{step:06d}" / "adapter"
    if stats["diverged"] and step == last:
        return None
    return path if (path / "adapter_config.json").is_file() else None


def cached(cfg: CompareConfig, path: Path, settings: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``'s result, kept in ``path`` with the settings and code version it was made with; reused under
    --reuse when the settings match (another code version is noted, see REUSED_OTHER_CODE)."""
    if cfg.reuse and path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("settings") == settings:
            _reused(path, doc.get("code"))
            return doc["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "code": code_version(), "result": result}, indent=2,
                              default=str) + "\n")
    os.replace(tmp, path)
    return result


def _meta_unet_factory(pretrained_model: str, revision: str | None):
    """A function building the task's UNet on the meta device from its config (read once; no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(pretrained_model, subfolder="unet", revision=revision)
    except OSError as err:
        raise ValueError(f"cannot read the UNet config of {pretrained_model!r} to match parameter budgets "
                         f"({str(err).splitlines()[0]}); pass a local model folder, or --budget fixed") from None

    def build():
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        return unet.requires_grad_(False)

    return build


def match_budgets(cfg: CompareConfig) -> dict[str, dict[str, Any]]:
    """Per method: its size arguments and trainable UNet count. ``match``: each baseline of METHODS at the candidate
    size whose count on this task's UNet and targets is closest to HRA r=8's (ties: the smaller); ``fixed`` and the
    ablation variants: their listed sizes."""
    from ..adapters import HRAConfig, inject_hra
    from ..adapters.peft_baselines import BaselineSpec, count_trainable, inject_baseline

    assert cfg.budget in BUDGETS
    meta_unet = None

    def count(method: str, size: int | None = None) -> int | None:
        nonlocal meta_unet
        tcfg = trainer_config(cfg, method)
        if meta_unet is None:
            meta_unet = _meta_unet_factory(tcfg.pretrained_model, tcfg.revision)
        unet, kind, targets = meta_unet(), adapter_kind(method), list(tcfg.target_modules)
        try:
            if kind == "hra":
                inject_hra(unet, HRAConfig(r=size or tcfg.r, target_modules=targets, train_bias=tcfg.train_bias))
            else:
                key = "r" if kind == "lora" else "block_size"
                inject_baseline(unet, BaselineSpec(kind, target_modules=targets,
                                                   **{key: size or getattr(tcfg, key)}))
        except ValueError:  # e.g. a block size that does not divide some layer's width
            return None
        return count_trainable(unet)

    target = count("hra")
    chosen: dict[str, dict[str, Any]] = {}
    for method in cfg.methods:
        kind = adapter_kind(method)
        if kind == "hra" or method not in METHODS or cfg.budget == "fixed":
            chosen[method] = {"args": method_args(method), "trainable": count(method)}
            continue
        flag, candidates = CANDIDATES[kind]
        if kind == "lora":  # LoRA's count is linear in r: one injection gives every rank's
            per_rank = count(method, 1)
            counts = {r: r * per_rank for r in candidates}
        else:
            counts = {b: n for b in candidates if (n := count(method, b)) is not None}
        if not counts:
            raise ValueError(f"no {kind} block size in {candidates} fits every target layer; use --methods without "
                             f"{method}")
        size = min(counts, key=lambda k: (abs(counts[k] - target), k))
        chosen[method] = {"args": ["--adapter", kind, flag, str(size)], "trainable": counts[size]}
    return chosen
