"""The PEFT baselines (LoRA, OFT, BOFT) beside HRA: one place that builds their config, injects, counts,
saves and loads them, so both trainers, ``generate`` and the comparison use the same code.

The baselines are PEFT's own layers (``peft.inject_adapter_in_model``), never re-implemented here.
They target the same module-name suffixes as HRA's config and are saved in PEFT's format:

  adapter_config.json              PeftConfig.save_pretrained (peft_type LORA / OFT / BOFT)
  adapter_model.safetensors        keys ``base_model.model.<module>.<tensor>`` (PeftModel.from_pretrained)
  pytorch_lora_weights.safetensors LoRA only: keys ``unet.<module>.lora_{A,B}.weight`` (diffusers'
                                   ``pipe.load_lora_weights(folder)``)
  condition_encoder.safetensors    control adapters only: the condition encoder (``hra_diffusion.control.io``)

Trainer metadata (base model, trainer, prompts) is kept in the safetensors header under ``hra_diffusion``,
so adapter_config.json stays exactly PEFT's. Parameter budgets per layer of input width d, output d_out:
HRA r·d; LoRA r·(d + d_out) (r = 4 ≈ HRA r = 8 on square layers); OFT (d / b)·b(b-1)/2 = d(b-1)/2
(block b = 16 ≈ HRA r = 8); BOFT with one butterfly factor d·b + d_out (b = 8).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..utils import atomic_directory
from .config import DEFAULT_TARGETS
from .io import ADAPTER_WEIGHTS, PEFT_PREFIX, read_safetensors
from .model import _existing_names_hint, matches_target

__all__ = [
    "BASELINES",
    "DEFAULT_BLOCK_SIZE",
    "DIFFUSERS_LORA_WEIGHTS",
    "BaselineSpec",
    "peft_config",
    "inject_baseline",
    "peft_layers",
    "peft_missing",
    "require_peft",
    "count_trainable",
    "save_peft_adapter",
    "load_peft_adapter",
    "merge_peft",
]

BASELINES = ("lora", "oft", "boft")
DEFAULT_BLOCK_SIZE = {"oft": 16, "boft": 8}
"""Block sizes whose parameter counts are in HRA r = 8's range (module docstring)."""
DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_ADAPTER_NAME = "default"
_TENSOR_PREFIX = {"lora": "lora_", "oft": "oft_", "boft": "boft_"}


def _choices() -> str:
    return ", ".join(("hra", *BASELINES))


@dataclass
class BaselineSpec:
    """What a PEFT baseline needs: kind, size, targets (module-name suffixes, as HRA's), init seed.

    r: LoRA's rank (unused by OFT/BOFT). block_size: OFT/BOFT block size (None: DEFAULT_BLOCK_SIZE;
    unused by LoRA). lora_alpha: LoRA's scale numerator (None: r, i.e. scale 1).
    """

    kind: str
    r: int = 4
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    block_size: int | None = None
    lora_alpha: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in BASELINES:
            raise ValueError(f"unknown PEFT baseline {self.kind!r}; choose one of {', '.join(BASELINES)} "
                             f"(or 'hra' through inject_hra); every adapter: {_choices()}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module-name suffix, e.g. [to_q, to_v]")
        if self.kind == "lora" and self.r < 1:
            raise ValueError(f"LoRA's r must be >= 1, got {self.r}")
        if self.block_size is not None and self.kind == "lora":
            raise ValueError("block_size is an OFT/BOFT option; LoRA's size is r")
        if self.lora_alpha is not None and self.kind != "lora":
            raise ValueError(f"lora_alpha is a LoRA option; it does not apply to {self.kind}")
        if self.kind in DEFAULT_BLOCK_SIZE:
            b = self.block_size if self.block_size is not None else DEFAULT_BLOCK_SIZE[self.kind]
            if b < 2 or (self.kind == "boft" and b % 2):
                raise ValueError(f"{self.kind} block_size must be >= 2" + (" and even" if self.kind == "boft" else "")
                                 + f", got {b}")
            self.block_size = b

    def describe(self) -> str:
        """One line for logs, model cards and the comparison table."""
        if self.kind == "lora":
            return f"PEFT LoRA r={self.r}, alpha={self.lora_alpha or self.r}"
        if self.kind == "oft":
            return f"PEFT OFT block {self.block_size} (PEFT's default parametrisation)"
        return f"PEFT BOFT block {self.block_size}, 1 butterfly factor"


PEFT_INSTALL = "pip install 'peft>=0.13'"


