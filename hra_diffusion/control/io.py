"""Save and load a control adapter: the UNet's adapter (any kind, through the adapter registry) plus the
condition encoder that feeds the condition image into ``conv_in``.

Where the encoder lives in the folder:
- HRA: in the same ``adapter_model.safetensors``, keys prefixed ``condition_encoder.``, its shape under
  ``condition_encoder`` in adapter_config.json (one file, as the trainer has always written it);
- PEFT baselines: ``condition_encoder.safetensors`` beside PEFT's files (their adapter_config.json stays
  exactly PEFT's), its shape in the file's header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..adapters.io import read_adapter, read_safetensors, save_adapter
from ..adapters.peft_baselines import save_peft_adapter
from ..adapters.registry import AdapterInfo, adapter_type, load_any_adapter
from .encoder import build_condition_encoder

__all__ = [
    "ENCODER_PREFIX",
    "CONDITION_ENCODER_FILE",
    "encoder_config",
    "has_condition_encoder",
    "save_condition_encoder",
    "load_condition_encoder",
    "save_control_adapter",
    "load_control_adapter",
    "load_trained_adapter",
]

ENCODER_PREFIX = "condition_encoder."
CONDITION_ENCODER_FILE = "condition_encoder.safetensors"


def encoder_config(encoder: nn.Module) -> dict[str, Any]:
    """The shape a condition encoder was built with (what is needed to rebuild it)."""
    config = getattr(encoder, "hra_condition_config", None)
    if config is None:
        raise ValueError("the encoder was not made by hra_diffusion.control.build_condition_encoder(); "
                         "its shape is unknown")
    return config


def has_condition_encoder(info: AdapterInfo) -> bool:
    """Whether the adapter folder described by ``info`` carries a condition encoder (a control adapter)."""
    if info.kind == "hra":
        return bool(info.doc.get("condition_encoder"))
    return (info.path / CONDITION_ENCODER_FILE).is_file()


def _rebuild(unet: nn.Module, config: dict[str, Any], state: dict, where: Any) -> nn.Module:
    encoder = build_condition_encoder(unet, block_out_channels=config["block_out_channels"],
                                      conditioning_channels=config["conditioning_channels"])
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{where}: the condition encoder weights do not fit its recorded shape "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return encoder.to(next(unet.parameters()).device).eval()


def save_condition_encoder(encoder: nn.Module, file: str | os.PathLike) -> Path:
    """The condition encoder as one safetensors file; its shape is in the file's header."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(file), metadata={"format": "pt", "condition_encoder": json.dumps(encoder_config(encoder))})
    return Path(file)


def load_condition_encoder(unet: nn.Module, folder: str | os.PathLike) -> nn.Module | None:
    """Rebuild the condition encoder stored in an adapter folder (either layout); None when it has none."""
    if adapter_type(folder) == "hra":  # one read of the adapter file gives the config and the encoder
        doc, _, extras = read_adapter(folder)
        if not doc.get("condition_encoder"):
            return None
        state = {k[len(ENCODER_PREFIX):]: v for k, v in extras.items() if k.startswith(ENCODER_PREFIX)}
        return _rebuild(unet, doc["condition_encoder"], state, f"adapter {folder}")
    file = Path(folder) / CONDITION_ENCODER_FILE
    if not file.is_file():
        return None
    state, meta = read_safetensors(file)
    if "condition_encoder" not in meta:
        raise ValueError(f"{file} has no 'condition_encoder' metadata (its shape); it was not written by "
                         "save_condition_encoder()")
    return _rebuild(unet, json.loads(meta["condition_encoder"]), state, file)


def save_control_adapter(unet: nn.Module, encoder: nn.Module, path: str | os.PathLike, kind: str = "hra",
                         **metadata: Any) -> Path:
    """One adapter folder: the UNet's adapter of ``kind`` plus the condition encoder (atomically)."""
    config = encoder_config(encoder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    if kind == "hra":
        extra = {ENCODER_PREFIX + k: v for k, v in state.items()}
        return save_adapter(unet, path, extra_tensors=extra, condition_encoder=config,
                            **{"adapter": "hra", **metadata})
    header = {"condition_encoder": json.dumps(config)}
    return save_peft_adapter(unet, path, extra_files={CONDITION_ENCODER_FILE: (state, header)}, **metadata)


def load_trained_adapter(unet: nn.Module, path: str | os.PathLike) -> tuple[str, list[str], nn.Module | None]:
    """Load any adapter folder a trainer wrote (or PEFT's HRA/LoRA/OFT/BOFT) into ``unet``.

    Returns (adapter kind, adapted module names, condition encoder or None).
    """
    kind = adapter_type(path)
    names = load_any_adapter(unet, path)
    return kind, names, load_condition_encoder(unet, path)


def load_control_adapter(unet: nn.Module, path: str | os.PathLike) -> tuple[list[str], nn.Module | None]:
    """Load an adapter; if it carries a condition encoder, rebuild it. Returns (layer names, encoder)."""
    _, names, encoder = load_trained_adapter(unet, path)
    return names, encoder
