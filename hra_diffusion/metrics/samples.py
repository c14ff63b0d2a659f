"""Reading sample sets: the generate manifest, reference folders, images as tensors."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HRAWarning, read_image

__all__ = ["MANIFEST", "IMAGE_SUFFIXES", "SampleRow", "load_image", "list_images", "read_samples", "resolve"]

MANIFEST = "manifest.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class SampleRow:
    """One generated image and what it was made from (a row of manifest.jsonl)."""

    file: Path
    prompt: str | None = None
    condition: Path | None = None
    condition_source: Path | None = None
    label: Path | None = None
    reference_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file -> (3, H, W) float in [0, 1], RGB (an undecodable file: ImageFileError naming it)."""
    arr = np.asarray(read_image(path), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def list_images(folder: str | os.PathLike, what: str = "image") -> list[Path]:
    """Sorted image files of a folder; a clear error if the folder is missing or holds no images."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} folder {str(folder)!r} is a file, not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"{what} folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
            "is it the right folder?"
        )
    return files


def resolve(base: Path, value: str | None) -> Path | None:
    """A manifest path: absolute as written, relative to the manifest's folder otherwise."""
    if value in (None, ""):
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


def read_samples(samples_dir: str | os.PathLike) -> list[SampleRow]:
    """Rows of ``<samples_dir>/manifest.jsonl`` (written by ``generate``); without a manifest, every
    image of the folder with no prompt. Every referenced file must exist."""
    folder = Path(samples_dir)
    if not folder.exists():
        raise FileNotFoundError(f"samples folder {str(folder)!r} does not exist (run `hra-diffusion generate` first?)")
    if not folder.is_dir():
        raise NotADirectoryError(f"samples folder {str(folder)!r} is a file, not a folder")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if (folder / "generate_config.json").is_file():
            raise FileNotFoundError(
                f"{str(manifest)!r} is missing: generate has not finished writing {str(folder)!r}; run the same "
                "generate command again to complete it, then score"
            )
        return [SampleRow(file=p) for p in list_images(folder, "samples")]
    rows: list[SampleRow] = []
    known = {"file", "prompt", "condition", "condition_source", "label", "reference_dir"}
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest}:{lineno} is not valid JSON ({err})") from None
        if not isinstance(doc, dict) or not doc.get("file"):
            raise ValueError(f"{manifest}:{lineno} has no 'file' entry")
        row = SampleRow(
            file=resolve(folder, doc["file"]),
            prompt=doc.get("prompt"),
            condition=resolve(folder, doc.get("condition")),
            condition_source=resolve(folder, doc.get("condition_source")),
            label=resolve(folder, doc.get("label")),
            reference_dir=resolve(folder, doc.get("reference_dir")),
            extra={k: v for k, v in doc.items() if k not in known},
        )
        for key in ("file", "condition", "condition_source", "label"):
            path = getattr(row, key)
            if path is not None and not path.is_file():
                raise FileNotFoundError(
                    f"{manifest}:{lineno}: {key} {str(path)!r} does not exist; the sample set is incomplete "
                    "(re-run generate, or remove that row)"
                )
        rows.append(row)
    if not rows:
        raise ValueError(f"{manifest} has no rows: the samples folder is empty (re-run generate)")
    listed = {r.file.resolve() for r in rows}
    unlisted = [p for p in sorted(folder.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in listed]
    if unlisted:
        n = len(unlisted)
        warnings.warn(
            f"{n} image{'s' if n > 1 else ''} in {folder} (e.g. {unlisted[0].name!r}) {'are' if n > 1 else 'is'} "
            f"not in {MANIFEST} and will not be scored; scoring the {len(rows)} listed image"
            f"{'s' if len(rows) > 1 else ''} (re-run generate, or remove the extra files, to score them all)",
            HRAWarning, stacklevel=2)
    return rows
