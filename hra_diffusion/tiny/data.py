"""The tiny world's DreamBooth subject as data: its scenes, its photos' and class images' captions, and the prompt
sets of the showroom and the comparison (the grammar the checker reads). Writing the data: tools/tiny_world."""

from __future__ import annotations

import numpy as np

from . import scenes

__all__ = ["subject_caption", "class_caption", "subject_scenes", "SUBJECT_BACKGROUNDS", "SUBJECT_LAYOUTS",
           "heldout_subject_prompts", "class_check_prompts", "sweep_subject_prompts", "sweep_class_prompts",
           "frontier_prompts"]

SUBJECT_BACKGROUNDS = ("green", "blue", "white", "black")  # never the stripe colours


# (size, position) of the subject in its photos: the 5 training photos show it at a few places and sizes;
# the held-out prompts ask for places it was never shown at (bottom left, top right, left, bottom).
SUBJECT_LAYOUTS = {
    "train": (("large", "center"), ("medium", "top left"), ("medium", "bottom right"), ("large", "right"),
              ("medium", "top")),
    "heldout": (("medium", "bottom left"), ("medium", "top right"), ("large", "left"), ("medium", "bottom")),
}
_HELDOUT_POSITIONS = ("bottom left", "top right", "left", "bottom")


def subject_scenes(seed: int = 0, split: str | None = None) -> list[scenes.Scene]:
    """The subject's scenes as written by ``write_subject`` (``split`` 'train' (5), 'heldout' (12) or both)."""
    out = []
    for name, n, split_seed in (("train", 5, seed + 101), ("heldout", 12, seed + 202)):
        if split in (None, name):
            out += _subject_scenes(split_seed, n, SUBJECT_LAYOUTS[name])
    return out


def _subject_scenes(seed: int, n: int, layouts: tuple[tuple[str, str], ...]) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size, position = layouts[i % len(layouts)]
        # the subject is never small in its photos, so its stripes stay visible at 32x32
        out.append(scenes.sample_scene(
            rng, shape=scenes.SUBJECT.shape, colour=scenes.SUBJECT.stripes[0],
            background=SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)], stripes=scenes.SUBJECT.stripes,
            size=size, position=position,
        ))
    return out


def heldout_subject_prompts() -> list[str]:
    """The DreamBooth showroom prompts: the subject on each background, and at held-out positions/sizes."""
    ident, noun = scenes.SUBJECT.identifier, scenes.SUBJECT.shape
    out = [f"a {ident} {noun} on a {bg} background" for bg in SUBJECT_BACKGROUNDS]
    for i, pos in enumerate(_HELDOUT_POSITIONS):
        out.append(f"a {ident} {noun} in the {pos} of a {SUBJECT_BACKGROUNDS[(i + 1) % 4]} background")
    out.append(f"a large {ident} {noun} on a {SUBJECT_BACKGROUNDS[2]} background")
    out.append(f"a small {ident} {noun} in the top right of a {SUBJECT_BACKGROUNDS[0]} background")
    return out


def class_check_prompts() -> list[str]:
    """Prompts without the identifier, for the prior check with the adapter loaded: 'a star on a {bg} background'."""
    return [f"a {scenes.SUBJECT.shape} on a {bg} background" for bg in SUBJECT_BACKGROUNDS]


def sweep_subject_prompts() -> list[str]:
    """A validation split for tuning (eval/compare.py's learning-rate sweep): the subject at the held-out places,
    each on another background or at another size than any held-out prompt asks, so tuning never sees a test
    prompt."""
    ident, noun = scenes.SUBJECT.identifier, scenes.SUBJECT.shape
    return [f"a {ident} {noun} in the top right of a black background",
            f"a {ident} {noun} in the bottom left of a green background",
            f"a large {ident} {noun} in the left of a white background",
            f"a {ident} {noun} in the bottom of a blue background"]


def sweep_class_prompts() -> list[str]:
    """The prior check of the validation split: class prompts with a place, none of them a test prompt."""
    noun = scenes.SUBJECT.shape
    return [f"a {noun} in the bottom left of a white background", f"a {noun} in the left of a blue background"]


def frontier_prompts() -> dict[str, dict[str, list[str]]]:
    """The comparison's prompt sets (eval/compare.py): {"val" | "test": {"context", "position", "class"}}.

    context: the subject on backgrounds and at sizes its photos never showed together (DreamBooth's new
    contexts); position: at places it was never shown (the tiny base ignores position words, so these are
    reported on their own); class: the class prompt with the adapter loaded. "val" (choosing settings) and
    "test" share no prompt, and "val" shares none with the showroom's held-out prompts."""
    ident, noun = scenes.SUBJECT.identifier, scenes.SUBJECT.shape

    def subject(size: str, bg: str) -> str:
        return f"a {size + ' ' if size else ''}{ident} {noun} on a {bg} background"

    return {
        "val": {"context": [subject("small", "white"), subject("small", "black"), subject("large", "black"),
                            subject("large", "blue")],
                "position": sweep_subject_prompts()[:2],
                "class": [f"a small {noun} on a blue background", f"a large {noun} on a white background",
                          f"a small {noun} on a green background", f"a large {noun} on a black background"]},
        "test": {"context": [*(subject("", bg) for bg in SUBJECT_BACKGROUNDS), subject("small", "green"),
                             subject("small", "blue"), subject("large", "white")],
                 "position": heldout_subject_prompts()[4:8],
                 "class": class_check_prompts()},
    }


def subject_caption(scene: scenes.Scene) -> str:
    """A training photo's own caption: identifier + class noun + where and on what it is shown, e.g. 'a qwe star in
    the top left of a blue background' (the per-image caption files; the identifier then need not explain the
    background)."""
    size = f"{scenes.size_word(scene)} " if scenes.size_word(scene) != "medium" else ""
    pos = scenes.position_word(scene)
    where = "on" if pos == "center" else f"in the {pos} of"
    return f"a {size}{scenes.SUBJECT.identifier} {scenes.SUBJECT.shape} {where} a {scene.background} background"


def class_caption(scene: scenes.Scene, i: int) -> str:
    """A class image's caption: 'a star on a {background} background', every fourth one 'a star' (the class prompt).
    No colour word, as in the class check prompts: the prior then holds exactly the prompts that are checked."""
    noun = scenes.SUBJECT.shape
    return f"a {noun}" if i % 4 == 3 else f"a {noun} on a {scene.background} background"
