"""hra-diffusion: Householder Reflection Adaptation (HRA) for Stable Diffusion.

Public API::

    from hra_diffusion import HRAConfig, inject_hra, save_adapter, load_adapter, merge_hra
"""

from .adapters import (
    ADAPTERS,
    CONTROL_TARGETS,
    DEFAULT_TARGETS,
    TEXT_ENCODER_TARGETS,
    HRAConfig,
    HRAConv2d,
    HRALayer,
    HRALinear,
    count_hra_parameters,
    describe_adapter,
    disable_hra,
    export_adapter,
    export_merged,
    export_peft,
    hra_layers,
    hra_parameters,
    inject_hra,
    load_adapter,
    load_any_adapter,
    merge_and_unload_hra,
    merge_hra,
    orthogonality_loss,
    read_adapter,
    save_adapter,
    unmerge_hra,
)
from .version import __version__  # noqa: E402

__all__ = [
    "HRAConfig",
    "inject_hra",
    "save_adapter",
    "load_adapter",
    "merge_hra",
    "unmerge_hra",
    "merge_and_unload_hra",
    "load_any_adapter",
    "describe_adapter",
    "ADAPTERS",
    "read_adapter",
    "export_peft",
    "export_merged",
    "export_adapter",
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
