"""What the Stable Diffusion trainer tasks share: the frozen components in their dtype, the UNet adapter,
prompt encoding and the UNet's conditioning, latent encoding and noising, the validation pipeline and the model
card's common facts.

The base's model_index.json decides the family (SD 1.x/2.x or SDXL, :mod:`hra_diffusion.conditioning`); the
tasks never branch on it: prompts go through ``self.cond`` (a :class:`PromptConditioner`) and every UNet call
takes ``**self._unet_kwargs(embeds, sizes)`` (SDXL's ``added_cond_kwargs`` from each image's size condition).

A task (:class:`~hra_diffusion.training.dreambooth.DreamBoothTask`,
:class:`~hra_diffusion.training.control_task.ControlTask`) subclasses :class:`StableDiffusionTask`, loads its
data first (bad data fails before any model is loaded), then calls :meth:`~StableDiffusionTask.load_base` and
:meth:`~StableDiffusionTask.add_unet_adapter`; :func:`~hra_diffusion.training.runner.run_task` runs it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .. import models
from ..adapters.peft_baselines import count_trainable
from ..conditioning import PromptConditioner, PromptEmbeds, SizeCondition
from ..models import SDComponents, load_sd_components, weight_dtype_for
from ..noise import NoisyBatch, add_noise, sample_latents
from ..sampling import pipeline_for, validation_sampler
from .card import adapter_facts
from .config import TrainConfig
from .trainer import TrainingTask, TrainResult

__all__ = ["StableDiffusionTask"]


class StableDiffusionTask(TrainingTask):
    """A :class:`TrainingTask` on a frozen Stable Diffusion pipeline with an adapter on its UNet.

    Subclasses set ``trainer`` (the entry script's name: the accelerate project, the adapter's ``trainer``
    metadata) and implement :meth:`write_card`.
    """

    trainer: ClassVar[str]
    sd: SDComponents
    cond: PromptConditioner  # the base family's prompt conditioning (self.sd.conditioner)

    def __init__(self, cfg: TrainConfig, accelerator) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.weight_dtype = weight_dtype_for(cfg.mixed_precision)
        self.autocast_dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> TrainConfig:
        """Complete and check ``cfg`` before anything is made (raise ConfigError naming the key)."""
        return cfg

    # ---- setup ---------------------------------------------------------------------------------
    def load_base(self) -> SDComponents:
        """The frozen components (SD 1.x/2.x or SDXL), cast to ``weight_dtype``, on the accelerator's device."""
        cfg = self.cfg
        self.sd = load_sd_components(cfg.pretrained_model, cfg.revision, cfg.variant, self.weight_dtype,
                                     cfg.pretrained_vae_model)
        self.cond = self.sd.conditioner
        for m in (self.sd.unet, self.sd.vae, *self.sd.text_encoders):
            m.to(self.accelerator.device)
        return self.sd

    def add_unet_adapter(self) -> None:
        """``cfg.adapter`` on the UNet (fp32 tensors on the cast base; ``unet_hra`` is None for a PEFT
        baseline), its trainable count, and gradient checkpointing if asked."""
        self.unet_hra = models.add_unet_adapter(self.sd.unet, self.cfg, "UNet")
        self.trainable_unet = count_trainable(self.sd.unet)
        if self.cfg.gradient_checkpointing:
            self.sd.unet.enable_gradient_checkpointing()

    # ---- pieces of the loss and of validation ---------------------------------------------------
    def _encode_prompts(self, prompts: Sequence[str], text_encoders: Sequence[nn.Module] | None = None) -> PromptEmbeds:
        """``prompts`` through the family's conditioning, with ``text_encoders`` (the wrapped training modules,
        so DDP syncs their gradients) or the frozen ones. Grad follows the caller's mode."""
        cond = self.cond if text_encoders is None else self.cond.using(text_encoders)
        return cond.encode(list(prompts))

    def _unet_kwargs(self, embeds: PromptEmbeds, sizes: Sequence[SizeCondition]) -> dict[str, Any]:
        """The UNet call's conditioning: ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs`` (the
        pooled text embedding and each image's time ids from its size condition)."""
        return self.cond.unet_kwargs(embeds, sizes)

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) of ``pixels``, fp32."""
        vae = self.sd.vae
        dist = vae.encode(pixels.to(self.accelerator.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _noisy_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Scaled latents drawn from (mean, std), noised at random timesteps, all from ``generator``."""
        latents = sample_latents(mean, std, generator, self.sd.vae.config.scaling_factor)
        return add_noise(self.sd.noise_scheduler, latents, generator)

    def _pipeline(self, unet: nn.Module, text_encoders: Sequence[nn.Module] | None = None):
        """The base's pipeline class (SD or SDXL) around the training modules (no copies) for validation images."""
        return pipeline_for(self.sd, unet, text_encoders)

    # ---- the model card -------------------------------------------------------------------------
    def _base_is_sdxl(self) -> bool:
        loaded = getattr(self, "sd", None)  # None: the base is not loaded (the card comes from cfg alone)
        return loaded is not None and loaded.family == "sdxl"

    def card_tags(self) -> list[str]:
        """Front-matter tags naming the base family (the hub lists SDXL adapters under stable-diffusion-xl)."""
        return ["stable-diffusion-xl"] if self._base_is_sdxl() else []

    def card_facts(self, result: TrainResult, data: dict, model: dict, run: dict | None = None) -> dict:
        """The card's settings table: base model, ``data``, the UNet adapter, ``model``, the schedule,
        ``run``, seed and time (in that order)."""
        cfg = self.cfg
        _, adapter_fact, _ = adapter_facts(cfg, self.trainable_unet)
        family = " (SDXL)" if self._base_is_sdxl() else ""
        vae = {"VAE": f"`{cfg.pretrained_vae_model}` (not the base's)"} if cfg.pretrained_vae_model else {}
        return {
            "base model": f"`{cfg.pretrained_model}`" + (f" @ {cfg.revision}" if cfg.revision else "") + family,
            **vae,
            **data,
            "adapter": adapter_fact,
            **model,
            "steps": f"{result.global_step} (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps} "
                     f"x {self.accelerator.num_processes} process(es))",
            "optimizer": f"{'8-bit ' if cfg.use_8bit_adam else ''}AdamW lr {cfg.learning_rate}, {cfg.lr_scheduler} "
                         f"(warm-up {cfg.lr_warmup_steps}), wd {cfg.adam_weight_decay}, clip {cfg.max_grad_norm}",
            "resolution": cfg.resolution,
            "mixed precision": cfg.mixed_precision,
            **(run or {}),
            "seed": cfg.seed,
            "training time": f"{result.seconds:.0f} s"
                             + (f" (resumed from {result.resumed_from.name})" if result.resumed_from else ""),
        }

    def card_pipeline_lines(self, imports: str = "") -> str:
        """The usage snippet's first lines: import (then ``imports``) and load the base's pipeline class, with
        the separate VAE when one was trained with, and the sampler the run validated with."""
        cfg, cls = self.cfg, self.sd.pipeline_class_name
        sampler = validation_sampler(cfg)[1]
        if not cfg.pretrained_vae_model:
            lines = (f"from diffusers import {sampler}, {cls}\n{imports}\n"
                     f"pipe = {cls}.from_pretrained({cfg.pretrained_model!r})\n")
        else:
            lines = (f"from diffusers import AutoencoderKL, {sampler}, {cls}\n{imports}\n"
                     f"vae = AutoencoderKL.from_pretrained({cfg.pretrained_vae_model!r})\n"
                     f"pipe = {cls}.from_pretrained({cfg.pretrained_model!r}, vae=vae)\n")
        return lines + f"pipe.scheduler = {sampler}.from_config(pipe.scheduler.config)  # as validation sampled\n"

    def card_sampling_args(self) -> str:
        """The pipeline call's sampling arguments, as validation used them."""
        cfg = self.cfg
        return f"num_inference_steps={cfg.validation_inference_steps}, guidance_scale={cfg.validation_guidance_scale:g}"

    @abstractmethod
    def write_card(self, result: TrainResult) -> Path:
        """Write ``<output_dir>/README.md`` for the trained adapter (main process only)."""
