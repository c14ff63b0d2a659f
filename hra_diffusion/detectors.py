"""Condition detectors for controllable generation: image -> condition map (white-on-black edges, depth, ...).

Weight-free detectors (Canny, standard lineart) always work; weight-based controlnet-aux annotators
(HED, lineart, MiDaS depth, PiDiNet) load from a local folder holding their files, never from the hub
when offline. Every detector returns an RGB PIL image of the input's size, so the condition stays
pixel-aligned with its image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError

__all__ = [
    "ConditionError",
    "DetectorSpec",
    "DETECTORS",
    "supported_conditions",
    "make_detector",
    "load_annotator",
    "canny",
    "detector_key",
    "ConditionCache",
]


class ConditionError(UserError):
    """An unknown condition type, or a weight-based detector whose files are not available."""


@dataclass(frozen=True)
class DetectorSpec:
    """One condition type: the controlnet-aux class behind it and the weight files it needs (if any)."""

    name: str
    description: str
    module: str  # controlnet_aux submodule
    cls: str
    weight_files: tuple[str, ...] = ()


DETECTORS: dict[str, DetectorSpec] = {
    spec.name: spec
    for spec in [
        DetectorSpec("canny", "Canny edges (cv2.Canny, low/high thresholds), weight-free", "canny", "CannyDetector"),
        DetectorSpec("lineart_standard", "standard line art (Gaussian difference), weight-free",
                     "lineart_standard", "LineartStandardDetector"),
        DetectorSpec("hed", "HED soft edges", "hed", "HEDdetector", ("ControlNetHED.pth",)),
        DetectorSpec("lineart", "line art (informative drawings)", "lineart", "LineartDetector",
                     ("sk_model.pth", "sk_model2.pth")),
        DetectorSpec("depth", "MiDaS DPT-hybrid depth", "midas", "MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
        DetectorSpec("pidi", "PiDiNet soft edges", "pidi", "PidiNetDetector", ("table5_pidinet.pth",)),
    ]
}


def supported_conditions() -> list[str]:
    """Names accepted by ``--condition`` (weight-free first)."""
    return list(DETECTORS)


def _spec(name: str) -> DetectorSpec:
    spec = DETECTORS.get(name)
    if spec is None:
        described = "; ".join(
            f"{s.name} ({s.description}{', needs ' + ', '.join(s.weight_files) if s.weight_files else ''})"
            for s in DETECTORS.values()
        )
        raise ConditionError(f"unknown condition type {name!r}; supported: {described}")
    return spec


def detector_key(name: str, low_threshold: int = 100, high_threshold: int = 200) -> str:
    """A folder name for the cache that changes whenever the detector's output would."""
    _spec(name)
    return f"canny-{low_threshold}-{high_threshold}" if name == "canny" else name


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges (H, W) uint8 (0 or 255) of a (H, W, 3) uint8 RGB image at its own resolution: the one edge
    detector behind the ``canny`` condition and the ``canny`` control metric.

    controlnet-aux's CannyDetector is used where it does not resample (sides multiples of 64); it snaps
    other sizes to multiples of 64, so there the same ``cv2.Canny(image, low, high)`` is called directly.
    """
    h, w = image.shape[:2]
    if h % 64 == 0 and w % 64 == 0:
        out = load_annotator("canny")(image, low, high, detect_resolution=min(h, w), image_resolution=min(h, w),
                                      output_type="np")
        return np.ascontiguousarray(out[..., 0])
    import cv2

    return cv2.Canny(image, low, high)


def _canny(low: int, high: int) -> Callable[[Image.Image], Image.Image]:
    def detect(image: Image.Image) -> Image.Image:
        edges = canny(np.asarray(image.convert("RGB"), dtype=np.uint8), low, high)
        return Image.fromarray(edges).convert("RGB")

    return detect


def load_annotator(name: str, weights: Any = None):
    """The controlnet-aux detector behind condition type ``name``, the one way they are loaded: weight-free
    types built directly; weight-based ones ``from_pretrained(weights)`` (a local folder holding the files
    listed in DETECTORS, or a hub repo id), or ``weights`` itself when it already is such a detector."""
    import importlib

    spec = _spec(name)
    cls = getattr(importlib.import_module(f"controlnet_aux.{spec.module}"), spec.cls)
    if isinstance(weights, cls):
        return weights
    if not spec.weight_files:
        return cls()
    return cls.from_pretrained(str(weights))


def make_detector(
    name: str, model_path: str | os.PathLike | None = None, low_threshold: int = 100, high_threshold: int = 200,
    detect_resolution: int = 512,
) -> Callable[[Image.Image], Image.Image]:
    """A function image -> condition image (RGB, same size) for condition type ``name``.

    Weight-based types need ``model_path``: a local folder holding the files listed in DETECTORS.
    """
    spec = _spec(name)
    if name == "canny":
        return _canny(low_threshold, high_threshold)
    folder = Path(model_path) if model_path else None
    if spec.weight_files:
        missing = [f for f in spec.weight_files if folder is None or not (folder / f).is_file()]
        if folder is None or missing:
            where = f"the folder {str(folder)!r} lacks {', '.join(missing)}" if folder else "no --condition_model_path was given"
            raise ConditionError(
                f"condition type {name!r} needs the annotator weights {', '.join(spec.weight_files)} "
                f"(from the hub repo lllyasviel/Annotators) in a local folder, but {where}. Download them where there "
                "is network and pass --condition_model_path FOLDER, or use a weight-free type: "
                + ", ".join(n for n, s in DETECTORS.items() if not s.weight_files)
            )
    detector = load_annotator(name, folder)

    def detect(image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        res = min(detect_resolution, max(64, min(image.size)))
        out = detector(np.asarray(image, dtype=np.uint8), detect_resolution=res, image_resolution=res, output_type="pil")
        return out.convert("RGB").resize(image.size, Image.BILINEAR)

    return detect


class ConditionCache:
    """Conditions computed from images, stored as PNG files keyed by detector and image content."""

    def __init__(self, root: str | os.PathLike, key: str, detect: Callable[[Image.Image], Image.Image]) -> None:
        self.folder = Path(root) / key
        self.detect = detect

    @staticmethod
    def content_hash(image: Image.Image) -> str:
        rgb = image.convert("RGB")
        h = hashlib.sha256(f"{rgb.size}".encode())
        h.update(rgb.tobytes())
        return h.hexdigest()[:32]

    def path_for(self, image: Image.Image) -> Path:
        return self.folder / f"{self.content_hash(image)}.png"

    def get(self, image: Image.Image) -> Path:
        """The cached condition file of ``image``, computing and writing it (atomically) if missing."""
        path = self.path_for(image)
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
            self.detect(image).save(tmp)
            os.replace(tmp, path)
        return path
