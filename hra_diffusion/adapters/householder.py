"""Householder Reflection Adaptation maths, pure torch (derivations: docs/method.md).

Notation: U is (d, r), one column per reflection; H = H_1 H_2 ... H_r with H_i = I - 2 û_i û_iᵀ.
Nothing here builds a d x d matrix except :func:`dense_chain`, the reference used by tests.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "normalize_columns",
    "wy_factor",
    "gram_schmidt",
    "reflection_factors",
    "row_factors",
    "apply_h",
    "apply_h_transpose",
    "orthogonality_penalty",
    "dense_chain",
    "symmetric_init",
    "random_init",
]


def normalize_columns(u: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """û_i = u_i / ||u_i||, column-wise. (d, r) -> (d, r)."""
    return u / u.norm(dim=0, keepdim=True).clamp_min(eps)


def wy_factor(u_hat: torch.Tensor) -> torch.Tensor:
    """Compact WY factor T (r, r), upper-triangular, with H_1...H_r = I - Û T Ûᵀ.

    T⁻¹ = ½ I + strict_upper(ÛᵀÛ)  (docs/method.md, "The compact WY form").
    """
    r = u_hat.shape[1]
    gram = u_hat.transpose(0, 1) @ u_hat  # (r, r)
    eye = torch.eye(r, dtype=u_hat.dtype, device=u_hat.device)
    t_inv = 0.5 * eye + torch.triu(gram, diagonal=1)
    return torch.linalg.solve_triangular(t_inv, eye, upper=True)


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis Q (d, r) of span(U), nested like modified Gram-Schmidt (H = I - 2QQᵀ).

    QR gives the same nested spans as (modified) Gram-Schmidt; QQᵀ does not depend on column signs.
    """
    q, _ = torch.linalg.qr(u, mode="reduced")
    return q


def reflection_factors(u: torch.Tensor, apply_gs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Û, T) such that H = I - Û T Ûᵀ; with Gram-Schmidt, Û = Q and T = 2 I."""
    if apply_gs:
        q = gram_schmidt(u)
        eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
        return q, 2.0 * eye
    u_hat = normalize_columns(u)
    return u_hat, wy_factor(u_hat)


class _RowFactors(torch.autograd.Function):
    """(a, c) = (Ûᵀ, Tᵀ Ûᵀ) in one autograd node, with the hand-derived backward below.

    Autograd over the ~12 small ops of the forward would record ~20 nodes; on a CPU their fixed
    per-op cost is comparable to the rank-r matmuls themselves. Backward, with M = T⁻¹:
      c = Tᵀa:          ∂a += T ∂c,   ∂T = a ∂cᵀ
      T = M⁻¹:          ∂M = -Tᵀ ∂T Tᵀ
      M = ½I + triu(G,1), G = a aᵀ:   ∂G = triu(∂M, 1),   ∂a += (∂G + ∂Gᵀ) a
      a = v / ||v|| (rows, v = uᵀ):   ∂v = (∂a - <∂a, a> a) / ||v||
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=u.device.type, enabled=False):
            v = u.transpose(0, 1)  # (r, d)
            norm = v.norm(dim=1, keepdim=True).clamp_min_(1e-12)  # (r, 1)
            a = (v / norm).contiguous()
            t = wy_factor(a.transpose(0, 1))  # (r, r)
            c = t.transpose(0, 1) @ a
        ctx.save_for_backward(a, t, norm)
        return a, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_a: torch.Tensor | None, grad_c: torch.Tensor | None) -> torch.Tensor:
        a, t, norm = ctx.saved_tensors
        with torch.autocast(device_type=a.device.type, enabled=False):
            ga = torch.zeros_like(a) if grad_a is None else grad_a.to(a.dtype)
            if grad_c is not None:
                gc = grad_c.to(a.dtype)
                ga = ga + t @ gc
                gm = -(t.transpose(0, 1) @ (a @ gc.transpose(0, 1)) @ t.transpose(0, 1))
                gg = torch.triu(gm, diagonal=1)
                ga = ga + (gg + gg.transpose(0, 1)) @ a
            gv = (ga - (ga * a).sum(dim=1, keepdim=True) * a) / norm
        return gv.transpose(0, 1)


def row_factors(u: torch.Tensor, apply_gs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c), both (r, d) contiguous, with a = Ûᵀ and c = Tᵀ Ûᵀ, so that Hᵀ = I - aᵀ c and H = I - cᵀ a.

    The row layout is LoRA's ``lora_A`` layout, which BLAS handles far better than (d, r) for
    ``F.linear(x, a)``. One pair serves every cheap form:
      input side    x Hᵀ = x - (x aᵀ) c
      adaptive LoRA W H  = W - (W cᵀ) a,   so y = base(x) - (x aᵀ)(c Wᵀ)
    """
    if apply_gs:  # T = 2 I, so c = 2 a
        q, _ = reflection_factors(u, apply_gs=True)
        a = q.transpose(0, 1).contiguous()
        return a, 2.0 * a
    return _RowFactors.apply(u)


def apply_h(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """W H for W (d_out, d), as W - (W cᵀ) a; O(d_out d r). Used by merge."""
    a, c = row_factors(u, apply_gs)
    return weight - (weight @ c.transpose(0, 1)) @ a


def apply_h_transpose(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """W Hᵀ = W H⁻¹ (H orthogonal), as W - (W aᵀ) c. Used by unmerge."""
    a, c = row_factors(u, apply_gs)
    return weight - (weight @ a.transpose(0, 1)) @ c


def orthogonality_penalty(u: torch.Tensor) -> torch.Tensor:
    """||I_r - ÛᵀÛ||_F² for one layer (the paper's regulariser, squared Frobenius norm)."""
    u_hat = normalize_columns(u)
    gram = u_hat.transpose(0, 1) @ u_hat
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (eye - gram).pow(2).sum()


def dense_chain(u: torch.Tensor, apply_gs: bool = False) -> torch.Tensor:
    """Reference only (tests): the dense d x d product H_1 H_2 ... H_r, or I - 2QQᵀ with Gram-Schmidt."""
    d, r = u.shape
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    if apply_gs:
        q = gram_schmidt(u)
        return eye - 2.0 * q @ q.transpose(0, 1)
    u_hat = normalize_columns(u)
    h = eye
    for i in range(r):
        ui = u_hat[:, i : i + 1]
        h = h - 2.0 * (h @ ui) @ ui.transpose(0, 1)
    return h


def random_init(d: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming-uniform (a=√5) columns, like nn.Linear / PEFT, as a (d, r) tensor."""
    u = torch.empty(d, r)
    # kaiming_uniform_ on a (d, r) tensor uses fan_in = r; reproduce it with an explicit generator.
    bound = math.sqrt(6.0 / ((1 + 5.0) * r))
    return u.uniform_(-bound, bound, generator=generator)


def symmetric_init(d: int, r: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """r/2 random columns each repeated twice, so u_{2k-1} = u_{2k} and H = I exactly (needs r even)."""
    if r % 2:
        raise ValueError(f"symmetric (identity) init needs an even r, got r={r}")
    half = random_init(d, r // 2, generator)
    return torch.repeat_interleave(half, 2, dim=1)
