"""Control training data: (image, condition, caption) rows from a local folder or a ``datasets`` dataset.

Layouts read:
- a folder with ``metadata.jsonl`` (or ``metadata.csv``): one row per pair, file paths relative to the folder;
- a folder with an ``<image_column>/`` and a ``<conditioning_image_column>/`` sub-folder, paired by file
  name, captions in ``<stem>.txt`` beside each image (or none);
- a ``datasets`` name (hub id, or a folder written by ``Dataset.save_to_disk``) with the column flags.
Without a conditioning column, a detector (``--condition canny``...) computes the condition from the
image, cached on disk. Image and condition get the same resize/crop/flip (one seed per stream position).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..detectors import ConditionCache
from ..images import CONDITION_BACKGROUND, PHOTO_BACKGROUND, ImageTransform, open_image
from ..samples import read_jsonl
from ..utils import stream_seed
from .data import IMAGE_EXTENSIONS, DataError, StreamSampler

__all__ = [
    "ControlRow",
    "ColumnNames",
    "METADATA_FILES",
    "rows_from_folder",
    "rows_from_dataset",
    "check_rows",
    "attach_computed_conditions",
    "ControlDataset",
    "collate_control",
]

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass(frozen=True)
class ColumnNames:
    """Which columns hold the image, the condition image and the caption."""

    image: str = "image"
    condition: str = "conditioning_image"
    caption: str = "text"


@dataclass
class ControlRow:
    """One training pair. ``image``/``condition`` are files, or loaders for in-memory dataset images."""

    image: Path | Callable[[], Image.Image]
    condition: Path | Callable[[], Image.Image] | None
    caption: str
    where: str  # for error messages: "row 3 of .../metadata.jsonl"

    def load_image(self) -> Image.Image:
        return _load(self.image, self.where, "image")

    def load_condition(self) -> Image.Image:
        if self.condition is None:  # pragma: no cover - filled before use
            raise DataError(f"{self.where}: no condition image (pass --condition canny to compute one)")
        return _load(self.condition, self.where, "condition image")


def _background(what: str) -> tuple[int, int, int]:
    return CONDITION_BACKGROUND if what == "condition image" else PHOTO_BACKGROUND


def _load(ref: Path | Callable[[], Image.Image], where: str, what: str) -> Image.Image:
    if isinstance(ref, Path):
        return open_image(ref, what, background=_background(what))
    try:
        return ref()
    except DataError:
        raise
    except Exception as err:  # decoders raise many types
        raise DataError(f"cannot read the {what} of {where} ({type(err).__name__}: {err})") from None


# ---- local folders ----------------------------------------------------------------------------------

def _read_metadata(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    rows = [doc for _, doc in read_jsonl(path)]
    if not rows:
        raise DataError(f"{path} has no rows; add one JSON object per training pair")
    return rows


def _missing_columns_error(source: str, missing: list[str], found: Sequence[str], hint: str) -> DataError:
    flags = {"image": "--image_column", "condition": "--conditioning_image_column", "caption": "--caption_column"}
    return DataError(
        f"{source} has no column {', '.join(repr(m) for m in missing)}; columns found: "
        f"{', '.join(repr(f) for f in found) or 'none'}. Name the right ones with "
        f"{', '.join(flags.values())}{hint}"
    )


def rows_from_folder(folder: str | os.PathLike, columns: ColumnNames, need_condition: bool) -> list[ControlRow]:
    """Rows of a local folder (metadata file, or image/condition sub-folders); see the module docstring."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"train_data_dir {str(root)!r} does not exist or is not a folder "
            f"(relative paths are from the current directory {os.getcwd()!r})"
        )
    meta = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    if meta is not None:
        return _rows_from_metadata(meta, columns, need_condition)
    image_dir, cond_dir = root / columns.image, root / columns.condition
    if not image_dir.is_dir():
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(
            f"{str(root)!r} has neither a metadata file ({', '.join(METADATA_FILES)}) nor an image sub-folder "
            f"{columns.image + '/'!r} (found: {', '.join(found) or 'nothing'}); see docs/control.md for the layouts"
        )
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    if not images:
        raise DataError(f"image folder {str(image_dir)!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    conds: dict[str, Path] = {}
    if cond_dir.is_dir():
        conds = {p.stem: p for p in sorted(cond_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    elif need_condition:
        raise DataError(
            f"{str(root)!r} has images in {columns.image + '/'!r} but no condition folder {columns.condition + '/'!r}; "
            "add it, name it with --conditioning_image_column, or compute conditions with --condition canny"
        )
    if conds and set(conds) != set(images):
        only_i, only_c = sorted(set(images) - set(conds)), sorted(set(conds) - set(images))
        raise DataError(
            f"{len(images)} images in {str(image_dir)!r} but {len(conds)} condition images in {str(cond_dir)!r}, "
            f"paired by file name: images without a condition: {only_i[:5]}, conditions without an image: "
            f"{only_c[:5]}. Every image needs exactly one condition image of the same name"
        )
    rows = []
    for stem, path in images.items():
        txt = path.with_suffix(".txt")
        caption = txt.read_text().strip() if txt.is_file() else ""
        rows.append(ControlRow(path, conds.get(stem), caption, f"image {str(path)!r}"))
    return rows


def _rows_from_metadata(meta: Path, columns: ColumnNames, need_condition: bool) -> list[ControlRow]:
    docs = _read_metadata(meta)
    found = list(dict.fromkeys(k for d in docs for k in d))
    wanted = {"image": columns.image, "caption": columns.caption}
    if need_condition:
        wanted["condition"] = columns.condition
    missing = [name for name in wanted.values() if name not in found]
    if missing:
        hint = "" if not need_condition or columns.condition not in missing else \
            ", or compute the condition from the image with --condition canny"
        raise _missing_columns_error(f"{meta}", missing, found, hint)
    if need_condition:
        n_img = sum(1 for d in docs if d.get(columns.image))
        without = [i for i, d in enumerate(docs, 1) if d.get(columns.image) and not d.get(columns.condition)]
        n_cond = sum(1 for d in docs if d.get(columns.condition))
        if n_img != n_cond or without:
            raise DataError(
                f"{meta}: {n_img} rows have an image ({columns.image!r}) but {n_cond} have a condition image "
                f"({columns.condition!r}); rows without one: {without[:5]}. Every image needs exactly one condition"
            )
    rows = []
    for i, d in enumerate(docs, 1):
        if not d.get(columns.image):
            raise DataError(f"{meta}: row {i} has no {columns.image!r} value; every row needs an image file")
        where = f"row {i} of {meta}"
        cond = meta.parent / str(d[columns.condition]) if need_condition else None
        caption = d.get(columns.caption)
        rows.append(ControlRow(meta.parent / str(d[columns.image]), cond, "" if caption is None else str(caption), where))
    return rows


def check_rows(rows: Sequence[ControlRow]) -> None:
    """Open every image and condition file once, so unreadable files fail before training (all named)."""
    bad = []
    for row in rows:
        for ref, what in ((row.image, "image"), (row.condition, "condition image")):
            if isinstance(ref, Path):
                try:
                    open_image(ref, what, background=_background(what))
                except DataError as err:
                    bad.append(f"{err} [{row.where}]")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} unreadable file(s): " + "; ".join(bad[:3]) + more)


# ---- datasets -------------------------------------------------------------------------------------

def _dataset_image(value: Any) -> Image.Image:
    """A ``datasets`` image cell (PIL image, {'bytes','path'} dict or a path) -> RGB image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, dict) and value.get("path"):
        return open_image(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return open_image(value)
    raise DataError(f"cannot read an image from a value of type {type(value).__name__}")


def rows_from_dataset(name: str, columns: ColumnNames, need_condition: bool, config_name: str | None = None,
                      split: str = "train", cache_dir: str | None = None) -> list[ControlRow]:
    """Rows of a ``datasets`` dataset: a hub id / loading-script name, or a ``save_to_disk`` folder."""
    import datasets

    local = Path(name)
    try:
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset {name!r} has splits {list(ds)}, not {split!r}; pass --dataset_split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as err:  # hub, file and builder errors come in many types
        raise DataError(
            f"could not load the dataset {name!r} (split {split!r}): {type(err).__name__}: {err}. Offline, pass a "
            "folder written by datasets' save_to_disk, or a local folder via --train_data_dir"
        ) from None
    found = list(ds.column_names)
    wanted = [columns.image, columns.caption] + ([columns.condition] if need_condition else [])
    missing = [c for c in wanted if c not in found]
    if missing:
        hint = ", or compute the condition with --condition canny" if columns.condition in missing else ""
        raise _missing_columns_error(f"dataset {name!r}", missing, found, hint)

    def loader(i: int, column: str) -> Callable[[], Image.Image]:
        return lambda: _dataset_image(ds[i][column])

    captions = ds[columns.caption]
    rows = []
    for i in range(len(ds)):
        cond = loader(i, columns.condition) if need_condition else None
        caption = captions[i]
        if isinstance(caption, (list, tuple)):  # several captions per image: the first (deterministic)
            caption = caption[0] if caption else ""
        rows.append(ControlRow(loader(i, columns.image), cond, "" if caption is None else str(caption),
                               f"row {i} of dataset {name!r}"))
    return rows


def attach_computed_conditions(rows: Sequence[ControlRow], cache: ConditionCache,
                               progress: Callable | None = None) -> None:
    """Fill each row's condition with the cached detector output of its image (computed once)."""
    for row in progress(rows) if progress else rows:
        row.condition = cache.get(row.load_image())


# ---- the torch dataset -------------------------------------------------------------------------

class ControlDataset(torch.utils.data.Dataset):
    """Control rows indexed by stream position (see StreamSampler): pixels, condition, caption.

    Items: ``pixel_values`` (3, R, R) in [-1, 1], ``condition`` (3, R, R) in [0, 1] (same crop/flip),
    ``size`` (the crop's SDXL :class:`~hra_diffusion.conditioning.SizeCondition`), ``prompt`` (empty with
    probability ``proportion_empty_prompts``, a pure function of the position).
    """

    def __init__(self, rows: Sequence[ControlRow], transform: ImageTransform, seed: int,
                 proportion_empty_prompts: float = 0.0) -> None:
        if not rows:
            raise DataError("the control dataset has no rows")
        self.rows = list(rows)
        self.transform = transform
        self.seed = seed
        self.proportion_empty_prompts = proportion_empty_prompts
        self.sampler_view = StreamSampler(len(self.rows), 1, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        index, epoch = self.sampler_view.item(position)
        seed = stream_seed(self.seed, "aug", epoch, index)
        row = self.rows[index]
        image, cond = row.load_image(), row.load_condition()
        if cond.size != image.size:  # align first, so one crop/flip fits both
            cond = cond.resize(image.size, Image.BILINEAR)
        prompt = row.caption
        if self.proportion_empty_prompts > 0:
            u = stream_seed(self.seed, "empty", position) / float(1 << 63)
            if u < self.proportion_empty_prompts:
                prompt = ""
        return {
            "pixel_values": self.transform(image, seed),
            "condition": (self.transform(cond, seed) + 1.0) / 2.0,
            "size": self.transform.size_condition(image.size, seed),
            "prompt": prompt,
            "position": position,
        }


def collate_control(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "condition": torch.stack([it["condition"] for it in items]),
        "sizes": [it["size"] for it in items],
        "prompts": [it["prompt"] for it in items],
    }
