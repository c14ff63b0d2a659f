"""Save / load HRA adapters (safetensors + JSON), PEFT interop both ways, merged diffusers export.

Our format: a directory with
  adapter_config.json        {"format": "hra-diffusion", "hra": {...HRAConfig}, "layers": {...}, ...}
  adapter_model.safetensors  {"<module path>.hra_u": (d, r) fp32, "<module path>.hra_bias": (d_out,) fp32 where
                             the bias was trained (HRAConfig.train_bias: a shift of the base bias), plus
                             optional extra tensors}
PEFT's format (peft_type "HRA"): keys "base_model.model.<module path>.hra_u", same (d, r) layout; with
bias="hra_only" also "base_model.model.<module path>.base_layer.bias", the trained bias itself (read here as
its shift from the model's bias).
Only safetensors and JSON are ever read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdapterFileError
from ..utils import atomic_directory
from .config import HRAConfig
from .layers import HRAConv2d, HRALayer
from .model import get_hra_config, hra_layers, inject_hra

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "TEXT_ENCODER_SUBDIR",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "read_adapter_biases",
    "read_safetensors",
    "export_peft",
    "export_merged",
    "write_peft_hra",
    "write_merged",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_NAME = "hra-diffusion"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
TEXT_ENCODER_SUBDIR = "text_encoder"  # a DreamBooth adapter's text-encoder part, a folder inside it
_SUFFIX = "." + HRALayer.adapter_prefix
_BIAS_SUFFIX = "." + HRALayer.bias_prefix
_PEFT_BIAS_SUFFIX = ".base_layer.bias"


def _library_version() -> str:
    from ..version import __version__

    return __version__


def _layer_info(layer: HRALayer) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": "conv2d" if isinstance(layer, HRAConv2d) else "linear",
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "d": layer.d,
        "r": layer.r,
    }
    if isinstance(layer, HRAConv2d):
        info["kernel_size"] = list(layer.base_layer.kernel_size)
    return info


def _adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    layers = list(hra_layers(model))
    if not layers:
        raise ValueError("the model has no HRA layers to save; call inject_hra() (or load_adapter) first")
    tensors = {
        f"{name}{_SUFFIX}": layer.hra_u.detach().to("cpu", torch.float32).contiguous()
        for name, layer in layers
    }
    tensors.update({f"{name}{_BIAS_SUFFIX}": layer.hra_bias.detach().to("cpu", torch.float32).contiguous()
                    for name, layer in layers if layer.hra_bias is not None})
    return tensors, {name: _layer_info(layer) for name, layer in layers}


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    **metadata: Any,
) -> Path:
    """Write the adapter of ``model`` to directory ``path`` (atomically; only adapter tensors).

    ``metadata`` is recorded in adapter_config.json (e.g. base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    base_model_revision=...). ``extra_tensors`` (e.g. a condition encoder's state dict, keys prefixed
    by the caller) are stored beside the ``hra_u`` tensors in the same safetensors file.
    """
    tensors, layers = _adapter_tensors(model)
    config = get_hra_config(model)
    if config is None:
        first = next(iter(layers.values()))
        config = HRAConfig(r=first["r"], target_modules=sorted(layers), init_identity=False)
    extras = {}
    for key, value in (extra_tensors or {}).items():
        if key in tensors or key.endswith((_SUFFIX, _BIAS_SUFFIX)):
            raise ValueError(f"extra tensor name {key!r} collides with an HRA tensor name")
        extras[key] = value.detach().to("cpu").contiguous()
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "hra": config.to_dict(),
        "num_layers": len(layers),
        "trainable_parameters": int(sum(t.numel() for t in tensors.values())),
        "base_model": None,
        "base_model_revision": None,
        **{k: v for k, v in metadata.items()},
        "layers": layers,
        "extra_tensors": sorted(extras),
    }
    with atomic_directory(path) as tmp:
        save_file({**tensors, **extras}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT_NAME})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return Path(path)


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{str(cfg_file)!r} is missing: an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(cfg_file)!r} is not valid JSON ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = " (a .bin adapter is a pickle; this library only reads safetensors)" if (
            path / "adapter_model.bin"
        ).exists() else ""
        raise FileNotFoundError(f"{str(weights)!r} is missing{hint}")
    return read_safetensors(weights)[0]


def _not_safetensors_hint(file: Path) -> str:
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive (a torch.save file?), which this library never loads"
    if head[:1] == b"\x80":
        return "it is a Python pickle, which this library never loads"
    return "it may be truncated or damaged"


def read_safetensors(file: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; only the header when ``tensors`` is False.

    A file that is not valid safetensors (truncated, or a pickle under that name) raises
    :class:`~hra_diffusion.errors.AdapterFileError` naming it; nothing in it is ever unpickled.
    """
    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            out = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except SafetensorError as err:
        raise AdapterFileError(
            f"{str(file)!r} is not a valid safetensors file ({str(err).splitlines()[0] if str(err) else 'unreadable'}; "
            f"{_not_safetensors_hint(file)}): save or download the adapter again"
        ) from None
    return out, meta


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read an adapter directory (ours or PEFT's HRA) without a model.

    Returns (config document, {module path: hra_u (d, r)}, extra tensors). PEFT configs are
    translated: the document gets an ``"hra"`` entry in HRAConfig form and ``"source": "peft"``.
    Trained biases are neither: see :func:`read_adapter_biases` (``doc["hra"]["train_bias"]`` says if any).
    """
    doc, u, _, extras = _read_adapter(Path(path))
    return doc, u, extras


def read_adapter_biases(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{module path: trained bias tensor} of an adapter directory; {} when it trains no bias.

    Ours hold the shift δ (added to the base bias); PEFT's (bias="hra_only") hold the trained bias itself,
    which :func:`load_adapter` turns into δ against the model it loads into.
    """
    return _read_adapter(Path(path))[2]


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor],
                                       dict[str, torch.Tensor]]:
    """(doc, hra_u per module, trained biases per module, extras)."""
    doc = _read_config(path)
    tensors = _read_tensors(path)
    if doc.get("peft_type") is not None:
        if str(doc["peft_type"]).upper() != "HRA":
            raise ValueError(
                f"{path} is a PEFT {doc['peft_type']} adapter; load_adapter reads HRA adapters "
                "(PEFT baselines load through peft itself)"
            )
        r = int(doc.get("r", 8))
        targets = doc.get("target_modules") or []
        if doc.get("bias", "none") not in ("none", "hra_only"):
            raise ValueError(f"{path}: a PEFT HRA adapter with bias={doc['bias']!r} trains every bias of the model, "
                             "which this library does not read; train it with bias='hra_only' or 'none'")
        doc = {
            **doc,
            "source": "peft",
            "hra": HRAConfig(
                r=r,
                target_modules=[targets] if isinstance(targets, str) else list(targets),
                apply_gs=bool(doc.get("apply_GS", False)),
                init_identity=False,
                train_bias=doc.get("bias") == "hra_only",
            ).to_dict(),
        }
        tensors = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items()}
        bias_suffix = _PEFT_BIAS_SUFFIX
    elif doc.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path / ADAPTER_CONFIG} is neither an hra-diffusion adapter (format={FORMAT_NAME!r}) "
            "nor a PEFT HRA adapter (peft_type='HRA')"
        )
    else:
        bias_suffix = _BIAS_SUFFIX
    u = {k[: -len(_SUFFIX)]: v for k, v in tensors.items() if k.endswith(_SUFFIX)}
    biases = {k[: -len(bias_suffix)]: v for k, v in tensors.items() if k.endswith(bias_suffix)}
    extras = {k: v for k, v in tensors.items() if not k.endswith((_SUFFIX, bias_suffix))}
    if not u:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} holds no '*.hra_u' tensors: not an HRA adapter")
    if set(biases) - set(u):
        raise ValueError(f"{path / ADAPTER_WEIGHTS} has a trained bias for {sorted(set(biases) - set(u))[0]!r}, "
                         "which has no hra_u: the file is damaged; save or download the adapter again")
    return doc, u, biases, extras


