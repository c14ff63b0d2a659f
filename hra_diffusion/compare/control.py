"""Control scoring for the comparison: Canny-edge F1 of generated images against their conditions (pixel-wise,
as ControlNet++, and within 1 px), and how often the prompt is followed (the asked colour and background,
read by the tiny world's checker), so control has its own trade-off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import CompareConfig

__all__ = ["control_setup", "evaluate_control", "evaluate_control_references"]


def control_setup(cfg: CompareConfig) -> tuple[dict[str, list], dict[str, Any]]:
    """({"val": pairs, "test": pairs}, settings): (condition, prompt, image path) from the held-out metadata, every
    third pair the validation split, the rest the test; the recipe's validation sampler and guidance."""
    from PIL import Image

    from .runs import trainer_config

    tcfg = trainer_config(cfg)
    folder = Path(tcfg.validation_data_dir or tcfg.train_data_dir)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    pairs = [(Image.open(folder / r[tcfg.conditioning_image_column]).convert("RGB"), r[tcfg.caption_column],
              str(folder / r[tcfg.image_column])) for r in rows]
    split = {"val": pairs[0::3], "test": [p for i, p in enumerate(pairs) if i % 3]}
    return split, {"pairs_from": str(folder), "val_pairs": len(split["val"]), "test_pairs": len(split["test"]),
                   "base_model": tcfg.pretrained_model, "resolution": tcfg.resolution,
                   "scheduler": tcfg.validation_scheduler, "steps": cfg.eval_steps,
                   "guidance": cfg.guidance if cfg.guidance is not None else tcfg.validation_guidance_scale,
                   "images": [cfg.control_val_images, cfg.control_test_images]}


def _prompt_followed(image, prompt: str) -> bool | None:
    """The asked colour and background both right (None: not a tiny-world prompt, so not read)."""
    from ..tiny import checker

    try:
        m = checker.prompt_matches(checker.read_scene(image), prompt)
    except ValueError:
        return None
    return all(m[k] is not False for k in ("colour", "background"))


def evaluate_control(cfg: CompareConfig, setup: dict, pairs: list, adapter: str | None, split: str) -> dict:
    """Canny F1 (pixel, 1 px) and prompt following of one adapter (None: the base, no condition encoder)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from ..control import attach_condition_encoder, load_trained_adapter
    from ..metrics.edge_consistency import control_consistency
    from ..sampling import build_pipeline, eval_mode, sampler_for
    from ..utils import default_device

    base = StableDiffusionPipeline.from_pretrained(setup["base_model"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe = build_pipeline(base.unet, base.text_encoder, base.vae, base.tokenizer, base.scheduler)
    pipe.scheduler = sampler_for(base.scheduler, setup["scheduler"])
    pipe.to(default_device(cfg.device))
    handle = None
    if adapter is not None:
        _, _, encoder = load_trained_adapter(pipe.unet, adapter)
        handle = attach_condition_encoder(pipe.unet, encoder)
    n = cfg.control_val_images if split == "val" else cfg.control_test_images
    f1: dict[int, list[float]] = {0: [], 1: []}
    images: list = []
    with eval_mode(pipe.unet):  # PEFT layers folded in: OFT/BOFT rebuild their rotation in every forward
        for k in range(n):  # image k of pair i: seed 1000·k + i, the same for every model
            got = control_consistency(pipe, [(c, p) for c, p, _ in pairs], handle, resolution=setup["resolution"],
                                      seed=1000 * k, steps=setup["steps"], guidance_scale=setup["guidance"],
                                      tolerances=(0, 1), images=images)
            for t in (0, 1):
                f1[t] += got[t]
    prompts = [p for _ in range(n) for _, p, _ in pairs]
    followed = [x for x in (_prompt_followed(im, p) for im, p in zip(images, prompts, strict=True)) if x is not None]
    metrics = {"canny_f1": float(np.mean(f1[0])), "canny_f1_1px": float(np.mean(f1[1]))}
    if followed:
        metrics["prompt_following"] = float(np.mean(followed))
    return {"metrics": metrics}


def evaluate_control_references(cfg: CompareConfig, setup: dict, pairs: dict[str, list]) -> dict[str, dict]:
    """The base model (no condition encoder) on both splits (its prompt following sets the rule's floor), and the
    real target images' own edges and colours on the test split."""
    import numpy as np
    from PIL import Image

    from ..metrics.edge_consistency import edge_consistency
    from .runs import cached

    refs = {f"base_{split}": cached(cfg, cfg.out / "reference" / split / "base" / "eval.json",
                                    {"setup": setup, "split": split},
                                    lambda split=split: evaluate_control(cfg, setup, pairs[split], None, split))
            for split in ("val", "test")}
    real = [(Image.open(img).convert("RGB"), cond, prompt) for cond, prompt, img in pairs["test"]]
    followed = [x for x in (_prompt_followed(im, p) for im, _, p in real) if x is not None]
    refs["real"] = {"metrics": {
        "canny_f1": float(np.mean([edge_consistency(im, c, tolerance=0) for im, c, _ in real])),
        "canny_f1_1px": float(np.mean([edge_consistency(im, c, tolerance=1) for im, c, _ in real])),
        **({"prompt_following": float(np.mean(followed))} if followed else {})}}
    return refs
