"""Generate images from a base Stable Diffusion model plus an HRA adapter; write PNGs + manifest.jsonl.

The manifest is what ``hra-diffusion score`` reads: one JSON object per image with its file, prompt,
seed, sampler settings, condition image, adapter and base model. Every image has its own seeded CPU
generator, so an image depends on its seed only (not on the batch it was drawn in).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .adapters.io import ADAPTER_CONFIG, TEXT_ENCODER_SUBDIR
from .samples import MANIFEST, PromptEntry, read_prompts, write_jsonl
from .utils import atomic_directory, default_device

__all__ = [
    "SCHEDULERS",
    "DTYPES",
    "GenerateConfig",
    "PromptEntry",  # PromptEntry and read_prompts live in hra_diffusion.samples; re-exported here
    "read_prompts",
    "default_base_model",
    "load_pipeline",
    "generate",
]

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm-solver": "DPMSolverMultistepScheduler",
    "dpm-solver-sde": "DPMSolverSDEScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class GenerateConfig:
    """Everything ``generate`` needs; the CLI's flags map one-to-one onto these fields."""

    output_dir: str
    adapter: str | None = None  # None: the base model alone (a baseline)
    base_model: str | None = None  # None: the adapter's recorded base if local, else the tiny world
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    conditions: list[str] = field(default_factory=list)  # one per prompt, or one for all
    reference_dir: str | None = None
    negative_prompt: str | None = None
    num_images_per_prompt: int = 4
    seed: int = 0
    seeds: list[int] | None = None  # explicit seeds, one per image of each prompt
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str | None = None  # None: the scheduler saved with the base model
    height: int | None = None
    width: int | None = None
    merge: bool = False
    batch_size: int = 4
    device: str | None = None
    dtype: str | None = None
    safety_checker: bool = True
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        for name in ("num_images_per_prompt", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds is an empty list; give at least one seed or leave it out")


def default_base_model(adapter_doc: dict[str, Any] | None) -> str:
    """The adapter's recorded base model if it is a local folder that exists, else the tiny world."""
    recorded = (adapter_doc or {}).get("base_model") or (adapter_doc or {}).get("base_model_name_or_path")
    if recorded and Path(str(recorded)).is_dir():
        return str(recorded)
    from .tiny.paths import TINY_MODEL_DIR

    if (Path(TINY_MODEL_DIR) / "model_index.json").is_file():
        return str(TINY_MODEL_DIR)
    hint = f" (the adapter records {recorded!r}, which is not a local folder)" if recorded else ""
    raise FileNotFoundError(
        f"no base model given and the tiny world {str(TINY_MODEL_DIR)!r} is not built{hint}: pass --base "
        "<diffusers pipeline folder or hub id>, or build the tiny world with `python -m hra_diffusion.tiny build`"
    )


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    dev = default_device(device)
    name = dtype or ("fp16" if str(dev).startswith("cuda") else "fp32")
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if str(dev) == "cpu" and name == "fp16":
        raise ValueError("fp16 on CPU is not supported by most kernels; use --dtype fp32 or bf16 on CPU")
    return torch.device(dev), torch_dtype, name


def load_pipeline(base: str, torch_dtype, safety_checker: bool = True):
    """A StableDiffusionPipeline from a local folder or hub id, with an actionable message when it fails."""
    from diffusers import StableDiffusionPipeline

    local = Path(base)
    if (local.is_absolute() or base.startswith(".") or local.exists()) and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"base model folder {base!r} " + ("has no model_index.json: it is not a diffusers pipeline folder"
                                              if local.exists() else "does not exist")
        )
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return StableDiffusionPipeline.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        raise OSError(
            f"could not load base model {base!r}" + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + f": {str(err).splitlines()[0] if str(err) else type(err).__name__}\n"
            f"Download it on a machine with internet access (`huggingface-cli download {base}`) and pass the "
            "local folder with --base /path/to/model (a diffusers folder with model_index.json)."
        ) from None


def _set_scheduler(pipe, name: str | None) -> str:
    if name is None:
        return type(pipe.scheduler).__name__
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name], None)
    if cls is None:
        raise ValueError(f"scheduler {name!r} ({SCHEDULERS[name]}) is not available in this diffusers version")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return type(pipe.scheduler).__name__


