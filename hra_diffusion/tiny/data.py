"""Write the tiny world's synthetic data sets: the DreamBooth subject and the outline -> shape control set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import scenes

__all__ = ["write_subject", "write_control", "write_all", "SUBJECT_BACKGROUNDS"]

SUBJECT_BACKGROUNDS = ("green", "blue", "white", "black")  # never the stripe colours


def _subject_scenes(seed: int, n: int) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = scenes.sample_scene(
            rng, shape=scenes.SUBJECT.shape, colour=scenes.SUBJECT.stripes[0],
            background=SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)], stripes=scenes.SUBJECT.stripes,
        )
        # the subject is shown fairly large so its stripes stay visible at 32x32
        out.append(scenes.Scene(**{**s.__dict__, "radius": 0.3 + 0.12 * float(rng.random())}))
    return out


def write_subject(out: Path, seed: int = 0, n_train: int = 5, n_heldout: int = 12) -> Path:
    """``out/train/*.png``, ``out/heldout/*.png`` and ``out/subject.json`` for one striped-star subject."""
    out = Path(out)
    a, b = scenes.SUBJECT.stripes
    ident, noun = scenes.SUBJECT.identifier, scenes.SUBJECT.shape
    for split, n, split_seed in (("train", n_train, seed + 101), ("heldout", n_heldout, seed + 202)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(_subject_scenes(split_seed, n)):
            scenes.render(s).save(out / split / f"{i:02d}.png")
    doc = {
        "class_noun": noun,
        "identifier": ident,
        "instance_prompt": f"a {ident} {noun}",
        "class_prompt": f"a {noun}",
        "validation_prompts": [f"a {ident} {noun}"] + [f"a {ident} {noun} on a {bg} background" for bg in SUBJECT_BACKGROUNDS],
        "description": f"a five-pointed star filled with horizontal {a} and {b} stripes; the base model only ever saw "
        "single-colour shapes, so the stripes are what DreamBooth must learn",
        "stripe_colours": [a, b],
        "resolution": scenes.RESOLUTION,
        "num_train": n_train,
        "num_heldout": n_heldout,
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
