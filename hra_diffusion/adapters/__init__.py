"""Adapters: the HRA method and the PEFT baselines side by side, behind one registry.

| module | what |
|---|---|
| ``householder`` | the HRA maths, pure torch (WY factor, fused row factors with their backward, Gram-Schmidt, penalty) |
| ``layers`` | ``HRALinear`` / ``HRAConv2d``: a frozen base layer and trainable ``hra_u`` (d, r) |
| ``config`` | ``HRAConfig`` and the default target lists |
| ``model`` | inject, merge / unmerge (reversible), merge-and-unload, disable, regulariser, counts |
| ``io`` | our adapter folder format, PEFT HRA both ways, merged model export |
| ``peft_baselines`` | PEFT's LoRA / OFT / BOFT at HRA's targets: inject, save, load |
| ``registry`` | detect / describe / load / save / merge any of them |
| ``export`` | any of them as a LoRA file (diffusers, kohya), PEFT or merged model: HRA as its exact LoRA |

The method is written up in docs/method.md. Nothing here imports the control, training or evaluation code.
"""

from .config import CONTROL_TARGETS, DEFAULT_TARGETS, TEXT_ENCODER_TARGETS, HRAConfig
from .export import EXPORT_FORMATS, export_adapter
from .io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    export_merged,
    export_peft,
    load_adapter,
    merged_state_dict,
    read_adapter,
    save_adapter,
)
from .layers import HRAConv2d, HRALayer, HRALinear
from .model import (
    count_hra_parameters,
    disable_hra,
    hra_layers,
    hra_parameters,
    inject_hra,
    merge_and_unload_hra,
    merge_hra,
    orthogonality_loss,
    unmerge_hra,
)
from .registry import (
    ADAPTERS,
    AdapterInfo,
    adapter_type,
    describe_adapter,
    load_any_adapter,
    merge_adapter,
    read_adapter_metadata,
    save_any_adapter,
    unmerge_adapter,
)

__all__ = [
    "HRAConfig", "DEFAULT_TARGETS", "CONTROL_TARGETS", "TEXT_ENCODER_TARGETS",
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "save_adapter", "load_adapter", "read_adapter", "export_peft",
    "export_merged", "merged_state_dict",
    "HRALayer", "HRALinear", "HRAConv2d",
    "inject_hra", "merge_hra", "unmerge_hra", "merge_and_unload_hra", "disable_hra", "hra_layers",
    "hra_parameters", "count_hra_parameters", "orthogonality_loss",
    "ADAPTERS", "AdapterInfo", "adapter_type", "describe_adapter", "read_adapter_metadata", "load_any_adapter",
    "save_any_adapter", "merge_adapter", "unmerge_adapter", "EXPORT_FORMATS", "export_adapter",
]
