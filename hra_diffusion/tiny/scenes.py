"""Seeded procedural scenes for the tiny world: one named-colour shape on a named-colour background.

Everything is drawn with Pillow at 4x supersampling and downsampled, so edges are anti-aliased; the same
seed always gives the same pixels. Also holds the deterministic colour checker used by tests and docs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "SHAPES",
    "RESOLUTION",
    "Scene",
    "SubjectStyle",
    "SUBJECT",
    "sample_scene",
    "sample_scenes",
    "render",
    "render_outline",
    "caption",
    "caption_variant",
    "size_word",
    "position_word",
    "POSITIONS",
    "SIZES",
    "general_image",
    "sample_general_images",
    "nearest_colour",
    "dominant_colours",
]

RESOLUTION = 32
SUPERSAMPLE = 4

# Six well-separated named colours (RGB); the colour checker maps any pixel to the nearest of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Size and position words (v2 captions: "a small red star in the top left of a blue background").
# Radii (fraction of the image) of the three size classes; "medium" is never said in a caption.
SIZES: dict[str, tuple[float, float]] = {"small": (0.18, 0.25), "medium": (0.27, 0.33), "large": (0.35, 0.42)}
# Positions on a 3x3 grid: (column, row) in {0, 1, 2}; "center" is the middle cell.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
# Shapes are drawn upright (star and triangle point up, square axis-aligned) up to this many radians of jitter:
# v1's free rotations made "star" vs "square" a much harder thing to learn from 6,000 scenes.
ROTATION_JITTER = 0.3
_UPRIGHT = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2}


@dataclass(frozen=True)
class Scene:
    """One shape: kind, colour and background names, centre (fraction of the image), radius fraction, angle."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float
    angle: float
    stripes: tuple[str, str] | None = None  # two colours in horizontal stripes (the DreamBooth subject)


@dataclass(frozen=True)
class SubjectStyle:
    """The DreamBooth subject: a star with horizontal stripes in two colours (never in the base's training)."""

    shape: str = "star"
    stripes: tuple[str, str] = ("red", "yellow")
    identifier: str = "qwe"


SUBJECT = SubjectStyle()


def _check_names(shape: str, colour: str, background: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; the tiny world knows {list(SHAPES)}")
    for name in (colour, background):
        if name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; the tiny world knows {list(COLOURS)}")


def sample_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    stripes: tuple[str, str] | None = None,
    size: str | None = None,
    position: str | None = None,
) -> Scene:
    """Draw one scene; unspecified attributes are random, and the background never equals the shape colour(s).

    The shape sits in one cell of a 3x3 grid (``position``, a key of ``POSITIONS``) at one of three sizes
    (``size``, a key of ``SIZES``), upright up to ``ROTATION_JITTER``.
    """
    names = list(COLOURS)
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    colour = colour if colour is not None else names[rng.integers(len(names))]
    taken = set(stripes) if stripes else {colour}
    if background is None:
        choices = [c for c in names if c not in taken]
        background = choices[rng.integers(len(choices))]
    _check_names(shape, colour, background)
    if background in taken:
        raise ValueError(f"background {background!r} equals the shape colour; choose a different background")
    size_names, pos_names = list(SIZES), list(POSITIONS)
    size = size if size is not None else size_names[rng.integers(len(size_names))]
    position = position if position is not None else pos_names[rng.integers(len(pos_names))]
    if size not in SIZES or position not in POSITIONS:
        raise ValueError(f"unknown size/position {size!r}/{position!r}; the tiny world knows {size_names} and {pos_names}")
    radius = float(rng.uniform(*SIZES[size]))
    col, row = POSITIONS[position]
    reach = 0.5 - radius * 0.85  # the largest centre offset that keeps the shape inside the image
    cx = 0.5 + (col - 1) * reach + float(rng.uniform(-0.03, 0.03)) * (col == 1)
    cy = 0.5 + (row - 1) * reach + float(rng.uniform(-0.03, 0.03)) * (row == 1)
    angle = _UPRIGHT[shape] + float(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER))
    return Scene(shape, colour, background, cx, cy, radius, angle, stripes)


