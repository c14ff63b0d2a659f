"""Sample and image-folder I/O shared by training, ``generate`` and scoring.

Image folders (listing, loading as tensors), JSON Lines files, the prompts files ``generate`` reads
(:class:`PromptEntry`) and the ``manifest.jsonl`` it writes and ``score`` reads (:class:`SampleRow`).
Bad input raises :class:`DataError` (a ``ValueError``; a missing file or folder also is a
``FileNotFoundError``) whose message names the file, folder or line and says what to do.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError, HRAWarning, MissingDataError
from .images import open_image

__all__ = [
    "MANIFEST",
    "IMAGE_EXTENSIONS",
    "DataError",
    "MissingDataError",
    "PromptEntry",
    "SampleRow",
    "load_image",
    "list_images",
    "read_jsonl",
    "write_jsonl",
    "read_prompts",
    "read_samples",
    "resolve",
]

MANIFEST = "manifest.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class PromptEntry:
    """One prompt and what goes with it (condition image, its source, a label map, a reference folder)."""

    prompt: str
    condition: Path | None = None
    condition_source: Path | None = None
    label: Path | None = None
    reference_dir: Path | None = None


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
    arr = np.asarray(open_image(path), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def list_images(folder: str | os.PathLike, what: str = "image") -> list[Path]:
    """Sorted image files of ``folder``; DataError if it is missing, not a folder or holds no images."""
    path = Path(folder)
    if not path.exists():
        raise MissingDataError(
            f"{what} folder {str(path)!r} does not exist; check the path (relative paths are from the current "
            f"directory {os.getcwd()!r})"
        )
    if not path.is_dir():
        raise DataError(f"{what} folder {str(path)!r} is a file, not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(
            f"{what} folder {str(path)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}); put the images there, "
            "or check that it is the right folder"
        )
    return files


def skipped_files(folder: str | os.PathLike, sidecars: Sequence[str] = ()) -> list[Path]:
    """Files of ``folder`` that :func:`list_images` leaves out: not an image by extension, not hidden, not a
    sidecar (e.g. the caption extension, like '.txt')."""
    keep = {s.lower() if s.startswith(".") else f".{s.lower()}" for s in sidecars if s}
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() not in IMAGE_EXTENSIONS and p.suffix.lower() not in keep)


def skipped_note(folder: str | os.PathLike, skipped: Sequence[Path], what: str = "image") -> str | None:
    """One line naming the files a folder holds that are not read as images, or None."""
    if not skipped:
        return None
    names = ", ".join(p.name for p in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    return (f"note: {len(skipped)} file(s) in the {what} folder {str(folder)!r} are not images by their extension "
            f"and are skipped: {names} (read: {', '.join(IMAGE_EXTENSIONS)}; convert a photo, e.g. HEIC, to use it)")


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON Lines file; a line that is not one JSON
    object raises DataError naming the file and line."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno} is not valid JSON ({err}); each line must be one JSON object") from None
        if not isinstance(doc, dict):
            raise DataError(f"{path}:{lineno} must be a JSON object, got {type(doc).__name__}")
        rows.append((lineno, doc))
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def resolve(base: Path, value: Any) -> Path | None:
    """A path from a manifest / prompts file: absolute as written, relative to the file's folder otherwise."""
    if value in (None, ""):
        return None
    p = Path(str(value))
    return p if p.is_absolute() else base / p


def read_prompts(path: str | os.PathLike) -> list[PromptEntry]:
    """Prompts from a file: .txt (one per line, '#' comments and blank lines skipped) or .jsonl with
    keys prompt|text, condition|conditioning_image, condition_source|image, label, reference_dir
    (relative paths are relative to the file; the control trainer's metadata.jsonl reads as is)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"prompts file {str(path)!r} does not exist")
    entries: list[PromptEntry] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, doc in read_jsonl(path):
            prompt = doc.get("prompt", doc.get("text"))
            if not isinstance(prompt, str):
                raise DataError(f"{path}:{lineno} has no 'prompt' (or 'text') string")
            entries.append(PromptEntry(
                prompt=prompt,
                condition=resolve(path.parent, doc.get("condition", doc.get("conditioning_image"))),
                condition_source=resolve(path.parent, doc.get("condition_source", doc.get("image"))),
                label=resolve(path.parent, doc.get("label")),
                reference_dir=resolve(path.parent, doc.get("reference_dir")),
            ))
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        entries = [PromptEntry(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise DataError(f"prompts file {str(path)!r} holds no prompts")
    return entries


def read_samples(samples_dir: str | os.PathLike) -> list[SampleRow]:
    """Rows of ``<samples_dir>/manifest.jsonl`` (written by ``generate``); without a manifest, every
    image of the folder with no prompt. Every referenced file must exist."""
    folder = Path(samples_dir)
    if not folder.exists():
        raise MissingDataError(
            f"samples folder {str(folder)!r} does not exist (run `hra-diffusion generate` first?)")
    if not folder.is_dir():
        raise DataError(f"samples folder {str(folder)!r} is a file, not a folder")
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
    for lineno, doc in read_jsonl(manifest):
        if not doc.get("file"):
            raise DataError(f"{manifest}:{lineno} has no 'file' entry")
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
                raise MissingDataError(
                    f"{manifest}:{lineno}: {key} {str(path)!r} does not exist; the sample set is incomplete "
                    "(re-run generate, or remove that row)"
                )
        rows.append(row)
    if not rows:
        raise DataError(f"{manifest} has no rows: the samples folder is empty (re-run generate)")
    listed = {r.file.resolve() for r in rows}
    unlisted = [p for p in sorted(folder.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and p.resolve() not in listed]
    if unlisted:
        n = len(unlisted)
        warnings.warn(
            f"{n} image{'s' if n > 1 else ''} in {folder} (e.g. {unlisted[0].name!r}) {'are' if n > 1 else 'is'} "
            f"not in {MANIFEST} and will not be scored; scoring the {len(rows)} listed image"
            f"{'s' if len(rows) > 1 else ''} (re-run generate, or remove the extra files, to score them all)",
            HRAWarning, stacklevel=2)
    return rows
