"""The diffusion training loss: noisy latents, the scheduler's target, prior preservation, λ·orthogonality.

L = ||ε̂ - y||² (instance half) + w · ||ε̂ - y||² (class half) + λ Σ ||I - ÛᵀÛ||_F²,
(with subject masks, the instance half is a weighted mean: 1 + mask_loss_weight on the subject's pixels),
with y = ε (epsilon), v = α_t ε - σ_t x₀ (v_prediction) or x₀ (sample), as the scheduler config says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.model import orthogonality_loss

__all__ = ["NoisyBatch", "add_noise", "diffusion_target", "denoising_loss", "pixel_weights", "with_orthogonality", "sample_latents"]


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


def pixel_weights(masks: torch.Tensor, latent_size: tuple[int, int], weight: float) -> torch.Tensor:
    """(B, 1, h, w) loss weights 1 + ``weight`` · coverage: ``masks`` (B, 1, H, W) in [0, 1] averaged over each
    latent pixel's footprint (area interpolation), so a latent pixel half on the subject gets 1 + weight/2."""
    coverage = F.interpolate(masks.float(), size=tuple(latent_size), mode="area")
    return 1.0 + weight * coverage


def _mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred, target)
    weights = weights.to(pred.device, pred.dtype)
    return ((pred - target) ** 2 * weights).mean() / weights.mean()  # a weighted mean: plain MSE's scale


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, num_prior: int = 0,
                   prior_loss_weight: float = 1.0,
                   instance_weights: torch.Tensor | None = None,
                   prior_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE on the instance part plus ``prior_loss_weight`` × MSE on the last ``num_prior`` rows (fp32).

    ``instance_weights`` (instance rows, 1, h, w) makes the instance part a per-pixel weighted mean (the masked
    loss: see :func:`pixel_weights`); ``prior_weights`` (prior rows, 1, h, w) the same for the prior part."""
    pred, target = pred.float(), target.float()
    if num_prior:
        n = pred.shape[0] - num_prior
        instance = _mse(pred[:n], target[:n], instance_weights)
        prior = _mse(pred[n:], target[n:], prior_weights)
        loss = instance + prior_loss_weight * prior
        return loss, {"loss_instance": instance.item(), "loss_prior": prior.item()}
    loss = _mse(pred, target, instance_weights)
    return loss, {"loss_instance": loss.item()}


def with_orthogonality(loss: torch.Tensor, models: list[nn.Module], orth_lambda: float) -> tuple[torch.Tensor, dict[str, float]]:
    """loss + λ Σ_models orthogonality_loss(model) (docs/method.md's regulariser); no-op for λ = 0."""
    if not orth_lambda:
        return loss, {}
    penalty = sum(orthogonality_loss(m) for m in models)
    return loss + orth_lambda * penalty, {"loss_orth": float(penalty.detach())}