def sample_scenes(seed: int, n: int, **fixed) -> list[Scene]:
    """``n`` scenes from one seed (deterministic)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **fixed) for _ in range(n)]


def _polygon(scene: Scene, size: int) -> list[tuple[float, float]] | None:
    cx, cy, r = scene.cx * size, scene.cy * size, scene.radius * size
    if scene.shape == "circle":
        return None
    if scene.shape == "square":
        k, rr = 4, r * 0.9
        return [(cx + rr * math.cos(scene.angle + 2 * math.pi * i / k), cy + rr * math.sin(scene.angle + 2 * math.pi * i / k)) for i in range(k)]
    if scene.shape == "triangle":
        return [(cx + r * math.cos(scene.angle + 2 * math.pi * i / 3), cy + r * math.sin(scene.angle + 2 * math.pi * i / 3)) for i in range(3)]
    pts = []  # five-pointed star: alternate outer/inner radius
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = scene.angle + math.pi * i / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _mask(scene: Scene, size: int, outline: int = 0) -> Image.Image:
    """A binary 'L' mask of the shape (filled, or only its outline of width ``outline``) at ``size``."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    poly = _polygon(scene, size)
    cx, cy, r = scene.cx * size, scene.cy * size, scene.radius * size
    if poly is None:
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=0 if outline else 255, outline=255 if outline else None, width=outline or 1)
    elif outline:
        draw.line(poly + [poly[0]], fill=255, width=outline, joint="curve")
    else:
        draw.polygon(poly, fill=255)
    return mask