def _entries(cfg: GenerateConfig) -> list[PromptEntry]:
    entries = [PromptEntry(p) for p in cfg.prompts]
    if cfg.prompts_file:
        entries += read_prompts(cfg.prompts_file)
    if not entries:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if cfg.conditions:
        if len(cfg.conditions) not in (1, len(entries)):
            raise ValueError(
                f"{len(cfg.conditions)} condition images for {len(entries)} prompts: give one per prompt, or one for all"
            )
        conds = cfg.conditions * len(entries) if len(cfg.conditions) == 1 else cfg.conditions
        for e, c in zip(entries, conds, strict=True):
            e.condition = Path(c)
    for e in entries:
        if cfg.reference_dir:
            e.reference_dir = Path(cfg.reference_dir)
        for key in ("condition", "condition_source", "label"):
            p = getattr(e, key)
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"{key.replace('_', ' ')} image {str(p)!r} (prompt {e.prompt!r}) does not exist")
        if e.reference_dir is not None and not e.reference_dir.is_dir():
            raise FileNotFoundError(f"reference folder {str(e.reference_dir)!r} does not exist")
    return entries


@dataclass
class _Loaded:
    """The pipeline with its adapter in place, and the facts every manifest row records."""

    pipe: Any
    handle: Any  # the condition hook of a control adapter, else None
    device: Any
    common: dict[str, Any]


def _resolve_adapter(cfg: GenerateConfig, entries: list[PromptEntry]):
    """Validate the adapter folder (before any model is loaded) against the prompts' conditions."""
    from .adapters.registry import describe_adapter
    from .control.io import has_condition_encoder

    info = describe_adapter(cfg.adapter) if cfg.adapter is not None else None
    is_control = bool(info and has_condition_encoder(info))
    has_condition = any(e.condition is not None for e in entries)
    if is_control and not has_condition:
        raise ValueError(f"adapter {cfg.adapter} is a control adapter: give condition images with --condition "
                         "(or 'condition' in a .jsonl prompts file)")
    if has_condition and not is_control:
        raise ValueError("condition images were given but " + (f"adapter {cfg.adapter} has no condition encoder"
                         if cfg.adapter else "no (control) adapter was given"))
    return info, is_control


def _load(cfg: GenerateConfig, info, is_control: bool) -> _Loaded:
    """Base pipeline + scheduler + adapter (UNet, optional text encoder, optional condition encoder)."""
    from .adapters.io import load_adapter
    from .adapters.registry import merge_adapter
    from .control import attach_condition_encoder, load_trained_adapter

    device, torch_dtype, dtype_name = _device_and_dtype(cfg.device, cfg.dtype)
    base = cfg.base_model or default_base_model(info.doc if info else None)
    pipe = load_pipeline(base, torch_dtype, safety_checker=cfg.safety_checker).to(device)
    pipe.set_progress_bar_config(disable=True)
    scheduler_name = _set_scheduler(pipe, cfg.scheduler)
    handle = None
    text_adapter = None
    if info is not None:
        _, _, encoder = load_trained_adapter(pipe.unet, cfg.adapter)
        if encoder is not None:
            handle = attach_condition_encoder(pipe.unet, encoder)
        te_dir = Path(cfg.adapter) / TEXT_ENCODER_SUBDIR
        if (te_dir / ADAPTER_CONFIG).is_file():
            load_adapter(pipe.text_encoder, te_dir)
            text_adapter = str(te_dir.resolve())
        if cfg.merge:
            merge_adapter(pipe.unet, info.kind)
            if text_adapter:
                merge_adapter(pipe.text_encoder, "hra")
    scale = getattr(pipe, "vae_scale_factor", 8)
    common = {
        "steps": cfg.steps, "guidance": cfg.guidance_scale, "scheduler": scheduler_name,
        "height": cfg.height or pipe.unet.config.sample_size * scale,
        "width": cfg.width or pipe.unet.config.sample_size * scale, "negative_prompt": cfg.negative_prompt,
        "adapter": str(Path(cfg.adapter).resolve()) if cfg.adapter else None,
        "adapter_source": info.source if info else None,
        "adapter_kind": ("control" if is_control else "subject") if info else None,
        "adapter_type": info.kind if info else None,
        "text_encoder_adapter": text_adapter, "merged": bool(cfg.merge and cfg.adapter),
        "base": str(Path(base).resolve()) if Path(base).is_dir() else base, "dtype": dtype_name,
        "device": str(device),
    }
    return _Loaded(pipe, handle, device, common)


