"""Control consistency of controllable-generation samples (ControlNet++ / OFT protocols, anchors.md).

The ground-truth map of each row comes from its condition source image (the real photo the condition was
made from; the detector runs on it exactly as on the generated image) or, without a source, from the
condition image itself (then it already IS the edge / HED / depth map). Per-image values and means.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..samples import SampleRow, read_samples
from .extractors import IMAGENET_MEAN, IMAGENET_STD, WeightsUnavailableError, weights_error
from .functional import (
    binarize_edges,
    confusion_matrix,
    edge_f1_iou,
    landmark_error,
    rmse,
    segmentation_scores,
    ssim,
)
from .result import ScoreResult, parse_metric_names

__all__ = [
    "CONTROL_METRICS",
    "DEFAULT_WEIGHTS",
    "canny_edges",
    "score_control",
    "load_hed",
    "load_lineart",
    "DepthEstimator",
    "load_depth",
    "Segmenter",
    "load_segmenter",
    "load_landmarks",
]

CONTROL_METRICS = {
    "canny": "F1 and IoU of Canny(100, 200) edge maps, generated vs condition (weight-free)",
    "hed": "SSIM of HED soft-edge maps (lllyasviel/Annotators weights)",
    "lineart": "SSIM of lineart maps (lllyasviel/Annotators weights)",
    "depth": "RMSE of DPT depth maps on a 0-255 scale (Intel/dpt-hybrid-midas weights)",
    "seg": "mIoU of SegFormer ADE20K segmentations (nvidia/segformer-b4-finetuned-ade-512-512 weights)",
    "landmarks": "mean 68-point face-landmark L2 error in pixels (face-alignment package weights)",
}
DEFAULT_WEIGHTS = {
    "hed": "lllyasviel/Annotators",
    "lineart": "lllyasviel/Annotators",
    "depth": "Intel/dpt-hybrid-midas",
    "seg": "nvidia/segformer-b4-finetuned-ade-512-512",
    "landmarks": "face_alignment:2D",
}


def _uint8(path_or_image: str | os.PathLike | Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, optionally resized to size=(W, H)."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    img = img.convert("RGB")
    if size is not None and img.size != size:
        img = img.resize(size, Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def canny_edges(image: np.ndarray, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edges (H, W) bool of a (H, W, 3) uint8 image at its own resolution.

    controlnet-aux's CannyDetector is used where it does not resample (sides multiples of 64); it snaps
    other sizes to multiples of 64, so there the same ``cv2.Canny(image, low, high)`` is called directly.
    """
    import cv2

    h, w = image.shape[:2]
    if h % 64 == 0 and w % 64 == 0:
        from controlnet_aux.canny import CannyDetector

        edges = CannyDetector()(image, low, high, detect_resolution=min(h, w), image_resolution=min(h, w),
                                output_type="np")[..., 0]
    else:
        edges = cv2.Canny(image, low, high)
    return torch.from_numpy(edges > 127)


