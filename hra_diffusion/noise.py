"""Forward diffusion: a VAE latent sample, noisy latents at random timesteps, and what the UNet must predict
(ε, v or x₀, from the scheduler's ``prediction_type``). Shared by the trainers' loss, the metrics' fixed-noise
loss and the tiny world's build."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NoisyBatch", "add_noise", "diffusion_target", "sample_latents"]


@dataclass
class NoisyBatch:
    noisy: torch.Tensor  # (B, 4, h, w)
    noise: torch.Tensor  # (B, 4, h, w)
    timesteps: torch.Tensor  # (B,) long
    target: torch.Tensor  # (B, 4, h, w)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None,
                   scaling_factor: float) -> torch.Tensor:
    """z = (μ + σ·n) · scaling_factor: a VAE latent sample drawn with ``generator`` (reproducible)."""
    n = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
    return (mean + std * n) * scaling_factor


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict, from ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config (epsilon, v_prediction, sample)")


def add_noise(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None) -> NoisyBatch:
    """Forward diffusion q(x_t | x_0) at uniform random timesteps (or the given noise/timesteps)."""
    b = latents.shape[0]
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return NoisyBatch(noisy, noise, timesteps, diffusion_target(scheduler, latents, noise, timesteps))
