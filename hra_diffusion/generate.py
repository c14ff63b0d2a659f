"""Generate images from a base Stable Diffusion model plus an HRA adapter; write PNGs + manifest.jsonl.

The manifest is what ``hra-diffusion score`` reads: one JSON object per image with its file, prompt,
seed, sampler settings, condition image, adapter and base model. Every image has its own seeded CPU
generator, so an image depends on its seed only (not on the batch it was drawn in).

Each image is written (atomically) as soon as it is made; a run that is killed or fails is completed by
running the same command again (see ``sample_dir``). ``--out`` never overlaps an input, and
``--overwrite`` removes only the files generate wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .adapters.io import ADAPTER_CONFIG, TEXT_ENCODER_SUBDIR
from .images import CONDITION_BACKGROUND, open_image
from .sample_dir import (
    CONDITIONS_DIR,
    MANIFEST,
    append_row,
    check_not_input,
    finish_output,
    image_name,
    plan_output,
    write_config,
    write_file_atomic,
)
from .samples import PromptEntry, read_prompts
from .sampling import SCHEDULERS
from .utils import default_device, dtype_kwargs, quiet_hub_warnings

__all__ = [
    "DTYPES",
    "MANIFEST",
    "GenerateConfig",
    "PromptEntry",  # PromptEntry and read_prompts live in hra_diffusion.samples; re-exported here
    "read_prompts",
    "default_base_model",
    "load_pipeline",
    "generate",
]

DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class GenerateConfig:
    """Everything ``generate`` needs; the CLI's flags map one-to-one onto these fields."""

    output_dir: str
    adapter: str | None = None  # None: the base model alone (a baseline)
    base_model: str | None = None  # None: the adapter's recorded base if local, else the tiny world
    vae_model: str | None = None  # None: the VAE the adapter was trained with (its vae_model), else the base's
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    conditions: list[str] = field(default_factory=list)  # one per prompt, or one for all
    reference_dir: str | None = None
    negative_prompt: str | None = None
    num_images_per_prompt: int = 4
    seed: int = 0
    seeds: list[int] | None = None  # explicit seeds, one per image of each prompt
    # None: what the adapter's run validated with (its ``sampling`` record), else 25 steps, 7.5, the base's sampler
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
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
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds is an empty list; give at least one seed or leave it out")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: what the hub accepts as a model id
FALLBACK_SAMPLING = {"scheduler": None, "steps": 25, "guidance_scale": 7.5}  # without a recorded one


def resolve_sampling(cfg: GenerateConfig, adapter_doc: dict[str, Any] | None) -> tuple[GenerateConfig, str]:
    """``cfg`` with sampler, steps and guidance filled in: what was typed, else the adapter's ``sampling`` record
    (how its run validated), else 25 steps at 7.5 with the base's sampler; and a line saying which."""
    recorded = (adapter_doc or {}).get("sampling") or {}
    if recorded.get("scheduler") not in SCHEDULERS:
        recorded = {k: v for k, v in recorded.items() if k != "scheduler"}
    values, sources = {}, {}
    for key in ("scheduler", "steps", "guidance_scale"):
        typed = getattr(cfg, key)
        if typed is not None:
            values[key], sources[key] = typed, "given"
        elif recorded.get(key) is not None:
            values[key], sources[key] = recorded[key], "the adapter's"
        else:
            values[key], sources[key] = FALLBACK_SAMPLING[key], "default"
    kinds = set(sources.values())
    where = ("as its run validated, recorded in the adapter" if kinds == {"the adapter's"} else
             "as given" if kinds == {"given"} else
             "generate's defaults" + ("" if adapter_doc is None else ": the adapter records no sampling")
             if kinds == {"default"} else ", ".join(f"{k}: {v}" for k, v in sources.items()))
    sampler = values["scheduler"] or "the base model's sampler"
    line = (f"sampling: {sampler}, {values['steps']} steps, guidance {values['guidance_scale']:g} ({where}; "
            "change with --scheduler/--steps/--guidance)")
    return replace(cfg, **values), line


