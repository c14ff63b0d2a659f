"""Validation grids during training (the images come from :mod:`hra_diffusion.sampling`, drawn by the training
modules themselves: no second model copy)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["image_grid", "save_and_log_grid"]


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] | None = None,
               min_cell: int = 128) -> Image.Image:
    """One image: a row per prompt (label on the left strip's top), images upscaled to ``min_cell``."""
    w, h = rows[0][0].size
    scale = max(1, math.ceil(min_cell / max(w, h)))
    cw, ch = w * scale, h * scale
    label_h = 14 if labels else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * cw, len(rows) * (ch + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        y = i * (ch + label_h)
        if labels:
            draw.text((2, y + 1), labels[i][: cols * cw // 6], fill="black")
        for j, img in enumerate(row):
            grid.paste(img.resize((cw, ch), Image.NEAREST), (j * cw, y + label_h))
    return grid


def save_and_log_grid(accelerator, rows: Sequence[Sequence[Image.Image]], labels: Sequence[str],
                      out_dir: str | os.PathLike, step: int, tag: str = "validation") -> Path:
    """Save the grid as ``<out_dir>/<tag>/step-<step>.png`` and log it to tensorboard (main process)."""
    grid = image_grid(rows, labels)
    path = Path(out_dir) / tag / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    singles = path.with_suffix("")  # <tag>/step-<step>/p<prompt>-<image>.png
    singles.mkdir(exist_ok=True)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img.save(singles / f"p{i}-{j}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            tracker.writer.flush()
    return path
