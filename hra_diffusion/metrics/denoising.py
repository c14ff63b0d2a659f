"""Fixed-noise denoising loss on a set of images: the learning signal behind the trainers' tests and docs.

L = mean over images, timesteps and noise draws of ||ε̂(x_t, t, c) - y||², with x₀ the VAE latent mean,
and the noise and timesteps fixed by a seed, so base and adapted models are compared on equal terms.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..images import ImageTransform, load_rgb
from ..noise import add_noise
from ..utils import stream_seed

__all__ = ["fixed_noise_loss", "DEFAULT_EVAL_TIMESTEPS"]

DEFAULT_EVAL_TIMESTEPS = (50, 200, 400, 600, 800)


@torch.no_grad()
def fixed_noise_loss(
    unet, vae, text_encoder, tokenizer, scheduler, images: Sequence[str | os.PathLike], prompt: str,
    resolution: int, seed: int = 0, timesteps: Sequence[int] = DEFAULT_EVAL_TIMESTEPS, draws: int = 2,
) -> float:
    """Mean denoising MSE of ``unet`` on ``images`` captioned ``prompt`` (centre crop, no flip)."""
    device = next(unet.parameters()).device
    dtype = next(vae.parameters()).dtype
    transform = ImageTransform(resolution, center_crop=True, random_flip=False)
    pixels = torch.stack([transform(load_rgb(p)) for p in images]).to(device, dtype)
    latents = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor  # (N, 4, h, w)
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    states = text_encoder(ids)[0]  # (1, L, C)
    total, count = 0.0, 0
    for t in timesteps:
        for k in range(draws):
            g = torch.Generator().manual_seed(stream_seed(seed, "eval", t, k))
            noisy = add_noise(scheduler, latents, g, timesteps=torch.full((len(images),), int(t)))
            cond = states.expand(len(images), -1, -1).to(unet.dtype if unet.dtype != torch.float32 else states.dtype)
            pred = unet(noisy.noisy.to(cond.dtype), noisy.timesteps, cond).sample.float()
            total += torch.mean((pred - noisy.target.float()) ** 2).item() * len(images)
            count += len(images)
    return total / count
