"""The tiny world's DreamBooth showroom rates: generate the held-out subject prompts and the class check prompts
with an adapter loaded, and read them with the deterministic checker (``checker.subject_rates``).

``python -m hra_diffusion.tiny rates --adapter outputs/dreambooth-tiny/adapter`` prints them; the trainer's end
of run and model card use ``showroom_rates``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from . import checker, data

__all__ = ["has_showroom", "showroom_prompts", "showroom_rates", "load_with_adapter", "format_rates", "rates_figure",
           "measure"]

SEEDS = (0, 1, 2)
CLASS_IMAGES = 4  # images of each class check prompt per seed


def has_showroom(subject_file: str | Path | None) -> bool:
    """Whether ``subject.json`` lists tiny-world showroom prompts (``heldout_prompts``): only then are the rates
    meaningful (the checker reads the tiny world's six colours and four shapes, not photos)."""
    if not subject_file or not Path(subject_file).is_file():
        return False
    return bool(json.loads(Path(subject_file).read_text()).get("heldout_prompts"))


def showroom_prompts(subject_file: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(held-out subject prompts, class check prompts) from ``subject.json``; the tiny world's without a file."""
    if subject_file is None:
        return data.heldout_subject_prompts(), data.class_check_prompts()
    if not has_showroom(subject_file):
        raise ValueError(f"{subject_file} lists no heldout_prompts: the showroom rates are for the tiny-world subject")
    doc = json.loads(Path(subject_file).read_text())
    return list(doc["heldout_prompts"]), list(doc.get("class_check_prompts") or data.class_check_prompts())


@torch.no_grad()
def showroom_rates(pipe, subject_file: str | Path | None = None, seeds: tuple[int, ...] = SEEDS, steps: int = 20,
                   guidance: float = 2.0, return_images: bool = False,
                   class_images: int = CLASS_IMAGES) -> dict[str, Any]:
    """Generate every held-out subject prompt once and every class check prompt ``class_images`` times per seed,
    and read them.

    Per seed, the subject prompts and one image of each class prompt are drawn in one batch (seeded by the seed),
    the class prompts' other images in a second (seeded by seed + 1000): 4 class prompts x 4 images x 3 seeds =
    48 class samples, so the class rate is known to about +-6 points rather than +-13 with one image each.
    Returns ``checker.subject_rates``'s dict (subject_rate, context_rate, subject_in_context_rate,
    class_plain_rate, class_striped_rate, rows) plus the settings; with ``return_images`` the images, each
    seed's in one row (``row_length`` of them: the subject prompts, then each class prompt's images);
    deterministic for a given pipeline."""
    if class_images < 1:
        raise ValueError(f"class_images must be >= 1, got {class_images}")
    held, cls = showroom_prompts(subject_file)
    images, all_prompts = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        first = pipe(held + cls, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images
        more: list = []
        if cls and class_images > 1:
            gen = torch.Generator().manual_seed(seed + 1000)
            more = pipe(cls, num_images_per_prompt=class_images - 1, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gen).images  # prompt-major: p0 x (k-1), p1 x (k-1), ...
        images += first[:len(held)]
        all_prompts += held
        for i, prompt in enumerate(cls):
            images += [first[len(held) + i], *more[i * (class_images - 1):(i + 1) * (class_images - 1)]]
            all_prompts += [prompt] * class_images
    rates = checker.subject_rates(images, all_prompts)
    rates.update(seeds=list(seeds), inference_steps=steps, guidance_scale=guidance, class_images_per_prompt=class_images)
    if return_images:
        rates["images"] = images
        rates["row_length"] = len(held) + len(cls) * class_images
    return rates


def load_with_adapter(base: str | Path, adapter: str | Path | None):
    """The tiny pipeline (fp32, CPU) with a DreamBooth adapter (UNet, and text encoder if saved) loaded, sampling
    with the trainer's validation sampler, so the rates here are the ones the trainer reported."""
    from diffusers import StableDiffusionPipeline

    from ..adapters.io import load_adapter
    from ..sampling import sampler_for

    pipe = StableDiffusionPipeline.from_pretrained(str(base), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = sampler_for(pipe.scheduler)
    if adapter is not None:
        load_adapter(pipe.unet, adapter)
        te = Path(adapter) / "text_encoder"
        if te.is_dir():
            load_adapter(pipe.text_encoder, te)
    return pipe


def format_rates(rates: dict[str, Any]) -> str:
    """One line for logs and model cards."""
    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    return (f"striped subject {pct(rates['subject_rate'])} of {rates['n_subject']} held-out samples, "
            f"asked background/position right in {pct(rates['context_rate'])} of those; "
            f"class prompt plain one-colour {pct(rates['class_plain_rate'])} of {rates['n_class']} "
            f"(stripes leaking {pct(rates['class_striped_rate'])})")


def rates_figure(images: list, rows: list[dict], out: Path, cols: int = 14, scale: int = 3) -> Path:
    """A grid of showroom samples, each with a short label: S = striped subject, P = plain (class prompt),
    and c = context (background/position) right."""
    tile, label_h = 32 * scale, 14
    n = len(images)
    nrows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, nrows * (tile + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (im, row) in enumerate(zip(images, rows, strict=True)):
        x, y = (i % cols) * tile, (i // cols) * (tile + label_h)
        sheet.paste(im.resize((tile, tile), Image.NEAREST), (x, y))
        ok = row.get("subject_ok", row.get("plain_ok"))
        kind = "S" if "subject_ok" in row else "P"
        draw.text((x + 2, y + tile + 1), f"{kind}{'+' if ok else '-'} {'c' if row['context_ok'] else 'x'}", fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def measure(pipe, subject_file: str | Path, guidance: float, out_dir: str | Path, steps: int = 20) -> dict[str, Any]:
    """The check a tiny-world subject.json names (``"showroom": "hra_diffusion.tiny.showroom:measure"``), which the
    DreamBooth trainer runs on the trained pipeline: the showroom rates, their grid in
    ``<out_dir>/validation/showroom.png``, and the lines for the summary and the model card."""
    rates = showroom_rates(pipe, subject_file, steps=steps, guidance=guidance, return_images=True)
    grid = rates_figure(rates.pop("images"), rates["rows"], Path(out_dir) / "validation" / "showroom.png",
                        cols=rates.pop("row_length"))  # rates keeps each sample's reading ("rows")
    line = format_rates(rates)
    return {"name": "tiny-world showroom", "results": rates, "line": line, "figure": str(grid),
            "card": f"{line}; seeds {rates['seeds']}, {rates['inference_steps']} steps, guidance "
                    f"{rates['guidance_scale']} (`validation/showroom.png`)"}