def peft_missing(what: str) -> str | None:
    """None when peft (an optional dependency: the baselines only) imports; else a message naming ``what``
    needed it and how to install it."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return (f"{what} uses PEFT's own layers, and peft is not installed: {PEFT_INSTALL} "
                "(HRA, this library's adapter, needs no peft)")
    return None


def require_peft(what: str) -> None:
    """Raise an ImportError with :func:`peft_missing`'s message when peft is not installed."""
    message = peft_missing(what)
    if message:
        raise ImportError(message)


def peft_config(spec: BaselineSpec):
    """The PEFT config for ``spec`` (identity initialisation: the adapted model equals the base at step 0)."""
    require_peft(f"adapter {spec.kind!r}")
    from peft import BOFTConfig, LoraConfig, OFTConfig

    targets = list(spec.target_modules)
    if spec.kind == "lora":
        return LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha or spec.r, target_modules=targets,
                          lora_dropout=0.0, init_lora_weights=True)
    if spec.kind == "oft":
        return OFTConfig(r=0, oft_block_size=spec.block_size, target_modules=targets, init_weights=True,
                         module_dropout=0.0)
    # one butterfly factor: PEFT forces 1 whenever its CUDA kernel is missing (always on CPU), so the same
    # setting everywhere keeps CPU and GPU runs comparable
    return BOFTConfig(boft_block_size=spec.block_size, boft_block_num=0, boft_n_butterfly_factor=1,
                      target_modules=targets, init_weights=True, boft_dropout=0.0)


@contextlib.contextmanager
def _peft_quiet(kind: str) -> Iterator[None]:
    """Without CUDA, PEFT's BOFT tries (and fails) to compile its CUDA kernel once per layer, warning each
    time; record the failure once so it falls back to its pure-torch path quietly."""
    if kind != "boft" or torch.cuda.is_available():
        yield
        return
    import peft.tuners.boft.layer as boft_layer

    if getattr(boft_layer, "_FBD_CUDA", None) is None:
        boft_layer._FBD_CUDA = False  # get_fbd_cuda() returns it as is: falsy -> the pure-torch path
    yield


def _target_layers(model: nn.Module, spec: BaselineSpec) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules()
             if n and matches_target(n, spec.target_modules) and isinstance(m, (nn.Linear, nn.Conv2d))]
    if not found:
        raise ValueError(f"target_modules {spec.target_modules} match no module of this {type(model).__name__}. "
                         f"Linear/Conv2d modules that exist end like: {_existing_names_hint(model)}")
    if spec.kind in DEFAULT_BLOCK_SIZE:
        for name, m in found:
            d = m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            if d % spec.block_size:
                raise ValueError(f"{spec.kind} block_size={spec.block_size} does not divide the input width {d} of "
                                 f"{name!r}; pick a block size that divides every target's input width "
                                 f"(PEFT would silently change it per layer)")
    return found


def inject_baseline(model: nn.Module, spec: BaselineSpec) -> list[str]:
    """Put PEFT's ``spec.kind`` layers on ``model`` (in place) at HRA's targets; freeze the rest.

    The adapter tensors are fp32 whatever the base dtype; the init is drawn from ``spec.seed``, so every
    rank and every resumed run starts alike. Returns the adapted module names.
    """
    require_peft(f"adapter {spec.kind!r}")
    from peft import inject_adapter_in_model

    if peft_layers(model):
        raise ValueError("this model already has PEFT adapter layers; load into a fresh model")
    _target_layers(model, spec)
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]), _peft_quiet(spec.kind):
        if spec.seed is not None:
            torch.manual_seed(spec.seed)
        inject_adapter_in_model(peft_config(spec), model, adapter_name=_ADAPTER_NAME)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return [n for n, _ in peft_layers(model)]


def peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every PEFT adapter layer (LoRA/OFT/BOFT/... wrapper) in ``model``; none without peft
    installed (it is an optional dependency: HRA training and sampling, e.g. validation's eval_mode, call this)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def merged_peft(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every (unmerged) PEFT baseline layer of ``model`` is folded into its base weight, so
    sampling runs at the base's speed: OFT and BOFT otherwise rebuild their rotations in every forward (BOFT's
    made a 24-image held-out evaluation on the tiny world take over 25 min on 2 CPU cores).
    On leaving, the exact base weights are put back (an unmerge alone leaves rounding in them, which bf16/fp16
    base weights would accumulate over a run's validations)."""
    layers = [layer for _, layer in peft_layers(model) if not layer.merged]
    saved = [{n: p.detach().to("cpu", copy=True) for n, p in layer.get_base_layer().named_parameters()}
             for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        yield model
    finally:
        with torch.no_grad():
            for layer, params in zip(layers, saved, strict=True):
                if layer.merged:
                    layer.unmerge()
                for n, p in layer.get_base_layer().named_parameters():
                    p.copy_(params[n])


def count_trainable(model: nn.Module) -> int:
    """Values that require grad: the adapter alone once it is injected (the base is frozen)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- save / load ---------------------------------------------------------------------------------

def _peft_kind(config) -> str:
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind not in BASELINES:
        raise ValueError(f"PEFT adapter type {kind!r} is not one of the baselines {', '.join(BASELINES)}")
    return kind


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, *,
                      extra_files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]] | None = None,
                      diffusers_prefix: str | None = "unet", **metadata: Any) -> Path:
    """Write ``model``'s PEFT baseline to folder ``path`` in PEFT's format (atomically; fp32 tensors).

    ``metadata`` (e.g. base_model=..., trainer=...) goes to the safetensors header; ``base_model`` also
    becomes PEFT's ``base_model_name_or_path``. LoRA adapters also get diffusers' LoRA file, keys prefixed
    by ``diffusers_prefix`` (the pipeline component, ``unet``). ``extra_files``: more safetensors files for the
    same folder, ``{file name: (tensors, header metadata)}`` (the control trainer's condition encoder).
    """
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = getattr(model, "peft_config", None) or {}
    if _ADAPTER_NAME not in configs or not peft_layers(model):
        raise ValueError("the model has no PEFT baseline to save; call inject_baseline() first")
    config = copy.copy(configs[_ADAPTER_NAME])
    kind = _peft_kind(config)
    config.inference_mode = True
    config.base_model_name_or_path = metadata.get("base_model")
    config.revision = metadata.get("base_model_revision")
    state = get_peft_model_state_dict(model, adapter_name=_ADAPTER_NAME)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    if not state:
        raise ValueError("the PEFT baseline has no tensors to save")
    doc = {"adapter": kind, **metadata, "trainable_parameters": int(sum(v.numel() for v in state.values()))}
    header = {"format": "pt", "hra_diffusion": json.dumps(doc, default=str)}
    with atomic_directory(path) as tmp:
        config.save_pretrained(str(tmp))
        save_file({PEFT_PREFIX + k: v for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=header)
        if kind == "lora" and diffusers_prefix:
            save_file({f"{diffusers_prefix}.{k}": v for k, v in state.items()}, str(tmp / DIFFUSERS_LORA_WEIGHTS),
                      metadata=header)
        for name, (tensors, meta) in (extra_files or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / name),
                      metadata={"format": "pt", **meta})
    return Path(path)


def load_peft_adapter(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a PEFT LoRA/OFT/BOFT adapter folder into a plain ``model`` (injects, then copies the tensors).

    Returns the adapted module names. A file that does not fit the model names the first offending key.
    """
    require_peft(f"the PEFT adapter {str(path)!r}")
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict

    path = Path(path)
    config = PeftConfig.from_pretrained(str(path))
    kind = _peft_kind(config)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = " (a .bin adapter is a pickle; this library only reads safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{str(weights)!r} is missing{hint}")
    state = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in read_safetensors(weights)[0].items()}
    if peft_layers(model):
        raise ValueError("this model already has PEFT adapter layers; load into a fresh model")
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]), _peft_quiet(kind):
        inject_adapter_in_model(config, model, adapter_name=_ADAPTER_NAME)
    if not peft_layers(model):
        raise ValueError(f"adapter {path}: its target_modules {config.target_modules} match no module of this "
                         f"{type(model).__name__}")
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=_ADAPTER_NAME)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"adapter {path} does not fit this model (different base model?): "
                         f"{str(err).splitlines()[0]}") from None
    prefix = _TENSOR_PREFIX[kind]
    unexpected = [k for k in result.unexpected_keys if prefix in k]
    missing = [k for k in result.missing_keys if prefix in k]
    if unexpected or missing:
        raise ValueError(f"adapter {path} does not fit this model: "
                         + (f"file has {unexpected[0]!r} which the model lacks; " if unexpected else "")
                         + (f"model has {missing[0]!r} which the file lacks" if missing else ""))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return [n for n, _ in peft_layers(model)]


def merge_peft(model: nn.Module) -> nn.Module:
    """Fold every PEFT baseline layer into its base weight (their own ``merge()``; reversible by ``unmerge()``)."""
    for _, layer in peft_layers(model):
        layer.merge()
    return model
