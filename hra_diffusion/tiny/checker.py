"""A deterministic checker for tiny-world images: background, object mask, shape, position, size, stripes.

Nothing here is learned, least of all on generated samples: every decision is a fixed rule on the six named
colours (``scenes.COLOURS``) and on masks rendered by ``scenes`` itself. Used by the build report (shape and
position following, the VAE keeping the subject's stripes), by the DreamBooth rates (``subject_rates``: striped
star in the asked context; plain one-colour star for the class prompt with the adapter loaded) and by tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from . import scenes

__all__ = [
    "Reading", "read_scene", "parse_prompt", "prompt_matches", "subject_rates", "StripeRule", "STRIPES",
]

_NAMES = list(scenes.COLOURS)
# area of each shape's mask relative to r^2 (r = the circumradius that scenes._polygon uses)
_AREA_PER_R2 = {"circle": math.pi, "square": 2 * 0.9**2, "triangle": 3 * math.sqrt(3) / 4,
                "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5)}


@dataclass(frozen=True)
class StripeRule:
    """When an object counts as 'striped in colours a and b' (the DreamBooth subject).

    Among the object's pixels both colours cover at least ``min_each`` and together at least ``min_both``;
    taking each image row's majority of the two colours, the rows alternate at least ``min_runs`` times
    (a-b-a is 3 runs), and rows are mostly one colour (mean row purity >= ``min_row_purity``: horizontal
    stripes, not a blend or checker), by at least ``min_purity_margin`` more than columns are (not vertical ones).
    """

    min_each: float = 0.15
    min_both: float = 0.6
    min_runs: int = 3
    min_row_purity: float = 0.7
    min_purity_margin: float = 0.1


STRIPES = StripeRule()


@dataclass(frozen=True)
class Reading:
    """What the checker reads in one 32x32 image."""

    background: str
    object_fraction: float  # share of the image's pixels that are not the background colour
    colour: str | None  # the object's most common named colour (None: no object)
    colour_purity: float  # that colour's share of the object's pixels
    striped: tuple[str, str] | None  # the two stripe colours if the object is horizontally striped
    shape: str | None  # best template match (None: no object)
    shape_iou: float
    cx: float  # object centroid, fractions of the image (0.5 = centre)
    cy: float
    position: str | None  # the 3x3 cell of the centroid, as in scenes.POSITIONS
    size: str | None  # small/medium/large from the area and the matched shape

    @property
    def has_object(self) -> bool:
        return self.colour is not None

    @property
    def plain(self) -> bool:
        """One colour fills the object (>= 80% of its pixels), no stripes."""
        return self.has_object and self.striped is None and self.colour_purity >= 0.8


def _labels(image: Image.Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return scenes.nearest_colour(arr.reshape(-1, 3)).reshape(arr.shape[:2])


def _lines(labels: np.ndarray, mask: np.ndarray, a: int, b: int) -> tuple[list[int], list[float]]:
    """Per image row (of the object's pixels in colours a or b): the majority colour and its share."""
    seq, purity = [], []
    for y in range(labels.shape[0]):
        row = labels[y][mask[y]]
        na, nb = int((row == a).sum()), int((row == b).sum())
        if na + nb < 2:
            continue
        seq.append(a if na >= nb else b)
        purity.append(max(na, nb) / (na + nb))
    return seq, purity


def _stripes(labels: np.ndarray, mask: np.ndarray, rule: StripeRule) -> tuple[str, str] | None:
    counts = np.bincount(labels[mask], minlength=len(_NAMES)).astype(float)
    total = counts.sum()
    if total == 0:
        return None
    a, b = np.argsort(counts)[::-1][:2]
    if counts[b] < rule.min_each * total or counts[a] + counts[b] < rule.min_both * total:
        return None
    seq, purity = _lines(labels, mask, a, b)
    runs = 1 + sum(1 for i in range(1, len(seq)) if seq[i] != seq[i - 1]) if seq else 0
    if runs < rule.min_runs or float(np.mean(purity)) < rule.min_row_purity:
        return None
    # horizontal, not vertical: rows must be purer than columns (a vertically striped star with bands as wide as
    # the subject's has single-colour rows near its tips)
    _, col_purity = _lines(labels.T, mask.T, a, b)
    if col_purity and float(np.mean(purity)) < float(np.mean(col_purity)) + rule.min_purity_margin:
        return None
    return tuple(sorted((_NAMES[a], _NAMES[b])))  # type: ignore[return-value]


def _template(shape: str, cx: float, cy: float, radius: float, angle: float, res: int) -> np.ndarray:
    s = scenes.Scene(shape, "red", "blue", cx, cy, radius, angle)
    return np.asarray(scenes.object_mask(s, res)) > 127


def _cell(cx: float, cy: float) -> str:
    col = 0 if cx < 0.42 else 2 if cx > 0.58 else 1
    row = 0 if cy < 0.42 else 2 if cy > 0.58 else 1
    return next(k for k, v in scenes.POSITIONS.items() if v == (col, row))


def read_scene(image: Image.Image | np.ndarray, min_fraction: float = 0.02, rule: StripeRule = STRIPES) -> Reading:
    """Read background, object colour/purity/stripes, shape (template IoU), centroid cell and size of an image."""
    labels = _labels(image)
    h, w = labels.shape
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    mask = labels != bg
    frac = float(mask.mean())
    if frac < min_fraction:
        return Reading(_NAMES[bg], frac, None, 0.0, None, None, 0.0, 0.5, 0.5, None, None)
    counts = np.bincount(labels[mask], minlength=len(_NAMES))
    colour = int(counts.argmax())
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    best, best_iou, best_r = None, -1.0, 0.0
    for shape, k in _AREA_PER_R2.items():
        r = math.sqrt(mask.sum() / (k * w * h))
        for jitter in (-0.25, 0.0, 0.25):
            angle = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2}[shape] + jitter
            t = _template(shape, cx, cy, r, angle, w)
            iou = float((t & mask).sum() / max(1, (t | mask).sum()))
            if iou > best_iou:
                best, best_iou, best_r = shape, iou, r
    size = min(scenes.SIZES, key=lambda s: abs(math.log(best_r / (sum(scenes.SIZES[s]) / 2))))
    return Reading(
        background=_NAMES[bg], object_fraction=frac, colour=_NAMES[colour], colour_purity=float(counts[colour] / mask.sum()),
        striped=_stripes(labels, mask, rule), shape=best, shape_iou=best_iou, cx=float(cx), cy=float(cy),
        position=_cell(cx, cy), size=size,
    )