def default_base_model(adapter_doc: dict[str, Any] | None) -> str:
    """The base the adapter records (a local folder that exists, or a hub id, loaded as the trainer and export
    load it); the tiny world when it records none, or records the tiny world of another checkout."""
    from .paths import TINY_MODEL_DIR

    recorded = (adapter_doc or {}).get("base_model") or (adapter_doc or {}).get("base_model_name_or_path")
    if recorded:
        path = Path(str(recorded)).expanduser()
        if path.is_dir():
            return str(recorded)
        if path.parts[-2:] != ("assets", "tiny-sd"):
            if _HUB_ID.fullmatch(str(recorded)):
                return str(recorded)
            raise FileNotFoundError(f"the adapter was trained on {str(recorded)!r}, which is not a folder here: "
                                    "pass --base <that model's diffusers folder or hub id>")
    if (Path(TINY_MODEL_DIR) / "model_index.json").is_file():
        return str(TINY_MODEL_DIR)
    raise FileNotFoundError(
        f"no base model given and the tiny world {str(TINY_MODEL_DIR)!r} is not built: pass --base "
        "<diffusers pipeline folder or hub id>, or build the tiny world with `python -m tools.tiny_world build`"
    )


def base_revision(adapter_doc: dict[str, Any] | None, base: str) -> str | None:
    """The hub revision the adapter recorded for its base, when ``base`` is that base (as export uses it)."""
    doc = adapter_doc or {}
    return doc.get("base_model_revision") if base == doc.get("base_model") else None


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    dev = default_device(device)
    name = dtype or ("fp16" if str(dev).startswith("cuda") else "fp32")
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if str(dev) == "cpu" and name == "fp16":
        raise ValueError("fp16 on CPU is not supported by most kernels; use --dtype fp32 or bf16 on CPU")
    return torch.device(dev), torch_dtype, name


