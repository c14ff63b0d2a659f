"""What the tiny-world feature extractors learn from: captioned scenes (plain, striped and checkered shapes) and
DINO's multi-crop views.

A scene is one of the tiny world's shapes (``scenes.py``: shape, colour, background, size, 3x3 position) whose fill is
plain, striped (horizontal bands, as the DreamBooth subject's, or vertical) or checkered, in one or two named colours.
Its captions say what is there in the tiny world's own grammar ("a small red and yellow striped star in the top left
of a blue background"), with parts left out at random as real alt-texts do. The DreamBooth subject's look (a star
striped in red and yellow) is never drawn here: the extractors meet the subject first when they score it, as the real
DINO and CLIP never saw your dog.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hra_diffusion.tiny import scenes

__all__ = [
    "FILLS",
    "Item",
    "sample_item",
    "sample_items",
    "is_subject_look",
    "render_item",
    "item_caption",
    "items_to_tensor",
    "images_to_tensor",
    "relocate",
    "shape_group",
    "clip_pool",
    "dino_pool",
    "MultiCrop",
]

FILLS = ("plain", "striped", "checkered")
_FILL_P = (0.55, 0.30, 0.15)


@dataclass(frozen=True)
class Item:
    """One captioned scene: the shape's layout/background (``scene``), its fill and the fill's colours."""

    scene: scenes.Scene
    fill: str  # one of FILLS
    colours: tuple[str, ...]  # one colour (plain) or two (striped / checkered)
    variant: int = 0  # how a pattern is drawn: stripes 0 = the subject's bands, 1 = other bands, 2 = vertical


def is_subject_look(item: Item) -> bool:
    """True for the DreamBooth subject's look: a star striped in its two colours (either order, any bands)."""
    return (item.scene.shape == scenes.SUBJECT.shape and item.fill == "striped"
            and set(item.colours) == set(scenes.SUBJECT.stripes))


def sample_item(rng: np.random.Generator) -> Item:
    """A random item (never the subject's look); the background never equals a fill colour."""
    names = list(scenes.COLOURS)
    while True:
        fill = FILLS[rng.choice(len(FILLS), p=_FILL_P)]
        if fill == "plain":
            colours: tuple[str, ...] = (names[rng.integers(len(names))],)
        else:
            i, j = rng.choice(len(names), 2, replace=False)
            colours = (names[i], names[j])
        stripes = colours if len(colours) == 2 else None
        scene = scenes.sample_scene(rng, colour=colours[0], stripes=stripes if fill == "striped" else None)
        if stripes and scene.background in stripes:  # checkered: sample_scene only kept the first colour off it
            continue
        item = Item(scene, fill, colours, int(rng.integers(3)) if fill == "striped" else int(rng.integers(2)))
        if not is_subject_look(item):
            return item


def sample_items(seed: int, n: int) -> list[Item]:
    """``n`` items from one seed (deterministic)."""
    rng = np.random.default_rng([seed, 19])
    return [sample_item(rng) for _ in range(n)]


def _bands(res: int, band: int, offset: int, vertical: bool, checker: bool) -> np.ndarray:
    """A (res, res) boolean mask: True where the second colour goes."""
    idx = (np.arange(res) + offset) // band % 2
    if checker:
        return (idx[:, None] + idx[None, :]) % 2 == 1
    return np.broadcast_to(idx[None, :] if vertical else idx[:, None], (res, res)) == 1


def render_item(item: Item, resolution: int = scenes.RESOLUTION) -> Image.Image:
    """The item as an RGB image. Plain fills and the subject-style stripes are drawn by ``scenes.render``; other
    patterns composite two single-colour renders of the same scene (identical anti-aliased edges) through a mask."""
    s = item.scene
    if item.fill == "plain":
        return scenes.render(s, resolution)
    if item.fill == "striped" and item.variant == 0:
        return scenes.render(s, resolution)  # the scene carries stripes=(a, b): the subject's own band style
    a = np.asarray(scenes.render(scenes.Scene(s.shape, item.colours[0], s.background, s.cx, s.cy, s.radius, s.angle),
                                 resolution))
    b = np.asarray(scenes.render(scenes.Scene(s.shape, item.colours[1], s.background, s.cx, s.cy, s.radius, s.angle),
                                 resolution))
    # the band width belongs to the object (its colours), the phase follows the object's place
    names = list(scenes.COLOURS)
    k = names.index(item.colours[0]) + names.index(item.colours[1])
    band = 2 + k % 3 if item.fill == "striped" else 3 + k % 3
    offset = -round((s.cx if item.variant == 2 else s.cy) * resolution) % band
    mask = _bands(resolution, band, offset, vertical=item.variant == 2, checker=item.fill == "checkered")
    return Image.fromarray(np.where(mask[..., None], b, a).astype(np.uint8))


