"""Controllable generation the OFT/HRA way (their official code; docs/control.md): a small condition encoder whose output is
added to the UNet's conv_in output, while the frozen UNet is tuned with HRA.

The encoder is diffusers' ControlNetConditioningEmbedding (last conv zero-initialised, so the model
equals the base at step 0). It is attached with a forward hook on ``unet.conv_in``; the hook tiles the
condition over the classifier-free-guidance batch, so both branches get the control.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


def _embedding_class():
    """diffusers' ControlNetConditioningEmbedding, imported on first use (the controlnets package costs seconds)."""
    try:  # diffusers >= 0.29
        from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
    except ImportError:  # older diffusers
        from diffusers.models.controlnet import ControlNetConditioningEmbedding
    return ControlNetConditioningEmbedding

__all__ = [
    "build_condition_encoder",
    "default_block_out_channels",
    "ConditionHandle",
    "attach_condition_encoder",
    "ControlledUNet",
    "prepare_condition",
]

_SD_CHANNELS = (16, 32, 96, 256)  # the official encoder for a VAE that downsamples 8x


def default_block_out_channels(vae_scale_factor: int = 8) -> tuple[int, ...]:
    """Channels of the encoder's stages: one stride-2 conv per VAE halving, (16, 32, 96, 256) for SD."""
    steps = int(round(math.log2(vae_scale_factor)))
    if 2**steps != vae_scale_factor or not 0 <= steps <= 3:
        raise ValueError(f"vae_scale_factor must be 1, 2, 4 or 8, got {vae_scale_factor}")
    return _SD_CHANNELS[: steps + 1]


def build_condition_encoder(
    unet: nn.Module,
    block_out_channels: Sequence[int] | None = None,
    vae_scale_factor: int = 8,
    conditioning_channels: int = 3,
) -> nn.Module:
    """The condition encoder for ``unet``: image (B, c, H, W) -> (B, conv_in channels, H/f, W/f)."""
    channels = tuple(block_out_channels or default_block_out_channels(vae_scale_factor))
    encoder = _embedding_class()(
        conditioning_embedding_channels=unet.conv_in.out_channels,
        conditioning_channels=conditioning_channels,
        block_out_channels=channels,
    )
    encoder.hra_condition_config = {
        "conditioning_embedding_channels": unet.conv_in.out_channels,
        "conditioning_channels": conditioning_channels,
        "block_out_channels": list(channels),
    }
    return encoder


class ConditionHandle:
    """A forward hook on ``unet.conv_in`` that adds ``encoder(condition)`` to its output."""

    def __init__(self, unet: nn.Module, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.condition: torch.Tensor | None = None
        self._cache: tuple[int, torch.Tensor] | None = None
        self._hook = unet.conv_in.register_forward_hook(self._add_condition)

    def set_condition(self, condition: torch.Tensor | None) -> None:
        """condition: (B, c, H, W) in [0, 1], one per generated image (not per CFG branch)."""
        self.condition = condition
        self._cache = None

    def remove(self) -> None:
        self._hook.remove()

    def _embed(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        assert self.condition is not None
        cond = self.condition.to(device=device, dtype=next(self.encoder.parameters()).dtype)
        if torch.is_grad_enabled() and self.encoder.training:
            return self.encoder(cond).to(dtype)
        # sampling: the condition is fixed across denoising steps, embed it once
        if self._cache is None or self._cache[0] != id(self.condition):
            with torch.no_grad():
                self._cache = (id(self.condition), self.encoder(cond))
        return self._cache[1].to(dtype)

    def _add_condition(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self.condition is None:
            raise RuntimeError(
                "this UNet has a condition encoder attached but no condition was set; "
                "call handle.set_condition(images) before generating"
            )
        emb = self._embed(output.dtype, output.device)  # (B, C, h, w)
        if emb.shape[-2:] != output.shape[-2:]:
            raise ValueError(
                f"condition embedding has spatial size {tuple(emb.shape[-2:])} but the UNet's latent is "
                f"{tuple(output.shape[-2:])}: give condition images at the generation resolution"
            )
        if output.shape[0] != emb.shape[0]:
            if output.shape[0] % emb.shape[0]:
                raise ValueError(
                    f"{emb.shape[0]} condition image(s) for a UNet batch of {output.shape[0]}: "
                    "give one condition per generated image"
                )
            emb = emb.repeat(output.shape[0] // emb.shape[0], 1, 1, 1)  # CFG: same control, both branches
        return output + emb


def attach_condition_encoder(unet: nn.Module, encoder: nn.Module) -> ConditionHandle:
    """Attach ``encoder`` to ``unet`` (e.g. inside a StableDiffusionPipeline); returns the handle."""
    return ConditionHandle(unet, encoder)


class ControlledUNet(nn.Module):
    """UNet + condition encoder as one module, so one DDP wrapper and one optimizer cover both."""

    def __init__(self, unet: nn.Module, condition_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.condition_encoder = condition_encoder
        self._handle = ConditionHandle(unet, condition_encoder)

    def forward(self, sample, timestep, encoder_hidden_states, condition: torch.Tensor, **kwargs):
        self._handle.set_condition(condition)
        try:
            return self.unet(sample, timestep, encoder_hidden_states, **kwargs)
        finally:
            self._handle.set_condition(None)


def prepare_condition(
    images: Sequence[Image.Image] | Image.Image, height: int, width: int
) -> torch.Tensor:
    """PIL condition image(s) -> (B, 3, height, width) float in [0, 1], RGB, bilinear-resized."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [
        np.asarray(img.convert("RGB").resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
        for img in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
