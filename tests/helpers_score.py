"""Shared helpers for the generate/score/report/CLI tests: tiny models built from config, sample folders."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 array as PNG (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def random_image(seed: int, size: int = 48) -> np.ndarray:
    """A smooth random colour image (H, W, 3) uint8: distinct features, never all black."""
    g = np.random.default_rng(seed)
    small = g.integers(20, 255, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))


def write_samples(folder: Path, images: list[np.ndarray], prompts: list[str] | None = None,
                  reference_dir: Path | None = None, extra: list[dict] | None = None) -> Path:
    """A samples folder as `generate` writes it: PNGs + manifest.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(images):
        name = f"img{i:03d}.png"
        save_png(folder / name, img)
        row = {"file": name, "prompt": prompts[i] if prompts else f"a photo of qwe thing {i}"}
        if reference_dir is not None:
            row["reference_dir"] = str(reference_dir)
        if extra:
            row.update(extra[i])
        rows.append(row)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_dino():
    """ViT-S/16 (DINO's architecture: 384 wide, 12 layers, 6 heads) with random weights."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    patch_size=16, image_size=224)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def tiny_clip():
    """open_clip's ViT-S-32 built with pretrained=None (random weights) and its tokenizer."""
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-S-32", pretrained=None), open_clip.get_tokenizer("ViT-S-32")


@functools.lru_cache(maxsize=1)
def tiny_extractors():
    """(DINO, CLIP) extractors on the random-weight models, built once per test session."""
    from hra_diffusion.metrics.extractors import load_clip, load_dino

    model, tokenizer = tiny_clip()
    return load_dino(tiny_dino()), load_clip(model, tokenizer=tokenizer)


def random_hra_adapter(unet, path: Path, targets=None, scale: float = 0.3, **metadata) -> Path:
    """Inject HRA into ``unet``, move it away from the identity with random updates, save it."""
    from hra_diffusion import HRAConfig, hra_layers, inject_hra, save_adapter

    inject_hra(unet, HRAConfig(r=4, seed=0, **({"target_modules": list(targets)} if targets else {})))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in hra_layers(unet):
            layer.hra_u.add_(scale * torch.randn(layer.hra_u.shape, generator=g))
    save_adapter(unet, path, **metadata)
    return path
