"""The diffusion training loss (noisy latents and the scheduler's target: :mod:`hra_diffusion.noise`), prior
preservation, λ·orthogonality.

L = ||ε̂ - y||² (instance half) + w · ||ε̂ - y||² (class half) + λ Σ ||I - ÛᵀÛ||_F²,
(with subject masks, the instance half is a weighted mean: 1 + mask_loss_weight on the subject's pixels),
with y = ε (epsilon), v = α_t ε - σ_t x₀ (v_prediction) or x₀ (sample), as the scheduler config says.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.model import orthogonality_loss

__all__ = ["denoising_loss", "pixel_weights", "with_orthogonality"]


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