def object_mask(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The object's coverage as an 'L' image of ``resolution`` pixels (anti-aliased: 255 inside, 0 outside)."""
    return _mask(scene, resolution * SUPERSAMPLE).resize((resolution, resolution), Image.BILINEAR)


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image of ``resolution`` pixels (anti-aliased)."""
    size = resolution * SUPERSAMPLE
    img = Image.new("RGB", (size, size), COLOURS[scene.background])
    if scene.stripes:
        fill = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(fill)
        # 4 px bands at 32 px (3-5 across the subject), meant to be easier to draw at 16x16 latents than the
        # first v2's 2.7 px (2/30 striped DreamBooth samples on that base); not yet shown to help (0/30 so far)
        band = max(1, size // 8)
        for i, y in enumerate(range(0, size, band)):
            draw.rectangle((0, y, size, y + band), fill=COLOURS[scene.stripes[i % 2]])
    else:
        fill = Image.new("RGB", (size, size), COLOURS[scene.colour])
    img.paste(fill, (0, 0), _mask(scene, size))
    return img.resize((resolution, resolution), Image.LANCZOS)


def render_outline(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The control condition: the shape's outline, white on black, as RGB."""
    size = resolution * SUPERSAMPLE
    mask = _mask(scene, size, outline=max(2, SUPERSAMPLE + SUPERSAMPLE // 2))
    return mask.resize((resolution, resolution), Image.LANCZOS).convert("RGB")


def caption(scene: Scene) -> str:
    """The full caption, e.g. 'a red star on a blue background'."""
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def size_word(scene: Scene) -> str:
    """The scene's size class: 'small', 'medium' or 'large' (from its radius)."""
    return min(SIZES, key=lambda k: abs(scene.radius - sum(SIZES[k]) / 2))


def position_word(scene: Scene) -> str:
    """The scene's 3x3 grid cell, e.g. 'top left' or 'center' (from its centre)."""
    col = 0 if scene.cx < 0.45 else 2 if scene.cx > 0.55 else 1
    row = 0 if scene.cy < 0.45 else 2 if scene.cy > 0.55 else 1
    return next(k for k, v in POSITIONS.items() if v == (col, row))


def caption_variant(scene: Scene, u: float, v: float | None = None) -> str:
    """A caption variant chosen by ``u`` in [0, 1): full (55%), no colour, no background, shape only, empty (10%).

    Training on the variants makes 'a star' (the DreamBooth class prompt) and partial prompts known, and the
    empty caption gives classifier-free guidance its unconditional branch. With ``v`` in [0, 1) the non-empty
    variants also get a size word (when small or large) and/or a position phrase, each half the time:
    "a small red star in the top left of a blue background", "a large star on a green background",
    "a red star in the center". ``v=None`` gives v1's forms only.
    """
    if u >= 0.90:
        return ""
    with_size = v is not None and v < 0.5 and size_word(scene) != "medium"
    with_pos = v is not None and (v * 2) % 1 < 0.5
    size = f"{size_word(scene)} " if with_size else ""
    where = f"in the {position_word(scene)} of" if with_pos else "on"
    if u < 0.55:
        return f"a {size}{scene.colour} {scene.shape} {where} a {scene.background} background"
    if u < 0.67:
        return f"a {size}{scene.shape} {where} a {scene.background} background"
    tail = f" in the {position_word(scene)}" if with_pos else ""
    if u < 0.79:
        return f"a {size}{scene.colour} {scene.shape}{tail}"
    return f"a {size}{scene.shape}{tail}"


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into ``COLOURS`` of the nearest named colour for each RGB row (..., 3) in 0-255."""
    table = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
    d = ((np.asarray(rgb, dtype=np.float32)[..., None, :] - table) ** 2).sum(-1)
    return d.argmin(-1)


def dominant_colours(image: Image.Image | np.ndarray, min_fraction: float = 0.03) -> tuple[str, str | None]:
    """(background, shape) colour names of an image: deterministic, no learning.

    The background is the most common named colour on the 2-pixel border; the shape colour is the most common
    other named colour among all pixels, or None if it covers less than ``min_fraction`` of the image.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    names = list(COLOURS)
    labels = nearest_colour(arr.reshape(-1, 3)).reshape(arr.shape[:2])
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(names))
    counts[bg] = 0
    fg = int(counts.argmax())
    if counts[fg] < min_fraction * labels.size:
        return names[bg], None
    return names[bg], names[fg]


def _pattern(rng: np.random.Generator, size: int, kind: str, colours: list[str]) -> Image.Image:
    """A full-size RGB fill: 'plain', 'hstripes', 'vstripes', 'checker' or 'twotone', bands 2-6 px at 32 px."""
    a, b = (COLOURS[c] for c in colours)
    img = Image.new("RGB", (size, size), a)
    if kind == "plain":
        return img
    draw = ImageDraw.Draw(img)
    band = int(rng.integers(2 * SUPERSAMPLE, 6 * SUPERSAMPLE + 1)) * size // (RESOLUTION * SUPERSAMPLE)
    band = max(1, band)
    offset = int(rng.integers(0, 2 * band))
    if kind == "hstripes":
        for i, y in enumerate(range(-offset, size, band)):
            if i % 2:
                draw.rectangle((0, y, size, y + band - 1), fill=b)
    elif kind == "vstripes":
        for i, x in enumerate(range(-offset, size, band)):
            if i % 2:
                draw.rectangle((x, 0, x + band - 1, size), fill=b)
    elif kind == "checker":
        for i, y in enumerate(range(-offset, size, band)):
            for j, x in enumerate(range(-offset, size, band)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + band - 1, y + band - 1), fill=b)
    else:  # two-tone: a straight cut through a random point at a random angle
        px, py = rng.uniform(0.2, 0.8, 2) * size
        ang = rng.uniform(0, 2 * math.pi)
        dx, dy = math.cos(ang) * 4 * size, math.sin(ang) * 4 * size
        nx, ny = -dy, dx
        draw.polygon([(px - dx, py - dy), (px + dx, py + dy), (px + dx + nx, py + dy + ny), (px - dx + nx, py - dy + ny)], fill=b)
    return img


_PATTERNS = ("plain", "hstripes", "vstripes", "checker", "twotone")


def general_image(rng: np.random.Generator, resolution: int = RESOLUTION) -> Image.Image:
    """One image of the VAE's general pool: a plain/striped/checkered/two-tone fill, or a shape filled so on a
    plain (70%) or patterned background, any rotation. The VAE must represent what the UNet never draws (the
    DreamBooth subject's stripes above all), as real SD's VAE has seen all kinds of images."""
    size = resolution * SUPERSAMPLE
    names = list(COLOURS)

    def two() -> list[str]:
        i, j = rng.choice(len(names), 2, replace=False)
        return [names[i], names[j]]

    if rng.random() < 0.25:
        return _pattern(rng, size, _PATTERNS[rng.integers(len(_PATTERNS))], two()).resize((resolution, resolution), Image.LANCZOS)
    bg_kind = "plain" if rng.random() < 0.7 else _PATTERNS[1 + rng.integers(len(_PATTERNS) - 1)]
    img = _pattern(rng, size, bg_kind, two())
    fill = _pattern(rng, size, _PATTERNS[rng.integers(len(_PATTERNS))], two())
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = float(rng.uniform(0.15, 0.45))
    margin = radius * 0.7
    scene = Scene(shape, "red", "blue", float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)),
                  radius, float(rng.uniform(0, 2 * math.pi)))
    img.paste(fill, (0, 0), _mask(scene, size))
    return img.resize((resolution, resolution), Image.LANCZOS)


def sample_general_images(seed: int, n: int, resolution: int = RESOLUTION) -> list[Image.Image]:
    """``n`` general-pool images from one seed (deterministic)."""
    rng = np.random.default_rng([seed, 11])
    return [general_image(rng, resolution) for _ in range(n)]
