"""A figure of the tiny base model's samples, each labelled by the colour checker (for docs/tiny-world.md)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from hra_diffusion.tiny import scenes

from .build import colour_prompts

__all__ = ["samples_figure"]


@torch.no_grad()
def samples_figure(pipe, out: Path, n: int = 16, cols: int = 8, scale: int = 4, seed: int = 0) -> Path:
    """Generate one image per 'a {colour} {shape} on a {background} background' prompt and save a labelled grid.

    Each tile shows the prompt's words and the checker's reading; a tick means both colours match.
    """
    triples = colour_prompts(n, seed=seed)
    prompts = [f"a {c} {s} on a {b} background" for s, c, b in triples]
    gen = torch.Generator().manual_seed(seed)
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, generator=gen).images
    tile, label_h = 32 * scale, 30
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, ((s, c, b), im) in enumerate(zip(triples, images, strict=True)):
        x, y = (i % cols) * tile, (i // cols) * (tile + label_h)
        sheet.paste(im.resize((tile, tile), Image.NEAREST), (x, y))
        got_b, got_c = scenes.dominant_colours(im)
        ok = "ok" if (got_b, got_c) == (b, c) else "x"
        draw.text((x + 2, y + tile + 2), f"{c} {s}/{b}", fill=(0, 0, 0))
        draw.text((x + 2, y + tile + 15), f"read {got_c}/{got_b} {ok}", fill=(90, 90, 90))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
