"""Condition encoder: zero-init equals base, CFG tiling, save/load, training through ControlledUNet."""

import pytest
import torch
from tiny_models import tiny_unet, unet_inputs

from hra_diffusion import CONTROL_TARGETS, HRAConfig, inject_hra
from hra_diffusion.control import (
    ControlledUNet,
    attach_condition_encoder,
    build_condition_encoder,
    default_block_out_channels,
    load_control_adapter,
    save_control_adapter,
)


def test_default_channels_follow_vae_factor():
    assert default_block_out_channels(8) == (16, 32, 96, 256)
    assert default_block_out_channels(2) == (16, 32)
    with pytest.raises(ValueError, match="vae_scale_factor"):
        default_block_out_channels(3)


def test_zero_init_equals_base_and_tiles_over_cfg_batch():
    unet = tiny_unet()
    sample, t, enc = unet_inputs(unet, batch=2)
    with torch.no_grad():
        base = unet(sample, t, enc).sample
    inject_hra(unet, HRAConfig(r=4, target_modules=list(CONTROL_TARGETS)))
    encoder = build_condition_encoder(unet, vae_scale_factor=1)
    handle = attach_condition_encoder(unet, encoder)
    cond = torch.rand(1, 3, 16, 16)
    handle.set_condition(cond)  # one condition, UNet batch 2 (the CFG-doubled batch)
    with torch.no_grad():
        assert torch.allclose(unet(sample, t, enc).sample, base, atol=1e-6)
        torch.nn.init.normal_(encoder.conv_out.weight, std=0.1)
        handle.set_condition(cond)
        out = unet(sample, t, enc).sample
    assert not torch.allclose(out, base, atol=1e-4)
    handle.set_condition(torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match="one condition per generated image"):
        unet(sample, t, enc)
    handle.set_condition(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="generation resolution"):
        unet(sample, t, enc)
    handle.remove()
    with torch.no_grad():
        assert torch.allclose(unet(sample, t, enc).sample, base, atol=1e-6)


def test_controlled_unet_trains_both_and_round_trips(tmp_path):
    unet = tiny_unet()
    inject_hra(unet, HRAConfig(r=4, target_modules=list(CONTROL_TARGETS)))
    model = ControlledUNet(unet, build_condition_encoder(unet, vae_scale_factor=1))
    sample, t, enc = unet_inputs(unet, batch=2)
    cond = torch.rand(2, 3, 16, 16)
    model(sample, t, enc, cond).sample.pow(2).mean().backward()
    assert model.condition_encoder.conv_out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        expected = model(sample, t, enc, cond).sample
    save_control_adapter(unet, model.condition_encoder, tmp_path / "ctl", base_model="tiny")
    fresh = tiny_unet()
    names, encoder = load_control_adapter(fresh, tmp_path / "ctl")
    assert encoder is not None and len(names) > 0
    handle = attach_condition_encoder(fresh, encoder)
    handle.set_condition(cond)
    with torch.no_grad():
        assert torch.allclose(fresh(sample, t, enc).sample, expected, atol=1e-5)
