"""Shared trainer pieces: typed config, image data, base-model loading, loss, checkpoints, validation,
model card, and the training loop that the DreamBooth and control trainers plug into."""

from .checkpoint import latest_checkpoint, list_checkpoints, prune_checkpoints, save_checkpoint
from .config import ConfigError, DreamBoothConfig, TrainConfig, parse_config, save_resolved_config
from .data import DataError, ImageFolderDataset, ImageTransform, StreamSampler, list_images, load_rgb
from .models import BaseModelError, SDComponents, add_hra, load_sd_components, weight_dtype_for
from .trainer import NonFiniteLossError, TrainingTask, TrainResult, make_accelerator, run_training

__all__ = [
    "ConfigError",
    "TrainConfig",
    "DreamBoothConfig",
    "parse_config",
    "save_resolved_config",
    "DataError",
    "ImageFolderDataset",
    "ImageTransform",
    "StreamSampler",
    "list_images",
    "load_rgb",
    "BaseModelError",
    "SDComponents",
    "load_sd_components",
    "add_hra",
    "weight_dtype_for",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "save_checkpoint",
    "NonFiniteLossError",
    "TrainingTask",
    "TrainResult",
    "make_accelerator",
    "run_training",
]
