"""Reading image files as users give them: one loader for photos, class images, control images and conditions.

Every reader decodes the file fully (a truncated or mislabelled file fails here, naming it) and returns a PIL
image in the asked mode. Transparent pixels are laid over ``background``: white for photos, black for
conditions (a transparent pixel of an edge map means "no edge").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import ImageFileError

__all__ = ["open_image", "load_rgb", "check_images", "PHOTO_BACKGROUND", "CONDITION_BACKGROUND"]

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