def _gray01(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3 or 1) uint8 map -> (1, 1, H, W) float in [0, 1] (mean over channels)."""
    x = torch.from_numpy(image).float() / 255.0
    if x.ndim == 3:
        x = x.mean(-1)
    return x[None, None]


def _resize_map(x: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    img = Image.fromarray(x)
    if img.size == size:
        return x
    return np.asarray(img.resize(size, Image.NEAREST if nearest else Image.BILINEAR))


# ---- loaders: a name / local folder (real weights) or an already-built model (tests) ---------------

def _annotator(kind: str, model: Any, device: str | torch.device):
    from controlnet_aux.hed import HEDdetector
    from controlnet_aux.lineart import LineartDetector

    cls = {"hed": HEDdetector, "lineart": LineartDetector}[kind]
    if isinstance(model, cls):
        return model.to(device)
    name = str(model)
    try:
        return cls.from_pretrained(name).to(device)
    except Exception as err:  # hub and file errors come in many types
        raise weights_error(f"{kind} annotator", name, f"--{kind}-model", err) from None


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


# ---- scoring ------------------------------------------------------------------------------------

def _ground_truth_image(row: SampleRow, metric: str) -> Path:
    if row.condition_source is not None:
        return row.condition_source
    if row.condition is None:
        raise ValueError(
            f"{row.file.name}: the {metric} metric compares with the condition, but the manifest row has neither "
            "'condition' nor 'condition_source'; generate from a control adapter with --condition"
        )
    return row.condition


def score_control(
    samples_dir: str | os.PathLike,
    metrics: str | list[str] | None = None,
    models: dict[str, Any] | None = None,
    skip_unavailable: bool = False,
    device: str | torch.device = "cpu",
    canny_thresholds: tuple[int, int] = (100, 200),
    annotator_resolution: int = 512,
    progress: Callable | None = None,
) -> ScoreResult:
    """Score a samples folder written by ``generate`` from a control adapter; see the module docstring.

    models: per metric, a hub id / folder or a built model overriding DEFAULT_WEIGHTS.
    skip_unavailable: record a metric whose weights cannot be loaded as unavailable instead of raising.
    annotator_resolution: the HED / lineart detectors' working resolution (controlnet-aux default 512).
    """
    names = parse_metric_names(metrics, CONTROL_METRICS, ["canny"])
    rows = read_samples(samples_dir)
    models = {**DEFAULT_WEIGHTS, **(models or {})}
    loaders = {"hed": load_hed, "lineart": load_lineart, "depth": load_depth, "seg": load_segmenter,
               "landmarks": load_landmarks}
    loaded: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        if name in loaders:
            try:
                loaded[name] = loaders[name](models[name], device=device)
            except WeightsUnavailableError as err:
                if not skip_unavailable:
                    raise
                unavailable[name] = str(err)
    active = [n for n in names if n == "canny" or n in loaded]
    if not active:
        raise WeightsUnavailableError("no requested control metric could be loaded:\n" + "\n".join(unavailable.values()))

    per_image: list[dict[str, Any]] = []
    values: dict[str, list[float]] = {}
    seg_conf: torch.Tensor | None = None
    landmark_misses = 0
    iterator = progress(rows) if progress else rows
    for row in iterator:
        gen = _uint8(row.file)
        size = (gen.shape[1], gen.shape[0])
        rec: dict[str, Any] = {"file": str(row.file), "prompt": row.prompt or "",
                               "condition": str(row.condition or ""), "condition_source": str(row.condition_source or "")}
        if "canny" in active:
            if row.condition_source is not None:
                target = canny_edges(_uint8(row.condition_source, size), *canny_thresholds)
            else:
                cond = _resize_map(_uint8(_ground_truth_image(row, "canny")), size, nearest=True)
                target = binarize_edges(torch.from_numpy(cond).permute(2, 0, 1))
            f1, iou = edge_f1_iou(canny_edges(gen, *canny_thresholds), target)
            rec["canny_f1"], rec["canny_iou"] = f1, iou
        for kind in ("hed", "lineart"):
            if kind in active:
                det = loaded[kind]
                pred = np.asarray(det(gen, detect_resolution=annotator_resolution, image_resolution=annotator_resolution, output_type="np"))
                pred = _resize_map(pred, size)
                if row.condition_source is not None:
                    ref = np.asarray(det(_uint8(row.condition_source), detect_resolution=annotator_resolution,
                                         image_resolution=annotator_resolution,
                                         output_type="np"))
                else:
                    ref = _uint8(_ground_truth_image(row, kind))
                rec[f"{kind}_ssim"] = ssim(_gray01(pred), _gray01(_resize_map(ref, size))).item()
        if "depth" in active:
            pred = loaded["depth"](gen)
            if row.condition_source is not None:
                ref = loaded["depth"](_uint8(row.condition_source, size))
            else:
                ref = _gray01(_resize_map(_uint8(_ground_truth_image(row, "depth")), size))[0, 0] * 255.0
            rec["depth_rmse"] = rmse(pred[None], ref[None]).item()
        if "seg" in active:
            seg = loaded["seg"]
            pred = seg(gen)
            if row.label is not None:
                label = torch.from_numpy(np.asarray(Image.open(row.label).resize(size, Image.NEAREST)).astype(np.int64))
                if label.ndim == 3:
                    raise ValueError(f"label map {row.label} must be single-channel class ids, not RGB")
            elif row.condition_source is not None:
                label = seg(_uint8(row.condition_source, size))
            else:
                raise ValueError(
                    f"{row.file.name}: seg needs a class-id label map ('label' in the manifest) or the "
                    "condition's source image ('condition_source'); a colour-coded condition cannot be read back"
                )
            conf = confusion_matrix(pred, label, seg.num_classes)
            seg_conf = conf if seg_conf is None else seg_conf + conf
            rec["seg_miou"] = segmentation_scores(conf)["miou"]
        if "landmarks" in active:
            detect = loaded["landmarks"]
            ref_points = detect(_uint8(_ground_truth_image(row, "landmarks"), size))
            pred_points = detect(gen) if ref_points is not None else None
            if ref_points is None or pred_points is None:
                landmark_misses += 1
                rec["landmarks_skipped"] = "no face found"
            else:
                rec["landmark_error"] = landmark_error(pred_points[None], ref_points[None]).item()
        for k, v in rec.items():
            if isinstance(v, float):
                values.setdefault(k, []).append(v)
        per_image.append(rec)

    summary = {k: float(np.mean(v)) for k, v in values.items()}
    if seg_conf is not None:  # dataset-level mIoU as ControlNet++ reports it; the per-image mean stays too
        scores = segmentation_scores(seg_conf)
        summary["seg_miou_mean_per_image"] = summary.pop("seg_miou")
        summary.update({"seg_miou": scores["miou"], "seg_macc": scores["macc"], "seg_aacc": scores["aacc"]})
    counts = {"images": len(rows), "scored": len(rows)}
    if "landmarks" in active:
        counts["landmarks_no_face"] = landmark_misses
    info = {"samples_dir": str(samples_dir), "metrics": active, "canny_thresholds": list(canny_thresholds),
            "models": {n: (models[n] if isinstance(models[n], str) else type(models[n]).__name__) for n in loaded}}
    if unavailable:
        info["unavailable"] = unavailable
    return ScoreResult(kind="control", summary=summary, per_image=per_image, counts=counts, info=info)
