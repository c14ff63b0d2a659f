"""Shared trainer pieces: typed configs (every task's), image data, base-model loading, loss, checkpoints,
validation, model card, the training loop, the Stable Diffusion task base the DreamBooth and control tasks
share, and the runner that parses a task's config and runs it."""

from ..images import ImageTransform, load_rgb
from ..models import BaseModelError, SDComponents, add_hra, load_sd_components, weight_dtype_for
from .checkpoint import latest_checkpoint, list_checkpoints, prune_checkpoints, save_checkpoint
from .config import ConfigError, ControlConfig, DreamBoothConfig, TrainConfig
from .data import DataError, ImageFolderDataset, StreamSampler, list_images
from .recipes import parse_config, save_resolved_config
from .runner import TASKS, parse_task_config, run_script, run_task
from .sd_task import StableDiffusionTask
from .trainer import NonFiniteLossError, TrainingTask, TrainResult, make_accelerator, run_training

__all__ = [
    "ConfigError",
    "TrainConfig",
    "DreamBoothConfig",
    "ControlConfig",
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
    "StableDiffusionTask",
    "TASKS",
    "parse_task_config",
    "run_task",
    "run_script",
]
