"""Control consistency of controllable-generation samples (ControlNet++ / OFT protocols, docs/generate-score.md).

The ground-truth map of each row comes from its condition source image (the real photo the condition was
made from; the detector runs on it exactly as on the generated image) or, without a source, from the
condition image itself (then it already IS the edge / HED / depth map). Per-image values and means.

Every metric is a :class:`MapExtractor` (image -> map, a row's ground-truth map, the comparison),
registered by name with its loader in ``CONTROL_REGISTRY``; ``score_control`` runs the requested ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..detectors import canny
from ..images import open_image
from ..samples import SampleRow, read_samples
from .control_models import (
    DEFAULT_WEIGHTS,
    Segmenter,
    load_depth,
    load_hed,
    load_landmarks,
    load_lineart,
    load_segmenter,
)
from .extractors import WeightsUnavailableError
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
    "CONTROL_REGISTRY",
    "DEFAULT_WEIGHTS",
    "ControlMetric",
    "ControlOptions",
    "MapExtractor",
    "register_control_metric",
    "load_control_metrics",
    "canny_edges",
    "score_control",
]


def _uint8(path_or_image: str | os.PathLike | Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, optionally resized to size=(W, H)."""
    img = path_or_image.convert("RGB") if isinstance(path_or_image, Image.Image) else open_image(path_or_image)
    if size is not None and img.size != size:
        img = img.resize(size, Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def canny_edges(image: np.ndarray, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edges (H, W) bool of a (H, W, 3) uint8 image at its own resolution (``conditions.canny``: the
    same detector makes the canny conditions)."""
    return torch.from_numpy(canny(image, low, high) > 127)


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


# ---- map extractors: one interface per metric ---------------------------------------------------

def _ground_truth_image(row: SampleRow, metric: str) -> Path:
    if row.condition_source is not None:
        return row.condition_source
    if row.condition is None:
        raise ValueError(
            f"{row.file.name}: the {metric} metric compares with the condition, but the manifest row has neither "
            "'condition' nor 'condition_source'; generate from a control adapter with --condition"
        )
    return row.condition


class MapExtractor:
    """A loaded control metric, the one interface ``score_control`` runs (cf. k-diffusion's feature extractors).

    ``extract``: a (H, W, 3) uint8 image -> the metric's map (edges, soft edges, depth, classes, landmarks).
    ``reference``: a manifest row's ground-truth map at size=(W, H): by default ``extract`` on the condition's
    source image, else the condition image read as a map (``from_condition``).
    ``compare``: (generated map, ground truth) -> per-image values, named ``<metric>_<value>``.
    ``summarize``: dataset-level values and counts added after the per-image means (default: none).
    """

    name = ""

    def extract(self, image: np.ndarray) -> Any:
        raise NotImplementedError

    def from_condition(self, condition: np.ndarray, size: tuple[int, int]) -> Any:
        raise NotImplementedError

    def reference(self, row: SampleRow, size: tuple[int, int]) -> Any:
        if row.condition_source is not None:
            return self.extract(_uint8(row.condition_source, size))
        return self.from_condition(_uint8(_ground_truth_image(row, self.name)), size)

    def compare(self, pred: Any, ref: Any, size: tuple[int, int]) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, generated: np.ndarray, row: SampleRow) -> dict[str, Any]:
        size = (generated.shape[1], generated.shape[0])
        return self.compare(self.extract(generated), self.reference(row, size), size)

    def summarize(self, summary: dict[str, float], per_image: list[dict[str, Any]], counts: dict[str, int]) -> None:
        pass


class CannyMap(MapExtractor):
    """Canny edge maps; F1 and IoU against the source's edges or the binarised condition."""

    name = "canny"

    def __init__(self, low: int = 100, high: int = 200) -> None:
        self.low, self.high = low, high

    def extract(self, image: np.ndarray) -> torch.Tensor:
        return canny_edges(image, self.low, self.high)

    def from_condition(self, condition: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        cond = _resize_map(condition, size, nearest=True)
        return binarize_edges(torch.from_numpy(cond).permute(2, 0, 1))

    def compare(self, pred: torch.Tensor, ref: torch.Tensor, size: tuple[int, int]) -> dict[str, Any]:
        f1, iou = edge_f1_iou(pred, ref)
        return {"canny_f1": f1, "canny_iou": iou}


class AnnotatorMap(MapExtractor):
    """A controlnet-aux soft-edge annotator (HED, lineart) at a fixed working resolution; SSIM of the maps."""

    def __init__(self, name: str, detector: Any, resolution: int = 512) -> None:
        self.name, self.detector, self.resolution = name, detector, resolution

    def extract(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self.detector(image, detect_resolution=self.resolution, image_resolution=self.resolution,
                                        output_type="np"))

    def reference(self, row: SampleRow, size: tuple[int, int]) -> np.ndarray:
        if row.condition_source is not None:  # detected at the source's own size, resized in compare
            return self.extract(_uint8(row.condition_source))
        return _uint8(_ground_truth_image(row, self.name))

    def compare(self, pred: np.ndarray, ref: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
        value = ssim(_gray01(_resize_map(pred, size)), _gray01(_resize_map(ref, size))).item()
        return {f"{self.name}_ssim": value}


class DepthMap(MapExtractor):
    """Depth maps on a 0-255 scale; RMSE against the source's depth or the condition's grey levels."""

    name = "depth"

    def __init__(self, estimator: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.estimator = estimator

    def extract(self, image: np.ndarray) -> torch.Tensor:
        return self.estimator(image)

    def from_condition(self, condition: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        return _gray01(_resize_map(condition, size))[0, 0] * 255.0

    def compare(self, pred: torch.Tensor, ref: torch.Tensor, size: tuple[int, int]) -> dict[str, Any]:
        return {"depth_rmse": rmse(pred[None], ref[None]).item()}


class SegmentationMap(MapExtractor):
    """Class-id maps; per-image mIoU, and the dataset-level mIoU / mAcc / aAcc from the summed confusion."""

    name = "seg"

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self.confusion: torch.Tensor | None = None

    def extract(self, image: np.ndarray) -> torch.Tensor:
        return self.segmenter(image)

    def reference(self, row: SampleRow, size: tuple[int, int]) -> torch.Tensor:
        if row.label is not None:
            label = torch.from_numpy(np.asarray(open_image(row.label, "label map", mode=None).resize(size, Image.NEAREST)).astype(np.int64))
            if label.ndim == 3:
                raise ValueError(f"label map {row.label} must be single-channel class ids, not RGB")
            return label
        if row.condition_source is not None:
            return self.extract(_uint8(row.condition_source, size))
        raise ValueError(
            f"{row.file.name}: seg needs a class-id label map ('label' in the manifest) or the "
            "condition's source image ('condition_source'); a colour-coded condition cannot be read back"
        )

    def compare(self, pred: torch.Tensor, ref: torch.Tensor, size: tuple[int, int]) -> dict[str, Any]:
        conf = confusion_matrix(pred, ref, self.segmenter.num_classes)
        self.confusion = conf if self.confusion is None else self.confusion + conf
        return {"seg_miou": segmentation_scores(conf)["miou"]}

    def summarize(self, summary: dict[str, float], per_image: list[dict[str, Any]], counts: dict[str, int]) -> None:
        if self.confusion is None:
            return
        # dataset-level mIoU as ControlNet++ reports it; the per-image mean stays too
        scores = segmentation_scores(self.confusion)
        summary["seg_miou_mean_per_image"] = summary.pop("seg_miou")
        summary.update({"seg_miou": scores["miou"], "seg_macc": scores["macc"], "seg_aacc": scores["aacc"]})


class LandmarkMap(MapExtractor):
    """68-point face landmarks; mean L2 error, the row skipped (and counted) where either image has no face."""

    name = "landmarks"

    def __init__(self, detect: Callable[[np.ndarray], torch.Tensor | None]) -> None:
        self.detect = detect

    def extract(self, image: np.ndarray) -> torch.Tensor | None:
        return self.detect(image)

    def reference(self, row: SampleRow, size: tuple[int, int]) -> torch.Tensor | None:
        return self.extract(_uint8(_ground_truth_image(row, self.name), size))  # a condition is a face photo too

    def score(self, generated: np.ndarray, row: SampleRow) -> dict[str, Any]:
        size = (generated.shape[1], generated.shape[0])
        ref = self.reference(row, size)
        pred = self.extract(generated) if ref is not None else None
        return self.compare(pred, ref, size)

    def compare(self, pred: torch.Tensor | None, ref: torch.Tensor | None, size: tuple[int, int]) -> dict[str, Any]:
        if ref is None or pred is None:
            return {"landmarks_skipped": "no face found"}
        return {"landmark_error": landmark_error(pred[None], ref[None]).item()}

    def summarize(self, summary: dict[str, float], per_image: list[dict[str, Any]], counts: dict[str, int]) -> None:
        counts["landmarks_no_face"] = sum("landmarks_skipped" in rec for rec in per_image)


# ---- the registry -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlOptions:
    """Settings some map extractors take: Canny thresholds, the HED / lineart working resolution."""

    canny_thresholds: tuple[int, int] = (100, 200)
    annotator_resolution: int = 512  # controlnet-aux's default


@dataclass(frozen=True)
class ControlMetric:
    """A registered control metric: what it measures, and ``load(weights, device, options)`` -> MapExtractor.
    ``default_weights`` None: weight-free (``weights`` is ignored and loading cannot fail)."""

    name: str
    description: str
    load: Callable[[Any, str | torch.device, ControlOptions], MapExtractor]
    default_weights: str | None = None


CONTROL_REGISTRY: dict[str, ControlMetric] = {}
CONTROL_METRICS: dict[str, str] = {}  # name -> description (the --metrics help and error messages)


def register_control_metric(metric: ControlMetric) -> None:
    """Add (or replace) a control metric; ``score_control(metrics=...)`` accepts its name from then on."""
    CONTROL_REGISTRY[metric.name] = metric
    CONTROL_METRICS[metric.name] = metric.description
    if metric.default_weights is not None:
        DEFAULT_WEIGHTS[metric.name] = metric.default_weights


for _metric in [
    ControlMetric("canny", "F1 and IoU of Canny(100, 200) edge maps, generated vs condition (weight-free)",
                  lambda weights, device, opt: CannyMap(*opt.canny_thresholds)),
    ControlMetric("hed", "SSIM of HED soft-edge maps (lllyasviel/Annotators weights)",
                  lambda weights, device, opt: AnnotatorMap("hed", load_hed(weights, device), opt.annotator_resolution),
                  DEFAULT_WEIGHTS["hed"]),
    ControlMetric("lineart", "SSIM of lineart maps (lllyasviel/Annotators weights)",
                  lambda weights, device, opt: AnnotatorMap("lineart", load_lineart(weights, device),
                                                            opt.annotator_resolution),
                  DEFAULT_WEIGHTS["lineart"]),
    ControlMetric("depth", "RMSE of DPT depth maps on a 0-255 scale (Intel/dpt-hybrid-midas weights)",
                  lambda weights, device, opt: DepthMap(load_depth(weights, device)), DEFAULT_WEIGHTS["depth"]),
    ControlMetric("seg", "mIoU of SegFormer ADE20K segmentations (nvidia/segformer-b4-finetuned-ade-512-512 weights)",
                  lambda weights, device, opt: SegmentationMap(load_segmenter(weights, device)), DEFAULT_WEIGHTS["seg"]),
    ControlMetric("landmarks", "mean 68-point face-landmark L2 error in pixels (face-alignment package weights)",
                  lambda weights, device, opt: LandmarkMap(load_landmarks(weights, device)), DEFAULT_WEIGHTS["landmarks"]),
]:
    register_control_metric(_metric)


# ---- scoring ------------------------------------------------------------------------------------

def load_control_metrics(
    names: list[str], weights: dict[str, Any], device: str | torch.device, options: ControlOptions,
    skip_unavailable: bool = False,
) -> tuple[dict[str, MapExtractor], dict[str, str]]:
    """({name: loaded extractor} in registry order, {name: why it could not be loaded}); without
    ``skip_unavailable`` the first WeightsUnavailableError is raised."""
    loaded: dict[str, MapExtractor] = {}
    unavailable: dict[str, str] = {}
    for name, metric in CONTROL_REGISTRY.items():
        if name not in names:
            continue
        try:
            loaded[name] = metric.load(weights.get(name), device, options)
        except WeightsUnavailableError as err:
            if not skip_unavailable:
                raise
            unavailable[name] = str(err)
    if not loaded:
        raise WeightsUnavailableError("no requested control metric could be loaded:\n" + "\n".join(unavailable.values()))
    return loaded, unavailable


def _score_row(row: SampleRow, loaded: dict[str, MapExtractor]) -> dict[str, Any]:
    rec: dict[str, Any] = {"file": str(row.file), "prompt": row.prompt or "", "condition": str(row.condition or ""),
                           "condition_source": str(row.condition_source or "")}
    generated = _uint8(row.file)
    for extractor in loaded.values():
        rec.update(extractor.score(generated, row))
    return rec


def _summarize(loaded: dict[str, MapExtractor], per_image: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, int]]:
    """Means of the per-image values, then each extractor's dataset-level values and counts."""
    values: dict[str, list[float]] = {}
    for rec in per_image:
        for k, v in rec.items():
            if isinstance(v, float):
                values.setdefault(k, []).append(v)
    summary = {k: float(np.mean(v)) for k, v in values.items()}
    counts = {"images": len(per_image), "scored": len(per_image)}
    for extractor in loaded.values():
        extractor.summarize(summary, per_image, counts)
    return summary, counts


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
    weights = {**DEFAULT_WEIGHTS, **(models or {})}
    options = ControlOptions(tuple(canny_thresholds), annotator_resolution)
    loaded, unavailable = load_control_metrics(names, weights, device, options, skip_unavailable)
    per_image = [_score_row(row, loaded) for row in (progress(rows) if progress else rows)]
    summary, counts = _summarize(loaded, per_image)
    info = {"samples_dir": str(samples_dir), "metrics": [n for n in names if n in loaded],
            "canny_thresholds": list(canny_thresholds),
            "models": {n: (weights[n] if isinstance(weights[n], str) else type(weights[n]).__name__)
                       for n in loaded if CONTROL_REGISTRY[n].default_weights is not None}}
    if unavailable:
        info["unavailable"] = unavailable
    return ScoreResult(kind="control", summary=summary, per_image=per_image, counts=counts, info=info)
