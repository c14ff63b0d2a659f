"""SDXL foundations: family detection, per-architecture conditioning (equal to the pipelines' own encode_prompt),
the tiny SDXL-shaped pipeline, and HRA's injection count on a full-size SDXL UNet built on the meta device."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from tiny_models import SDXL_PROJECTION_DIM, SDXL_TE_WIDTHS

from hra_diffusion.adapters.config import HRAConfig
from hra_diffusion.adapters.model import count_hra_parameters, inject_hra
from hra_diffusion.conditioning import (
    PromptEmbeds,
    SDConditioner,
    SDXLConditioner,
    SizeCondition,
    conditioner_from_pipeline,
    pipeline_family,
)

PROMPTS = ["a photo of qwe square", "a red square on a green background, seen from above"]

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the shape-defining entries; the rest are defaults)
SDXL_UNET_CONFIG = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def sdxl_unet_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- family detection ----------------------------------------------------------------------------

def test_family_from_model_index(tiny_sdxl_dir, tiny_random_sd_dir, tmp_path):
    assert pipeline_family(tiny_sdxl_dir) == "sdxl"
    assert pipeline_family(tiny_random_sd_dir) == "sd"
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"'FluxPipeline' is not supported.*StableDiffusionXLPipeline"):
        pipeline_family(other)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        pipeline_family(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline_family(tmp_path / "missing")


# ---- conditioning equals the pipelines' own encode_prompt ----------------------------------------

def test_sdxl_encoding_equals_pipeline_encode_prompt(sdxl_pipe):
    cond = conditioner_from_pipeline(sdxl_pipe)
    assert isinstance(cond, SDXLConditioner) and cond.family == "sdxl"
    cond.check_unet(sdxl_pipe.unet)
    with torch.no_grad():
        ours = cond.encode(PROMPTS)
        want, _, want_pooled, _ = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert ours.hidden.shape == (2, sdxl_pipe.tokenizer.model_max_length, sum(SDXL_TE_WIDTHS))
    assert ours.pooled.shape == (2, SDXL_PROJECTION_DIM)
    assert torch.equal(ours.hidden, want) and torch.equal(ours.pooled, want_pooled)
    # the two prompts differ, and so do their embeddings (the check above is not of two constant tensors)
    assert not torch.allclose(ours.hidden[0], ours.hidden[1]) and not torch.allclose(ours.pooled[0], ours.pooled[1])
    # tokenize + encode_tokens is encode; per-prompt caching then cat gives the batch back
    again = cond.encode_tokens(cond.tokenize(PROMPTS))
    with torch.no_grad():
        cached = PromptEmbeds.cat([cond.encode(p) for p in PROMPTS])
    assert torch.equal(again.hidden.detach(), ours.hidden) and torch.allclose(cached.hidden, ours.hidden, atol=1e-6)
    assert torch.allclose(cached[1].pooled, ours.pooled[1:], atol=1e-6)


def test_sdxl_time_ids_and_unet_call_match_the_pipeline(sdxl_pipe):
    cond = conditioner_from_pipeline(sdxl_pipe)
    sizes = [SizeCondition((768, 1024), (0, 128), (512, 512)), SizeCondition((300, 200), (12, 0), (64, 64))]
    ids = cond.time_ids(sizes)
    for row, s in zip(ids, sizes, strict=True):
        want = sdxl_pipe._get_add_time_ids(s.original_size, s.crop_top_left, s.target_size, torch.float32,
                                           text_encoder_projection_dim=SDXL_PROJECTION_DIM)
        assert torch.equal(row[None], want)
    with torch.no_grad():
        embeds = cond.encode(PROMPTS)
        kwargs = cond.unet_kwargs(embeds, sizes)
        assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"}
        assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
        sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 600])
        ours = sdxl_pipe.unet(sample, t, **kwargs).sample
        other_sizes = [sizes[1], sizes[0]]
        swapped = sdxl_pipe.unet(sample, t, **cond.unet_kwargs(embeds, other_sizes)).sample
    assert not torch.allclose(ours, swapped, atol=1e-4)  # the time ids reach the UNet
    with pytest.raises(ValueError, match="one SizeCondition"):
        cond.unet_kwargs(embeds, sizes[:1])
    with pytest.raises(ValueError, match="pooled"):
        cond.unet_kwargs(PromptEmbeds(embeds.hidden), sizes)


def test_load_conditioner_from_a_folder(tiny_sdxl_dir, tiny_random_sd_dir, sdxl_pipe):
    from hra_diffusion.conditioning import load_conditioner

    cond = load_conditioner(tiny_sdxl_dir)
    assert isinstance(cond, SDXLConditioner) and cond.component_names == ("text_encoder", "text_encoder_2")
    assert all(not p.requires_grad for te in cond.text_encoders for p in te.parameters())
    with torch.no_grad():
        got = cond.encode(PROMPTS)
        want = conditioner_from_pipeline(sdxl_pipe).encode(PROMPTS)
    assert torch.equal(got.hidden, want.hidden) and torch.equal(got.pooled, want.pooled)
    sd = load_conditioner(tiny_random_sd_dir, dtype=torch.bfloat16)
    assert isinstance(sd, SDConditioner) and sd.text_encoders[0].dtype == torch.bfloat16


def test_sd_encoding_equals_pipeline_encode_prompt(tiny_random_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_random_sd_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    cond = conditioner_from_pipeline(pipe)
    assert isinstance(cond, SDConditioner) and cond.family == "sd"
    cond.check_unet(pipe.unet)
    with torch.no_grad():
        ours = cond.encode(PROMPTS)
        want, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert ours.pooled is None and torch.equal(ours.hidden, want)
    assert set(cond.unet_kwargs(ours)) == {"encoder_hidden_states"}


def test_mismatched_text_encoders_are_named(sdxl_pipe, tiny_random_sd_dir):
    from diffusers import UNet2DConditionModel

    sd_unet = UNet2DConditionModel.from_pretrained(tiny_random_sd_dir, subfolder="unet")
    cond = conditioner_from_pipeline(sdxl_pipe)
    with pytest.raises(ValueError, match="cross_attention_dim is 32.*different models"):
        cond.check_unet(sd_unet)
    with pytest.raises(ValueError, match="two tokenizers and two text encoders"):
        SDXLConditioner([sdxl_pipe.tokenizer], [sdxl_pipe.text_encoder])


# ---- the tiny SDXL pipeline ------------------------------------------------------------------------

def test_tiny_sdxl_pipeline_is_sdxl_shaped_and_samples(sdxl_pipe):
    unet = sdxl_pipe.unet
    assert unet.config.addition_embed_type == "text_time"
    assert list(unet.config.transformer_layers_per_block) == [1, 2]
    assert len(unet.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert type(sdxl_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    out = sdxl_pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and float(out.std()) > 0


# ---- full-size SDXL UNet on the meta device --------------------------------------------------------

def test_sdxl_unet_wraps_560_attention_projections():
    unet = sdxl_unet_on_meta()
    names = inject_hra(unet, HRAConfig(r=8))
    assert len(names) == 560
    assert sum(1 for n in names if ".attn1." in n) == 280 and sum(1 for n in names if ".attn2." in n) == 280
    # 70 transformer blocks: down 2x1 + 2x2 ... at 640 and 1280 wide; per block the adapter holds one (d, r)
    # matrix per projection, d = its input width: attn1 q,k,v,out: 4C; attn2 q, out: 2C; attn2 k, v: 2 x 2048
    blocks = {640: 2 * 2 + 3 * 2, 1280: 2 * 10 + 10 + 3 * 10}  # down, mid, up per width
    assert sum(blocks.values()) == 70
    per_r = sum(n * (6 * c + 2 * 2048) for c, n in blocks.items())
    assert count_hra_parameters(unet) == 8 * per_r == 6_287_360
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == 8 * per_r  # everything else frozen
    cross_kv = [n for n in names if ".attn2.to_k" in n or ".attn2.to_v" in n]
    assert {unet.get_submodule(n).hra_u.shape[0] for n in cross_kv} == {2048}


# ---- generate on SDXL ------------------------------------------------------------------------------

# attention, transformer and resnet layers, both samplers, conv_in/out and the time/add embeddings: every kind of
# LDM name a kohya SDXL file uses (input_blocks_N_1_..., in_layers_2, emb_layers_1, op, label_emb_0_0, out_2)
SDXL_EXPORT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj",
                       "downsamplers.0.conv", "upsamplers.0.conv", "linear_1", "conv_in", "conv_out"]


def _random_hra(model, targets, r: int, seed: int) -> None:
    """HRA away from the identity (random reflection vectors), as a trained adapter would be."""
    inject_hra(model, HRAConfig(r=r, target_modules=list(targets), init_identity=False, seed=seed))


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_dir, tmp_path_factory):
    """A random HRA adapter on the tiny SDXL UNet (SDXL_EXPORT_TARGETS) with text_encoder/ and text_encoder_2/ parts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from hra_diffusion.adapters.config import TEXT_ENCODER_TARGETS
    from hra_diffusion.adapters.io import save_adapter

    root = tmp_path_factory.mktemp("sdxl-adapters") / "adapter"
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    _random_hra(unet, SDXL_EXPORT_TARGETS, 4, 0)
    save_adapter(unet, root, base_model=str(tiny_sdxl_dir))
    for i, (sub, cls) in enumerate((("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))):
        te = cls.from_pretrained(tiny_sdxl_dir, subfolder=sub)
        _random_hra(te, TEXT_ENCODER_TARGETS, 2, 1 + i)
        save_adapter(te, root / sub, base_model=str(tiny_sdxl_dir))
    return root


def _images(folder):
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_generate_cli_on_sdxl(tiny_sdxl_dir, sdxl_adapter, tmp_path):
    import shutil

    import numpy as np

    from hra_diffusion.cli import main

    unet_only = tmp_path / "unet-only"
    unet_only.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(sdxl_adapter / f, unet_only / f)
    common = ["--base", str(tiny_sdxl_dir), "--prompt", PROMPTS[0], "--seeds", "3", "5", "--steps", "2",
              "--guidance", "5", "--no-progress"]
    runs = {"full": ["--adapter", str(sdxl_adapter)], "merged": ["--adapter", str(sdxl_adapter), "--merge"],
            "unet": ["--adapter", str(unet_only)], "base": []}
    for name, extra in runs.items():
        assert main(["generate", "--out", str(tmp_path / name), *common, *extra]) == 0
    got = {name: _images(tmp_path / name) for name in runs}
    assert list(got["full"]) == ["p0000_00_s3.png", "p0000_01_s5.png"]
    for image in got["full"]:
        assert np.abs(got["full"][image] - got["merged"][image]).max() <= 2  # live = merged, within rounding
        assert np.abs(got["full"][image] - got["base"][image]).max() > 4  # the adapter changes the images
        assert np.abs(got["full"][image] - got["unet"][image]).max() > 4  # ... and so do its text-encoder parts
    row = json.loads((tmp_path / "full" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["text_encoders_adapted"] == ["text_encoder", "text_encoder_2"] and row["adapter_kind"] == "subject"
    assert row["height"] == row["width"] == 32


def test_generate_control_adapter_on_sdxl(tiny_sdxl_dir, tmp_path):
    import numpy as np
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from hra_diffusion.adapters.config import CONTROL_TARGETS
    from hra_diffusion.control import build_condition_encoder, save_control_adapter
    from hra_diffusion.generate import GenerateConfig, generate

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    inject_hra(unet, HRAConfig(r=4, target_modules=list(CONTROL_TARGETS), seed=0))
    encoder = build_condition_encoder(unet, vae_scale_factor=2)  # sized from the SDXL UNet's conv_in
    assert encoder.conv_out.out_channels == unet.conv_in.out_channels
    torch.manual_seed(0)
    torch.nn.init.normal_(encoder.conv_out.weight, std=0.5)  # a trained-looking, non-zero control path
    save_control_adapter(unet, encoder, tmp_path / "control", base_model=str(tiny_sdxl_dir), condition_type="canny")
    conditions = []
    for i, fill in enumerate((0, 255)):
        path = tmp_path / f"cond{i}.png"
        Image.new("RGB", (32, 32), (fill, fill, fill)).save(path)
        conditions.append(str(path))
    out = {}
    for i, cond in enumerate(conditions):
        out[i] = _images(generate(GenerateConfig(
            output_dir=str(tmp_path / f"out{i}"), adapter=str(tmp_path / "control"), base_model=str(tiny_sdxl_dir),
            prompts=[PROMPTS[0]], conditions=[cond], seeds=[1], steps=2, guidance_scale=5.0, progress=False)))
    name = "p0000_00_s1.png"
    assert np.abs(out[0][name] - out[1][name]).max() > 4  # the condition steers the SDXL UNet


# ---- export on SDXL --------------------------------------------------------------------------------

def test_sdxl_kohya_names_map_back_through_diffusers_reader():
    """Every Linear/Conv2d of a full-size SDXL UNet and both text encoders (meta device): the kohya (LDM) names we
    write are mapped back to exactly those modules by diffusers' SDXL kohya reader, with no key left over."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from torch import nn
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from hra_diffusion.adapters.export import kohya_module_name, sgm_module_path

    unet = sdxl_unet_on_meta()
    with torch.device("meta"):
        te1 = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(  # OpenCLIP ViT-bigG/14's
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu"))
    models = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    layers = {c: [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
              for c, model in models.items()}
    assert len(layers["unet"]) == 794 and len(layers["text_encoder"]) == 12 * 6
    assert len(layers["text_encoder_2"]) == 32 * 6 + 1  # + text_projection
    kohya = {}
    for component, names in layers.items():
        for n in names:
            key = kohya_module_name("sdxl", component, n, unet.config)
            kohya.update({f"{key}.lora_down.weight": torch.zeros(1), f"{key}.lora_up.weight": torch.zeros(1),
                          f"{key}.alpha": torch.tensor(4.0)})
    assert len(kohya) == 3 * sum(len(n) for n in layers.values())  # distinct names
    # names as kohya sd-scripts / ComfyUI / A1111 spell them for SDXL
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
                 "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_output_blocks_0_0_skip_connection",
                 "lora_unet_label_emb_0_0", "lora_unet_time_embed_2", "lora_unet_out_2",
                 "lora_te1_text_model_encoder_layers_11_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_31_mlp_fc2", "lora_te2_text_projection"):
        assert f"{name}.lora_down.weight" in kohya, name
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(dict(kohya), unet.config))  # raises on any leftover key
    assert len(converted) == 2 * sum(len(n) for n in layers.values()) and len(alphas) == len(converted) // 2
    unet_sd = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in converted.items()
                                               if k.startswith("unet.")})
    mapped = {"unet": {k.rsplit(".lora_", 1)[0] for k in unet_sd}}
    for component, model in (("text_encoder", te1), ("text_encoder_2", te2)):
        te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
            {k[len(component) + 1:]: v for k, v in converted.items() if k.startswith(component + ".")}))
        prefix = "" if hasattr(model, "text_model") else "text_model."
        mapped[component] = {k.rsplit(".lora_", 1)[0].removeprefix(prefix) for k in te_sd}
    for component, names in layers.items():
        assert mapped[component] == set(names), component
    with pytest.raises(ValueError, match="no LDM"):
        sgm_module_path("down_blocks.0.resnets.0.norm1")


STOCK_SDXL = textwrap.dedent("""
    import sys
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    base, inputs, out, *loras = sys.argv[1:]
    inp = load_file(inputs)
    outs = {}
    for i, lora in enumerate(loras):
        pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch.float32)
        pipe.load_lora_weights(lora)
        with torch.no_grad():
            outs[f"{i}.te1"] = pipe.text_encoder(inp["ids"], output_hidden_states=True).hidden_states[-2]
            te2 = pipe.text_encoder_2(inp["ids"], output_hidden_states=True)
            outs[f"{i}.te2"], outs[f"{i}.pooled"] = te2.hidden_states[-2], te2.text_embeds
            outs[f"{i}.unet"] = pipe.unet(inp["sample"], inp["t"], inp["enc"], added_cond_kwargs={
                "text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}).sample
    assert not any(m.startswith("hra_diffusion") for m in sys.modules), "hra_diffusion was imported"
    save_file(outs, out)
""")


@torch.no_grad()
def _sdxl_outputs(base, adapter, inp) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from hra_diffusion.adapters.io import load_adapter

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    te1 = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2").eval()
    if adapter is not None:
        for model, part in ((unet, adapter), (te1, adapter / "text_encoder"), (te2, adapter / "text_encoder_2")):
            load_adapter(model, part)
    out2 = te2(inp["ids"], output_hidden_states=True)
    return {"te1": te1(inp["ids"], output_hidden_states=True).hidden_states[-2], "te2": out2.hidden_states[-2],
            "pooled": out2.text_embeds,
            "unet": unet(inp["sample"], inp["t"], inp["enc"], added_cond_kwargs={
                "text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}).sample}


@pytest.mark.slow
def test_sdxl_lora_and_kohya_exports_load_in_stock_diffusers(tiny_sdxl_dir, sdxl_adapter, tmp_path):
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hra_diffusion.adapters.export import METADATA_KEY, export_adapter
    from hra_diffusion.cli import main

    g = torch.Generator().manual_seed(3)
    inp = {"ids": torch.randint(0, 512, (2, 16), generator=g), "sample": torch.randn(2, 4, 16, 16, generator=g),
           "t": torch.tensor([10, 700]), "enc": torch.randn(2, 16, sum(SDXL_TE_WIDTHS), generator=g),
           "text_embeds": torch.randn(2, SDXL_PROJECTION_DIM, generator=g),
           "time_ids": torch.tensor([[512.0, 768, 0, 64, 512, 512], [300, 200, 12, 0, 256, 256]])}
    want = _sdxl_outputs(tiny_sdxl_dir, sdxl_adapter, inp)
    plain = _sdxl_outputs(tiny_sdxl_dir, None, inp)
    for key in want:
        assert _rel(plain[key], want[key]) > 1e-3, key  # every part of the adapter changes its output
    lora_dir, kohya_file = tmp_path / "lora", tmp_path / "kohya.safetensors"
    assert main(["export", "--adapter", str(sdxl_adapter), "--to", "lora", "--out", str(lora_dir)]) == 0
    export_adapter(sdxl_adapter, "kohya", kohya_file)
    with safe_open(str(kohya_file), framework="pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()[METADATA_KEY])["base_family"] == "sdxl"
    assert {k.split("_", 2)[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.") for k in keys)
    lora_keys = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.2.self_attn.q_proj.lora_A") for k in lora_keys)
    save_file({k: v.contiguous() for k, v in inp.items()}, str(tmp_path / "inputs.safetensors"))
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SDXL)
    res = subprocess.run([sys.executable, str(script), str(tiny_sdxl_dir), str(tmp_path / "inputs.safetensors"),
                          str(tmp_path / "out.safetensors"), str(lora_dir), str(kohya_file)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    for i in (0, 1):  # 0: diffusers layout, 1: kohya (LDM names)
        for key in want:
            assert _rel(got[f"{i}.{key}"], want[key]) <= 1e-5, (i, key)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_sdxl_merged_export_has_both_text_encoders(tiny_sdxl_dir, sdxl_adapter, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from hra_diffusion.adapters.export import export_adapter

    g = torch.Generator().manual_seed(4)
    inp = {"ids": torch.randint(0, 512, (1, 16), generator=g), "sample": torch.randn(1, 4, 16, 16, generator=g),
           "t": torch.tensor([300]), "enc": torch.randn(1, 16, sum(SDXL_TE_WIDTHS), generator=g),
           "text_embeds": torch.randn(1, SDXL_PROJECTION_DIM, generator=g),
           "time_ids": torch.tensor([[64.0, 64, 0, 0, 32, 32]])}
    want = _sdxl_outputs(tiny_sdxl_dir, sdxl_adapter, inp)
    merged = export_adapter(sdxl_adapter, "merged", tmp_path / "merged")
    assert sorted(p.name for p in merged.iterdir() if p.is_dir()) == ["text_encoder", "text_encoder_2"]
    unet = UNet2DConditionModel.from_pretrained(merged).eval()
    te1 = CLIPTextModel.from_pretrained(merged / "text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(merged / "text_encoder_2").eval()
    with torch.no_grad():
        out2 = te2(inp["ids"], output_hidden_states=True)
        got = {"te1": te1(inp["ids"], output_hidden_states=True).hidden_states[-2], "te2": out2.hidden_states[-2],
               "pooled": out2.text_embeds,
               "unet": unet(inp["sample"], inp["t"], inp["enc"], added_cond_kwargs={
                   "text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}).sample}
    for key in want:
        assert _rel(got[key], want[key]) <= 1e-5, key


# ---- benchmark code paths (no timings are asserted: the tiny shapes only exercise the SDXL sections) ------

def test_bench_sdxl_sections_on_tiny_shapes(tmp_path, monkeypatch):
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    import bench_hra
    import render_tables

    assert (1280, 1280, 1024 * 2) in bench_hra.SDXL_SHAPES and (2048, 1280, 77 * 2) in bench_hra.SDXL_SHAPES
    monkeypatch.setattr(bench_hra, "SDXL_SHAPES", [(48, 32, 8), (64, 32, 5)])
    results = tmp_path / "bench.json"
    results.write_text(json.dumps({"layers": {"kept": True}}))
    bench_hra.main(["--sdxl", "--r", "2", "--repeats", "1", "--json", str(results)])  # no --sdxl-unet: layers only
    doc = json.loads(results.read_text())
    assert doc["layers"] == {"kept": True} and "unet_sdxl" not in doc  # the SD-1.5 section is left alone
    rows = doc["layers_sdxl"]["rows"]
    assert [r["shape"] for r in rows] == ["(48, 32, 8)", "(64, 32, 5)"]
    assert all(r["ours_ms"] > 0 and r["peft_lora_mib"] > 0 for r in rows)
    table = render_tables.render({"layers_sdxl": doc["layers_sdxl"]})["layers_sdxl"]
    assert "SDXL shapes" in table and "(64, 32, 5)" in table
    # the whole-SDXL-UNet step, on an SDXL-shaped UNet of test size (the real one is 10 GiB per process)
    from tiny_models import tiny_sdxl_unet

    monkeypatch.setattr(bench_hra, "SDXL_UNET_CONFIG", dict(tiny_sdxl_unet().config))
    times = bench_hra.bench_unet_time(2, 1, ["ours", "peft_lora"], sdxl=True)
    assert set(times) == {"ours", "peft_lora"} and all(t > 0 for t in times.values())
    with pytest.raises(SystemExit):
        bench_hra.main(["--sdxl-unet", "--json", ""])  # --sdxl-unet without --sdxl is refused
