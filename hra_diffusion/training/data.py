"""Image-folder data for the trainers: checked loading, RGB conversion, resize/crop/flip, a resumable order.

Every random choice (shuffle order, crop offset, flip, noise) is a pure function of the seed and the
position in the stream, so a resumed run sees exactly the batches it would have seen (no RNG state).

Every item also carries its SDXL micro-conditioning (:class:`~hra_diffusion.conditioning.SizeCondition`:
original size, crop top-left, target size; see :meth:`ImageTransform.size_condition`), which an SD 1.x/2.x
UNet simply does not take.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..conditioning import SizeCondition
from ..errors import ImageFileError
from ..images import ImageTransform, check_images, load_rgb, open_mask, upscale_note
from ..samples import IMAGE_EXTENSIONS, DataError, list_images, skipped_files, skipped_note
from ..utils import stream_seed

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "list_images",
    "StreamSampler",
    "ImageFolderDataset",
    "CachedLatent",
    "load_masks",
]  # IMAGE_EXTENSIONS, DataError and list_images live in hra_diffusion.samples; images in hra_diffusion.images


class StreamSampler:
    """Batches of stream positions: global batch g, rank k gets positions [g·B·W + k·B, +B).

    Position p of a dataset of n items reads item ``perm_e[p mod n]`` of epoch ``e = p // n``, with
    ``perm_e`` a seeded permutation: a pure function of (seed, p), so ``start_batch`` resumes exactly.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_batch, self.shuffle = rank, world_size, start_batch, shuffle
        self._perms: dict[int, list[int]] = {}

    def item(self, position: int) -> tuple[int, int]:
        """(dataset index, epoch) of stream position ``position``."""
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset, epoch
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(stream_seed(self.seed, "perm", epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perms = {epoch: perm}
        return perm[offset], epoch

    def batch_positions(self, batch: int) -> list[int]:
        first = (batch * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch
        while True:
            yield self.batch_positions(batch)
            batch += 1


def _caption(image: Path, extension: str | None) -> str | None:
    """The caption file's text for ``image`` (``extension`` like '.txt'), None without one; an empty file is an
    error (it would train the image unconditioned)."""
    if not extension:
        return None
    path = image.with_suffix(extension if extension.startswith(".") else f".{extension}")
    if not path.is_file():
        return None
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except UnicodeDecodeError as err:
        raise DataError(f"caption file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason}): save it as "
                        "UTF-8, or remove it to use the instance prompt") from None
    if not text:
        raise DataError(f"caption file {str(path)!r} is empty: write the image's caption in it, or remove the file "
                        "to use the instance prompt")
    return text


def load_masks(images: Sequence[Path], mask_dir: str | os.PathLike,
               sizes: Sequence[tuple[int, int]] | None = None) -> list[Image.Image]:
    """One greyscale mask per image: ``mask_dir/NAME.<any image extension>`` for image ``NAME.*``, the same size
    as the (upright) image, ``sizes`` when known (white = subject). Every missing, unreadable or mis-sized mask
    is named in one error."""
    root = Path(mask_dir)
    if not root.is_dir():
        raise DataError(f"instance_mask_dir {str(root)!r} is not a folder: it should hold one mask per instance image "
                        "(same file name, any image extension; white = subject)")
    by_stem: dict[str, Path] = {}
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(f.stem, f)
    masks, problems = [], []
    for i, image in enumerate(images):
        path = by_stem.get(image.stem)
        if path is None:
            problems.append(f"no mask for {image.name} (expected {image.stem}.png in {str(root)!r})")
            continue
        try:
            mask = open_mask(path)
            size = sizes[i] if sizes is not None else load_rgb(image).size
        except (ImageFileError, FileNotFoundError) as err:
            problems.append(str(err))  # names the mask file and why
            continue
        if mask.size != size:
            problems.append(f"mask {path.name} is {mask.size[0]}x{mask.size[1]} but {image.name} is {size[0]}x{size[1]}")
            continue
        masks.append(mask)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{len(problems)} problem(s) with the instance masks: " + "; ".join(problems[:3]) + more)
    return masks


class CachedLatent(typing.NamedTuple):
    """One cached image: the VAE's latent distribution (mean, std) and the crop's SDXL size condition."""

    mean: torch.Tensor
    std: torch.Tensor
    size: SizeCondition


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of one folder with one prompt, indexed by stream position (see :class:`StreamSampler`).

    Items are dicts: ``pixel_values`` (3, R, R) in [-1, 1] (or ``latent_mean``/``latent_std`` when a
    latent cache is attached), ``size`` (the crop's :class:`SizeCondition`), ``prompt``, the stream
    ``position``, and with ``mask_dir`` the image's ``mask`` (1, R, R) in [0, 1], cut like the pixels.
    """

    def __init__(self, folder: str | os.PathLike, prompt: str, transform: ImageTransform, seed: int,
                 what: str = "image", check: bool = True, caption_extension: str | None = None,
                 mask_dir: str | os.PathLike | None = None) -> None:
        self.files = list_images(folder, what)
        self.what = what
        # lines for the run to print once: files skipped as non-images, images upscaled to the resolution
        self.notes = [skipped_note(folder, skipped_files(folder, [caption_extension or ""]), what)]
        sizes = check_images(self.files, what) if check else None  # upright (w, h) of every image
        if sizes is not None:
            self.notes.append(upscale_note(self.files, sizes, transform.resolution, what))
        self.notes = [n for n in self.notes if n]
        self.masks = load_masks(self.files, mask_dir, sizes) if mask_dir else None
        self.prompt = prompt
        # per-image captions (kohya's convention): NAME.png's prompt is the text of NAME<caption_extension>
        # beside it, when that file exists; ``prompt`` otherwise
        self.prompts = [_caption(f, caption_extension) or prompt for f in self.files]
        self.transform = transform
        self.sampler_view = StreamSampler(len(self.files), 1, seed)
        self.seed = seed
        self.latent_cache: dict[tuple[int, bool], CachedLatent] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def item_seed(self, position: int) -> tuple[int, int]:
        index, epoch = self.sampler_view.item(position)
        return index, stream_seed(self.seed, "aug", epoch, index)

    def __getitem__(self, position: int) -> dict:
        index, seed = self.item_seed(position)
        item = {"prompt": self.prompts[index], "position": position}
        if self.latent_cache is not None:
            flip = self.transform.params((1, 1), seed)[2] if self.transform.random_flip else False
            cached = self.latent_cache[(index, flip)]
            item["latent_mean"], item["latent_std"], item["size"] = cached.mean, cached.std, cached.size
            if self.masks is not None:  # cached latents are centre crops (seed 0) with the key's flip
                item["mask"] = self.transform.mask(self.masks[index], 0, flip=flip)
        else:
            image = load_rgb(self.files[index], self.what)
            item["pixel_values"] = self.transform(image, seed)
            item["size"] = self.transform.size_condition(image.size, seed)
            if self.masks is not None:
                item["mask"] = self.transform.mask(self.masks[index], seed)
        return item

    def cache_keys(self) -> list[tuple[int, bool]]:
        flips = (False, True) if self.transform.random_flip else (False,)
        return [(i, f) for i in range(len(self.files)) for f in flips]

    def cache_pixels(self, key: tuple[int, bool]) -> tuple[torch.Tensor, SizeCondition]:
        """The pixels to cache under ``key`` (centre crop, the key's flip) and their size condition."""
        index, flip = key
        image = load_rgb(self.files[index], self.what)
        return self.transform(image, 0, flip=flip), self.transform.size_condition(image.size, 0, flip=flip)
