"""SDXL foundations: family detection, per-architecture conditioning (equal to the pipelines' own encode_prompt),
the tiny SDXL-shaped pipeline, and HRA's injection count on a full-size SDXL UNet built on the meta device."""

from __future__ import annotations

import json

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

def _random_hra(model, targets, r: int, seed: int) -> None:
    """HRA away from the identity (random reflection vectors), as a trained adapter would be."""
    inject_hra(model, HRAConfig(r=r, target_modules=list(targets), init_identity=False, seed=seed))


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_dir, tmp_path_factory):
    """An HRA adapter on the tiny SDXL UNet (attention projections) with text_encoder/ and text_encoder_2/ parts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from hra_diffusion.adapters.config import TEXT_ENCODER_TARGETS
    from hra_diffusion.adapters.io import save_adapter

    root = tmp_path_factory.mktemp("sdxl-adapters") / "adapter"
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    _random_hra(unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 0)
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
