"""One switchboard for every adapter kind: detect, read, load, save and merge HRA (ours or PEFT's) and the
PEFT baselines (LoRA, OFT, BOFT), so ``generate``, the trainers, the exporter and the comparison never
dispatch on the type themselves.

    kind = adapter_type(folder)                 # 'hra' | 'lora' | 'oft' | 'boft'
    info = describe_adapter(folder)             # kind + its recorded metadata, without a model
    names = load_any_adapter(unet, folder)      # injects and fills the adapter
    save_any_adapter(unet, folder, kind, ...)   # the format that kind is saved in
    merge_adapter(unet, kind)                   # fold in, reversibly (unmerge_adapter undoes it)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import AdapterFileError
from .io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_NAME,
    load_adapter,
    read_adapter,
    read_safetensors,
    save_adapter,
)
from .peft_baselines import BASELINES

__all__ = [
    "ADAPTERS",
    "AdapterInfo",
    "adapter_type",
    "describe_adapter",
    "read_adapter_metadata",
    "load_any_adapter",
    "save_any_adapter",
    "merge_adapter",
    "unmerge_adapter",
]

ADAPTERS = ("hra", *BASELINES)
"""Every adapter kind the trainers take (``--adapter``); ``hra`` is this library's, the rest PEFT's."""


def _choices() -> str:
    return ", ".join(ADAPTERS)


def adapter_type(path: str | os.PathLike) -> str:
    """'hra' (ours, or PEFT's HRA), 'lora', 'oft' or 'boft', from the folder's adapter_config.json."""
    file = Path(path) / ADAPTER_CONFIG
    if not Path(path).is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing: an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        doc = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON ({err})") from None
    if doc.get("format") == FORMAT_NAME:
        return "hra"
    peft_type = str(doc.get("peft_type") or "").lower()
    if peft_type in ADAPTERS:
        return peft_type
    raise ValueError(f"{file} is neither an hra-diffusion adapter nor a PEFT adapter of a supported type "
                     f"(peft_type {doc.get('peft_type')!r}); supported: {_choices()}")


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer metadata stored in a PEFT baseline's safetensors header ({} when there is none)."""
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing")
    _, meta = read_safetensors(file, tensors=False)
    if "hra_diffusion" not in meta:
        return {}
    try:
        return json.loads(meta["hra_diffusion"])
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{str(file)!r}: its 'hra_diffusion' header entry is not valid JSON ({err})") from None


@dataclass
class AdapterInfo:
    """What a folder holds, read without a model: its kind and its metadata document.

    ``doc`` is our adapter_config.json for HRA (PEFT HRA configs translated, ``source: peft``), or PEFT's
    config merged with the trainer metadata from the weights' header for a baseline.
    """

    path: Path
    kind: str
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.doc.get("base_model") or self.doc.get("base_model_name_or_path")

    @property
    def source(self) -> str:
        return self.doc.get("source", "hra-diffusion" if self.kind == "hra" else "peft")


def describe_adapter(path: str | os.PathLike) -> AdapterInfo:
    """Validate an adapter folder and read its kind and metadata (cheap: no model is built)."""
    kind = adapter_type(path)
    if kind == "hra":
        doc, _, _ = read_adapter(path)
    else:
        doc = {**json.loads((Path(path) / ADAPTER_CONFIG).read_text()), **read_adapter_metadata(path),
               "source": "peft"}
    return AdapterInfo(Path(path), kind, doc)


def load_any_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an HRA adapter (ours or PEFT's) or a PEFT LoRA/OFT/BOFT folder into ``model``; returns the
    adapted layer names."""
    if adapter_type(path) == "hra":
        return load_adapter(model, path)
    from .peft_baselines import load_peft_adapter

    return load_peft_adapter(model, path)


def save_any_adapter(model: nn.Module, path: str | os.PathLike, kind: str, **metadata: Any) -> Path:
    """A trainer's adapter in its kind's format: ours for HRA, PEFT's for a baseline (atomically)."""
    if kind == "hra":
        return save_adapter(model, path, adapter="hra", **metadata)
    if kind not in BASELINES:
        raise ValueError(f"unknown adapter {kind!r}; choose one of {_choices()}")
    from .peft_baselines import save_peft_adapter

    return save_peft_adapter(model, path, **metadata)


def merge_adapter(model: nn.Module, kind: str) -> nn.Module:
    """Fold the adapter into the base weights, reversibly (HRA: W <- W H; PEFT layers: their ``merge()``)."""
    if kind == "hra":
        from .model import merge_hra

        return merge_hra(model)
    from .peft_baselines import merge_peft

    return merge_peft(model)


def unmerge_adapter(model: nn.Module, kind: str) -> nn.Module:
    """Undo :func:`merge_adapter`."""
    if kind == "hra":
        from .model import unmerge_hra

        unmerge_hra(model)
        return model
    from .peft_baselines import peft_layers

    for _, layer in peft_layers(model):
        layer.unmerge()
    return model
