"""Tiny diffusers/transformers models built from config, for the HRA core tests (no weights, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD15_UNET_KWARGS = dict(cross_attention_dim=768)  # diffusers' UNet2DConditionModel defaults = SD 1.5 shapes


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32):
    """diffusers' test-size UNet: block_out_channels (32, 64), 2 layers per block, one cross-attn level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def unet_inputs(unet, batch: int = 2, seed: int = 1, tokens: int = 7):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    t = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    enc = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return sample, t, enc


def write_tiny_clip_tokenizer(path: Path, max_length: int = 16) -> None:
    """A valid CLIP BPE tokenizer with only byte-level tokens (no merges): enough to run a pipeline."""
    from tools.tiny_world.tokenizer import _bytes_to_unicode

    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())  # CLIP's 256 printable stand-ins for bytes
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(path)


def tiny_pipeline_dir(path: Path, seed: int = 0) -> Path:
    """Save a complete tiny StableDiffusionPipeline folder (random weights) to ``path``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tiny_clip_tokenizer(path / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(path / "_tok")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=512, eos_token_id=513,
            pad_token_id=513,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=16, sample_size=32,
    )
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(seed), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


# SDXL-shaped: two text encoders of different widths (so a swapped concatenation or pooled embedding shows),
# text/time added conditioning, and a cross-attention level with two transformer layers.
SDXL_TE_WIDTHS = (32, 48)
SDXL_PROJECTION_DIM = 24
SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_unet(seed: int = 0):
    """An SDXL-shaped UNet of test size: ("DownBlock2D", "CrossAttnDownBlock2D") like SDXL's first levels,
    transformer_layers_per_block (1, 2), addition_embed_type "text_time", cross-attention 32 + 48 = 80 wide."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        cross_attention_dim=sum(SDXL_TE_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
        norm_num_groups=16,
    ).eval()


def _tokenizer_source(path: Path) -> Path:
    """The tiny world's CLIP tokenizer (assets/tiny-sd/tokenizer) when it is built, else a byte-level one."""
    asset = Path(__file__).resolve().parent.parent / "assets" / "tiny-sd" / "tokenizer"
    if (asset / "tokenizer_config.json").is_file():
        return asset
    write_tiny_clip_tokenizer(path)
    return path


def tiny_sdxl_pipeline_dir(path: Path, seed: int = 0) -> Path:
    """Save a complete tiny StableDiffusionXLPipeline folder (random weights, both tokenizers the tiny world's
    CLIP tokenizer) to ``path``; it loads with ``StableDiffusionXLPipeline.from_pretrained`` offline."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_source(path / "_tok"))
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)

    def text_config(width: int, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=layers, num_attention_heads=4,
                              max_position_embeddings=tokenizer.model_max_length,
                              projection_dim=SDXL_PROJECTION_DIM, hidden_act="gelu", **special)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(SDXL_TE_WIDTHS[0], 2))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(SDXL_TE_WIDTHS[1], 3))
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=16, sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=tiny_sdxl_unet(seed), scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path
