"""hra-diffusion: Householder Reflection Adaptation (HRA) for Stable Diffusion.

Public API::

    from hra_diffusion import HRAConfig, inject_hra, save_adapter, load_adapter, merge_hra
"""

from .adapter_io import export_merged, export_peft, load_adapter, read_adapter, save_adapter
from .config import CONTROL_TARGETS, DEFAULT_TARGETS, TEXT_ENCODER_TARGETS, HRAConfig
from .layers import HRAConv2d, HRALayer, HRALinear
from .model import (
    count_hra_parameters,
    disable_hra,
    hra_layers,
    hra_parameters,
    inject_hra,
    merge_hra,
    orthogonality_loss,
    unmerge_hra,
)

__version__ = "0.1.0"

__all__ = [
    "HRAConfig",
    "inject_hra",
    "save_adapter",
    "load_adapter",
    "merge_hra",
    "unmerge_hra",
    "read_adapter",
    "export_peft",
    "export_merged",
    "HRALayer",
    "HRALinear",
    "HRAConv2d",
    "hra_layers",
    "hra_parameters",
    "count_hra_parameters",
    "orthogonality_loss",
    "disable_hra",
    "DEFAULT_TARGETS",
    "CONTROL_TARGETS",
    "TEXT_ENCODER_TARGETS",
    "__version__",
]
