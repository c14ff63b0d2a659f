"""Load the frozen Stable Diffusion components (SD 1.x/2.x or SDXL, from the base's model_index.json) and put HRA
on them (base cast first, adapter fp32)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .adapters.config import HRAConfig
from .adapters.model import inject_hra
from .conditioning import PromptConditioner, load_conditioner, pipeline_family, read_model_index
from .utils import dtype_kwargs

__all__ = ["BaseModelError", "SDComponents", "load_sd_components", "load_separate_vae", "weight_dtype_for",
           "vae_dtype_for", "add_hra", "add_unet_adapter", "is_offline"]


class BaseModelError(OSError):
    """The base model could not be found or loaded (the message says where it looked and what to do)."""

    hra_user_error = True  # an expected error: entry points print it as one line (hra_diffusion.errors)


@dataclass
class SDComponents:
    """The pieces of a Stable Diffusion pipeline a trainer needs: SD 1.x/2.x (``family`` 'sd') or SDXL ('sdxl').

    ``conditioner`` holds the tokenizer(s) and text encoder(s) (one for SD, two for SDXL) and turns prompts into
    the UNet's conditioning (:mod:`hra_diffusion.conditioning`); ``tokenizer`` / ``text_encoder`` are its
    first ones. ``pipeline_config``: the extra constructor arguments of the family's pipeline, from the base's
    model_index.json (SDXL's ``force_zeros_for_empty_prompt``).
    """

    conditioner: PromptConditioner
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any
    source: str
    family: str = "sd"
    vae_source: str | None = None  # a separate VAE (--pretrained_vae_model); None: the base's vae/
    pipeline_config: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.conditioner.tokenizers[0]

    @property
    def text_encoder(self) -> nn.Module:
        return self.conditioner.text_encoders[0]

    @property
    def text_encoders(self) -> tuple[nn.Module, ...]:
        return tuple(self.conditioner.text_encoders)

    @property
    def pipeline_class_name(self) -> str:
        """The diffusers pipeline of this family (what a model card tells users to load)."""
        return {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[self.family]


def recorded_name(name: str) -> str:
    """How an adapter records a model it was trained on: a local folder as its absolute path (so generate and
    export find it from any folder), a hub id as typed."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.is_dir() else name


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen base under ``mixed_precision`` ('no' -> fp32)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def _describe_failure(name: str, err: Exception) -> BaseModelError:
    local = Path(name).expanduser()
    if local.exists():
        return BaseModelError(
            f"base model folder {str(local)!r} could not be loaded as a diffusers StableDiffusionPipeline or "
            "StableDiffusionXLPipeline folder (needs model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            f"scheduler/; SDXL also text_encoder_2/, tokenizer_2/): {type(err).__name__}: {err}"
        )
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        return BaseModelError(
            f"base model {name!r} is not an existing folder (relative paths are from {os.getcwd()!r}); "
            "pass a local StableDiffusionPipeline folder or a hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    if is_offline():
        return BaseModelError(
            f"base model {name!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1), and it is not "
            "in the local Hugging Face cache. Download it once where there is network "
            f"(`hf download {name}`), or pass --pretrained_model /path/to/local/folder."
        )
    return BaseModelError(
        f"base model {name!r} could not be loaded from the hub ({type(err).__name__}: {err}). Check the id and "
        "your network/token, or pass --pretrained_model /path/to/local/folder."
    )


def load_sd_components(
    name: str, revision: str | None = None, variant: str | None = None, weight_dtype: torch.dtype = torch.float32,
    vae_model: str | None = None,
) -> SDComponents:
    """Tokenizer(s), text encoder(s), VAE, UNet (frozen, cast to ``weight_dtype``) and the training noise
    scheduler of an SD 1.x/2.x or SDXL pipeline, the family read from its model_index.json.

    ``name`` is a local pipeline folder or a hub id; offline with no cached copy, the error says so.
    ``vae_model``: a separate AutoencoderKL (folder or hub id) instead of the base's ``vae/``.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": True} if is_offline() or local.is_dir() \
        else {"revision": revision}
    try:
        index = read_model_index(name, revision)
        family = pipeline_family(index)
        conditioner = load_conditioner(name, revision, variant, weight_dtype, kwargs.get("local_files_only", False))
        noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kwargs)
        vae = None if vae_model else _load_vae(name, "vae", variant, family, weight_dtype, kwargs)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant,
                                                    **dtype_kwargs(weight_dtype), **kwargs)
    except (OSError, ValueError) as err:
        raise _describe_failure(name, err) from None
    if vae_model:
        vae = load_separate_vae(vae_model, family, weight_dtype)
    for module in (vae, unet):
        module.requires_grad_(False)
        module.eval()
    if any(p.dtype != weight_dtype for p in unet.parameters() if p.is_floating_point()):
        nn.Module.to(unet, dtype=weight_dtype)  # a library that ignored the load dtype (no warning path)
    _check_fits(conditioner, vae, unet, name, vae_model)
    config = {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))} \
        if family == "sdxl" else {}
    return SDComponents(conditioner, vae, unet, noise_scheduler, name, family, vae_model, config)


def vae_dtype_for(family: str, weight_dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The VAE's dtype: ``weight_dtype``, except an SDXL VAE that overflows in fp16 (its config's
    ``force_upcast``, true for SDXL's own VAE, false for fp16-safe ones) stays fp32 under fp16, as diffusers'
    SDXL scripts and pipeline keep it. SD 1.x/2.x VAEs follow ``weight_dtype`` as they always have here."""
    if family == "sdxl" and weight_dtype == torch.float16 and force_upcast:
        return torch.float32
    return weight_dtype


def _load_vae(source: str, subfolder: str | None, variant: str | None, family: str, weight_dtype: torch.dtype,
              kwargs: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(source, subfolder=subfolder, **kwargs)
    dtype = vae_dtype_for(family, weight_dtype, bool(config.get("force_upcast", True)))
    vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, variant=variant, **dtype_kwargs(dtype), **kwargs)
    if any(p.dtype != dtype for p in vae.parameters() if p.is_floating_point()):
        nn.Module.to(vae, dtype=dtype)
    return vae


def load_separate_vae(vae_model: str, family: str, weight_dtype: torch.dtype) -> nn.Module:
    """``--pretrained_vae_model``: an AutoencoderKL folder or hub id (a pipeline folder's ``vae/`` also works)."""
    local = Path(vae_model).expanduser()
    subfolder = "vae" if local.is_dir() and (local / "vae" / "config.json").is_file() else None
    kwargs: dict[str, Any] = {"local_files_only": True} if is_offline() or local.is_dir() else {}
    try:
        return _load_vae(str(local) if local.is_dir() else vae_model, subfolder, None, family, weight_dtype, kwargs)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = "it is not an existing folder" if not local.exists() and vae_model.startswith((".", "/", "~")) else first
        raise BaseModelError(
            f"pretrained_vae_model {vae_model!r} could not be loaded as a diffusers AutoencoderKL ({where}); pass a "
            "folder holding config.json and diffusion_pytorch_model.safetensors, or a hub id such as "
            "madebyollin/sdxl-vae-fp16-fix" + (" that is in the local cache (HF_HUB_OFFLINE=1)" if is_offline() else "")
        ) from None


def _check_fits(conditioner: PromptConditioner, vae: nn.Module, unet: nn.Module, name: str,
                vae_model: str | None) -> None:
    """The text encoders and the VAE fit the UNet, or an error naming the mismatch."""
    try:
        conditioner.check_unet(unet)
    except ValueError as err:
        raise BaseModelError(f"base model {name!r}: {err}") from None
    latent, taken = int(vae.config.latent_channels), int(unet.config.in_channels)
    if latent != taken:
        what = f"the VAE {vae_model!r} (pretrained_vae_model)" if vae_model else "its VAE"
        raise BaseModelError(f"base model {name!r}: {what} makes {latent}-channel latents but the UNet takes "
                             f"{taken} channels; use the VAE of this model family")


def add_hra(model: nn.Module, config: HRAConfig, what: str = "model") -> list[str]:
    """Inject HRA into an (already dtype-cast, frozen) model; adapter tensors stay fp32.

    Errors from the core (targets matching nothing, r too large) are re-raised naming ``what``.
    """
    try:
        names = inject_hra(model, config)
    except ValueError as err:
        raise ValueError(f"HRA on the {what}: {err}") from None
    model.train()
    return names


def add_unet_adapter(unet: nn.Module, cfg, what: str = "UNet") -> HRAConfig | None:
    """Put ``cfg.adapter`` on the UNet at ``cfg.target_modules``: HRA (returns its HRAConfig) or a PEFT
    baseline (returns None), both seeded by ``cfg.seed``; the adapter tensors are fp32, the rest frozen."""
    if cfg.adapter == "hra":
        hra = HRAConfig(r=cfg.r, target_modules=cfg.target_modules, apply_gs=cfg.apply_gs,
                        orth_lambda=cfg.orth_lambda, train_bias=cfg.train_bias, seed=cfg.seed)
        add_hra(unet, hra, what)
        return hra
    from .adapters.peft_baselines import inject_baseline

    try:
        inject_baseline(unet, cfg.baseline_spec())
    except ValueError as err:
        raise ValueError(f"{cfg.adapter} on the {what}: {err}") from None
    unet.train()
    return None
