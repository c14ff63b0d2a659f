"""Load the frozen Stable Diffusion components and put HRA on them (base cast first, adapter fp32)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..adapters.config import HRAConfig
from ..adapters.model import inject_hra
from ..utils import dtype_kwargs

__all__ = ["BaseModelError", "SDComponents", "load_sd_components", "weight_dtype_for", "add_hra", "add_unet_adapter",
           "is_offline"]


class BaseModelError(OSError):
    """The base model could not be found or loaded (the message says where it looked and what to do)."""

    hra_user_error = True  # an expected error: entry points print it as one line (hra_diffusion.errors)


@dataclass
class SDComponents:
    """The pieces of a Stable Diffusion pipeline a trainer needs."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any
    source: str


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen base under ``mixed_precision`` ('no' -> fp32)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def _describe_failure(name: str, err: Exception) -> BaseModelError:
    local = Path(name).expanduser()
    if local.exists():
        return BaseModelError(
            f"base model folder {str(local)!r} could not be loaded as a diffusers StableDiffusionPipeline "
            f"folder (needs unet/, vae/, text_encoder/, tokenizer/, scheduler/): {type(err).__name__}: {err}"
        )
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        return BaseModelError(
            f"base model {name!r} is not an existing folder (relative paths are from {os.getcwd()!r}); "
            "pass a local StableDiffusionPipeline folder or a hub id like 'runwayml/stable-diffusion-v1-5'"
        )
    if is_offline():
        return BaseModelError(
            f"base model {name!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1), and it is not "
            "in the local Hugging Face cache. Download it once where there is network "
            f"(`huggingface-cli download {name}`), or pass --pretrained_model /path/to/local/folder."
        )
    return BaseModelError(
        f"base model {name!r} could not be loaded from the hub ({type(err).__name__}: {err}). Check the id and "
        "your network/token, or pass --pretrained_model /path/to/local/folder."
    )


def load_sd_components(
    name: str, revision: str | None = None, variant: str | None = None, weight_dtype: torch.dtype = torch.float32
) -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet (frozen, cast to ``weight_dtype``) and the training noise scheduler.

    ``name`` is a local pipeline folder or a hub id; offline with no cached copy, the error says so.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs: dict[str, Any] = {"revision": revision}
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
    if is_offline() or local.is_dir():
        kwargs["local_files_only"] = True
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kwargs)
        # loaded in weight_dtype (not cast afterwards with .to(dtype), which diffusers warns about on every run)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant,
                                                     **dtype_kwargs(weight_dtype, "transformers"), **kwargs)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **dtype_kwargs(weight_dtype), **kwargs)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant,
                                                    **dtype_kwargs(weight_dtype), **kwargs)
    except (OSError, ValueError) as err:
        raise _describe_failure(name, err) from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        if any(p.dtype != weight_dtype for p in module.parameters() if p.is_floating_point()):
            nn.Module.to(module, dtype=weight_dtype)  # a library that ignored the load dtype (no warning path)
        module.eval()
    return SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, name)


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
                        orth_lambda=cfg.orth_lambda, seed=cfg.seed)
        add_hra(unet, hra, what)
        return hra
    from ..adapters.peft_baselines import inject_baseline

    try:
        inject_baseline(unet, cfg.baseline_spec())
    except ValueError as err:
        raise ValueError(f"{cfg.adapter} on the {what}: {err}") from None
    unet.train()
    return None
