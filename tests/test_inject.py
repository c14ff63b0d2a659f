"""inject_hra / merge_hra on diffusers UNets (SD-1.5 shaped on the meta device, and a tiny real one)."""

import pytest
import torch
from tiny_models import tiny_unet, unet_inputs

from hra_diffusion import (
    CONTROL_TARGETS,
    HRAConfig,
    HRALayer,
    count_hra_parameters,
    disable_hra,
    hra_layers,
    inject_hra,
    merge_and_unload_hra,
    merge_hra,
    orthogonality_loss,
    unmerge_hra,
)


def sd15_unet_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768)  # diffusers defaults = SD 1.5 shapes


@pytest.mark.parametrize("r", [8, 4])
def test_sd15_unet_wraps_128_attention_projections(r):
    unet = sd15_unet_on_meta()
    names = inject_hra(unet, HRAConfig(r=r))
    assert len(names) == 128
    assert {n.rsplit(".", 2)[-2] if n.endswith("to_out.0") else n.rsplit(".", 1)[-1] for n in names} == {
        "to_q", "to_k", "to_v", "to_out",
    }
    assert sum(1 for n in names if ".attn1." in n) == 64 and sum(1 for n in names if ".attn2." in n) == 64
    assert count_hra_parameters(unet) == 99_456 * r
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == 99_456 * r  # everything else frozen
    if r == 8:
        assert trainable == 795_648


def test_control_targets_add_geglu_projection():
    unet = sd15_unet_on_meta()
    names = inject_hra(unet, HRAConfig(r=8, target_modules=list(CONTROL_TARGETS)))
    assert len(names) == 128 + 16
    assert sum(n.endswith("ff.net.0.proj") for n in names) == 16


def test_no_match_lists_existing_names():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="match no module") as err:
        inject_hra(unet, HRAConfig(target_modules=["q_proj"]))
    assert "to_q" in str(err.value)  # names that do exist are listed
    assert not any(True for _ in hra_layers(unet))


def test_suffix_match_is_on_dotted_names_and_exclude_works():
    unet = tiny_unet()
    names = inject_hra(unet, HRAConfig(r=4, target_modules=["to_q", "proj_in"], exclude_modules=["attn2.to_q"]))
    assert all(n.endswith(".to_q") or n.endswith(".proj_in") for n in names)
    assert not any(n.endswith("attn2.to_q") for n in names)
    assert any(n.endswith("attn1.to_q") for n in names)


@pytest.mark.slow
def test_injected_unet_equals_base_at_init_then_merges():
    unet = tiny_unet()
    args = unet_inputs(unet)
    with torch.no_grad():
        base_out = unet(*args).sample
    inject_hra(unet, HRAConfig(r=8, seed=0))
    with torch.no_grad():
        assert torch.allclose(unet(*args).sample, base_out, atol=1e-5)
    # train-like perturbation, then live vs merged
    with torch.no_grad():
        for _, layer in hra_layers(unet):
            layer.hra_u.add_(0.3 * torch.randn_like(layer.hra_u))
        live = unet(*args).sample
        with disable_hra(unet):
            assert torch.allclose(unet(*args).sample, base_out, atol=1e-5)
    assert not torch.allclose(live, base_out, atol=1e-3)
    # merge_hra is reversible: wrappers stay, forward is the base layer's, unmerge restores W
    weights = {n: layer.base_layer.weight.clone() for n, layer in hra_layers(unet)}
    merge_hra(unet)
    assert all(layer.merged for _, layer in hra_layers(unet))
    with torch.no_grad():
        merged = unet(*args).sample
    assert ((merged - live).norm() / live.norm()).item() < 1e-5
    unmerge_hra(unet)
    assert all(torch.allclose(layer.base_layer.weight, weights[n], atol=1e-5) for n, layer in hra_layers(unet))
    with torch.no_grad():
        assert ((unet(*args).sample - live).norm() / live.norm()).item() < 1e-5
    # merge_and_unload_hra folds in for good and puts the plain layers back
    merge_and_unload_hra(unet)
    assert not any(isinstance(m, HRALayer) for m in unet.modules())
    assert not any(".base_layer." in k for k in unet.state_dict())
    with torch.no_grad():
        unloaded = unet(*args).sample
    assert ((unloaded - live).norm() / live.norm()).item() < 1e-5


def test_orthogonality_loss_sums_layers_and_trains():
    unet = tiny_unet()
    inject_hra(unet, HRAConfig(r=4, seed=0, orth_lambda=1.0))
    loss = orthogonality_loss(unet)
    assert loss.item() > 0  # paired identity init: duplicate columns are far from orthogonal
    loss.backward()
    assert all(layer.hra_u.grad is not None for _, layer in hra_layers(unet))
    with pytest.raises(ValueError, match="no HRA layers"):
        orthogonality_loss(tiny_unet())


def test_double_injection_rejected_and_seed_reproducible():
    a, b = tiny_unet(), tiny_unet()
    inject_hra(a, HRAConfig(r=4, seed=7))
    inject_hra(b, HRAConfig(r=4, seed=7))
    for (_, la), (_, lb) in zip(hra_layers(a), hra_layers(b), strict=True):
        assert torch.equal(la.hra_u, lb.hra_u)
    with pytest.raises(ValueError, match="already has HRA layers"):
        inject_hra(a, HRAConfig(r=4))