def _object_phrase(item: Item, with_colour: bool) -> str:
    if item.fill == "plain":
        return f"{item.colours[0]} {item.scene.shape}" if with_colour else item.scene.shape
    pattern = "striped" if item.fill == "striped" else "checkered"
    colours = f"{item.colours[0]} and {item.colours[1]} " if with_colour else ""
    return f"{colours}{pattern} {item.scene.shape}"


def item_caption(item: Item, rng: np.random.Generator | None = None) -> str:
    """A caption of what is there. Without ``rng`` the full one ("a red star on a blue background", with the size
    word when small or large); with ``rng`` a random variant that leaves out colour, size, position or background."""
    s = item.scene
    if rng is None:
        size = scenes.size_word(s)
        size = "" if size == "medium" else size + " "
        return f"a {size}{_object_phrase(item, True)} on a {s.background} background"
    u = rng.random(4)
    obj = _object_phrase(item, with_colour=u[0] < 0.85)
    size = scenes.size_word(s)
    size = f"{size} " if u[1] < 0.5 and size != "medium" else ""
    with_pos, with_bg = u[2] < 0.5, u[3] < 0.8
    if with_bg:
        where = f"in the {scenes.position_word(s)} of" if with_pos else "on"
        return f"a {size}{obj} {where} a {s.background} background"
    return f"a {size}{obj}" + (f" in the {scenes.position_word(s)}" if with_pos else "")


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)


def items_to_tensor(items: list[Item], resolution: int = scenes.RESOLUTION) -> torch.Tensor:
    return images_to_tensor([render_item(it, resolution) for it in items])


def relocate(item: Item, rng: np.random.Generator) -> Item:
    """The same object (shape, fill, colours) in another scene: a new background, size, place and tilt."""
    s = item.scene
    stripes = item.colours if len(item.colours) == 2 else None
    while True:
        scene = scenes.sample_scene(rng, shape=s.shape, colour=item.colours[0],
                                    stripes=stripes if item.fill == "striped" else None)
        if not stripes or scene.background not in stripes:
            return Item(scene, item.fill, item.colours, item.variant)


def shape_group(item: Item, rng: np.random.Generator) -> list[Item]:
    """``item`` drawn as each of the four shapes with the same fill, colours, background, size and place: CLIP's
    hard negatives (in a random batch, colours and backgrounds tell nearly every pair apart, and shapes were left
    unlearned: 50% zero-shot shape accuracy after 750 steps, star and triangle confused)."""
    s = item.scene
    stripes = item.colours if item.fill == "striped" else None
    size, position = scenes.size_word(s), scenes.position_word(s)
    out = []
    for shape in scenes.SHAPES:
        scene = scenes.sample_scene(rng, shape=shape, colour=item.colours[0], background=s.background, stripes=stripes,
                                    size=size, position=position)
        out.append(Item(scene, item.fill, item.colours, item.variant))
    return out


def clip_pool(seed: int, n: int, group_fraction: float) -> tuple[list[Item], int]:
    """CLIP's images: ``n`` items, the first ``n_grouped`` of them in consecutive shape groups of four (never the
    subject's look); returns (items, n_grouped)."""
    n_groups = int(n * group_fraction) // len(scenes.SHAPES)
    rng = np.random.default_rng([seed, 47])
    grouped: list[Item] = []
    for base in sample_items(seed + 3, n_groups * 3):  # more bases than needed: some groups hold the subject's look
        group = shape_group(base, rng)
        if not any(is_subject_look(it) for it in group):
            grouped += group
        if len(grouped) >= n_groups * len(scenes.SHAPES):
            break
    return grouped + sample_items(seed, n - len(grouped)), len(grouped)


def dino_pool(seed: int, n: int, general_fraction: float = 0.3, relocate_fraction: float = 1.0) -> torch.Tensor:
    """DINO's unlabelled images as (n, 2, 3, 32, 32) pairs: each captioned-world object drawn twice, in two scenes
    (another background, size and place; for ``relocate_fraction`` of them, else the same image twice), and the
    VAE's general pool (patterns, any rotation) once, twice over.

    The two renders of one object are where DINO's two global views come from: the tiny world's stand-in for the
    variety of real photos that teaches the real DINO that an object is the same on any background."""
    n_general = int(round(n * general_fraction))
    items = sample_items(seed + 1, n - n_general)
    rng = np.random.default_rng([seed, 43])
    moved = [relocate(it, rng) if rng.random() < relocate_fraction else it for it in items]
    first, second = items_to_tensor(items), items_to_tensor(moved)
    pairs = torch.stack([first, second], 1)
    if n_general:
        general = images_to_tensor(scenes.sample_general_images(seed + 2, n_general))
        pairs = torch.cat([pairs, torch.stack([general, general], 1)])
    return pairs


