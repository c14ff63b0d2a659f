"""The weight-based models behind the control metrics: loaders take a hub id / local folder (real weights)
or an already-built model (tests build the real architectures from config), and say how to get missing
weights (WeightsUnavailableError)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..detectors import load_annotator
from .extractors import IMAGENET_MEAN, IMAGENET_STD, WeightsUnavailableError, weights_error

__all__ = [
    "DEFAULT_WEIGHTS",
    "load_hed",
    "load_lineart",
    "DepthEstimator",
    "load_depth",
    "Segmenter",
    "load_segmenter",
    "load_landmarks",
]

DEFAULT_WEIGHTS = {
    "hed": "lllyasviel/Annotators",
    "lineart": "lllyasviel/Annotators",
    "depth": "Intel/dpt-hybrid-midas",
    "seg": "nvidia/segformer-b4-finetuned-ade-512-512",
    "landmarks": "face_alignment:2D",
}


def _annotator(kind: str, model: Any, device: str | torch.device):
    import controlnet_aux  # noqa: F401  (a missing package is an ImportError, not missing weights)

    try:
        return load_annotator(kind, model).to(device)
    except Exception as err:  # hub and file errors come in many types
        raise weights_error(f"{kind} annotator", str(model), f"--{kind}-model", err) from None


def load_hed(model: Any = DEFAULT_WEIGHTS["hed"], device: str | torch.device = "cpu"):
    """controlnet-aux HEDdetector (from a repo id / folder holding ControlNetHED.pth, or a built one)."""
    return _annotator("hed", model, device)


def load_lineart(model: Any = DEFAULT_WEIGHTS["lineart"], device: str | torch.device = "cpu"):
    """controlnet-aux LineartDetector (from a repo id / folder holding sk_model.pth, or a built one)."""
    return _annotator("lineart", model, device)


class DepthEstimator:
    """A transformers depth model (DPT): image -> (H, W) depth normalised to 0-255 per image (ControlNet++)."""

    def __init__(self, model: nn.Module, image_size: int = 384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> None:
        self.model = model.eval()
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).device)
        depth = self.model(pixel_values=x).predicted_depth  # (1, h', w')
        depth = F.interpolate(depth[:, None].float().cpu(), size=(h, w), mode="bicubic", align_corners=False)[0, 0]
        lo, hi = depth.min(), depth.max()
        return (depth - lo) / (hi - lo).clamp_min(1e-8) * 255.0


def load_depth(model: str | nn.Module = DEFAULT_WEIGHTS["depth"], device: str | torch.device = "cpu") -> DepthEstimator:
    """DPT depth estimator from a hub id / local folder, or a built transformers depth model."""
    if isinstance(model, nn.Module):
        return DepthEstimator(model.to(device))
    from transformers import AutoModelForDepthEstimation

    try:
        net = AutoModelForDepthEstimation.from_pretrained(str(model))
    except (OSError, ValueError) as err:
        raise weights_error("depth (DPT)", str(model), "--depth-model", err) from None
    return DepthEstimator(net.to(device))


class Segmenter:
    """A SegFormer semantic segmenter: image -> (H, W) class ids (argmax of logits upsampled to the image)."""

    def __init__(self, model: nn.Module, image_size: int = 512, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.model = model.eval()
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.num_classes = int(model.config.num_labels)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        x = torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).device)
        logits = self.model(pixel_values=x).logits.float().cpu()  # (1, classes, h/4, w/4)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)


def load_segmenter(model: str | nn.Module = DEFAULT_WEIGHTS["seg"], device: str | torch.device = "cpu") -> Segmenter:
    """SegFormer from a hub id / local folder, or a built SegformerForSemanticSegmentation."""
    if isinstance(model, nn.Module):
        return Segmenter(model.to(device))
    from transformers import SegformerForSemanticSegmentation

    try:
        net = SegformerForSemanticSegmentation.from_pretrained(str(model))
    except (OSError, ValueError) as err:
        raise weights_error("segmentation (SegFormer)", str(model), "--seg-model", err) from None
    return Segmenter(net.to(device))


def load_landmarks(model: Any = DEFAULT_WEIGHTS["landmarks"], device: str | torch.device = "cpu") -> Callable:
    """68-point 2D face landmarks: image -> (68, 2) tensor or None (no face). Needs ``face-alignment``,
    or pass any callable with that contract."""
    if callable(model):
        return model
    if importlib.util.find_spec("face_alignment") is None:
        raise WeightsUnavailableError(
            "the landmarks metric needs the face-alignment package and its weights: pip install face-alignment "
            "(its FAN weights download on first use; offline, put them in $TORCH_HOME/hub/checkpoints)"
        )
    import face_alignment

    try:
        fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=str(device))
    except Exception as err:  # download failures come in many types
        raise weights_error("face-landmark (FAN)", str(model), "$TORCH_HOME", err) from None

    def detect(image: np.ndarray) -> torch.Tensor | None:
        found = fa.get_landmarks(image)
        return torch.from_numpy(np.asarray(found[0], dtype=np.float32)[:, :2]) if found else None

    return detect
