"""Write the tiny world's synthetic data sets: the DreamBooth subject (photos, captions, masks, class images,
subject.json) and the outline -> shape control set (``python -m tools.tiny_world data``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hra_diffusion.tiny import scenes
from hra_diffusion.tiny.data import (
    SUBJECT_BACKGROUNDS,
    SUBJECT_LAYOUTS,
    _subject_scenes,
    class_caption,
    class_check_prompts,
    heldout_subject_prompts,
    subject_caption,
)

__all__ = ["write_subject", "write_control", "write_all", "SHOWROOM_CHECK"]

# what subject.json names as its showroom check: the trainer imports it by this name (it never imports the tiny world)
SHOWROOM_CHECK = "hra_diffusion.tiny.showroom:measure"


def write_subject(out: Path, seed: int = 0, n_train: int = 5, n_heldout: int = 12, n_class: int = 480) -> Path:
    """``out/train/*.png`` (with a caption ``.txt`` each), ``out/train_masks/*.png`` (the subject's masks, for the
    masked loss), ``out/heldout/*.png``, ``out/class/class-NNNNN.png`` + ``.txt`` (class images for prior
    preservation: plain one-colour stars of the base's own scene kind, the tiny world's "real photos of the
    class"), ``out/class_masks/`` (their object masks) and ``out/subject.json`` for one striped-star subject."""
    out = Path(out)
    if n_class:
        (out / "class").mkdir(parents=True, exist_ok=True)
        (out / "class_masks").mkdir(exist_ok=True)
        for i, s in enumerate(scenes.sample_scenes(seed + 303, n_class, shape=scenes.SUBJECT.shape)):
            scenes.render(s).save(out / "class" / f"class-{i:05d}.png")
            (out / "class" / f"class-{i:05d}.txt").write_text(class_caption(s, i) + "\n")
            scenes.object_mask(s).save(out / "class_masks" / f"class-{i:05d}.png")
    a, b = scenes.SUBJECT.stripes
    ident, noun = scenes.SUBJECT.identifier, scenes.SUBJECT.shape
    for split, n, split_seed in (("train", n_train, seed + 101), ("heldout", n_heldout, seed + 202)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(_subject_scenes(split_seed, n, SUBJECT_LAYOUTS[split])):
            scenes.render(s).save(out / split / f"{i:02d}.png")
            (out / split / f"{i:02d}.txt").write_text(subject_caption(s) + "\n")  # held-out ones: for CLIP-T
            if split == "train":
                (out / "train_masks").mkdir(exist_ok=True)
                scenes.object_mask(s).save(out / "train_masks" / f"{i:02d}.png")
    held = heldout_subject_prompts()
    doc = {
        "class_noun": noun,
        "identifier": ident,
        "instance_prompt": f"a {ident} {noun}",
        "class_prompt": f"a {noun}",
        "instance_mask_dir": "train_masks",  # used with mask_loss_weight > 0
        "class_data_dir": "class",  # rendered plain stars + captions (the default recipe's class images)
        "class_mask_dir": "class_masks",  # their object masks: class_mask_dir when class_data_dir is class/
        # the validation grid: the subject in new contexts (backgrounds, positions), and the class prompt
        "validation_prompts": [held[0], held[5], held[6], held[3], f"a {noun} on a {SUBJECT_BACKGROUNDS[1]} background"],
        "heldout_prompts": held,
        "class_check_prompts": class_check_prompts(),
        "description": f"a five-pointed star filled with horizontal {a} and {b} stripes, shown at a few positions and "
        "sizes; the base model only ever saw single-colour shapes, so the stripes are what DreamBooth must learn",
        "stripe_colours": [a, b],
        "resolution": scenes.RESOLUTION,
        "num_train": n_train,
        "num_heldout": n_heldout,
        "showroom": SHOWROOM_CHECK,
    }
    (out / "subject.json").write_text(json.dumps(doc, indent=2) + "\n")
    return out


def write_control(out: Path, seed: int = 0, n_train: int = 320, n_heldout: int = 24) -> Path:
    """``out/{train,heldout}/`` with images/, conditions/ (white outline on black) and metadata.jsonl rows."""
    out = Path(out)
    for split, n, split_seed in (("train", n_train, seed + 303), ("heldout", n_heldout, seed + 404)):
        root = out / split
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "conditions").mkdir(parents=True, exist_ok=True)
        rows = []
        for i, s in enumerate(scenes.sample_scenes(split_seed, n)):
            name = f"{i:04d}.png"
            scenes.render(s).save(root / "images" / name)
            scenes.render_outline(s).save(root / "conditions" / name)
            rows.append({"image": f"images/{name}", "conditioning_image": f"conditions/{name}", "text": scenes.caption(s)})
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def write_all(data_dir: Path, seed: int = 0) -> Path:
    """Regenerate ``data_dir/subject`` and ``data_dir/control`` from ``seed`` (old contents replaced)."""
    data_dir = Path(data_dir)
    tmp = data_dir.parent / (data_dir.name + ".tmp-data")
    shutil.rmtree(tmp, ignore_errors=True)
    write_subject(tmp / "subject", seed)
    write_control(tmp / "control", seed)
    for part in ("subject", "control"):
        shutil.rmtree(data_dir / part, ignore_errors=True)
        data_dir.mkdir(parents=True, exist_ok=True)
        (tmp / part).rename(data_dir / part)
    shutil.rmtree(tmp, ignore_errors=True)
    return data_dir
