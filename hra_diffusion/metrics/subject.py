"""Subject fidelity of DreamBooth-style samples: DINO, CLIP-I, CLIP-T and LPIPS (the protocol of the official HRA code's generation/subject/evaluate.py; docs/generate-score.md).

DINO / CLIP-I / LPIPS: every generated image against every real image of its subject, averaged over
ALL pairs. CLIP-T: each image against the prompt it was generated from (identifier included).
All-black images (safety-filtered) are skipped and counted. Which DINO and CLIP: ``choice.choose_extractors``
(the flags, else the tiny world's stand-ins for tiny-world samples, else the real models).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import HRAWarning
from ..samples import SampleRow, list_images, load_image, read_samples
from .cache import FeatureCache, cached_features, default_cache_dir
from .choice import choose_extractors
from .extractors import (
    DEFAULT_CLIP_PRETRAINED,
    CLIPExtractor,
    DINOExtractor,
    WeightsUnavailableError,
    load_clip,
    load_dino,
)
from .functional import is_all_black, matched_cosine, pairwise_cosine
from .result import ScoreResult, parse_metric_names

__all__ = ["SUBJECT_METRICS", "default_subject_metrics", "score_subject", "lpips_available", "load_lpips"]

SUBJECT_METRICS = {
    "dino": "DINO CLS cosine, real x generated (higher is better; ViT-S/16, or the tiny world's stand-in)",
    "clip_i": "CLIP image-image cosine, real x generated (higher is better)",
    "clip_t": "CLIP image-prompt cosine (higher is better)",
    "lpips": "LPIPS distance, real x generated (lower is better; needs the lpips package)",
}


def lpips_available() -> bool:
    return importlib.util.find_spec("lpips") is not None


def default_subject_metrics() -> list[str]:
    return ["dino", "clip_i", "clip_t"] + (["lpips"] if lpips_available() else [])


def load_lpips(model: str | torch.nn.Module = "vgg", device: str | torch.device = "cpu") -> torch.nn.Module:
    """LPIPS (Zhang et al. 2018) from the ``lpips`` package ('vgg' as in the HRA evaluation), or a built module."""
    if isinstance(model, torch.nn.Module):
        return model.to(device).eval()
    if not lpips_available():
        raise WeightsUnavailableError("LPIPS needs the `lpips` package: pip install lpips (or drop lpips from --metrics)")
    import lpips

    try:
        return lpips.LPIPS(net=str(model), verbose=False).to(device).eval()
    except Exception as err:  # torchvision backbone download failures come in many types
        raise WeightsUnavailableError(
            f"could not load LPIPS-{model} weights ({type(err).__name__}: {err}); its {model} backbone comes "
            "from torchvision's download cache: put the weights file in $TORCH_HOME/hub/checkpoints "
            "on a machine with internet access first"
        ) from None


def _lpips_pairs(model: torch.nn.Module, reals: list[torch.Tensor], gens: list[torch.Tensor], device) -> torch.Tensor:
    """(R, G) LPIPS distances; each real image is resized to its generated image's size."""
    out = torch.zeros(len(reals), len(gens))
    with torch.no_grad():
        for j, g in enumerate(gens):
            size = g.shape[-2:]
            r = torch.stack([F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
                             for x in reals])
            g2 = g[None].expand(len(reals), -1, -1, -1)
            d = model(r.to(device) * 2 - 1, g2.to(device) * 2 - 1)  # lpips wants [-1, 1]
            out[:, j] = d.flatten().float().cpu()
    return out


def _subject_rows(samples_dir: str | os.PathLike, reference_dir: str | os.PathLike | None,
                  names: list[str]) -> list[SampleRow]:
    """The manifest rows, with ``reference_dir`` applied, checked against what the metrics need."""
    rows = read_samples(samples_dir)
    if reference_dir is not None:
        for row in rows:
            row.reference_dir = Path(reference_dir)
    needs_ref = [n for n in names if n != "clip_t"]
    if needs_ref:
        missing = [r for r in rows if r.reference_dir is None]
        if missing:
            raise ValueError(
                f"{', '.join(needs_ref)} compare with real subject images, but {missing[0].file.name} has no "
                "reference folder: pass --reference DIR (or generate with --reference-dir)"
            )
    if "clip_t" in names:
        no_prompt = [r for r in rows if not r.prompt]
        if no_prompt:
            raise ValueError(
                f"clip_t needs each image's prompt, but {no_prompt[0].file.name} has none (no manifest.jsonl "
                f"in {samples_dir}?); score a folder written by `generate`, or pass --metrics without clip_t"
            )
    return rows


