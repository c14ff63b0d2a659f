"""Sampling with a Stable Diffusion pipeline built around given modules: the samplers by name, the sampler a
run validates with, the family's pipeline around training modules (nothing copied), seeded image batches, and
eval mode with PEFT layers folded in. Shared by the trainers' validation, generate, the metrics and the showroom."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn
from PIL import Image

__all__ = ["SCHEDULERS", "VALIDATION_SCHEDULERS", "validation_sampler", "validation_sampling", "sampler_for", "build_pipeline",
           "pipeline_for", "generate_images", "eval_mode"]

# generate's --scheduler names -> diffusers classes
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

# the samplers validation can draw with (ControlConfig.validation_scheduler; DreamBooth always uses DPM-Solver++),
# each with its name in `hra-diffusion generate --scheduler` (SCHEDULERS has the classes)
VALIDATION_SCHEDULERS = {"dpm++": "dpm-solver", "ddim": "ddim"}


class eval_mode:
    """Sampling with training modules: eval mode inside the block, each module's previous mode restored after;
    PEFT baseline layers (LoRA/OFT/BOFT) are folded into their base weights meanwhile and the exact base weights
    put back after (:func:`~hra_diffusion.adapters.peft_baselines.merged_peft`: OFT/BOFT would otherwise rebuild
    their rotations in every denoising step). HRA layers are left as they are (their unmerged forward is cheap)."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = [m for m in modules if m is not None]

    def __enter__(self) -> None:
        from .adapters.peft_baselines import merged_peft

        self.previous = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        self.merged = contextlib.ExitStack()
        try:
            for m in self.modules:
                self.merged.enter_context(merged_peft(m))
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.merged.close()
        finally:
            for m, was in zip(self.modules, self.previous, strict=True):
                m.train(was)


def _sampler_names(validation_scheduler: str) -> tuple[str, str]:
    name = VALIDATION_SCHEDULERS[validation_scheduler]
    return name, SCHEDULERS[name]


def validation_sampler(cfg) -> tuple[str, str]:
    """(generate's ``--scheduler`` name, diffusers class name) of the sampler the run validated with
    (``cfg.validation_scheduler``; DPM-Solver++ where the config has none)."""
    return _sampler_names(getattr(cfg, "validation_scheduler", "dpm++"))


def validation_sampling(cfg) -> dict[str, object]:
    """How a run validated, recorded in its adapter (``sampling``) so that ``generate`` samples it the same way
    by default: {"scheduler": generate's name, "steps", "guidance_scale"}."""
    return {"scheduler": validation_sampler(cfg)[0], "steps": int(cfg.validation_inference_steps),
            "guidance_scale": float(cfg.validation_guidance_scale)}


def sampler_for(noise_scheduler, validation_scheduler: str = "dpm++"):
    """The sampler the trainers validate with, made with ``from_config`` from the base's noise schedule (its
    ``algorithm_type`` etc. come from that config; the tiny world's asks for DPM-Solver++'s SDE variant):
    DPM-Solver++ by default, or another of config.VALIDATION_SCHEDULERS."""
    import diffusers

    return getattr(diffusers, _sampler_names(validation_scheduler)[1]).from_config(noise_scheduler.config)


def build_pipeline(unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, tokenizer, noise_scheduler,
                   pipeline_cls=None, **extra):
    """A StableDiffusionPipeline around the given (unwrapped) modules, DPM-Solver++ sampling.

    The modules are shared, not copied: memory stays at one model.
    """
    from diffusers import StableDiffusionPipeline

    cls = pipeline_cls or StableDiffusionPipeline
    pipe = cls(
        unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer,
        scheduler=sampler_for(noise_scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_for(components, unet: nn.Module | None = None, text_encoders: Sequence[nn.Module] | None = None):
    """The base's own pipeline class around ``components`` (:class:`~hra_diffusion.models.SDComponents`):
    a StableDiffusionPipeline (SD 1.x/2.x, :func:`build_pipeline`) or a StableDiffusionXLPipeline (SDXL: both
    tokenizers and text encoders, no watermark), DPM-Solver++ sampling. ``unet`` / ``text_encoders`` replace
    the components' own (e.g. the training modules); nothing is copied.
    """
    unet = components.unet if unet is None else unet
    encoders = tuple(components.text_encoders if text_encoders is None else text_encoders)
    if components.family == "sd":
        return build_pipeline(unet, encoders[0], components.vae, components.tokenizer, components.noise_scheduler)
    from diffusers import StableDiffusionXLPipeline

    tokenizers = components.conditioner.tokenizers
    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet,
        scheduler=sampler_for(components.noise_scheduler),
        add_watermarker=False, **components.pipeline_config,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], num_images: int, seed: int, steps: int,
                    guidance_scale: float, resolution: int, autocast_dtype: torch.dtype | None = None,
                    **call_kwargs) -> list[list[Image.Image]]:
    """``num_images`` images per prompt; image i of every prompt uses seed ``seed + i`` (fixed across steps)."""
    device = pipe.unet.device
    rows = []
    for prompt in prompts:
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            out = pipe(
                [prompt] * num_images, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=generators, height=resolution, width=resolution, **call_kwargs,
            )
        rows.append(list(out.images))
    return rows