def load_pipeline(base: str, torch_dtype, safety_checker: bool = True, vae_model: str | None = None,
                  revision: str | None = None):
    """The base pipeline from a local folder or hub id (at ``revision``), with an actionable message when it
    fails: a StableDiffusionPipeline or StableDiffusionXLPipeline, chosen from the folder's model_index.json.
    ``vae_model``: a separate AutoencoderKL (folder or hub id) instead of the base's own."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .conditioning import pipeline_family

    local = Path(base)
    if (local.is_absolute() or base.startswith(".") or local.exists()) and not (local / "model_index.json").is_file():
        raise FileNotFoundError(
            f"base model folder {base!r} " + ("has no model_index.json: it is not a diffusers pipeline folder"
                                              if local.exists() else "does not exist")
        )
    try:
        family = pipeline_family(base, revision)  # an unsupported pipeline class is a ValueError that says so
    except OSError as err:
        raise _not_loaded(base, err) from None
    kwargs: dict[str, Any] = dtype_kwargs(torch_dtype)  # dtype= where diffusers deprecates torch_dtype
    if revision:
        kwargs["revision"] = revision
    if family == "sd" and not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # SDXL has no safety checker
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    if vae_model:
        from .models import BaseModelError, load_separate_vae

        try:
            kwargs["vae"] = load_separate_vae(vae_model, family, torch_dtype)
        except BaseModelError as err:  # name generate's flag, not the trainer's key
            raise BaseModelError(str(err).replace("pretrained_vae_model", "VAE (--vae, or the adapter's recorded "
                                                  "vae_model)", 1)) from None
    from safetensors import SafetensorError

    try:
        with contextlib.nullcontext() if local.is_dir() else quiet_hub_warnings():
            return pipeline_class.from_pretrained(base, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise _not_loaded(base, err) from None


def _not_loaded(base: str, err: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    return OSError(
        f"could not load base model {base!r}" + (" (HF_HUB_OFFLINE is set)" if offline else "")
        + f": {str(err).splitlines()[0] if str(err) else type(err).__name__}\n"
        f"Download it on a machine with internet access (`hf download {base} --local-dir DIR`) and pass the "
        "folder with --base DIR (a diffusers folder with model_index.json)."
    )


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
    checked: set[Path] = set()
    for e in entries:
        if cfg.reference_dir:
            e.reference_dir = Path(cfg.reference_dir)
        for key in ("condition", "condition_source", "label"):
            p = getattr(e, key)
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"{key.replace('_', ' ')} image {str(p)!r} (prompt {e.prompt!r}) does not exist")
        if e.condition is not None and e.condition not in checked:  # decodable, before any model is loaded
            open_image(e.condition, "condition image", background=CONDITION_BACKGROUND)
            checked.add(e.condition)
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
    if info is not None and _text_encoder_part(info):
        parent = Path(cfg.adapter).resolve().parent
        raise ValueError(f"{cfg.adapter} is the text-encoder part of an adapter (its layers are the text "
                         f"encoder's): pass the adapter folder itself, --adapter {parent}" if
                         (parent / ADAPTER_CONFIG).is_file() else
                         f"{cfg.adapter} adapts a text encoder only; generate takes a UNet adapter folder "
                         "(which may hold text_encoder/ beside it)")
    is_control = bool(info and has_condition_encoder(info))
    has_condition = any(e.condition is not None for e in entries)
    if is_control and not has_condition:
        raise ValueError(f"adapter {cfg.adapter} is a control adapter: give condition images with --condition "
                         "(or 'condition' in a .jsonl prompts file)")
    if has_condition and not is_control:
        raise ValueError("condition images were given but " + (f"adapter {cfg.adapter} has no condition encoder"
                         if cfg.adapter else "no (control) adapter was given"))
    return info, is_control


def _text_encoder_part(info) -> bool:
    """Whether an adapter folder holds a CLIP text encoder's layers (``….self_attn.q_proj``, ``….mlp.fc1``), as
    ``adapter/text_encoder/`` and ``adapter/text_encoder_2/`` do (a UNet's attention is ``attn1``/``attn2``)."""
    layers = list((info.doc.get("layers") or {}).keys()) if info.kind == "hra" else []
    return bool(layers) and all(".self_attn." in name or ".mlp." in name for name in layers)


def _load(cfg: GenerateConfig, info, is_control: bool, base: str) -> _Loaded:
    """Base pipeline + scheduler + adapter (UNet, optional text encoder, optional condition encoder)."""
    from .adapters.io import load_adapter
    from .adapters.peft_baselines import BASELINES
    from .adapters.registry import merge_adapter
    from .control import attach_condition_encoder, load_trained_adapter

    device, torch_dtype, dtype_name = _device_and_dtype(cfg.device, cfg.dtype)
    vae_model = _vae_model(cfg, info)
    revision = base_revision(info.doc if info else None, base)
    pipe = load_pipeline(base, torch_dtype, safety_checker=cfg.safety_checker, vae_model=vae_model,
                         revision=revision).to(device)
    pipe.set_progress_bar_config(disable=True)
    scheduler_name = _set_scheduler(pipe, cfg.scheduler)
    handle = None
    fold_unet = info is not None and (cfg.merge or info.kind in BASELINES)
    text_adapter = None
    text_parts: list[str] = []  # text_encoder/ and, for SDXL, text_encoder_2/: each adapts that component
    if info is not None:
        _, _, encoder = load_trained_adapter(pipe.unet, cfg.adapter)
        if encoder is not None:
            handle = attach_condition_encoder(pipe.unet, encoder)
        for component in (TEXT_ENCODER_SUBDIR, "text_encoder_2"):
            te_dir = Path(cfg.adapter) / component
            if (te_dir / ADAPTER_CONFIG).is_file():
                if getattr(pipe, component, None) is None:
                    raise ValueError(f"adapter {cfg.adapter} has a {component}/ part but base model {base!r} has "
                                     f"no {component}: pass the base it was trained on with --base")
                load_adapter(getattr(pipe, component), te_dir)
                text_parts.append(component)
        if text_parts:
            text_adapter = str((Path(cfg.adapter) / text_parts[0]).resolve())
        if fold_unet:  # PEFT baselines always: the trainers validate them folded, and OFT/BOFT live rebuild
            merge_adapter(pipe.unet, info.kind)  # their rotation in every denoising step (BOFT: ~10x slower)
        if cfg.merge:
            for component in text_parts:
                merge_adapter(getattr(pipe, component), "hra")
    scale = getattr(pipe, "vae_scale_factor", 8)
    common = {
        "steps": cfg.steps, "guidance": cfg.guidance_scale, "scheduler": scheduler_name,
        "height": cfg.height or pipe.unet.config.sample_size * scale,
        "width": cfg.width or pipe.unet.config.sample_size * scale, "negative_prompt": cfg.negative_prompt,
        "adapter": str(Path(cfg.adapter).resolve()) if cfg.adapter else None,
        "adapter_source": info.source if info else None,
        "adapter_kind": ("control" if is_control else "subject") if info else None,
        "adapter_type": info.kind if info else None,
        "text_encoder_adapter": text_adapter, "text_encoders_adapted": text_parts,
        "merged": fold_unet,
        "base": _path_or_id(base), "base_revision": revision, "dtype": dtype_name, "device": str(device),
        "vae": _path_or_id(vae_model),
    }
    return _Loaded(pipe, handle, device, common)


def _vae_model(cfg: GenerateConfig, info) -> str | None:
    """--vae, else the VAE the adapter was trained with (trainers record ``vae_model``), else None (the base's)."""
    return cfg.vae_model or ((info.doc.get("vae_model") if info is not None else None) or None)


def _path_or_id(source: str | None) -> str | None:
    """A local folder as its absolute path, a hub id (or None) as given."""
    return str(Path(source).resolve()) if source and Path(source).is_dir() else source


def _condition_names(entries: list[PromptEntry]) -> dict[Path, str]:
    """{condition image: its copy's name in the output folder}, one per distinct image."""
    names: dict[Path, str] = {}
    for e in entries:
        if e.condition is not None and e.condition not in names:
            names[e.condition] = f"{CONDITIONS_DIR}/{len(names):04d}_{e.condition.name}"
    return names


def _copy_conditions(cond_names: dict[Path, str], out: Path) -> None:
    for src, rel in cond_names.items():
        write_file_atomic(out / rel, lambda tmp, src=src: shutil.copyfile(src, tmp))


def _sample(cfg: GenerateConfig, loaded: _Loaded, entries: list[PromptEntry], batch: list[tuple[int, int, int]]):
    """One pipeline call for ``batch`` of (prompt index, image index, seed): (images, nsfw flags)."""
    import torch

    from .control import prepare_condition

    height, width = loaded.common["height"], loaded.common["width"]
    if loaded.handle is not None:
        images = [open_image(entries[pi].condition, "condition image", background=CONDITION_BACKGROUND) for pi, _, _ in batch]
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


def _sha256_files(folder: Path) -> str:
    """A fingerprint of an adapter folder's weights and configs (what makes its images)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _identity(cfg: GenerateConfig, entries: list[PromptEntry], base: str, seeds: list[int], device: str,
              dtype_name: str, vae_model: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """Everything that decides the images: a re-run into the same folder must match it to resume."""
    def p(x: Path | None) -> str | None:
        return str(x.resolve()) if x is not None else None

    ident = {
        "adapter": p(Path(cfg.adapter)) if cfg.adapter else None,
        "adapter_sha256": _sha256_files(Path(cfg.adapter)) if cfg.adapter else None,
        "base": _path_or_id(base) + (f"@{revision}" if revision else ""),
        "prompts": [{"prompt": e.prompt, "condition": p(e.condition),
                     "condition_sha256": _sha256(e.condition) if e.condition is not None else None,
                     "condition_source": p(e.condition_source), "label": p(e.label),
                     "reference_dir": p(e.reference_dir)} for e in entries],
        "seeds": [int(s) for s in seeds],
        "negative_prompt": cfg.negative_prompt, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler, "height": cfg.height, "width": cfg.width, "merge": cfg.merge,
        "safety_checker": cfg.safety_checker, "device": device.split(":")[0], "dtype": dtype_name,
    }
    if vae_model:  # only when set: folders written before the option stay resumable
        ident["vae"] = _path_or_id(vae_model)
    return ident


def _inputs(cfg: GenerateConfig, entries: list[PromptEntry], base: str) -> list[tuple[str, Path | None, bool]]:
    """What ``--out`` must not overlap: (what, path, whether ``--out`` inside it is refused too)."""
    inputs: list[tuple[str, Path | None, bool]] = [
        ("adapter folder", Path(cfg.adapter) if cfg.adapter else None, True),
        ("base model folder", Path(base) if Path(base).is_dir() else None, True),
        ("VAE folder", Path(cfg.vae_model) if cfg.vae_model and Path(cfg.vae_model).is_dir() else None, True),
        ("prompts file", Path(cfg.prompts_file) if cfg.prompts_file else None, False),
    ]
    for e in entries:
        inputs.append(("reference folder", e.reference_dir, True))
        for key in ("condition", "condition_source", "label"):
            if getattr(e, key) is not None:
                # is or contains the images' folder (a subfolder of it, e.g. ./samples beside ./edge.png, is fine)
                inputs.append((f"{key.replace('_', ' ')} image's folder", getattr(e, key).parent, False))
    return list(dict.fromkeys(inputs))


def generate(cfg: GenerateConfig, log: Callable[[str], None] | None = None) -> Path:
    """Run the pipeline over every (prompt, seed) into ``cfg.output_dir``; returns it.

    Images are written one by one as they are made; a re-run of the same settings into the same folder
    makes only the missing ones (``log`` gets a line saying so). Nothing is loaded, written or removed
    before the inputs and the output folder are checked.
    """
    from tqdm.auto import tqdm

    say = log or (lambda _msg: None)
    out_dir = Path(cfg.output_dir)
    entries = _entries(cfg)
    info, is_control = _resolve_adapter(cfg, entries)
    cfg, sampling_line = resolve_sampling(cfg, info.doc if info else None)
    say(sampling_line)
    base = cfg.base_model or default_base_model(info.doc if info else None)
    check_not_input(out_dir, _inputs(cfg, entries, base))
    device, _, dtype_name = _device_and_dtype(cfg.device, cfg.dtype)
    seeds = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed + k for k in range(cfg.num_images_per_prompt)]
    jobs = [(pi, k, s) for pi in range(len(entries)) for k, s in enumerate(seeds)]
    names = [image_name(pi, k, s) for pi, k, s in jobs]
    cond_names = _condition_names(entries)
    identity = _identity(cfg, entries, base, seeds, str(device), dtype_name, _vae_model(cfg, info),
                         base_revision(info.doc if info else None, base))
    plan = plan_output(out_dir, identity, names, list(cond_names.values()), cfg.overwrite)
    if plan.complete:
        say(f"all {len(names)} images are already in {out_dir} (same settings): nothing to do")
        return out_dir
    todo = [(job, name) for job, name in zip(jobs, names, strict=True) if name not in plan.done]
    if plan.done:
        say(f"resuming: {len(plan.done)} of {len(names)} images are already in {out_dir}; making the other {len(todo)}")
    settings = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    doc = {**settings, "identity": identity, "files": names, "conditions": list(cond_names.values()),
           "images": len(names), "complete": False}
    rows = dict(plan.done)
    if not todo:  # every image is there, only the manifest is missing (a kill at the very end)
        plan.remove_previous()
        finish_output(out_dir, [rows[n] for n in names], {**doc, "resolved": plan.previous.get("resolved")})
        return out_dir
    loaded = _load(cfg, info, is_control, base)
    removed = plan.remove_previous()
    if removed and cfg.overwrite:
        say(f"--overwrite: removed {removed} files a previous generate run wrote in {out_dir}")
    doc["resolved"] = loaded.common
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(out_dir, doc)
    _copy_conditions(cond_names, out_dir)
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    try:
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not cfg.progress):
            images, nsfw = _sample(cfg, loaded, entries, [job for job, _ in batch])
            for ((pi, k, s), name), image, flagged in zip(batch, images, nsfw, strict=True):
                _save_image(image, out_dir / name)
                rows[name] = _row(entries[pi], name, pi, k, s, loaded.common, cond_names, flagged)
                append_row(out_dir, rows[name])
    except KeyboardInterrupt:
        say(f"interrupted with {len(rows)} of {len(names)} images in {out_dir}; run the same command again to "
            "make the rest")
        raise
    finally:
        if loaded.handle is not None:
            loaded.handle.remove()
    finish_output(out_dir, [rows[n] for n in names], doc)
    return out_dir


def _save_image(image, path: Path) -> None:
    """One image, atomically (a kill leaves the complete file or none)."""
    write_file_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
