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

from . import checker, data

__all__ = ["has_showroom", "showroom_prompts", "showroom_rates", "load_with_adapter", "format_rates"]

SEEDS = (0, 1, 2)


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
                   guidance: float = 2.0, return_images: bool = False) -> dict[str, Any]:
    """Generate every held-out subject prompt and class check prompt once per seed and read them.

    Returns ``checker.subject_rates``'s dict (subject_rate, context_rate, subject_in_context_rate,
    class_plain_rate, class_striped_rate, rows) plus the settings; deterministic for a given pipeline."""
    held, cls = showroom_prompts(subject_file)
    prompts = held + cls
    images, all_prompts = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        images += pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images
        all_prompts += prompts
    rates = checker.subject_rates(images, all_prompts)
    rates.update(seeds=list(seeds), inference_steps=steps, guidance_scale=guidance)
    if return_images:
        rates["images"] = images
    return rates


def load_with_adapter(base: str | Path, adapter: str | Path | None):
    """The tiny pipeline (fp32, CPU) with a DreamBooth adapter (UNet, and text encoder if saved) loaded, sampling
    with the trainer's validation sampler, so the rates here are the ones the trainer reported."""
    from ..adapters.io import load_adapter
    from ..training.validation import sampler_for
    from .build import load_pipeline

    pipe = load_pipeline(Path(base))
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