def _reference_sets(kept: list[SampleRow]) -> tuple[dict[Path, list[SampleRow]], dict[Path, list[Path]], int]:
    """Kept rows grouped by reference folder, each folder's non-black real images, and how many were black."""
    groups: dict[Path, list[SampleRow]] = {}
    refs: dict[Path, list[Path]] = {}
    black_refs = 0
    for r in kept:
        groups.setdefault(r.reference_dir, []).append(r)
    for ref_dir in groups:
        files = list_images(ref_dir, "reference")
        good = [f for f in files if not bool(is_all_black(load_image(f)[None])[0])]
        black_refs += len(files) - len(good)
        if not good:
            raise ValueError(f"every image in reference folder {str(ref_dir)!r} is all black")
        refs[ref_dir] = good
    return groups, refs, black_refs


def _load_models(names: list[str], dino, clip, clip_pretrained, clip_tokenizer, lpips_model,
                 device, lpips_optional: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'dino' | 'clip' | 'lpips': loaded model} for the requested metrics, the info entries naming them).
    ``lpips_optional``: LPIPS weights that cannot be loaded are noted under ``info['unavailable']``, not raised."""
    models: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if "dino" in names:
        models["dino"] = dino if isinstance(dino, DINOExtractor) else load_dino(dino, device=device)
        info["dino_model"] = models["dino"].cache_key
    if "clip_i" in names or "clip_t" in names:
        models["clip"] = clip if isinstance(clip, CLIPExtractor) else load_clip(
            clip, clip_pretrained, device=device, tokenizer=clip_tokenizer)
        info["clip_model"] = models["clip"].cache_key
    if "lpips" in names:
        try:
            models["lpips"] = load_lpips(lpips_model, device=device)
        except WeightsUnavailableError as err:
            if not lpips_optional:
                raise
            # lpips was not asked for by name, only there by default: say why it is missing instead of failing
            info["unavailable"] = {"lpips": str(err)}
            warnings.warn(f"lpips not computed: {err}", HRAWarning, stacklevel=3)
            return models, info
        info["lpips_model"] = lpips_model if isinstance(lpips_model, str) else type(lpips_model).__name__
    return models, info


@dataclass
class _SubjectRun:
    """What every metric of one scoring run shares; each metric writes per-image values and its summary."""

    kept: list[SampleRow]
    groups: dict[Path, list[SampleRow]]
    refs: dict[Path, list[Path]]
    gen_pixels: dict[Path, torch.Tensor]
    per_image: dict[Path, dict[str, Any]]
    cache_root: Path
    batch_size: int
    progress: Callable | None
    summary: dict[str, float] = field(default_factory=dict)

    def features(self, extractor, files: list[Path]) -> torch.Tensor:
        cache = FeatureCache(self.cache_root, extractor.cache_key)
        return cached_features(files, extractor, load_image, cache, batch_size=self.batch_size, progress=self.progress)

    def pair_metric(self, metric: str, extractor) -> None:
        """Feature cosine over ALL (real, generated) pairs of each subject."""
        total, count = 0.0, 0
        for ref_dir, members in self.groups.items():
            real = self.features(extractor, self.refs[ref_dir])
            gen = self.features(extractor, [m.file for m in members])
            sims = pairwise_cosine(real, gen)  # (R, G)
            total += sims.sum().item()
            count += sims.numel()
            for m, v in zip(members, sims.mean(0).tolist(), strict=True):
                self.per_image[m.file][metric] = v
        self.summary[metric] = total / count

    def clip_t(self, extractor: CLIPExtractor) -> None:
        """Each image against its own prompt."""
        img = self.features(extractor, [r.file for r in self.kept])
        txt = extractor.encode_text([r.prompt for r in self.kept])
        values = matched_cosine(img, txt)
        for r, v in zip(self.kept, values.tolist(), strict=True):
            self.per_image[r.file]["clip_t"] = v
        self.summary["clip_t"] = values.mean().item()

    def lpips(self, model: torch.nn.Module, device) -> None:
        """LPIPS distance over ALL (real, generated) pairs of each subject."""
        total, count = 0.0, 0
        for ref_dir, members in self.groups.items():
            reals = [load_image(f) for f in self.refs[ref_dir]]
            d = _lpips_pairs(model, reals, [self.gen_pixels[m.file] for m in members], device)
            total += d.sum().item()
            count += d.numel()
            for m, v in zip(members, d.mean(0).tolist(), strict=True):
                self.per_image[m.file]["lpips"] = v
        self.summary["lpips"] = total / count


def score_subject(
    samples_dir: str | os.PathLike,
    reference_dir: str | os.PathLike | None = None,
    metrics: str | list[str] | None = None,
    dino: str | os.PathLike | torch.nn.Module | DINOExtractor | None = None,
    clip: str | torch.nn.Module | CLIPExtractor | None = None,
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    clip_tokenizer=None,
    lpips_model: str | torch.nn.Module = "vgg",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: Callable | None = None,
) -> ScoreResult:
    """Score a samples folder against real subject images; see the module docstring for the protocol.

    ``dino`` / ``clip`` None: chosen from the samples' base model (the tiny world's stand-in extractors for
    tiny-world samples, else DINO ViT-S/16 and CLIP ViT-L/14); metrics.json names them under ``info.extractors``."""
    names = parse_metric_names(metrics, SUBJECT_METRICS, default_subject_metrics())
    rows = _subject_rows(samples_dir, reference_dir, names)
    gen_pixels = {r.file: load_image(r.file) for r in rows}
    black = {f for f, x in gen_pixels.items() if bool(is_all_black(x[None])[0])}
    kept = [r for r in rows if r.file not in black]
    if not kept:
        raise ValueError(f"every image in {samples_dir} is all black (safety-filtered?): nothing to score")
    groups, refs, black_refs = _reference_sets(kept) if any(n != "clip_t" for n in names) else ({}, {}, 0)
    need = [k for k, metrics_of in (("dino", {"dino"}), ("clip", {"clip_i", "clip_t"})) if metrics_of & set(names)]
    choice = choose_extractors(rows, dino, clip, clip_pretrained, need=need)
    models, model_info = _load_models(names, choice.dino, choice.clip, choice.clip_pretrained, clip_tokenizer,
                                      lpips_model, device, lpips_optional=metrics in (None, "", []))
    if need:
        model_info.update(choice.info)

    per_image = {r.file: {"file": str(r.file), "prompt": r.prompt or "", "reference_dir": str(r.reference_dir or ""),
                          "skipped": "all-black" if r.file in black else ""} for r in rows}
    run = _SubjectRun(kept, groups, refs, gen_pixels, per_image,
                      Path(cache_dir) if cache_dir is not None else default_cache_dir(), batch_size, progress)
    if "dino" in names:
        run.pair_metric("dino", models["dino"])
    if "clip_i" in names:
        run.pair_metric("clip_i", models["clip"])
    if "clip_t" in names:
        run.clip_t(models["clip"])
    if "lpips" in models:
        run.lpips(models["lpips"], device)

    counts = {"images": len(rows), "scored": len(kept), "skipped_black": len(black),
              "references": sum(len(v) for v in refs.values()), "skipped_black_references": black_refs,
              "reference_sets": len(refs)}
    info = {"samples_dir": str(samples_dir), "metrics": [n for n in names if n not in model_info.get("unavailable", {})],
            **model_info}
    return ScoreResult(kind="subject", summary=run.summary, per_image=[per_image[r.file] for r in rows],
                       counts=counts, info=info, references=[f for v in refs.values() for f in v])
