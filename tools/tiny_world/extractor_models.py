"""The tiny world's stand-in extractors as models: their settings (:class:`ExtractorConfig`) and constructors
(open_clip CLIP, transformers ViT + DINO head), shared by their training and their evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ExtractorConfig", "quick_config", "clip_model_cfg", "make_clip", "make_dino", "DINOHead", "OPENAI_MEAN",
           "OPENAI_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ExtractorConfig:
    """Everything that determines the built extractors (``threads``, ``checkpoint_every`` only the speed)."""

    seed: int = 0
    # CLIP: image tower ViT 32 px / patch 8 (4x4 tokens), text tower 3 layers on CLIP's 49,408-token vocabulary
    clip_pool: int = 12000
    clip_steps: int = 3000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_wd: float = 0.1
    clip_embed_dim: int = 64
    clip_patch: int = 8
    clip_width: int = 128
    clip_layers: int = 4
    clip_text_width: int = 48
    clip_text_layers: int = 3
    context_length: int = 24
    pseudo_word_rate: float = 0.15  # captions with a made-up word before the noun ("a vop star"), as DreamBooth's
    clip_shape_groups: float = 0.5  # share of each batch in groups of four scenes that differ only in the shape
    # DINO: ViT 32 px / patch 4 (8x8 tokens), 64 wide; prototypes straight on the L2-normalised CLS token (head
    # layers 0): with an MLP head the CLS kept the background instead of the object (docs/history.md)
    dino_pool: int = 8000
    dino_steps: int = 1200
    dino_batch: int = 48
    dino_lr: float = 2e-3
    dino_wd: float = 0.04
    dino_width: int = 64
    dino_layers: int = 4
    dino_heads: int = 2
    dino_patch: int = 4
    dino_out_dim: int = 512
    dino_head_layers: int = 0
    dino_local_crops: int = 4
    dino_relocate: float = 1.0  # share of objects whose two global views come from two scenes (else one image)
    dino_general: float = 0.3  # share of the VAE's general pool in DINO's images
    dino_hue: float = 0.05  # colour jitter's hue range (of a full turn); colours are identity in this world
    dino_grey: float = 0.2  # share of views turned grey
    # a sharper teacher than DINO's 0.04 and a faster EMA than its 0.996: at 0.04 / 0.996 the teacher stayed near
    # uniform (entropy ~log K, loss near its maximum) for the whole of a budget of ~1,000 steps
    teacher_temp: float = 0.02
    student_temp: float = 0.1
    center_momentum: float = 0.9
    teacher_momentum: float = 0.98  # start of the cosine schedule to 1
    warmup_fraction: float = 0.1
    eval_scenes: int = 96  # rendered held-out scenes for the zero-shot figures (plus the 24 of assets/tiny-data)
    save_fp16: bool = True
    threads: int = 2
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("clip_steps", "dino_steps", "clip_batch", "dino_batch", "clip_pool", "dino_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


_SPEED_ONLY = {"threads", "checkpoint_every"}


def quick_config(**overrides: Any) -> ExtractorConfig:
    """A seconds-long build for tests: tiny pools, batches and step counts (its figures mean nothing)."""
    base = dict(clip_pool=256, clip_steps=6, clip_batch=16, dino_pool=128, dino_steps=6, dino_batch=8, dino_out_dim=64,
                dino_local_crops=2, eval_scenes=12, checkpoint_every=2, threads=1)
    return ExtractorConfig(**{**base, **overrides})


# ---- models ----------------------------------------------------------------------------------------------------

def clip_model_cfg(cfg: ExtractorConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of the tiny CLIP (what ``open_clip_config.json`` holds)."""
    return {
        "embed_dim": cfg.clip_embed_dim,
        "vision_cfg": {"image_size": 32, "patch_size": cfg.clip_patch, "width": cfg.clip_width,
                       "layers": cfg.clip_layers, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.clip_text_width,
                     "heads": 4, "layers": cfg.clip_text_layers},
    }


def make_clip(cfg: ExtractorConfig) -> nn.Module:
    import open_clip

    mc = clip_model_cfg(cfg)
    return open_clip.CLIP(mc["embed_dim"], mc["vision_cfg"], mc["text_cfg"])


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes (norm fixed to 1).

    ``layers`` 3 is DINO's default MLP; 1 a linear bottleneck (DINO's ``nlayers=1``); 0 no bottleneck: the
    prototypes act on the L2-normalised CLS token itself, so the invariances DINO teaches hold in the very
    features the scorer compares, not only after a projector."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 256, bottleneck: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers == 0:
            self.mlp, bottleneck = nn.Identity(), dim
        elif layers == 1:
            self.mlp = nn.Linear(dim, bottleneck)
        else:
            mods: list[nn.Module] = [nn.Linear(dim, hidden), nn.GELU()]
            for _ in range(layers - 2):
                mods += [nn.Linear(hidden, hidden), nn.GELU()]
            self.mlp = nn.Sequential(*mods, nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        g = self.last.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def make_dino(cfg: ExtractorConfig) -> tuple[nn.Module, DINOHead]:
    """(the ViT backbone, the DINO head) with fresh weights."""
    from transformers import ViTConfig, ViTModel

    vit_cfg = ViTConfig(image_size=32, patch_size=cfg.dino_patch, hidden_size=cfg.dino_width,
                        num_hidden_layers=cfg.dino_layers, num_attention_heads=cfg.dino_heads,
                        intermediate_size=4 * cfg.dino_width, layer_norm_eps=1e-6, qkv_bias=True)
    return ViTModel(vit_cfg, add_pooling_layer=False), DINOHead(cfg.dino_width, cfg.dino_out_dim,
                                                                 layers=cfg.dino_head_layers)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


