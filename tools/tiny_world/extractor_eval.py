"""Do the tiny-world extractors mean something? The figures of the build report and of tests/test_tiny_extractors.py.

Everything goes through the scorer's own extractor classes (``metrics.extractors``: the same resizing, normalising
and CLS/projection features as ``hra-diffusion score subject``):

- subject fidelity: DINO and CLIP-I of the real held-out subject photos against its reference photos
  (``assets/tiny-data/subject/{heldout,train}``), as the scorer computes them (mean over all pairs), next to the
  same photos redrawn with only the fill changed to a plain star of each colour, or with the subject's stripes on
  a circle, square or triangle (same place, size and background: nothing but the subject's identity differs);
- prompt fidelity: CLIP-T of held-out scenes with their own caption against the same caption with a wrong
  background or a wrong colour, and of the held-out subject photos with "a qwe star on a <background> background";
- zero-shot accuracy: colour, shape and background of held-out scenes read by the CLIP from text prompts alone.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hra_diffusion.paths import TINY_CONTROL_DIR, TINY_EXTRACTORS_DIR, TINY_SUBJECT_DIR
from hra_diffusion.tiny import scenes
from hra_diffusion.tiny.data import subject_scenes

from .extractor_data import Item, images_to_tensor, render_item

__all__ = [
    "EVAL_SEED",
    "load_tiny_extractors",
    "subject_images",
    "plain_stars",
    "striped_shapes",
    "heldout_scenes",
    "subject_fidelity",
    "clip_t_checks",
    "zero_shot",
    "evaluate",
    "evaluate_folder",
]

EVAL_SEED = 4321  # rendered held-out scenes (the extractors train on other seeds)


def load_tiny_extractors(folder: str | Path = TINY_EXTRACTORS_DIR, device: str = "cpu"):
    """(DINOExtractor, CLIPExtractor) of the tiny world, loaded the way the scorer loads local weights."""
    from hra_diffusion.metrics.choice import require_extractors
    from hra_diffusion.metrics.extractors import load_clip, load_dino

    folder = require_extractors(folder)
    return load_dino(str(folder / "dino"), device=device), load_clip(str(folder / "clip"), None, device=device)


def _load(files: list[Path]) -> torch.Tensor:
    from hra_diffusion.samples import load_image

    return torch.stack([load_image(f) for f in files])


def subject_images(split: str) -> torch.Tensor:
    """The shipped subject photos of ``split`` ('train': the references, 'heldout') as (N, 3, 32, 32)."""
    return _load(sorted((TINY_SUBJECT_DIR / split).glob("*.png")))


def _heldout_subject_scenes() -> list[scenes.Scene]:
    """The scenes of the shipped held-out subject photos (``data.write_subject`` draws them from these)."""
    return subject_scenes(split="heldout")


def plain_stars(colour: str) -> tuple[torch.Tensor, list[int]]:
    """The held-out subject photos redrawn as plain ``colour`` stars: the same place, size, tilt and background,
    only the fill differs. Photos whose background is ``colour`` are left out; returns (images, the photos' indices)."""
    keep = [i for i, s in enumerate(_heldout_subject_scenes()) if s.background != colour]
    subj = _heldout_subject_scenes()
    out = [scenes.render(replace(subj[i], colour=colour, stripes=None)) for i in keep]
    return images_to_tensor(out), keep


def striped_shapes(shape: str, seed: int = EVAL_SEED) -> torch.Tensor:
    """The held-out subject photos redrawn as another ``shape`` (upright as that shape is drawn) in the subject's
    own stripes, on the same background at the same size class and grid cell."""
    rng = np.random.default_rng([seed, scenes.SHAPES.index(shape)])
    out = []
    for s in _heldout_subject_scenes():
        redraw = scenes.sample_scene(rng, shape=shape, colour=s.colour, background=s.background, stripes=s.stripes,
                                     size=scenes.size_word(s), position=scenes.position_word(s))
        out.append(render_item(Item(redraw, "striped", tuple(s.stripes), 0)))
    return images_to_tensor(out)


def heldout_scenes(n_rendered: int, seed: int = EVAL_SEED) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """Held-out plain scenes with their (shape, colour, background): the control set's held-out images shipped in
    assets/tiny-data, then ``n_rendered`` scenes drawn from ``seed``."""
    rows = [json.loads(line) for line in (TINY_CONTROL_DIR / "heldout" / "metadata.jsonl").read_text().splitlines()
            if line.strip()]
    labels = []
    for r in rows:  # "a red star on a blue background"
        words = r["text"].split()
        labels.append((words[2], words[1], words[5]))
    images = _load([TINY_CONTROL_DIR / "heldout" / r["image"] for r in rows])
    rendered = scenes.sample_scenes(seed, n_rendered)
    if rendered:
        images = torch.cat([images, images_to_tensor([scenes.render(s) for s in rendered])])
        labels += [(s.shape, s.colour, s.background) for s in rendered]
    return images, labels


def _pair_means(extractor, refs: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Each image's mean cosine with the references (the scorer's per-image pair metric)."""
    return (extractor(refs) @ extractor(images).T).mean(0)


def subject_fidelity(extractor) -> dict[str, Any]:
    """DINO or CLIP-I against the subject's reference photos (the scorer's mean over all pairs) for the held-out
    photos and for the same photos redrawn with one change: a plain star of each colour (same place, size,
    background), or the subject's stripes on another shape. ``margin_vs_plain[c]``: held-out photos minus their
    plain-``c`` redraws, over the photos whose background is not ``c``; ``min_margin_vs_plain`` the smallest."""
    refs = subject_images("train")
    heldout = _pair_means(extractor, refs, subject_images("heldout"))
    plain, margins = {}, {}
    for c in scenes.COLOURS:
        images, keep = plain_stars(c)
        values = _pair_means(extractor, refs, images)
        plain[c] = round(float(values.mean()), 4)
        margins[c] = round(float(heldout[keep].mean() - values.mean()), 4)
    other = {s: round(float(_pair_means(extractor, refs, striped_shapes(s)).mean()), 4)
             for s in scenes.SHAPES if s != scenes.SUBJECT.shape}
    return {"subject_heldout": round(float(heldout.mean()), 4), "plain_stars": plain, "margin_vs_plain": margins,
            "min_margin_vs_plain": min(margins.values()), "striped_other_shapes": other,
            "min_margin_vs_other_shapes": round(float(heldout.mean()) - max(other.values()), 4)}


def _text(clip, prompts: list[str]) -> torch.Tensor:
    return clip.encode_text(prompts)


def clip_t_checks(clip, images: torch.Tensor, labels: list[tuple[str, str, str]]) -> dict[str, Any]:
    """CLIP-T of each scene with its caption against every caption with one wrong background or one wrong colour;
    and of the held-out subject photos with "a qwe star on a <bg> background" against the other backgrounds."""
    feats = clip(images)
    out: dict[str, Any] = {}
    for kind in ("background", "colour"):
        wins, margins = [], []
        for f, (shape, colour, bg) in zip(feats, labels, strict=True):
            right = f"a {colour} {shape} on a {bg} background"
            if kind == "background":
                wrong = [f"a {colour} {shape} on a {b} background" for b in scenes.COLOURS if b not in (bg, colour)]
            else:
                wrong = [f"a {c} {shape} on a {bg} background" for c in scenes.COLOURS if c not in (bg, colour)]
            sims = _text(clip, [right, *wrong]) @ f
            wins += (sims[0] > sims[1:]).tolist()
            margins.append(float(sims[0] - sims[1:].mean()))
        out[f"scenes_right_beats_wrong_{kind}"] = round(float(np.mean(wins)), 4)
        out[f"scenes_margin_wrong_{kind}"] = round(float(np.mean(margins)), 4)
    out.update(_subject_prompt_checks(clip))
    out["n_scenes"] = len(labels)
    return out


def _subject_prompt_checks(clip) -> dict[str, Any]:
    ident, noun = scenes.SUBJECT.identifier, scenes.SUBJECT.shape
    feats = clip(subject_images("heldout"))
    truth = [s.background for s in subject_scenes(split="heldout")]
    others = [c for c in scenes.COLOURS if c not in scenes.SUBJECT.stripes]
    wins, right_t, wrong_t = [], [], []
    for f, bg in zip(feats, truth, strict=True):
        wrong = [b for b in others if b != bg]
        sims = _text(clip, [f"a {ident} {noun} on a {bg} background"] + [f"a {ident} {noun} on a {b} background"
                                                                         for b in wrong]) @ f
        wins += (sims[0] > sims[1:]).tolist()
        right_t.append(float(sims[0]))
        wrong_t.append(float(sims[1:].mean()))
    a, b = scenes.SUBJECT.stripes
    described = [f"a {a} and {b} striped {noun}"] + [f"a {c} {noun}" for c in scenes.COLOURS]
    pattern = (_text(clip, described) @ feats.T).argmax(0)  # which description each photo matches best
    return {"subject_clip_t_right_background": round(float(np.mean(right_t)), 4),
            "subject_clip_t_wrong_background": round(float(np.mean(wrong_t)), 4),
            "subject_right_beats_wrong_background": round(float(np.mean(wins)), 4),
            "subject_striped_description_rate": round(float((pattern == 0).float().mean()), 4)}


def _ensemble(clip, template: str, targets: list[str], others: list[str]) -> torch.Tensor:
    """(len(targets), D): for each target, the normalised mean text feature over the ``others`` filled in."""
    rows = []
    for t in targets:
        f = _text(clip, [template.format(t=t, o=o) for o in others]).mean(0)
        rows.append(f / f.norm())
    return torch.stack(rows)


def zero_shot(clip, images: torch.Tensor, labels: list[tuple[str, str, str]]) -> dict[str, float]:
    """Zero-shot colour, shape and background accuracy: the nearest prompt, each class's prompts averaged over the
    other attribute ("a red {circle|square|triangle|star}" for red; "a {colour} star" for star), as CLIP does."""
    colours, shapes = list(scenes.COLOURS), list(scenes.SHAPES)
    feats = clip(images)
    heads = {
        "colour": (_ensemble(clip, "a {t} {o}", colours, shapes), colours, 1),
        "shape": (_ensemble(clip, "a {o} {t}", shapes, colours), shapes, 0),
        "background": (_ensemble(clip, "a {o} on a {t} background", colours, shapes), colours, 2),
    }
    out = {}
    for name, (text, names, col) in heads.items():
        pred = (feats @ text.T).argmax(1).tolist()
        out[f"{name}_accuracy"] = round(float(np.mean([names[p] == lab[col] for p, lab in zip(pred, labels, strict=True)])), 4)
    out["n"] = len(labels)
    return out


def evaluate(dino, clip, n_scenes: int = 96) -> dict[str, Any]:
    """Every figure above for one (DINO, CLIP) pair of scorer extractors."""
    images, labels = heldout_scenes(n_scenes)
    with torch.no_grad():
        return {"dino": subject_fidelity(dino), "clip_i": subject_fidelity(clip),
                "clip_t": clip_t_checks(clip, images, labels), "zero_shot": zero_shot(clip, images, labels)}


def _untrained(cfg) -> tuple[Any, Any]:
    """The same architectures with fresh weights, as scorer extractors: what the training adds shows against it."""
    from open_clip.tokenizer import SimpleTokenizer

    from hra_diffusion.metrics.extractors import CLIPExtractor, DINOExtractor

    from .extractor_models import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, make_clip, make_dino

    torch.manual_seed(cfg.seed + 99)
    vit, _ = make_dino(cfg)
    dino = DINOExtractor(vit.eval(), "untrained-dino", image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    clip = CLIPExtractor(make_clip(cfg).eval(), SimpleTokenizer(context_length=cfg.context_length), "untrained-clip",
                         image_size=32, mean=OPENAI_MEAN, std=OPENAI_STD)
    return dino, clip


def evaluate_folder(folder: str | Path, cfg) -> dict[str, Any]:
    """The build report's figures: the written extractors in ``folder``, and untrained ones for comparison."""
    dino, clip = load_tiny_extractors(folder)
    figures = evaluate(dino, clip, cfg.eval_scenes)
    base_dino, base_clip = _untrained(cfg)
    with torch.no_grad():
        figures["untrained"] = {"dino": subject_fidelity(base_dino), "clip_i": subject_fidelity(base_clip)}
    figures["untrained"]["note"] = "the same architectures with fresh weights (chance level for zero-shot: 1/6, 1/4)"
    return figures

