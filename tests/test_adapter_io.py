"""save/load round trips, PEFT interop both ways, merged diffusers export."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_pipeline_dir, tiny_unet, unet_inputs

from hra_diffusion import (
    HRAConfig,
    export_merged,
    export_peft,
    hra_layers,
    inject_hra,
    load_adapter,
    merge_hra,
    read_adapter,
    save_adapter,
)
from hra_diffusion.utils import atomic_directory

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]  # conv1: the resnets' 3x3 convs


def perturbed(unet, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in hra_layers(unet):
            layer.hra_u.add_(scale * torch.randn(layer.hra_u.shape, generator=g))
    return unet


def run(unet):
    with torch.no_grad():
        return unet(*unet_inputs(unet)).sample


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_save_load_round_trip_is_exact(tmp_path):
    unet = tiny_unet()
    inject_hra(unet, HRAConfig(r=4, target_modules=TARGETS, orth_lambda=1e-5, seed=1))
    perturbed(unet)
    save_adapter(unet, tmp_path / "a", base_model="tiny-from-config", base_model_revision="abc")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert doc["hra"]["r"] == 4 and doc["hra"]["orth_lambda"] == 1e-5 and doc["hra"]["apply_gs"] is False
    assert doc["hra"]["target_modules"] == TARGETS
    assert doc["base_model"] == "tiny-from-config" and doc["base_model_revision"] == "abc"
    assert doc["library_version"]
    some = next(iter(doc["layers"].values()))
    assert {"type", "in_features", "out_features", "d", "r"} <= set(some)
    assert any(v["type"] == "conv2d" and v["kernel_size"] == [3, 3] for v in doc["layers"].values())
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(k.endswith(".hra_u") for k in tensors)  # only adapter tensors
    assert sum(t.numel() for t in tensors.values()) == doc["trainable_parameters"]

    fresh = tiny_unet()
    names = load_adapter(fresh, tmp_path / "a")
    assert names == [n for n, _ in hra_layers(unet)]
    for (_, a), (_, b) in zip(hra_layers(unet), hra_layers(fresh), strict=True):
        assert torch.equal(a.hra_u, b.hra_u)
    assert torch.equal(run(fresh), run(unet))


def test_load_into_mismatched_model_names_first_layer(tmp_path):
    unet = tiny_unet(cross_attention_dim=32)
    inject_hra(unet, HRAConfig(r=4))
    save_adapter(unet, tmp_path / "a")
    other = tiny_unet(cross_attention_dim=48)  # attn2.to_k / to_v take 48-d inputs
    with pytest.raises(ValueError, match=r"attn2\.to_k.*\(32, 4\).*48"):
        load_adapter(other, tmp_path / "a")
    injected_other = tiny_unet(cross_attention_dim=48)
    inject_hra(injected_other, HRAConfig(r=4))
    with pytest.raises(ValueError, match=r"attn2\.to_k"):
        load_adapter(injected_other, tmp_path / "a")


def test_bad_adapter_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_unet(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_unet(), tmp_path / "empty")
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "adapter_config.json").write_text(json.dumps({"peft_type": "HRA", "r": 8}))
    (tmp_path / "pkl" / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_adapter(tiny_unet(), tmp_path / "pkl")
    unet = tiny_unet()
    with pytest.raises(ValueError, match="no HRA layers"):
        save_adapter(unet, tmp_path / "x")


def test_atomic_directory_keeps_previous_on_crash(tmp_path):
    unet = tiny_unet()
    inject_hra(unet, HRAConfig(r=4))
    save_adapter(unet, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "a") as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind
    read_adapter(tmp_path / "a")


def test_atomic_directory_gets_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "shared") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_extra_tensors_round_trip(tmp_path):
    unet = tiny_unet()
    inject_hra(unet, HRAConfig(r=4))
    extra = {"condition_encoder.w": torch.randn(3, 3)}
    save_adapter(unet, tmp_path / "a", extra_tensors=extra, condition_encoder={"channels": 3})
    doc, u, extras = read_adapter(tmp_path / "a")
    assert doc["condition_encoder"] == {"channels": 3} and doc["extra_tensors"] == ["condition_encoder.w"]
    assert torch.equal(extras["condition_encoder.w"], extra["condition_encoder.w"])
    assert len(u) == len(list(hra_layers(unet)))


# ---- PEFT interoperability ---------------------------------------------------------------------
peft = pytest.importorskip("peft")


def peft_unet(base, r=4, targets=TARGETS):
    from peft import HRAConfig as PeftHRAConfig
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(base), PeftHRAConfig(r=r, target_modules=targets))


def test_same_u_gives_peft_outputs():
    base = tiny_unet()
    ours = copy.deepcopy(base)
    inject_hra(ours, HRAConfig(r=4, target_modules=TARGETS))
    perturbed(ours)
    theirs = peft_unet(base)
    peft_params = {n: p for n, p in theirs.named_parameters() if "hra_u" in n}
    assert len(peft_params) == len(list(hra_layers(ours)))
    with torch.no_grad():
        for name, layer in hra_layers(ours):
            peft_params[f"base_model.model.{name}.hra_u.default"].copy_(layer.hra_u)
    assert rel(run(ours), run(theirs)) <= 1e-5


def test_export_to_peft_then_peft_loads_it(tmp_path):
    from peft import PeftModel

    base = tiny_unet()
    ours = copy.deepcopy(base)
    inject_hra(ours, HRAConfig(r=4, target_modules=TARGETS))
    perturbed(ours)
    export_peft(ours, tmp_path / "peft", base_model_name_or_path="tiny")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and k.endswith(".hra_u") for k in keys)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert rel(run(loaded), run(ours)) <= 1e-5


def test_peft_saved_adapter_loads_into_ours(tmp_path):
    base = tiny_unet()
    theirs = peft_unet(base)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "hra_u" in n:
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    names = load_adapter(ours, tmp_path / "peft")
    assert len(names) == len(list(hra_layers(ours))) > 0
    assert rel(run(ours), run(theirs)) <= 1e-5


# ---- merged export -------------------------------------------------------------------------------
def test_merged_export_loads_in_stock_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base_dir = tiny_pipeline_dir(tmp_path / "base")
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    inject_hra(unet, HRAConfig(r=4, target_modules=TARGETS))
    perturbed(unet)
    live = run(unet)
    export_merged(unet, tmp_path / "merged_unet")
    assert any(isinstance(m, torch.nn.Module) for _, m in hra_layers(unet))  # model untouched
    # a stock pipeline, without hra_diffusion involved
    pipe = StableDiffusionPipeline.from_pretrained(
        base_dir, unet=UNet2DConditionModel.from_pretrained(tmp_path / "merged_unet")
    )
    assert rel(run(pipe.unet), live) < 1e-5
    images = pipe("a", num_inference_steps=2, output_type="np", height=32, width=32).images
    assert images.shape == (1, 32, 32, 3)
    # merging in place gives the same weights as the export
    merge_hra(unet)
    assert rel(run(unet), live) < 1e-5
    # exporting an already merged model folds H in once, not twice
    export_merged(unet, tmp_path / "merged_again")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "merged_again")
    assert rel(run(again), live) < 1e-5


# ---- trained biases (PEFT's hra_bias="hra_only") ----------------------------------------------
def with_bias_shift(unet, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in hra_layers(unet):
            if layer.hra_bias is not None:
                layer.hra_bias.add_(scale * torch.randn(layer.hra_bias.shape, generator=g))
    return unet


def test_bias_shift_round_trips_and_merges(tmp_path):
    """The shift starts at zero (model = base), is off with the adapter disabled (the base for prior preservation,
    unlike PEFT, whose disabled adapter keeps the trained bias), folds into the bias on merge and back out."""
    from hra_diffusion import disable_hra, unmerge_hra
    from hra_diffusion.adapters.io import merged_state_dict, read_adapter_biases

    base = tiny_unet()
    ours = copy.deepcopy(base)
    inject_hra(ours, HRAConfig(r=4, target_modules=TARGETS, train_bias=True))
    shifted = [n for n, layer in hra_layers(ours) if layer.hra_bias is not None]
    assert shifted and any(layer.hra_bias is None for _, layer in hra_layers(ours))  # to_q/k/v have no bias
    assert rel(run(ours), run(base)) <= 1e-6
    with_bias_shift(perturbed(ours))
    want = run(ours)
    with disable_hra(ours):
        assert rel(run(ours), run(base)) <= 1e-6
    merge_hra(ours)
    assert rel(run(ours), want) <= 1e-5
    unmerge_hra(ours)
    assert rel(run(ours), want) <= 1e-6
    save_adapter(ours, tmp_path / "a")
    assert sorted(read_adapter_biases(tmp_path / "a")) == sorted(shifted)
    loaded = copy.deepcopy(base)
    load_adapter(loaded, tmp_path / "a")
    assert rel(run(loaded), want) <= 1e-6
    plain = copy.deepcopy(base)  # a model already adapted without biases takes the file's shifts too
    inject_hra(plain, HRAConfig(r=4, target_modules=TARGETS))
    load_adapter(plain, tmp_path / "a")
    assert rel(run(plain), want) <= 1e-6
    merged = copy.deepcopy(base)
    merged.load_state_dict(merged_state_dict(ours))
    assert rel(run(merged), want) <= 1e-5


def test_peft_hra_only_biases_both_ways(tmp_path):
    """PEFT's bias="hra_only" files hold the trained bias itself: read as a shift from the model's bias (before, such
    biases were silently dropped); our export writes them the same way and PEFT reproduces our outputs."""
    from peft import HRAConfig as PeftHRAConfig
    from peft import PeftModel, get_peft_model

    base = tiny_unet()
    theirs = get_peft_model(copy.deepcopy(base), PeftHRAConfig(r=4, target_modules=TARGETS, bias="hra_only"))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    assert any(k.endswith(".base_layer.bias") for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "peft")
    assert rel(run(ours), run(theirs)) <= 1e-5
    export_peft(ours, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["bias"] == "hra_only"
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    assert rel(run(again), run(theirs)) <= 1e-5
