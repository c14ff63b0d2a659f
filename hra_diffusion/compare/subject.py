"""DreamBooth scoring for the comparison: samples of the subject in new contexts (backgrounds and sizes), at new
places (reported on their own), and of the class prompt with the adapter loaded; the subject checker's rates
(tiny world) and DINO / CLIP-I / CLIP-T against the training photos."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import CompareConfig

__all__ = ["SubjectSetup", "subject_setup", "evaluate_subject", "evaluate_subject_references", "SUBJECT_METRICS"]

SUBJECT_METRICS = ("dino", "clip_i", "clip_t")
POSITION_IMAGES = 4  # per position prompt
CLASS_TEST_IMAGES = 8  # per class prompt on the test split: the prior's rate to about +-8 points


@dataclass
class SubjectSetup:
    """What every DreamBooth evaluation shares: the prompt sets of both splits, the sampler, the subject's folders."""

    base_model: str
    reference_dir: str
    identifier: str
    prompts: dict[str, dict[str, list[str]]]  # {"val"|"test": {"context", "position", "class"}}
    heldout_dir: str | None
    generation: dict[str, Any]  # scheduler, steps, guidance, seed

    def settings(self) -> dict[str, Any]:
        return asdict(self)


def subject_setup(cfg: CompareConfig) -> SubjectSetup:
    """The recipe's subject (its subject.json), with the tiny world's prompt sets; the recipe's validation sampler."""
    from ..sampling import validation_sampler
    from ..tiny import data
    from ..tiny.showroom import has_showroom
    from ..training.dreambooth import apply_subject_file
    from .runs import trainer_config

    tcfg = apply_subject_file(trainer_config(cfg))
    if not has_showroom(tcfg.subject_file):
        raise ValueError("the comparison reads its rates with the tiny world's subject checker, and this recipe's "
                         f"subject ({tcfg.subject_file or tcfg.instance_data_dir}) has none; on your own subject, "
                         "use hra-diffusion generate + score at the settings the frontier chose (docs/baselines.md)")
    doc = json.loads(Path(tcfg.subject_file).read_text())
    subject_dir = Path(tcfg.instance_data_dir).parent
    return SubjectSetup(
        base_model=tcfg.pretrained_model, reference_dir=tcfg.instance_data_dir, identifier=doc["identifier"],
        prompts=data.frontier_prompts(),
        heldout_dir=str(subject_dir / "heldout") if (subject_dir / "heldout").is_dir() else None,
        generation={"scheduler": validation_sampler(tcfg)[0], "steps": cfg.eval_steps, "seed": 0,
                    "guidance": cfg.guidance if cfg.guidance is not None else tcfg.validation_guidance_scale})


def _generate(cfg: CompareConfig, setup: SubjectSetup, adapter: str | None, folder: Path,
              prompts: list[tuple[str, int]]) -> Path:
    """Images of each (prompt, count) into ``folder`` (image k of a prompt: seed + k, the same for every model)."""
    from ..generate import GenerateConfig, generate
    from ..utils import default_device

    g = setup.generation
    for count in sorted({n for _, n in prompts}):
        generate(GenerateConfig(
            output_dir=str(folder / f"n{count}"), adapter=adapter, base_model=setup.base_model,
            prompts=[p for p, n in prompts if n == count], reference_dir=setup.reference_dir,
            num_images_per_prompt=count, seed=g["seed"], steps=g["steps"], scheduler=g["scheduler"],
            guidance_scale=g["guidance"], device=default_device(cfg.device), safety_checker=False, overwrite=True,
            progress=False))
    return folder


def _images(folder: Path) -> tuple[list, list[str]]:
    from PIL import Image

    from ..samples import read_samples

    images, prompts = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for r in read_samples(sub):
            images.append(Image.open(r.file).convert("RGB"))
            prompts.append(r.prompt)
    return images, prompts


def _rates(images: list, prompts: list[str], context: tuple[str, ...]) -> dict[str, Any]:
    from ..tiny import checker

    return checker.subject_rates(images, prompts, context=context)


def _scores(cfg: CompareConfig, folder: Path) -> dict[str, float]:
    """DINO, CLIP-I, CLIP-T of the samples in ``folder``'s sub-folders (one generate run each), weighted by their
    number of images."""
    from ..metrics.subject import score_subject
    from ..samples import read_samples
    from ..utils import default_device

    sums: dict[str, float] = {}
    total = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        n = len(read_samples(sub))
        result = score_subject(sub, metrics=list(SUBJECT_METRICS), dino=cfg.dino_model, clip=cfg.clip_model,
                               **({"clip_pretrained": cfg.clip_pretrained} if cfg.clip_pretrained else {}),
                               device=default_device(cfg.device))
        for k in SUBJECT_METRICS:
            if k in result.summary:
                sums[k] = sums.get(k, 0.0) + float(result.summary[k]) * n
        total += n
    return {k: v / total for k, v in sums.items()}


