"""HRA maths and layers against the dense reference chain (method.md)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hra_diffusion import HRAConfig
from hra_diffusion.adapters.householder import (
    dense_chain,
    orthogonality_penalty,
    reflection_factors,
    symmetric_init,
)
from hra_diffusion.adapters.layers import HRAConv2d, HRALinear


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("apply_gs", [False, True])
def test_wy_form_equals_dense_chain(apply_gs):
    torch.manual_seed(0)
    u = torch.randn(40, 8)
    u_hat, t = reflection_factors(u, apply_gs)
    h_wy = torch.eye(40) - u_hat @ t @ u_hat.T
    assert rel_err(h_wy, dense_chain(u, apply_gs)) < 1e-6


@pytest.mark.parametrize("apply_gs", [False, True])
def test_h_is_orthogonal(apply_gs):
    torch.manual_seed(1)
    h = dense_chain(torch.randn(24, 6, dtype=torch.float64), apply_gs)
    assert torch.allclose(h @ h.T, torch.eye(24, dtype=torch.float64), atol=1e-12)


def test_chain_order_is_h1_first():
    """H = H_1 H_2 ... H_r: H_r touches x first (method.md)."""
    u = torch.randn(5, 2, dtype=torch.float64)
    u_hat = u / u.norm(dim=0)
    h1 = torch.eye(5, dtype=torch.float64) - 2 * u_hat[:, :1] @ u_hat[:, :1].T
    h2 = torch.eye(5, dtype=torch.float64) - 2 * u_hat[:, 1:] @ u_hat[:, 1:].T
    assert torch.allclose(dense_chain(u), h1 @ h2, atol=1e-12)
    assert not torch.allclose(dense_chain(u), h2 @ h1, atol=1e-6)


def test_symmetric_init_is_identity_and_odd_r_rejected():
    u = symmetric_init(32, 8)
    assert torch.equal(u[:, 0], u[:, 1]) and not torch.equal(u[:, 0], u[:, 2])
    assert torch.allclose(dense_chain(u), torch.eye(32), atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        HRAConfig(r=7)
    with pytest.raises(ValueError, match="even"):
        symmetric_init(32, 3)
    assert HRAConfig(r=7, init_identity=False).r == 7


def test_orthogonality_penalty():
    q, _ = torch.linalg.qr(torch.randn(16, 4))
    assert orthogonality_penalty(q * 3.0).item() < 1e-10  # orthogonal planes: 0 (scale-free)
    u = torch.ones(16, 2)  # identical planes: off-diagonals 1 -> 2
    assert orthogonality_penalty(u).item() == pytest.approx(2.0, abs=1e-6)


def _linear_ref(layer: HRALinear, x):
    base = layer.base_layer
    return F.linear(x, base.weight @ dense_chain(layer.hra_u, layer.apply_gs), base.bias)


def _conv_ref(layer: HRAConv2d, x):
    base = layer.base_layer
    w = base.weight.reshape(base.out_channels, -1) @ dense_chain(layer.hra_u, layer.apply_gs)
    return base._conv_forward(x, w.reshape(base.weight.shape), base.bias)


def _make(kind: str, apply_gs: bool):
    torch.manual_seed(2)
    if kind.startswith("linear"):
        layer = HRALinear(nn.Linear(48, 20), 8, apply_gs=apply_gs, init_identity=False)
        layer.form = kind.split("-")[1]
        x = torch.randn(3, 11, 48)
        return layer, x, _linear_ref
    if kind == "conv1x1":
        layer = HRAConv2d(nn.Conv2d(16, 12, 1), 8, apply_gs=apply_gs, init_identity=False)
    else:
        layer = HRAConv2d(nn.Conv2d(6, 10, 3, stride=2, padding=1), 8, apply_gs=apply_gs, init_identity=False)
    x = torch.randn(2, layer.base_layer.in_channels, 9, 9)
    return layer, x, _conv_ref


@pytest.mark.parametrize("kind", ["linear-lora", "linear-input", "linear-auto", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("apply_gs", [False, True])
def test_layer_matches_dense_reference_forward_and_grad(kind, apply_gs):
    layer, x, ref_fn = _make(kind, apply_gs)
    out = layer(x)
    ref = ref_fn(layer, x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5
    g = torch.randn_like(out)
    (grad_ours,) = torch.autograd.grad((out * g).sum(), layer.hra_u)
    (grad_ref,) = torch.autograd.grad((ref_fn(layer, x) * g).sum(), layer.hra_u)
    assert rel_err(grad_ours, grad_ref) <= 1e-4
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("form", ["lora", "input"])
def test_no_dxd_matrix_in_forward_or_backward(form):
    """No tensor autograd saves is d x d: the frozen W and the input are the largest things kept."""
    d, d_out, n, r = 512, 64, 10, 8
    layer = HRALinear(nn.Linear(d, d_out), r, init_identity=False)
    layer.form = form
    x = torch.randn(n, d)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert layer.hra_u.grad is not None
    assert max(sizes) <= max(d_out * d, n * d)
    assert d * d not in sizes and all(s < d * d for s in sizes)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_identity_at_init_equals_base(kind):
    torch.manual_seed(3)
    base = nn.Linear(32, 16) if kind == "linear" else nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 5, 32) if kind == "linear" else torch.randn(2, 4, 6, 6)
    expected = base(x)
    layer = (HRALinear if kind == "linear" else HRAConv2d)(base, 8)
    assert torch.allclose(layer(x), expected, atol=1e-6)


# dtype -> (forward tolerance merged vs live, unmerge restore tolerance), relative
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 3e-3)}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_merge_unmerge_per_dtype(dtype, kind):
    torch.manual_seed(4)
    if kind == "linear":
        base, x = nn.Linear(64, 32), torch.randn(4, 64)
        cls = HRALinear
    else:
        base, x = nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 7, 7)
        cls = HRAConv2d
    base = base.to(dtype)
    x = x.to(dtype)
    w0 = base.weight.detach().clone()
    layer = cls(base, 8, init_identity=False)
    assert layer.hra_u.dtype == torch.float32  # adapter stays fp32 on a low-precision base
    live = layer(x)
    assert live.dtype == dtype
    layer.merge()
    merged = layer(x)
    tol_fwd, tol_restore = TOLERANCES[dtype]
    assert rel_err(merged.float(), live.float()) <= tol_fwd
    assert rel_err(layer.base_layer.weight.float(), w0.float()) > 10 * tol_restore  # merge changed W
    layer.unmerge()
    assert rel_err(layer.base_layer.weight.float(), w0.float()) <= tol_restore
    assert rel_err(layer(x).float(), live.float()) <= tol_fwd


def test_auto_form_picks_the_cheaper_exact_form():
    layer = HRALinear(nn.Linear(768, 320), 8, init_identity=False)
    calls = []
    layer.base_layer.register_forward_pre_hook(lambda m, args: calls.append(args[0]))
    x_small, x_large = torch.randn(2, 77, 768), torch.randn(1, 4096, 768)
    layer(x_small)  # 154 text tokens: input-side form, base sees x Hᵀ
    assert not torch.equal(calls[-1], x_small)
    layer(x_large)  # many tokens: adaptive-LoRA form, base sees x untouched
    assert calls[-1] is x_large


def test_bad_layers_rejected():
    with pytest.raises(ValueError, match="exceeds the layer's input dimension"):
        HRALinear(nn.Linear(4, 8), 8)
    with pytest.raises(ValueError, match="grouped Conv2d"):
        HRAConv2d(nn.Conv2d(8, 8, 3, groups=2), 4)
    with pytest.raises(ValueError, match="positive integer"):
        HRAConfig(r=0)
    with pytest.raises(ValueError, match="orth_lambda"):
        HRAConfig(orth_lambda=-1)


def test_gram_schmidt_variant_does_not_start_at_identity():
    cfg = HRAConfig(r=4, apply_gs=True)
    assert cfg.init_identity is False  # documented: H = I - 2QQᵀ is never I
    layer = HRALinear(nn.Linear(16, 8), 4, apply_gs=True, init_identity=cfg.init_identity)
    x = torch.randn(3, 16)
    assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-3)
    assert torch.isfinite(layer(x)).all()


def test_fused_row_factors_gradcheck_and_match_reference():
    from hra_diffusion.adapters.householder import row_factors

    u = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: row_factors(x), (u,))
    assert torch.autograd.gradcheck(lambda x: row_factors(x)[1], (u,))  # one output unused
    a, c = row_factors(u)
    u_hat, t = reflection_factors(u)
    assert torch.allclose(a, u_hat.T) and torch.allclose(c, t.T @ u_hat.T)
