"""Evaluation: scoring of generated samples, and the trainers' weight-free learning signals.

Subject fidelity (DINO, CLIP-I, CLIP-T, LPIPS; ``subject``) and control consistency (Canny F1/IoU,
HED/lineart SSIM, depth RMSE, segmentation mIoU, face-landmark error; ``control_metrics``), following the
protocols of the official HRA code and ControlNet++ (docs/generate-score.md), with feature extractors, pure metric functions, a feature cache and an HTML report.
Model-side evaluation used by the trainers' tests and eval/compare.py (imported on demand, as they load
the training stack): ``denoising.fixed_noise_loss`` (held-out denoising loss) and
``edge_consistency.control_consistency`` (Canny-edge F1 of images generated from held-out conditions).
Sample folders, manifests and image listing are read by ``hra_diffusion.samples``.
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