def load_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load an adapter directory (ours, or PEFT's HRA) into ``model``; returns the adapted layer names.

    A plain model is injected first, exactly at the layers the file has tensors for. A model that
    already has HRA layers must have the same ones. Any shape mismatch names the first layer.
    """
    doc, u, biases, _ = _read_adapter(Path(path))
    # safetensors sorts keys; work in the model's module order so "first mismatch" means first in the model
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    order.update({f"{name}.base_layer": i for name, i in list(order.items())})
    u = dict(sorted(u.items(), key=lambda kv: order.get(kv[0], len(order))))
    config = HRAConfig.from_dict({k: v for k, v in doc["hra"].items() if k in HRAConfig.__dataclass_fields__})
    existing = dict(hra_layers(model))
    if not existing:
        modules = dict(model.named_modules())
        for name, tensor in u.items():
            module = modules.get(name)
            if module is None:
                break
            _check_shape(name, module, tensor, path)
        config.init_identity = False  # the values are about to be overwritten: skip the pairing check
        inject_hra(model, config, names=list(u))
        existing = dict(hra_layers(model))
    else:
        missing = sorted(set(u) - set(existing))
        extra = sorted(set(existing) - set(u))
        if missing or extra:
            raise ValueError(
                f"adapter {path} does not fit this model's HRA layers: "
                + (f"file has {missing[0]!r} which the model lacks; " if missing else "")
                + (f"model has {extra[0]!r} which the file lacks" if extra else "")
            )
    for name, tensor in u.items():
        layer = existing[name]
        if tuple(layer.hra_u.shape) != tuple(tensor.shape):
            raise ValueError(
                f"adapter {path}: layer {name!r} has hra_u of shape {tuple(tensor.shape)} in the file but "
                f"{tuple(layer.hra_u.shape)} in the model (different base model or r?)"
            )
        layer.apply_gs = config.apply_gs
        with torch.no_grad():
            layer.hra_u.copy_(tensor.to(layer.hra_u.device, torch.float32))
    for name, layer in existing.items():
        _load_bias(name, layer, biases.get(name), peft=doc.get("source") == "peft", path=path)
    return list(u)


@torch.no_grad()
def _load_bias(name: str, layer: HRALayer, tensor: torch.Tensor | None, *, peft: bool, path: Any) -> None:
    """Set the layer's trained bias shift from the file (zero when the file has none for it)."""
    if tensor is None:
        if layer.hra_bias is not None:
            layer.hra_bias.zero_()
        return
    base_bias = getattr(layer.base_layer, "bias", None)
    if base_bias is None or tuple(base_bias.shape) != tuple(tensor.shape):
        raise ValueError(f"adapter {path}: layer {name!r} has a trained bias of shape {tuple(tensor.shape)} in the "
                         f"file, but the model's layer has " + ("no bias" if base_bias is None else
                                                                f"a bias of shape {tuple(base_bias.shape)}")
                         + " (different base model?)")
    if layer.merged:
        raise RuntimeError(f"layer {name!r} is merged; unmerge before loading an adapter into it")
    if layer.hra_bias is None:
        layer.hra_bias = nn.Parameter(torch.zeros(base_bias.shape, device=base_bias.device, dtype=torch.float32),
                                      requires_grad=layer.hra_u.requires_grad)
    value = tensor.to(base_bias.device, torch.float32)
    layer.hra_bias.copy_(value - base_bias.float() if peft else value)


def _check_shape(name: str, module: nn.Module, tensor: torch.Tensor, path: Any) -> None:
    if isinstance(module, nn.Linear):
        d = module.in_features
    elif isinstance(module, nn.Conv2d):
        d = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    else:
        raise ValueError(f"adapter {path}: {name!r} is a {type(module).__name__} in this model, not Linear/Conv2d")
    if tensor.ndim != 2 or tensor.shape[0] != d:
        raise ValueError(
            f"adapter {path}: layer {name!r} has hra_u of shape {tuple(tensor.shape)} in the file but the "
            f"model's layer has input dimension {d} (different base model?)"
        )


def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write the adapter in PEFT's HRA format (loadable by ``PeftModel.from_pretrained``)."""
    tensors, _ = _adapter_tensors(model)
    config = get_hra_config(model)
    u = {k[: -len(_SUFFIX)]: v for k, v in tensors.items() if k.endswith(_SUFFIX)}
    # PEFT stores the trained bias itself: the base's plus the shift (already in it when merged)
    biases = {name: (layer.base_layer.bias.detach().float() + (0 if layer.merged else layer.hra_bias.detach())).cpu()
              for name, layer in hra_layers(model) if layer.hra_bias is not None}
    with atomic_directory(path) as tmp:
        write_peft_hra(tmp, u, apply_gs=bool(config.apply_gs) if config else False, biases=biases,
                       base_model_name_or_path=base_model_name_or_path, revision=revision)
    return Path(path)


def write_peft_hra(
    folder: str | os.PathLike,
    u: Mapping[str, torch.Tensor],
    *,
    apply_gs: bool = False,
    biases: Mapping[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """PEFT's HRA files (adapter_config.json + adapter_model.safetensors) into an existing ``folder``,
    from ``{module path: hra_u (d, r)}`` and, for an adapter that trained biases, ``biases`` {module path: the
    trained bias itself (base + shift)} (PEFT's bias="hra_only"); ``metadata`` goes to the safetensors header."""
    rs = sorted({int(t.shape[1]) for t in u.values()})
    if len(rs) != 1:
        raise ValueError(f"PEFT's HRA format has one r per adapter; this adapter mixes r values {rs}")
    peft_doc = {
        "peft_type": "HRA",
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": rs[0],
        "apply_GS": bool(apply_gs),
        # the exact wrapped names, so PEFT wraps the same layers whatever our suffixes were
        "target_modules": sorted(u),
        "exclude_modules": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "hra_only" if biases else "none",
        "modules_to_save": None,
    }
    folder = Path(folder)
    tensors = {f"{PEFT_PREFIX}{k}{_SUFFIX}": v.detach().to("cpu").contiguous() for k, v in u.items()}
    tensors.update({f"{PEFT_PREFIX}{k}{_PEFT_BIAS_SUFFIX}": v.detach().to("cpu").contiguous()
                    for k, v in (biases or {}).items()})
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_doc, indent=2) + "\n")
    return folder


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded in (W H) and the original key names.

    The model itself is not changed; only the adapted weights are new tensors.
    """
    merged = {}
    for name, layer in hra_layers(model):
        merged[f"{name}.base_layer.weight"] = layer.base_layer.weight if layer.merged else layer.merged_weight()
        if layer.hra_bias is not None and not layer.merged:
            bias = layer.base_layer.bias
            merged[f"{name}.base_layer.bias"] = bias + layer.hra_bias.detach().to(bias.dtype)
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith((_SUFFIX, _BIAS_SUFFIX)):
            continue
        new_value = merged.get(key, value)
        out[key.replace(".base_layer.", ".")] = new_value.detach().contiguous()
    return out


def export_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model`` with adapters merged as a plain diffusers/transformers model folder.

    The folder loads with the stock ``from_pretrained`` (e.g. ``UNet2DConditionModel``), without this
    package. ``model`` must be a diffusers ``ModelMixin`` or a transformers ``PreTrainedModel``.
    """
    with atomic_directory(path) as tmp:
        write_merged(model, tmp)
    return Path(path)


def write_merged(model: nn.Module, folder: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """The merged model's config and weights into an existing ``folder`` (see :func:`export_merged`);
    ``dtype`` casts the floating-point weights at the end, ``metadata`` goes to the safetensors header."""
    state = merged_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    folder = Path(folder)
    header = {"format": "pt", **(metadata or {})}
    if hasattr(model, "save_config"):  # diffusers ModelMixin
        model.save_config(folder)
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata=header)
    elif hasattr(model, "config") and hasattr(model.config, "save_pretrained"):  # transformers
        model.config.save_pretrained(folder)
        save_file(state, str(folder / "model.safetensors"), metadata=header)
    else:
        raise TypeError(
            f"export_merged needs a diffusers or transformers model, got {type(model).__name__}; "
            "use merge_and_unload_hra(model) and save its state_dict yourself"
        )
    return folder