@dataclass
class MultiCrop:
    """DINO's views at 32 px: 2 global crops (``global_scale`` of the area, resized to 32) and ``n_local`` local
    crops (``local_scale``, resized to ``local_size``), each flipped at random and colour-jittered (brightness,
    contrast, saturation, a small hue rotation) or turned grey, as in DINO (Caron et al. 2021), batched on tensors."""

    n_local: int = 4
    global_size: int = 32
    local_size: int = 16
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    jitter_p: float = 0.8
    grey_p: float = 0.2
    hue: float = 0.1  # of a full turn

    def _crop(self, x: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator,
              on_object: bool = False) -> torch.Tensor:
        """Random resized crops; ``on_object``: centred on a random pixel that differs from the background (the
        most common border colour), so that a small local crop sees part of the object, not only background."""
        n = x.shape[0]
        area = torch.empty(n).uniform_(*scale, generator=g)
        log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        if on_object:
            res = x.shape[-1]
            pick = torch.multinomial(_object_mask(x).flatten(1) + 1e-3, 1, generator=g).squeeze(1)
            cx = (((pick % res).float() + 0.5) / res * 2 - 1).clamp(-(1 - w), 1 - w)
            cy = (((pick // res).float() + 0.5) / res * 2 - 1).clamp(-(1 - h), 1 - h)
        else:
            cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
            cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _colour(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        on = (torch.rand(n, 1, 1, 1, generator=g) < self.jitter_p).float()
        bright = 1 + on * torch.empty(n, 1, 1, 1).uniform_(-0.4, 0.4, generator=g)
        contrast = 1 + on * torch.empty(n, 1, 1, 1).uniform_(-0.4, 0.4, generator=g)
        sat = 1 + on * torch.empty(n, 1, 1, 1).uniform_(-0.2, 0.2, generator=g)
        angle = on.view(n) * torch.empty(n).uniform_(-1, 1, generator=g) * self.hue * 2 * math.pi
        x = x * bright
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - grey) * sat + grey
        x = _rotate_hue(x, angle)
        to_grey = (torch.rand(n, 1, 1, 1, generator=g) < self.grey_p).float()
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        return (to_grey * grey + (1 - to_grey) * x).clamp(0, 1)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 2, 3, 32, 32) pairs in [0, 1] -> ([2 global views: one of each image of a pair], [n_local local
        views, each of either image]), each (B, 3, s, s) in [0, 1]. A (B, 3, 32, 32) batch is its own pair."""
        if x.ndim == 4:
            x = torch.stack([x, x], 1)
        glob = [self._colour(self._crop(x[:, i], self.global_size, self.global_scale, g), g) for i in range(2)]
        loc = []
        for _ in range(self.n_local):
            pick = (torch.rand(x.shape[0], generator=g) < 0.5).long()
            src = x[torch.arange(x.shape[0]), pick]
            loc.append(self._colour(self._crop(src, self.local_size, self.local_scale, g, on_object=True), g))
        return glob, loc


def _object_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) 1.0 where a pixel's colour is far from the image's most common border colour, else 0.0."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, 4W)
    q = (border * 4).round()  # coarse colour bins, then the most common one
    codes = q[:, 0] * 25 + q[:, 1] * 5 + q[:, 2]
    mode = torch.mode(codes, dim=-1).values
    idx = (codes == mode[:, None]).float().argmax(-1)
    bg = border[torch.arange(x.shape[0]), :, idx]  # (B, 3)
    return ((x - bg[:, :, None, None]).abs().sum(1) > 0.3).float()


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each image's colours by ``angle`` (radians) about the grey axis (a hue shift, linear in RGB)."""
    c, s = torch.cos(angle), torch.sin(angle)
    k = 1 / 3
    r = math.sqrt(k)
    # Rodrigues' rotation about the unit vector (1, 1, 1) / sqrt(3)
    m = torch.stack([
        torch.stack([c + (1 - c) * k, (1 - c) * k - r * s, (1 - c) * k + r * s], -1),
        torch.stack([(1 - c) * k + r * s, c + (1 - c) * k, (1 - c) * k - r * s], -1),
        torch.stack([(1 - c) * k - r * s, (1 - c) * k + r * s, c + (1 - c) * k], -1),
    ], -2)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)
