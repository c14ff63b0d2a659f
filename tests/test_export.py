"""`hra-diffusion export`: HRA as an exact LoRA (diffusers and kohya layouts), PEFT and merged exports.

The end-to-end check loads the exported files with stock diffusers in a subprocess that never imports
hra_diffusion, and compares its UNet and text-encoder outputs with the HRA model's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hra_diffusion.adapters.config import TEXT_ENCODER_TARGETS, HRAConfig
from hra_diffusion.adapters.export import (
    METADATA_KEY,
    base_family,
    export_adapter,
    kohya_module_name,
    lora_key,
)
from hra_diffusion.adapters.io import load_adapter, save_adapter
from hra_diffusion.adapters.model import inject_hra
from hra_diffusion.cli import main

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # conv1: 3x3 convs, proj_in: 1x1 convs


def _components(base: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch.float32).eval()
    return unet, te


def _inputs(unet, te) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    size = unet.config.sample_size
    return {
        "ids": torch.randint(0, 512, (2, te.config.max_position_embeddings), generator=g),
        "sample": torch.randn(2, unet.config.in_channels, size, size, generator=g),
        "t": torch.tensor([10, 700]),
    }


@torch.no_grad()
def _outputs(unet, te, inp) -> dict[str, torch.Tensor]:
    enc = te(inp["ids"])[0]
    return {"text": enc, "unet": unet(inp["sample"], inp["t"], enc).sample}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def hra_adapter(tiny_random_sd_dir, tmp_path_factory) -> Path:
    """A random (non-identity) HRA adapter on the UNet (Linear and Conv2d layers) plus a text-encoder part."""
    root = tmp_path_factory.mktemp("export") / "adapter"
    unet, te = _components(tiny_random_sd_dir)
    inject_hra(unet, HRAConfig(r=4, target_modules=UNET_TARGETS, init_identity=False, seed=0))
    inject_hra(te, HRAConfig(r=2, target_modules=list(TEXT_ENCODER_TARGETS), init_identity=False, seed=1))
    save_adapter(unet, root, base_model=str(tiny_random_sd_dir))
    save_adapter(te, root / "text_encoder", base_model=str(tiny_random_sd_dir))
    return root


@pytest.fixture(scope="module")
def hra_reference(tiny_random_sd_dir, hra_adapter):
    """(inputs, HRA outputs, base outputs) on the tiny pipeline."""
    unet, te = _components(tiny_random_sd_dir)
    inp = _inputs(unet, te)
    plain = _outputs(unet, te, inp)
    load_adapter(unet, hra_adapter)
    with torch.no_grad():
        unet_only = unet(inp["sample"], inp["t"], plain["text"]).sample  # the adapter without its text part
    load_adapter(te, hra_adapter / "text_encoder")
    return inp, {**_outputs(unet, te, inp), "unet_only": unet_only}, plain


STOCK_DIFFUSERS = textwrap.dedent("""
    import sys
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    base, inputs, out, *loras = sys.argv[1:]
    inp = load_file(inputs)
    outs = {}
    for i, lora in enumerate(loras):
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.load_lora_weights(lora)
        with torch.no_grad():
            enc = pipe.text_encoder(inp["ids"])[0]
            outs[f"{i}.text"] = enc
            outs[f"{i}.unet"] = pipe.unet(inp["sample"], inp["t"], enc).sample
    assert not any(m.startswith("hra_diffusion") for m in sys.modules), "hra_diffusion was imported"
    save_file(outs, out)
