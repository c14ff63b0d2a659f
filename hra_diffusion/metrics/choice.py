"""Which DINO and CLIP score a sample set: the flags when given, else by the samples' base model.

``generate`` records the base model of every image in the manifest (``base``). Samples of the tiny world
(``assets/tiny-sd``, or any folder written by ``python -m tools.tiny_world build``) are scored with the tiny world's
stand-in extractors (``assets/tiny-extractors``: small models trained on its 32 px scenes, see
docs/tiny-extractors.md); every other base keeps the real DINO ViT-S/16 and CLIP ViT-L/14 (OpenAI) defaults, whose
weights must be downloaded. ``--dino-model`` / ``--clip-model`` / ``--clip-pretrained`` always win.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..samples import SampleRow
from .extractors import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, DEFAULT_DINO

__all__ = ["ExtractorChoice", "choose_extractors", "is_tiny_world_base", "require_extractors", "TINY_DINO_NAME",
           "TINY_CLIP_NAME"]

TINY_DINO_NAME = "tiny-world stand-in DINO (ViT 32 px, patch 4; not the real DINO)"
TINY_CLIP_NAME = "tiny-world stand-in CLIP (open_clip ViT 32 px; not the real CLIP)"
# keys of the build report that `python -m tools.tiny_world build` writes into every tiny-world pipeline folder
_TINY_BUILD_KEYS = {"pool_size", "unet_steps", "vae_steps", "resolution"}


def is_tiny_world_base(base: str | None) -> bool:
    """True if ``base`` (a manifest's ``base``) is the tiny world: assets/tiny-sd, or a folder written by its build."""
    from ..paths import TINY_MODEL_DIR

    if not base or not Path(base).is_dir():
        return False
    if Path(base).resolve() == TINY_MODEL_DIR.resolve():
        return True
    try:
        config = json.loads((Path(base) / "build_report.json").read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(config, dict) and _TINY_BUILD_KEYS <= set(config)


@dataclass
class ExtractorChoice:
    """What to load (names/paths/modules as ``load_dino`` / ``load_clip`` take them) and how it was chosen."""

    dino: Any
    clip: Any
    clip_pretrained: Any
    info: dict[str, Any] = field(default_factory=dict)


def _name(value: Any) -> str:
    if hasattr(value, "cache_key"):  # an extractor object
        return value.cache_key
    return value if isinstance(value, str) else str(value) if hasattr(value, "__fspath__") else type(value).__name__


def choose_extractors(rows: Sequence[SampleRow], dino: Any = None, clip: Any = None,
                      clip_pretrained: Any = DEFAULT_CLIP_PRETRAINED,
                      need: Sequence[str] = ("dino", "clip")) -> ExtractorChoice:
    """Fill in the extractors of ``need`` not given (None) from the rows' base model; see the module docstring.

    A sample set mixing tiny-world and other bases must name its extractors (the two kinds of numbers would not
    be comparable). An extractor not in ``need`` is left as given (and not named in ``info``)."""
    bases = sorted({str(r.extra.get("base") or "") for r in rows})
    tiny = [b for b in bases if is_tiny_world_base(b)]
    missing = [k for k, v in (("dino", dino), ("clip", clip)) if k in need and v is None]
    if not missing:
        names = {k: f"given: {_name(v)}" for k, v in (("dino", dino), ("clip", clip)) if k in need}
        return ExtractorChoice(dino, clip, clip_pretrained, {"extractors_chosen_by": "flags", "extractors": names})
    if tiny and len(tiny) != len(bases):
        others = [b or "(not recorded)" for b in bases if b not in tiny]
        raise ValueError(
            f"these samples come from the tiny world ({tiny[0]}) and from other base models ({others[0]}); their "
            "DINO/CLIP numbers would not be comparable: score them separately, or pass --dino-model and --clip-model")
    info: dict[str, Any] = {"extractors_chosen_by": (f"base model: the tiny world ({tiny[0]})" if tiny
                                                     else "default: the real DINO/CLIP")}
    names: dict[str, str] = {}
    if tiny:
        folder = require_extractors()
        if "dino" in missing:
            dino, names["dino"] = str(folder / "dino"), f"{TINY_DINO_NAME}: {folder / 'dino'}"
        if "clip" in missing:  # a local folder: load_clip ignores clip_pretrained for it
            clip, names["clip"] = str(folder / "clip"), f"{TINY_CLIP_NAME}: {folder / 'clip'}"
    if dino is None and "dino" in need:
        dino, names["dino"] = DEFAULT_DINO, f"DINO ViT-S/16: {DEFAULT_DINO}"
    if clip is None and "clip" in need:
        clip, names["clip"] = DEFAULT_CLIP_MODEL, f"CLIP {DEFAULT_CLIP_MODEL} / {clip_pretrained}"
    for key, value in (("dino", dino), ("clip", clip)):
        if key in need and key not in names:
            names[key] = f"given: {_name(value)}"
    info["extractors"] = names
    return ExtractorChoice(dino, clip, clip_pretrained, info)


def require_extractors(folder: str | Path | None = None) -> Path:
    """``folder`` if it holds both built extractors, else a FileNotFoundError naming the command that builds them."""
    from ..paths import TINY_EXTRACTORS_DIR

    folder = Path(folder or TINY_EXTRACTORS_DIR)
    missing = [p for p in ("clip/open_clip_config.json", "clip/open_clip_model.safetensors", "dino/config.json",
                           "dino/model.safetensors", "dino/preprocessor_config.json") if not (folder / p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the tiny-world feature extractors in {str(folder)!r} are missing or incomplete ({', '.join(missing)}); "
            f"build them with `python -m tools.tiny_world build-extractors` from the repository root (about 11 min on 2 CPU cores), or pass "
            "real weights with --dino-model / --clip-model")
    return folder