def evaluate_subject(cfg: CompareConfig, setup: SubjectSetup, adapter: str | None, folder: Path, split: str) -> dict:
    """One adapter (None: the base) on a split's prompts: the checker's rates and the subject metrics.

    subject_rate / subject_in_context_rate: over the context prompts, the striped subject / with the asked
    background and size; position_subject_rate / position_rate: the same over the position prompts (background and
    position); class_plain_rate / class_striped_rate: the class prompts drawn as a plain object on the asked
    background / with the stripes leaking."""
    prompts = setup.prompts[split]
    n = cfg.val_images if split == "val" else cfg.test_images
    n_class = n if split == "val" else max(n, CLASS_TEST_IMAGES)
    if adapter is None:  # the base: the subject prompts asked without the identifier (its chance of the subject)
        subject = [(" ".join(w for w in p.split() if w != setup.identifier), n) for p in prompts["context"]]
    else:
        subject = [(p, n) for p in prompts["context"]]
    samples = _generate(cfg, setup, adapter, folder / "context", subject)
    metrics: dict[str, float] = _scores(cfg, samples) if adapter is not None else {}
    images, used = _images(samples)
    if adapter is None:
        asked = {" ".join(w for w in p.split() if w != setup.identifier): p for p in prompts["context"]}
        used = [asked[p] for p in used]
    got = _rates(images, used, ("background", "size"))
    metrics.update(subject_rate=got["subject_rate"], subject_in_context_rate=got["subject_in_context_rate"])
    extra = [(p, POSITION_IMAGES) for p in prompts["position"]] if adapter is not None else []
    images, used = _images(_generate(cfg, setup, adapter, folder / "more", [*extra, *((p, n_class) for p in prompts["class"])]))
    is_class = [setup.identifier not in p.split() for p in used]
    got = _rates([im for im, c in zip(images, is_class, strict=True) if c], [p for p, c in zip(used, is_class, strict=True) if c],
                 ("background",))  # the prior kept: a plain object on the asked background
    metrics.update(class_plain_rate=got["class_plain_rate"], class_striped_rate=got["class_striped_rate"])
    if extra:
        got = _rates([im for im, c in zip(images, is_class, strict=True) if not c],
                     [p for p, c in zip(used, is_class, strict=True) if not c], ("background", "position"))
        metrics.update(position_subject_rate=got["subject_rate"], position_rate=got["subject_in_context_rate"])
    return {"metrics": {k: float(v) for k, v in metrics.items() if v is not None}}


def evaluate_subject_references(cfg: CompareConfig, setup: SubjectSetup, split: str) -> dict[str, dict]:
    """The base model on the split's prompts (its class prompts set the rule's prior floor), and on the test split
    the real held-out photos scored as if generated (with their captions)."""
    from .runs import cached

    refs = {"base": cached(cfg, cfg.out / "reference" / split / "base" / "eval.json",
                           {"setup": setup.settings(), "split": split, "images": _sizes(cfg)},
                           lambda: evaluate_subject(cfg, setup, None, cfg.out / "reference" / split / "base", split))}
    if split == "test" and setup.heldout_dir:
        refs["real"] = cached(cfg, cfg.out / "reference" / "real" / "eval.json", {"setup": setup.settings()},
                              lambda: _real_photos(cfg, setup))
    return refs


def _sizes(cfg: CompareConfig) -> list[int]:
    return [cfg.val_images, cfg.test_images]


def _real_photos(cfg: CompareConfig, setup: SubjectSetup) -> dict:
    """The held-out photos scored as generated samples: a manifest with each photo's caption and the base."""
    from PIL import Image

    from ..samples import list_images

    folder = cfg.out / "reference" / "real" / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in list_images(Path(setup.heldout_dir)):
        caption = photo.with_suffix(".txt")
        rows.append({"file": str(photo.resolve()), "reference_dir": str(Path(setup.reference_dir).resolve()),
                     "base": setup.base_model, "prompt": caption.read_text(encoding="utf-8").strip()})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = _scores(cfg, folder.parent)
    got = _rates([Image.open(r["file"]).convert("RGB") for r in rows], [r["prompt"] for r in rows],
                 ("background", "size"))
    metrics.update(subject_rate=got["subject_rate"], subject_in_context_rate=got["subject_in_context_rate"])
    return {"metrics": metrics, "photos": len(rows)}
