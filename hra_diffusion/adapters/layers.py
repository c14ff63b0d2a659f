"""HRA layers: wrap a frozen nn.Linear / nn.Conv2d and compute y = W H x + b cheaply.

Both exact cheap forms of docs/method.md are used, with a = Ûᵀ and c = Tᵀ Ûᵀ (r, d) (householder.row_factors):
    adaptive LoRA  W H = W - (W cᵀ) a    =>  y = base(x) - (x aᵀ)(c Wᵀ)      O(n r (d + d_out) + d_out d r)
    input side     x Hᵀ = x - (x aᵀ) c   =>  y = base(x - (x aᵀ) c)          O(n r d)
The Linear layer takes whichever needs fewer multiply-adds for the call (``form="auto"``): the adaptive-LoRA
form when the token count n is large, the input-side form when n is small (cross-attention K/V over 77 text
tokens, the 8x8 UNet levels), where the d_out d r product with W would dominate. No d x d matrix is built,
in forward or backward. The trainable tensor is ``hra_u`` (d, r), kept in fp32 whatever the base dtype; with
``train_bias`` also ``hra_bias`` (d_out), a shift of the base layer's bias: y = W H x + b + δ.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .householder import apply_h, apply_h_transpose, random_init, row_factors, symmetric_init

__all__ = ["HRALayer", "HRALinear", "HRAConv2d", "wrap_layer"]


class HRALayer(nn.Module):
    """Base class: holds the frozen ``base_layer``, the reflection vectors ``hra_u`` (d, r) and, with
    ``train_bias`` on a layer that has a bias, its trainable shift ``hra_bias`` (d_out, zero at init)."""

    adapter_prefix = "hra_u"
    bias_prefix = "hra_bias"

    def __init__(
        self,
        base_layer: nn.Module,
        d: int,
        r: int,
        apply_gs: bool = False,
        init_identity: bool = True,
        generator: torch.Generator | None = None,
        train_bias: bool = False,
    ) -> None:
        super().__init__()
        if r > d:
            raise ValueError(
                f"HRA rank r={r} exceeds the layer's input dimension d={d} "
                f"({type(base_layer).__name__}): at most d reflections are independent; use r <= {d}"
            )
        self.base_layer = base_layer
        self.r = r
        self.apply_gs = apply_gs
        self.merged = False
        self.disabled = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        u = symmetric_init(d, r, generator) if init_identity else random_init(d, r, generator)
        device = base_layer.weight.device
        self.hra_u = nn.Parameter(u.to(device=device, dtype=torch.float32))
        bias = getattr(base_layer, "bias", None)
        self.register_parameter("hra_bias", nn.Parameter(torch.zeros(bias.shape, device=device, dtype=torch.float32))
                                if train_bias and bias is not None else None)

    # ---- the maths shared by both layer types -------------------------------------------------
    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, c), each (r, d): Hᵀ = I - aᵀ c, from the fp32 adapter, cast to the compute dtype."""
        a, c = row_factors(self.hra_u, self.apply_gs)
        return a.to(dtype), c.to(dtype)

    def _flat_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_flat_weight(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def d(self) -> int:
        return self.hra_u.shape[0]

    def _shift(self, y: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """y + δ (the trained bias shift) along ``channel_dim``; y itself when the layer trains no bias."""
        if self.hra_bias is None:
            return y
        shape = [1] * y.ndim
        shape[channel_dim] = -1
        return y + self.hra_bias.to(y.dtype).reshape(shape)

    # ---- merge / unmerge ------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W H in the base layer's shape and dtype (computed in fp32), without changing the layer."""
        w = self._flat_weight()
        merged = apply_h(w.float(), self.hra_u.float(), self.apply_gs)
        return merged.to(w.dtype).reshape(self.base_layer.weight.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W <- W H. Forward then costs the base layer's."""
        if self.merged:
            return
        self.base_layer.weight.data.copy_(self.merged_weight())
        if self.hra_bias is not None:
            self.base_layer.bias.data.add_(self.hra_bias.to(self.base_layer.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: W <- W Hᵀ (exact in fp32; fp16/bf16 lose the rounding of one multiply)."""
        if not self.merged:
            return
        w = self._flat_weight()
        restored = apply_h_transpose(w.float(), self.hra_u.float(), self.apply_gs)
        self.base_layer.weight.data.copy_(restored.to(w.dtype).reshape(self.base_layer.weight.shape))
        if self.hra_bias is not None:
            self.base_layer.bias.data.sub_(self.hra_bias.to(self.base_layer.bias.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, apply_gs={self.apply_gs}, merged={self.merged}"
                + (", train_bias=True" if self.hra_bias is not None else ""))


class HRALinear(HRALayer):
    """y = W H x + b for a frozen nn.Linear W (d_out, d)."""

    def __init__(self, base_layer: nn.Linear, r: int, **kwargs) -> None:
        super().__init__(base_layer, base_layer.in_features, r, **kwargs)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.form = "auto"  # "auto" | "lora" | "input": which exact cheap form the forward uses

    def _flat_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        a, c = self._factors(x.dtype)  # (r, d) each
        n = x.numel() // self.in_features
        form = self.form
        if form == "auto":  # multiply-adds of forward + backward, see the module docstring
            lora_cost = 3 * n * (self.in_features + self.out_features) + 2 * self.in_features * self.out_features
            form = "input" if 6 * n * self.in_features <= lora_cost else "lora"
        xa = F.linear(x, a)  # (..., r)
        if form == "input":
            return self._shift(self.base_layer(x - xa @ c))  # base(x Hᵀ)
        w = self.base_layer.weight
        bt = F.linear(c.to(w.dtype), w).to(x.dtype)  # (r, d_out) = (W Û T)ᵀ
        return self._shift(self.base_layer(x) - xa @ bt)  # (..., d_out)


class HRAConv2d(HRALayer):
    """y = conv(x, W H) for a frozen nn.Conv2d, H acting on the flattened (in·kh·kw) patch, like PEFT.

    W H = W - (W Û) T Ûᵀ, so the delta is a rank-r conv (kernel Ûᵀ, the base's stride/padding) followed
    by a 1x1 conv with W Û T: the same cost as a LoRA conv.
    """

    def __init__(self, base_layer: nn.Conv2d, r: int, **kwargs) -> None:
        if base_layer.groups != 1:
            raise ValueError(
                f"HRA on a grouped Conv2d (groups={base_layer.groups}) is not supported: H acts on the "
                "whole flattened input patch. Leave this layer out of target_modules."
            )
        kh, kw = base_layer.kernel_size
        super().__init__(base_layer, base_layer.in_channels * kh * kw, r, **kwargs)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    def _flat_weight(self) -> torch.Tensor:
        return self.base_layer.weight.reshape(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (B, d_out, H', W')
        if self.merged or self.disabled:
            return result
        a, c = self._factors(x.dtype)  # (r, d) each, d = in·kh·kw
        kh, kw = self.base_layer.kernel_size
        xa = self.base_layer._conv_forward(x, a.reshape(self.r, self.in_features, kh, kw), None)  # (B, r, H', W')
        w = self._flat_weight()
        up = F.linear(c.to(w.dtype), w).to(x.dtype).transpose(0, 1)  # (d_out, r) = W Û T
        return self._shift(result - F.conv2d(xa, up.reshape(self.out_features, self.r, 1, 1)), 1)  # (B, d_out, H', W')


def wrap_layer(module: nn.Module, r: int, **kwargs) -> HRALayer:
    """Wrap a Linear or Conv2d in the matching HRA layer; anything else is a clear error."""
    if isinstance(module, nn.Linear):
        return HRALinear(module, r, **kwargs)
    if isinstance(module, nn.Conv2d):
        return HRAConv2d(module, r, **kwargs)
    raise TypeError(
        f"HRA wraps nn.Linear and nn.Conv2d layers, not {type(module).__name__}; "
        "remove this module from target_modules"
    )