def _copy_conditions(entries: list[PromptEntry], tmp: Path) -> dict[Path, str]:
    """Copy each distinct condition image into ``conditions/``; returns {original: name in the folder}."""
    names: dict[Path, str] = {}
    for e in entries:
        if e.condition is not None and e.condition not in names:
            (tmp / "conditions").mkdir(exist_ok=True)
            names[e.condition] = f"conditions/{len(names):04d}_{e.condition.name}"
            shutil.copyfile(e.condition, tmp / names[e.condition])
    return names


def _sample(cfg: GenerateConfig, loaded: _Loaded, entries: list[PromptEntry], batch: list[tuple[int, int, int]]):
    """One pipeline call for ``batch`` of (prompt index, image index, seed): (images, nsfw flags)."""
    import torch
    from PIL import Image

    from .control import prepare_condition

    height, width = loaded.common["height"], loaded.common["width"]
    if loaded.handle is not None:
        images = []
        for pi, _, _ in batch:
            with Image.open(entries[pi].condition) as img:
                images.append(img.convert("RGB"))
        loaded.handle.set_condition(prepare_condition(images, height, width).to(loaded.device))
    generators = [torch.Generator("cpu").manual_seed(int(s)) for _, _, s in batch]
    with torch.inference_mode():
        result = loaded.pipe(
            prompt=[entries[pi].prompt for pi, _, _ in batch],
            negative_prompt=[cfg.negative_prompt] * len(batch) if cfg.negative_prompt else None,
            num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=height, width=width,
            generator=generators, output_type="pil",
        )
    return result.images, getattr(result, "nsfw_content_detected", None) or [None] * len(batch)


def _row(e: PromptEntry, name: str, pi: int, k: int, seed: int, common: dict, cond_names: dict, flagged) -> dict:
    return {
        "file": name, "prompt": e.prompt, "prompt_index": pi, "image_index": k, "seed": int(seed), **common,
        "condition": cond_names.get(e.condition) if e.condition is not None else None,
        "condition_original": str(e.condition.resolve()) if e.condition is not None else None,
        "condition_source": str(e.condition_source.resolve()) if e.condition_source else None,
        "label": str(e.label.resolve()) if e.label else None,
        "reference_dir": str(e.reference_dir.resolve()) if e.reference_dir else None,
        "nsfw": flagged,
    }


def generate(cfg: GenerateConfig) -> Path:
    """Run the pipeline over every (prompt, seed) and write ``cfg.output_dir`` atomically; returns it."""
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"output folder {str(out_dir)!r} is not empty; pass --overwrite to replace it")
    entries = _entries(cfg)
    info, is_control = _resolve_adapter(cfg, entries)
    loaded = _load(cfg, info, is_control)
    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed + k for k in range(cfg.num_images_per_prompt)]
    jobs = [(pi, k, s) for pi in range(len(entries)) for k, s in enumerate(seeds)]
    batches = [jobs[i : i + cfg.batch_size] for i in range(0, len(jobs), cfg.batch_size)]
    with atomic_directory(out_dir) as tmp:
        cond_names = _copy_conditions(entries, tmp)
        rows = []
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not cfg.progress):
            images, nsfw = _sample(cfg, loaded, entries, batch)
            for (pi, k, s), image, flagged in zip(batch, images, nsfw, strict=True):
                name = f"p{pi:04d}_{k:02d}_s{s}.png"
                image.save(tmp / name)
                rows.append(_row(entries[pi], name, pi, k, s, loaded.common, cond_names, flagged))
        if loaded.handle is not None:
            loaded.handle.remove()
        write_jsonl(tmp / MANIFEST, rows)
        settings = {k: v for k, v in asdict(cfg).items() if k != "progress"}
        (tmp / "generate_config.json").write_text(json.dumps({**settings, "resolved": loaded.common}, indent=2) + "\n")
    return out_dir
