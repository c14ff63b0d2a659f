"""Scoring of generated samples: feature extractors, pure metric functions, feature cache, HTML report.

Subject fidelity (DINO, CLIP-I, CLIP-T, LPIPS) and control consistency (Canny F1/IoU, HED/lineart SSIM,
depth RMSE, segmentation mIoU, face-landmark error), following the protocols in anchors.md.
"""

from ..samples import read_samples
from .cache import FeatureCache, cached_features, default_cache_dir, file_hash
from .control_metrics import CONTROL_METRICS, canny_edges, score_control
from .extractors import (
    CLIPExtractor,
    DINOExtractor,
    FeatureExtractor,
    WeightsUnavailableError,
    load_clip,
    load_dino,
)
from .report import write_outputs
from .result import ScoreResult
from .subject import SUBJECT_METRICS, score_subject

__all__ = [
    "FeatureExtractor",
    "DINOExtractor",
    "CLIPExtractor",
    "WeightsUnavailableError",
    "load_dino",
    "load_clip",
    "FeatureCache",
    "cached_features",
    "default_cache_dir",
    "file_hash",
    "SUBJECT_METRICS",
    "CONTROL_METRICS",
    "score_subject",
    "score_control",
    "canny_edges",
    "ScoreResult",
    "read_samples",
    "write_outputs",
]
