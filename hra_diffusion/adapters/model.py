"""Inject HRA layers into a model by module-name suffix; merge, disable, regularise, count."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from .config import HRAConfig
from .householder import orthogonality_penalty
from .layers import HRALayer, wrap_layer

__all__ = [
    "inject_hra",
    "merge_hra",
    "unmerge_hra",
    "merge_and_unload_hra",
    "hra_layers",
    "hra_parameters",
    "hra_state_dict",
    "orthogonality_loss",
    "count_hra_parameters",
    "disable_hra",
    "get_hra_config",
    "matches_target",
]

_CONFIG_ATTR = "hra_config"


def matches_target(name: str, targets: Iterable[str]) -> bool:
    """Suffix match on dotted module names: 'to_q' matches 'a.b.to_q' and 'to_q', not 'a.b.xto_q'."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def hra_layers(model: nn.Module) -> Iterator[tuple[str, HRALayer]]:
    """(name, layer) for every HRA layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, HRALayer):
            yield name, module


def hra_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter tensors: ``hra_u`` of every layer (and ``hra_bias`` where trained)."""
    return [p for _, layer in hra_layers(model) for p in (layer.hra_u, layer.hra_bias) if p is not None]


def hra_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'<module path>.hra_u': (d, r)} for every HRA layer, and {'<module path>.hra_bias': (d_out,)} where trained."""
    out = {}
    for name, layer in hra_layers(model):
        out[f"{name}.{HRALayer.adapter_prefix}"] = layer.hra_u
        if layer.hra_bias is not None:
            out[f"{name}.{HRALayer.bias_prefix}"] = layer.hra_bias
    return out


def count_hra_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in hra_parameters(model))


def get_hra_config(model: nn.Module) -> HRAConfig | None:
    return getattr(model, _CONFIG_ATTR, None)


def _existing_names_hint(model: nn.Module, limit: int = 12) -> str:
    suffixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            parts = name.split(".")
            tail = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
            if tail not in suffixes:
                suffixes.append(tail)
    return ", ".join(suffixes[:limit]) + (" ..." if len(suffixes) > limit else "")


def inject_hra(model: nn.Module, config: HRAConfig, names: Iterable[str] | None = None) -> list[str]:
    """Wrap every Linear/Conv2d whose name ends with a target in ``config`` (or exactly ``names``).

    Freezes every other parameter of ``model``; the ``hra_u`` tensors (and ``hra_bias`` with
    ``config.train_bias``) are the only trainable ones.
    Returns the wrapped module names. Raises if nothing matches, listing names that do exist.
    """
    if any(True for _ in hra_layers(model)):
        raise ValueError(
            "this model already has HRA layers; merge_and_unload_hra() it, or load into a fresh model"
        )
    if names is None:
        selected = [
            n
            for n, _ in model.named_modules()
            if n
            and matches_target(n, config.target_modules)
            and not matches_target(n, config.exclude_modules)
        ]
    else:
        selected = list(names)
        known = dict(model.named_modules())
        missing = [n for n in selected if n not in known]
        if missing:
            raise ValueError(
                f"the model has no module named {missing[0]!r} ({len(missing)} missing in all); "
                f"is this the right base model? Modules that exist end like: {_existing_names_hint(model)}"
            )
    if not selected:
        raise ValueError(
            f"target_modules {config.target_modules} match no module of this "
            f"{type(model).__name__}. Linear/Conv2d modules that exist end like: "
            f"{_existing_names_hint(model)}"
        )
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    for name in selected:
        module = model.get_submodule(name)
        try:
            layer = wrap_layer(
                module,
                config.r,
                apply_gs=config.apply_gs,
                init_identity=config.init_identity,
                generator=generator,
                train_bias=config.train_bias,
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"cannot wrap {name!r}: {err}") from None
        _set_submodule(model, name, layer)
    setattr(model, _CONFIG_ATTR, config)
    return selected


def merge_hra(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W <- W H), keeping the wrappers: reversible.

    A merged layer's forward is its base layer's (the base model's cost); :func:`unmerge_hra` restores W.
    To drop the wrappers for good (a plain model to save or hand on), use :func:`merge_and_unload_hra`.
    """
    for _, layer in hra_layers(model):
        layer.merge()
    return model


def unmerge_hra(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_hra`: W <- W Hᵀ on every merged HRA layer (exact in fp32)."""
    for _, layer in hra_layers(model):
        layer.unmerge()
    return model


def merge_and_unload_hra(model: nn.Module) -> nn.Module:
    """Fold every adapter in and put the plain base layers back (PEFT's ``merge_and_unload``): not reversible."""
    for name, layer in list(hra_layers(model)):
        layer.merge()
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


@contextlib.contextmanager
def disable_hra(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block (e.g. prior-preservation targets), without a second copy."""
    layers = [layer for _, layer in hra_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_hra() needs unmerged adapters; call unmerge_hra() first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """Σ_layers ||I - ÛᵀÛ||_F² (the paper's regulariser; multiply by λ and add to the loss)."""
    terms = [orthogonality_penalty(layer.hra_u) for _, layer in hra_layers(model)]
    if not terms:
        raise ValueError("the model has no HRA layers; call inject_hra() first")
    return torch.stack(terms).sum()