_PROMPT = re.compile(
    r"^a (?:(?P<size>small|medium|large) )?(?:(?P<word>\w+) )?(?P<shape>circle|square|triangle|star)"
    r"(?: (?:on|in the (?P<pos>top left|top right|bottom left|bottom right|top|bottom|left|right|center) of) a "
    r"(?P<bg>\w+) background| in the (?P<pos2>top left|top right|bottom left|bottom right|top|bottom|left|right|center))?$"
)


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The tiny-world words of a prompt: size, colour (or identifier) word, shape, position, background."""
    m = _PROMPT.match(prompt.strip())
    if not m:
        raise ValueError(f"not a tiny-world prompt: {prompt!r}")
    return {"size": m["size"], "word": m["word"], "shape": m["shape"], "position": m["pos"] or m["pos2"],
            "background": m["bg"]}


def _position_ok(reading: Reading, position: str) -> bool:
    """Lenient: the centroid lies on the asked side(s); 'center' means within the middle 30% both ways."""
    col, row = scenes.POSITIONS[position]
    ok_x = reading.cx < 0.45 if col == 0 else reading.cx > 0.55 if col == 2 else abs(reading.cx - 0.5) <= 0.15
    ok_y = reading.cy < 0.45 if row == 0 else reading.cy > 0.55 if row == 2 else abs(reading.cy - 0.5) <= 0.15
    return ok_x and ok_y


def prompt_matches(reading: Reading, prompt: str) -> dict[str, bool | None]:
    """Which of the prompt's asked attributes the image shows (None where the prompt does not ask)."""
    p = parse_prompt(prompt)
    word = p["word"]
    return {
        "background": None if p["background"] is None else reading.background == p["background"],
        "colour": None if word not in scenes.COLOURS else (reading.colour == word and reading.plain),
        "shape": None if not reading.has_object else reading.shape == p["shape"],
        "position": None if p["position"] is None else reading.has_object and _position_ok(reading, p["position"]),
        "size": None if p["size"] is None else reading.size == p["size"],
    }


def subject_rates(images: list, prompts: list[str], stripe_colours: tuple[str, str] = scenes.SUBJECT.stripes,
                  identifier: str = scenes.SUBJECT.identifier,
                  context: tuple[str, ...] = ("background", "position")) -> dict[str, Any]:
    """The DreamBooth showroom rates of generated images, one per prompt (deterministic, nothing learned).

    Prompts with the identifier ("a qwe star on a blue background", "a small qwe star in the top left of a
    black background"): ``subject_rate`` = share showing the striped subject (horizontal stripes in the two
    subject colours); ``context_rate`` = share of those whose asked background and position (if asked) are
    right. Prompts without it ("a star on a blue background", with the adapter loaded): ``class_plain_rate`` =
    share drawing a plain one-colour object (>= 80% one colour, no stripes) with the background right,
    ``class_striped_rate`` = share where the stripes leak. Also the per-image rows. ``context``: which asked
    attributes count as the context (of "background", "position", "size"; those the prompt does not ask are skipped).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    want = tuple(sorted(stripe_colours))
    rows, subj, ctx, cls_plain, cls_striped, n_subj, n_cls = [], 0, 0, 0, 0, 0, 0
    for image, prompt in zip(images, prompts, strict=True):
        r = read_scene(image)
        m = prompt_matches(r, prompt)
        context_ok = all(v for k, v in m.items() if k in context and v is not None)
        row = {"prompt": prompt, "background": r.background, "colour": r.colour, "striped": r.striped is not None,
               "shape": r.shape, "position": r.position if r.has_object else None, "context_ok": context_ok}
        if parse_prompt(prompt)["word"] == identifier:
            n_subj += 1
            ok = r.striped == want
            subj += ok
            ctx += ok and context_ok
            row["subject_ok"] = bool(ok)
        else:
            n_cls += 1
            plain = r.plain and context_ok
            cls_plain += plain
            cls_striped += r.striped is not None
            row["plain_ok"] = bool(plain)
        rows.append(row)
    return {
        "n_subject": n_subj,
        "subject_rate": subj / n_subj if n_subj else None,
        # of the striped-subject samples, the share whose background/position is right
        "context_rate": ctx / subj if subj else (0.0 if n_subj else None),
        "subject_in_context_rate": ctx / n_subj if n_subj else None,
        "n_class": n_cls,
        "class_plain_rate": cls_plain / n_cls if n_cls else None,
        "class_striped_rate": cls_striped / n_cls if n_cls else None,
        "rows": rows,
    }