""")


def test_lora_and_kohya_load_in_stock_diffusers_and_reproduce_hra(tiny_random_sd_dir, hra_adapter, hra_reference,
                                                                 tmp_path):
    inp, want, plain = hra_reference
    assert _rel(plain["unet"], want["unet"]) > 1e-3 and _rel(plain["text"], want["text"]) > 1e-3  # non-trivial
    lora_dir, kohya_file = tmp_path / "lora", tmp_path / "kohya.safetensors"
    assert main(["export", "--adapter", str(hra_adapter), "--to", "lora", "--out", str(lora_dir)]) == 0
    assert main(["export", "--adapter", str(hra_adapter), "--to", "kohya", "--out", str(kohya_file)]) == 0
    unet_only = tmp_path / "unet-only"  # the same UNet adapter without a text_encoder/ part
    unet_only.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(hra_adapter / f, unet_only / f)
    unet_only_file = tmp_path / "unet-only.safetensors"
    assert main(["export", "--adapter", str(unet_only), "--to", "kohya", "--out", str(unet_only_file)]) == 0
    save_file({k: v.contiguous() for k, v in inp.items()}, str(tmp_path / "inputs.safetensors"))
    script = tmp_path / "stock.py"
    script.write_text(STOCK_DIFFUSERS)
    res = subprocess.run([sys.executable, str(script), str(tiny_random_sd_dir), str(tmp_path / "inputs.safetensors"),
                          str(tmp_path / "out.safetensors"), str(lora_dir), str(kohya_file), str(unet_only_file)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    for i in (0, 1):  # 0: diffusers layout, 1: kohya
        assert _rel(got[f"{i}.text"], want["text"]) <= 1e-5
        assert _rel(got[f"{i}.unet"], want["unet"]) <= 1e-5
    assert torch.equal(got["2.text"], plain["text"])  # no text-encoder keys: the text encoder is untouched
    assert _rel(got["2.unet"], want["unet_only"]) <= 1e-5


def test_export_records_its_source_and_base(tiny_random_sd_dir, hra_adapter, tmp_path):
    a = export_adapter(hra_adapter, "lora", tmp_path / "a")
    b = export_adapter(hra_adapter, "kohya", tmp_path / "b.safetensors", dtype="bf16")
    with safe_open(str(a), framework="pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float32
    assert a.name == "pytorch_lora_weights.safetensors"
    assert doc["method"] == "hra" and doc["format"] == "lora" and doc["exact_for_base"] is True
    assert doc["r"] == {"unet": 4, "text_encoder": 2}
    assert doc["base_model"] == str(tiny_random_sd_dir) and doc["source_adapter"] == str(hra_adapter.resolve())
    assert len(doc["base_weights_sha256"]) == 64
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    with safe_open(str(b), framework="pt") as f:
        doc_b = json.loads(f.metadata()[METADATA_KEY])
        alpha_key = next(k for k in f.keys() if k.endswith(".alpha"))
        assert f.get_tensor(alpha_key).dtype == torch.bfloat16
        down = next(k for k in f.keys() if k.endswith("conv1.lora_down.weight"))
        assert f.get_tensor(down).ndim == 4 and f.get_tensor(down.replace("down", "up")).shape[-2:] == (1, 1)
    assert "vae_model" not in doc
    import shutil

    with_vae = tmp_path / "with-vae"
    shutil.copytree(hra_adapter, with_vae)
    cfg_file = with_vae / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "vae_model": "madebyollin/sdxl-vae-fp16-fix"}))
    with safe_open(str(export_adapter(with_vae, "lora", tmp_path / "c")), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["vae_model"] == "madebyollin/sdxl-vae-fp16-fix"
    # the same base weights hash the same, whatever the output format and dtype
    assert doc_b["base_weights_sha256"] == doc["base_weights_sha256"] and doc_b["dtype"] == "bf16"
    # lora_B = -W Û T, so B A equals W H - W
    tensors = load_file(str(a))
    unet, _ = _components(tiny_random_sd_dir)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    w = unet.get_submodule(name).weight
    load_adapter(unet, hra_adapter)
    delta = tensors[lora_key("unet", name, "up")] @ tensors[lora_key("unet", name, "down")]
    assert torch.allclose(w + delta, unet.get_submodule(name).merged_weight(), atol=1e-6)


def test_merged_and_peft_exports(tiny_random_sd_dir, hra_adapter, hra_reference, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    inp, want, _ = hra_reference
    merged = export_adapter(hra_adapter, "merged", tmp_path / "merged")
    unet = UNet2DConditionModel.from_pretrained(merged).eval()
    te = CLIPTextModel.from_pretrained(merged / "text_encoder").eval()
    got = _outputs(unet, te, inp)
    assert _rel(got["text"], want["text"]) <= 1e-5 and _rel(got["unet"], want["unet"]) <= 1e-5
    peft = export_adapter(hra_adapter, "peft", tmp_path / "peft")  # no base needed
    assert json.loads((peft / "adapter_config.json").read_text())["peft_type"] == "HRA"
    unet2, te2 = _components(tiny_random_sd_dir)
    load_adapter(unet2, peft)
    load_adapter(te2, peft / "text_encoder")
    got = _outputs(unet2, te2, inp)
    assert _rel(got["unet"], want["unet"]) <= 1e-6


def test_sd15_key_names_map_through_diffusers_kohya_converter():
    """Every Linear/Conv2d of a real SD-1.5-shaped UNet and CLIP text encoder (on the meta device): the kohya
    names we write are mapped back to exactly those modules by diffusers' own kohya reader, none left over."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD 1.5's shapes
        te = CLIPTextModel(CLIPTextConfig())  # CLIP ViT-L/14's text tower, SD 1.5's text encoder
    layers = {c: [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
              for c, model in (("unet", unet), ("text_encoder", te))}
    assert len(layers["unet"]) == 282 and len(layers["text_encoder"]) == 12 * 6
    kohya = {}
    for component, names in layers.items():
        for n in names:
            key = kohya_module_name("sd", component, n)
            kohya.update({f"{key}.lora_down.weight": torch.zeros(1), f"{key}.lora_up.weight": torch.zeros(1),
                          f"{key}.alpha": torch.tensor(4.0)})
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))  # raises on any leftover key
    assert len(converted) == 2 * sum(len(n) for n in layers.values()) and len(alphas) == len(converted) // 2
    unet_sd = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items()
                                               if k.startswith("unet.")})
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
        {k[len("text_encoder."):]: v for k, v in converted.items() if k.startswith("text_encoder.")}))
    prefix = "" if hasattr(te, "text_model") else "text_model."
    mapped = {"unet": {k.rsplit(".lora_", 1)[0] for k in unet_sd},
              "text_encoder": {k.rsplit(".lora_", 1)[0].removeprefix(prefix) for k in te_sd}}
    for component, names in layers.items():
        assert mapped[component] == set(names), component
    # the names A1111 and ComfyUI look up for SD 1.x's CLIP (lora_te_text_model_encoder_layers_{i}_{layer})
    assert kohya_module_name("sd", "text_encoder", "encoder.layers.11.self_attn.out_proj") == \
        "lora_te_text_model_encoder_layers_11_self_attn_out_proj"
    assert kohya_module_name("sd", "unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0") == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0"
    # SDXL's kohya names are LDM paths (tests/test_sdxl.py maps a whole SDXL UNet through diffusers' reader)
    assert kohya_module_name("sdxl", "unet", "down_blocks.1.attentions.0.proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert kohya_module_name("sdxl", "text_encoder", "encoder.layers.0.mlp.fc1") == \
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    with pytest.raises(ValueError, match="no text_encoder_2"):
        kohya_module_name("sd", "text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")


def _cli_error(args: list[str], capsys) -> str:
    capsys.readouterr()  # drop what earlier calls printed (progress bars)
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hra-diffusion export: error: ")
    return err


def test_existing_output_needs_overwrite(hra_adapter, tmp_path, capsys):
    out = tmp_path / "k.safetensors"
    args = ["--adapter", str(hra_adapter), "--to", "kohya", "--out", str(out)]
    assert main(["export", *args]) == 0
    before = out.stat().st_mtime_ns
    assert "--overwrite" in _cli_error(args, capsys)
    assert out.stat().st_mtime_ns == before
    assert main(["export", *args, "--overwrite", "--dtype", "fp16"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert "one file" in _cli_error(["--adapter", str(hra_adapter), "--to", "kohya", "--out", str(tmp_path / "d")],
                                    capsys)


def test_wrong_base_shapes_name_the_layer(hra_adapter, tmp_path, capsys):
    from tiny_models import tiny_unet

    other = tmp_path / "other-unet"
    tiny_unet(cross_attention_dim=16).save_pretrained(other)  # attn2.to_k takes 16 wide inputs, not 32
    err = _cli_error(["--adapter", str(hra_adapter), "--to", "lora", "--base", str(other), "--out",
                      str(tmp_path / "x")], capsys)
    assert "attn2.to_k" in err and "different base model" in err and not (tmp_path / "x").exists()
    err = _cli_error(["--adapter", str(tmp_path / "missing"), "--to", "lora", "--out", str(tmp_path / "y")], capsys)
    assert "does not exist" in err


def test_peft_baselines_lora_converts_exactly_oft_is_refused(tiny_random_sd_dir, tmp_path, capsys):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from tiny_models import unet_inputs

    from hra_diffusion.adapters.peft_baselines import BaselineSpec, inject_baseline, save_peft_adapter

    unet, _ = _components(tiny_random_sd_dir)
    inject_baseline(unet, BaselineSpec("lora", r=2, lora_alpha=4, seed=0))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    save_peft_adapter(unet, tmp_path / "lora-adapter", base_model=str(tiny_random_sd_dir))
    peft = {k.removeprefix("base_model.model."): v
            for k, v in load_file(str(tmp_path / "lora-adapter" / "adapter_model.safetensors")).items()}
    lora = load_file(str(export_adapter(tmp_path / "lora-adapter", "lora", tmp_path / "l.safetensors")))
    kohya = load_file(str(export_adapter(tmp_path / "lora-adapter", "kohya", tmp_path / "k.safetensors")))
    assert set(lora) == {f"unet.{k}" for k in peft}
    for k, v in peft.items():  # alpha / r = 2 is folded into lora_B in diffusers' layout (no alpha there)
        assert torch.equal(lora[f"unet.{k}"], v * 2 if ".lora_B." in k else v)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert len(converted) == len(peft) and set(alphas.values()) == {4.0}
    # merged: the PEFT layers folded in, loadable by the stock UNet class
    from diffusers import UNet2DConditionModel

    merged = UNet2DConditionModel.from_pretrained(export_adapter(tmp_path / "lora-adapter", "merged",
                                                                 tmp_path / "merged")).eval()
    sample, t, enc = unet_inputs(unet, tokens=5)
    with torch.no_grad():
        want, got = unet(sample, t, enc).sample, merged(sample, t, enc).sample
    assert _rel(got, want) <= 1e-5
    unet2, _ = _components(tiny_random_sd_dir)
    with torch.no_grad():
        assert _rel(unet2(sample, t, enc).sample, want) > 1e-3  # the LoRA does change the output
    inject_baseline(unet2, BaselineSpec("oft", block_size=8, seed=0))
    save_peft_adapter(unet2, tmp_path / "oft-adapter", base_model=str(tiny_random_sd_dir))
    err = _cli_error(["--adapter", str(tmp_path / "oft-adapter"), "--to", "lora", "--out", str(tmp_path / "o")],
                     capsys)
    assert "OFT" in err and "--to merged" in err


def test_conv_without_a_lora_form_and_control_adapters_are_refused(hra_adapter, tmp_path):
    from hra_diffusion.adapters.export import hra_lora_factor

    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2)
    u = torch.randn(4 * 9, 2)
    with pytest.raises(ValueError, match=r"'blocks.0.conv'.*dilation=\(2, 2\)"):
        hra_lora_factor(conv, u, name="blocks.0.conv")
    plain = nn.Conv2d(4, 6, 3, padding=1)
    f = hra_lora_factor(plain, u, name="c")
    assert f.down.shape == (2, 4, 3, 3) and f.up.shape == (6, 2, 1, 1) and f.alpha == 2.0
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w = plain.weight.double()
    delta = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, f.down, padding=1), f.up)
    from hra_diffusion.adapters.householder import apply_h

    merged = apply_h(w.reshape(6, -1), u.double()).reshape(w.shape)
    assert torch.allclose(torch.nn.functional.conv2d(x, w, padding=1) + delta,
                          torch.nn.functional.conv2d(x, merged, padding=1), atol=1e-10)
    linear = nn.Linear(12, 5)  # the Gram-Schmidt variant (H = I - 2QQᵀ) is a LoRA the same way
    u = torch.randn(12, 3)
    g = hra_lora_factor(linear, u, apply_gs=True)
    assert torch.allclose(linear.weight.double() + g.up @ g.down, apply_h(linear.weight.double(), u.double(), True))
    assert base_family({"addition_embed_type": "text_time"}) == "sdxl" and base_family({}) == "sd"
    control = tmp_path / "control"
    layer = nn.Sequential(nn.Linear(8, 8))
    inject_hra(layer, HRAConfig(r=2, target_modules=["0"]))
    save_adapter(layer, control, extra_tensors={"condition_encoder.conv.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="control adapter"):
        export_adapter(control, "lora", tmp_path / "c")


def test_trained_biases_export_merged_and_peft_and_refuse_a_lora(tiny_random_sd_dir, tmp_path):
    """An adapter that trained its layers' biases (--train_bias): the merged model and PEFT's format (bias="hra_only",
    the trained bias itself) reproduce it; a LoRA file cannot carry a bias, so kohya/lora exports refuse, saying so."""
    from diffusers import UNet2DConditionModel

    from hra_diffusion.adapters.model import hra_layers

    unet, te = _components(tiny_random_sd_dir)
    inp = _inputs(unet, te)
    enc = _outputs(unet, te, inp)["text"]
    inject_hra(unet, HRAConfig(r=4, target_modules=UNET_TARGETS, init_identity=False, seed=0, train_bias=True))
    with torch.no_grad():
        for _, layer in hra_layers(unet):
            if layer.hra_bias is not None:
                layer.hra_bias.normal_(0, 0.2)
        want = unet(inp["sample"], inp["t"], enc).sample
    adapter = save_adapter(unet, tmp_path / "adapter", base_model=str(tiny_random_sd_dir))
    merged = UNet2DConditionModel.from_pretrained(export_adapter(adapter, "merged", tmp_path / "merged")).eval()
    with torch.no_grad():
        assert _rel(merged(inp["sample"], inp["t"], enc).sample, want) <= 1e-5
    peft = export_adapter(adapter, "peft", tmp_path / "peft")
    assert json.loads((peft / "adapter_config.json").read_text())["bias"] == "hra_only"
    again, _ = _components(tiny_random_sd_dir)
    load_adapter(again, peft)
    with torch.no_grad():
        assert _rel(again(inp["sample"], inp["t"], enc).sample, want) <= 1e-5
    for to, out in (("kohya", tmp_path / "k.safetensors"), ("lora", tmp_path / "lora")):
        with pytest.raises(ValueError, match="trained its layers' biases.*--to merged"):
            export_adapter(adapter, to, out)
        assert not out.exists()


def test_peft_hra_only_adapter_exports_to_peft_unchanged(tiny_random_sd_dir, tmp_path):
    """A PEFT bias="hra_only" source already holds the trained biases: --to peft writes them as they are (not added
    to the base's a second time), and the result reproduces the source."""
    from peft import HRAConfig as PeftHRAConfig
    from peft import get_peft_model

    unet, te = _components(tiny_random_sd_dir)
    inp = _inputs(unet, te)
    enc = _outputs(unet, te, inp)["text"]
    peft_unet = get_peft_model(unet, PeftHRAConfig(r=4, target_modules=["to_out.0", "proj_in"], bias="hra_only"))
    with torch.no_grad():
        for p in peft_unet.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
        want = peft_unet(inp["sample"], inp["t"], enc).sample
    peft_unet.save_pretrained(tmp_path / "src")
    cfg_file = tmp_path / "src" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": str(tiny_random_sd_dir)}))
    out = export_adapter(tmp_path / "src", "peft", tmp_path / "peft")
    again, _ = _components(tiny_random_sd_dir)
    load_adapter(again, out)
    with torch.no_grad():
        assert _rel(again(inp["sample"], inp["t"], enc).sample, want) <= 1e-5
