"""Reading image files as users give them: one loader for photos, class images, control images and conditions.

Every reader decodes the file fully (a truncated or mislabelled file fails here, naming it) and returns a PIL
image in the asked mode, upright (the EXIF orientation a phone writes is applied, as diffusers' scripts do).
16-bit and float images are scaled to 8 bits, CMYK converted (through its ICC profile when it has one), and
transparent pixels laid over ``background``: white for photos, black for conditions (a transparent pixel of an
edge map means "no edge").
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .conditioning import SizeCondition
from .errors import ImageFileError

__all__ = ["open_image", "open_mask", "load_rgb", "check_images", "upscale_note", "ImageTransform", "PHOTO_BACKGROUND", "CONDITION_BACKGROUND"]

PHOTO_BACKGROUND = (255, 255, 255)
CONDITION_BACKGROUND = (0, 0, 0)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Greyscale ``L`` from 16/32-bit integer (``I;16*``, ``I``) or float (``F``) images, which Pillow's
    ``convert`` would clip to white: integers by their bit depth, floats as 0..1 (or 0..255 when above 1)."""
    a = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 1.0
        a = np.nan_to_num(a.astype(np.float64)) * scale
    else:
        a = a.astype(np.float64) / (257.0 if img.mode.startswith("I;16") or int(a.max(initial=0)) <= 65535 else 16843009.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _from_cmyk(img: Image.Image) -> Image.Image:
    """RGB from CMYK: through the embedded ICC profile when there is one (what a photo editor shows), else
    Pillow's plain conversion."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain conversion
            pass
    return img.convert("RGB")


def _flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB, with any transparency composited over ``background``."""
    if img.mode == "CMYK":
        return _from_cmyk(img)
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
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # unreadable EXIF: the pixels as stored (a phone photo may then lie on its side)
                img = img.copy()
            if mode is None:
                return img.copy()
            if img.mode.startswith("I") or img.mode == "F":
                img = _to_8bit(img)
            return _flatten(img, background) if mode == "RGB" else img.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        reason = "is not an image file" if isinstance(err, UnidentifiedImageError) else \
            f"cannot be decoded ({' '.join(str(err).split()) or type(err).__name__})"
        raise ImageFileError(f"{what} {str(path)!r} {reason}: it may be truncated or mislabelled; replace or "
                             "remove it") from None


def open_mask(path: str | os.PathLike, what: str = "mask") -> Image.Image:
    """A mask as greyscale ``L`` (white = keep), read like every image here (upright, 16-bit scaled): the alpha
    channel of an image with one, else its grey levels."""
    img = open_image(path, what, mode=None)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    return (_to_8bit(img) if img.mode.startswith("I") or img.mode == "F" else img).convert("L")


def load_rgb(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """A photo as RGB (greyscale, palette converted; transparency over white)."""
    return open_image(path, what)


def check_images(files: Sequence[Path], what: str = "image",
                 background: tuple[int, int, int] = PHOTO_BACKGROUND) -> list[tuple[int, int]]:
    """Open every file once, so unreadable ones fail before any model loads: one error naming them all.
    Returns each image's upright size (w, h)."""
    bad, sizes = [], []
    for f in files:
        try:
            sizes.append(open_image(f, what, background=background).size)
        except (ImageFileError, FileNotFoundError) as err:
            bad.append(str(err))
    if bad:
        raise ImageFileError(f"{len(bad)} unreadable {what}(s): " + "; ".join(bad))
    return sizes


def upscale_note(files: Sequence[Path], sizes: Sequence[tuple[int, int]], resolution: int,
                 what: str = "image") -> str | None:
    """One line naming the images whose shorter side is below ``resolution`` (they are upscaled, and look
    soft), or None."""
    small = [(f, s) for f, s in zip(files, sizes, strict=True) if min(s) < resolution]
    if not small:
        return None
    shown = ", ".join(f"{Path(f).name} ({w}x{h}, x{resolution / min(w, h):.1f})" for f, (w, h) in small[:5])
    more = f" and {len(small) - 5} more" if len(small) > 5 else ""
    return (f"note: {len(small)} of {len(files)} {what}s are smaller than resolution {resolution} and are upscaled: "
            f"{shown}{more}; larger photos train sharper")


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
