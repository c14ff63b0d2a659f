"""Reading image files as users give them: one loader for photos, class images, control images and conditions.

Every reader decodes the file fully (a truncated or mislabelled file fails here, naming it) and returns a PIL
image in the asked mode. Transparent pixels are laid over ``background``: white for photos, black for
conditions (a transparent pixel of an edge map means "no edge").
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .conditioning import SizeCondition
from .errors import ImageFileError

__all__ = ["open_image", "load_rgb", "check_images", "ImageTransform", "PHOTO_BACKGROUND", "CONDITION_BACKGROUND"]

PHOTO_BACKGROUND = (255, 255, 255)
CONDITION_BACKGROUND = (0, 0, 0)


def _flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB, with any transparency composited over ``background``."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike, what: str = "image", mode: str | None = "RGB",
               background: tuple[int, int, int] = PHOTO_BACKGROUND) -> Image.Image:
    """Open and fully decode an image file: converted to ``mode`` (RGB: transparency over ``background``), or
    as stored for ``mode=None``. A missing file raises FileNotFoundError, an undecodable one ImageFileError,
    each naming the file and ``what`` it was."""
    try:
        with Image.open(path) as img:
            img.load()
            if mode is None:
                return img.copy()
            return _flatten(img, background) if mode == "RGB" else img.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        reason = "is not an image file" if isinstance(err, UnidentifiedImageError) else \
            f"cannot be decoded ({' '.join(str(err).split()) or type(err).__name__})"
        raise ImageFileError(f"{what} {str(path)!r} {reason}: it may be truncated or mislabelled; replace or "
                             "remove it") from None


def load_rgb(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """A photo as RGB (greyscale, palette converted; transparency over white)."""
    return open_image(path, what)


def check_images(files: Sequence[Path], what: str = "image",
                 background: tuple[int, int, int] = PHOTO_BACKGROUND) -> None:
    """Open every file once, so unreadable ones fail before any model loads: one error naming them all."""
    bad = []
    for f in files:
        try:
            open_image(f, what, background=background)
        except (ImageFileError, FileNotFoundError) as err:
            bad.append(str(err))
    if bad:
        raise ImageFileError(f"{len(bad)} unreadable {what}(s): " + "; ".join(bad))


@dataclass
class ImageTransform:
    """Resize the shorter side to ``resolution``, crop a square (centre or random), maybe flip; to [-1, 1]."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    def params(self, size: tuple[int, int], seed: int) -> tuple[int, int, bool]:
        """(left, top, flip) for an image of ``size`` after resizing, drawn from ``seed``."""
        w, h = self.resized_size(size)
        rng = random.Random(seed)
        if self.center_crop:
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        else:
            left, top = rng.randint(0, w - self.resolution), rng.randint(0, h - self.resolution)
        flip = self.random_flip and rng.random() < 0.5
        return left, top, flip

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        w, h = size
        scale = self.resolution / min(w, h)
        return max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))

    def size_condition(self, size: tuple[int, int], seed: int = 0, flip: bool | None = None) -> SizeCondition:
        """SDXL's micro-conditioning of the crop ``__call__`` makes of an image of ``size`` (w, h) with ``seed``:
        original size (h, w) before the resize, crop top-left (top, left) in the resized image, target size.

        A flipped crop counts its left from the mirrored image (resized width - resolution - left): diffusers'
        SDXL training scripts flip the resized image first, then crop it and record the crop's top-left as
        computed, that is in the flipped image. We crop first and flip the crop (the same pixels), so the
        same numbers are the mirrored left. The top never changes.
        """
        left, top, drawn_flip = self.params(size, seed)
        w, _ = self.resized_size(size)
        if drawn_flip if flip is None else flip:
            left = w - self.resolution - left
        return SizeCondition((int(size[1]), int(size[0])), (top, left), (self.resolution, self.resolution))

    def __call__(self, image: Image.Image, seed: int = 0, flip: bool | None = None) -> torch.Tensor:
        """(3, R, R) float tensor in [-1, 1]; ``flip`` forces the flip decision (latent caching)."""
        image = self._cut(image, seed, flip, Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def mask(self, mask: Image.Image, seed: int = 0, flip: bool | None = None) -> torch.Tensor:
        """(1, R, R) float tensor in [0, 1]: a greyscale mask of an image (same size) cut exactly as
        ``__call__(image, seed, flip)`` cuts the image (bilinear resize, same crop, same flip)."""
        mask = self._cut(mask, seed, flip, Image.BILINEAR)
        return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None].contiguous()

    def _cut(self, image: Image.Image, seed: int, flip: bool | None, resample: int) -> Image.Image:
        """Resize (with ``resample``), crop and maybe flip, as drawn from ``seed`` (``flip`` forces the flip)."""
        left, top, drawn_flip = self.params(image.size, seed)
        w, h = self.resized_size(image.size)
        if (w, h) != image.size:
            image = image.resize((w, h), resample)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if drawn_flip if flip is None else flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image
