"""Export an adapter for tools that do not know HRA: LoRA files (diffusers' and kohya's layout), PEFT, merged.

HRA is an exact rank-r LoRA of the base it was trained on (docs/method.md, "HRA is an adaptive LoRA"): with
a = Ûᵀ and c = Tᵀ Ûᵀ (``householder.row_factors``, both (r, d_in)),

    W H = W − (W cᵀ) a = W + B A,    A = a (r × d_in),    B = −W cᵀ = −W Û T (d_out × r),

so ``lora_A = A``, ``lora_B = B`` at scale 1 (alpha = r) reproduce the adapted layer exactly. B depends on
W: the file is exact for that base only. A conv layer gets the LoRA conv form (a k×k ``down`` with the base's
stride/padding, a 1×1 ``up``), which is exactly ``HRAConv2d``'s forward. The product is computed in fp64 and
cast to the requested dtype at the end.

    export_adapter("out/dog-hra", "kohya", "dog.safetensors", base="stable-diffusion-v1-5/stable-diffusion-v1-5")

Layouts (``--to``):
  lora    diffusers: ``pytorch_lora_weights.safetensors``, ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``
          (+ ``text_encoder.…``), for ``pipe.load_lora_weights``
  kohya   one file, ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
          (+ ``lora_te_…``), for AUTOMATIC1111, ComfyUI and kohya sd-scripts
  peft    PEFT's HRA folder (no base needed)
  merged  the base's UNet folder with the adapter folded in (+ ``text_encoder/`` when adapted)

Key names depend on the base family (:func:`base_family`): SD 1.x/2.x kohya names are diffusers module paths
with ``.`` → ``_`` (kohya trains SD 1.x on the diffusers UNet) and the text encoder is ``lora_te_``; SDXL's kohya
names are the LDM/SGM paths kohya, ComfyUI and A1111 use for SDXL (``lora_unet_input_blocks_4_1_…``, see
:func:`sgm_module_path`), with ``lora_te1_`` / ``lora_te2_`` for the two text encoders. diffusers reads both
(``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_non_diffusers_lora_to_diffusers``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..utils import atomic_directory
from .householder import row_factors
from .io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    TEXT_ENCODER_SUBDIR,
    _check_shape,
    _read_adapter,
    write_merged,
    write_peft_hra,
)
from .peft_baselines import DIFFUSERS_LORA_WEIGHTS
from .registry import AdapterInfo, describe_adapter

__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_DTYPES",
    "METADATA_KEY",
    "LoraFactor",
    "hra_lora_factor",
    "base_family",
    "file_module_path",
    "sgm_module_path",
    "lora_key",
    "kohya_module_name",
    "lora_state_dict",
    "base_weights_hash",
    "export_adapter",
]

EXPORT_FORMATS = ("lora", "kohya", "peft", "merged")
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METADATA_KEY = "hra_diffusion_export"
"""The safetensors header entry (a JSON document) that records where an exported file came from."""

TEXT_COMPONENTS = (TEXT_ENCODER_SUBDIR, "text_encoder_2")
COMPONENTS = ("unet", *TEXT_COMPONENTS)
"""Pipeline components an adapter folder can adapt: the UNet (the folder itself), ``text_encoder/`` and, for
SDXL, ``text_encoder_2/``."""
KOHYA_PREFIX = {"sd": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
"""kohya's per-family, per-component key prefixes."""
CONDITION_ENCODER_FILE = "condition_encoder.safetensors"  # a control baseline's encoder (control.io's name)


# ---- maths ---------------------------------------------------------------------------------------

@dataclass
class LoraFactor:
    """One layer's LoRA pair, delta W = up @ down (flattened), at scale alpha / rank.

    down: (r, d_in) for a Linear, (r, in, kh, kw) for a Conv2d; up: (d_out, r), or (d_out, r, 1, 1).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _conv_refusal(module: nn.Conv2d) -> str | None:
    """Why a conv layer has no LoRA conv form (k×k down with the base's stride/padding, 1×1 up), or None."""
    if module.groups != 1:
        return f"groups={module.groups}"
    if tuple(module.dilation) != (1, 1):
        return f"dilation={tuple(module.dilation)}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}"
    return None


@torch.no_grad()
def hra_lora_factor(module: nn.Module, u: torch.Tensor, apply_gs: bool = False, name: str = "") -> LoraFactor:
    """The exact LoRA pair of one HRA layer: A = Ûᵀ, B = −W Û T (computed in fp64), alpha = r."""
    weight = module.weight.detach().to("cpu", torch.float64)
    if isinstance(module, nn.Conv2d):
        why = _conv_refusal(module)
        if why is not None:
            raise ValueError(f"layer {name!r} is a Conv2d with {why}: the LoRA conv form (k x k down, 1 x 1 up) "
                             "cannot express it; export --to merged or --to peft instead")
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"layer {name!r} is a {type(module).__name__}; HRA adapts Linear and Conv2d layers only")
    a, c = row_factors(u.detach().to("cpu", torch.float64), apply_gs)  # (r, d_in) each
    w = weight.reshape(weight.shape[0], -1)  # (d_out, d_in)
    up = -(w @ c.transpose(0, 1))  # (d_out, r) = -W Û T
    r = a.shape[0]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return LoraFactor(a.reshape(r, module.in_channels, kh, kw), up.reshape(-1, r, 1, 1), float(r))
    return LoraFactor(a, up, float(r))


# ---- naming --------------------------------------------------------------------------------------

def base_family(unet_config: Mapping[str, Any]) -> str:
    """'sdxl' for a UNet with SDXL's added text/time conditioning, else 'sd' (SD 1.x / 2.x)."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


def file_module_path(component: str, module: str) -> str:
    """The module path LoRA files use: the model's own, except that a CLIP text encoder's layers keep the
    ``text_model.`` prefix that transformers >= 5 dropped (CLIPTextModel is flat there): A1111, ComfyUI,
    kohya and diffusers all read ``text_model.encoder.layers.N...`` (diffusers strips it for a flat model)."""
    if component in TEXT_COMPONENTS and not module.startswith(("text_model.", "text_projection")):
        return "text_model." + module
    return module


def lora_key(component: str, module: str, part: str) -> str:
    """diffusers' (PEFT-style) key: ``unet.<module>.lora_A.weight`` for part 'down', ``lora_B`` for 'up'."""
    return f"{component}.{file_module_path(component, module)}.lora_{'A' if part == 'down' else 'B'}.weight"


def _sd_kohya_name(module: str) -> str:
    return module.replace(".", "_")


_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}


def sgm_module_path(module: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """The LDM/SGM path (what kohya, ComfyUI and A1111 name SDXL's UNet layers by) of a diffusers UNet module.

    Down level b, layer j -> ``input_blocks.{1 + b(L+1) + j}.{0 resnet | 1 attention}``, its downsampler ->
    ``input_blocks.{(b+1)(L+1)}.0.op``; mid -> ``middle_block.{0, 1, 2}``; up level b, layer j ->
    ``output_blocks.{b(L+1) + j}.{0 | 1}``, its upsampler -> ``output_blocks.{b(L+1) + L}.{2 | 1}.conv``
    (L = layers_per_block; 2 after an attention, else 1). Inside a resnet conv1 -> in_layers.2,
    time_emb_proj -> emb_layers.1, conv2 -> out_layers.3, conv_shortcut -> skip_connection; inside a
    transformer the names are the same. ``unet_config`` defaults to SDXL's (L = 2, up levels 0 and 1 with
    attention).
    """
    config = unet_config or {}
    per_level = int(config.get("layers_per_block", 2)) + 1
    up_types = config.get("up_block_types", ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

    def fail() -> ValueError:
        return ValueError(f"UNet layer {module!r} has no LDM (SGM) name for a kohya SDXL file; export --to lora "
                          "(diffusers' layout) or --to merged instead")

    if module in _SGM_TOP:
        return _SGM_TOP[module]
    parts = module.split(".")

    def inner(kind: str, rest: list[str]) -> list[str]:
        if kind == "resnets":
            if not rest or rest[0] not in _SGM_RESNET:
                raise fail()
            return _SGM_RESNET[rest[0]].split(".") + rest[1:]
        return rest  # attentions: proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj, proj_out as they are

    try:
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 5:
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            down = parts[0] == "down_blocks"
            name = "input_blocks" if down else "output_blocks"
            if kind in ("downsamplers", "upsamplers"):
                if j != 0 or rest != ["conv"] or kind != ("downsamplers" if down else "upsamplers"):
                    raise fail()
                if down:
                    return f"input_blocks.{(level + 1) * per_level}.0.op"
                slot = 2 if "CrossAttn" in str(up_types[level]) else 1
                return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv"
            if kind not in ("resnets", "attentions"):
                raise fail()
            index = (1 if down else 0) + level * per_level + j
            return ".".join([name, str(index), "0" if kind == "resnets" else "1", *inner(kind, rest)])
        if parts[0] == "mid_block" and len(parts) >= 4:
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            slot = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, j))
            if slot is None:
                raise fail()
            return ".".join(["middle_block", str(slot), *inner(kind, rest)])
    except (ValueError, IndexError) as err:
        if isinstance(err, ValueError) and "SGM" in str(err):
            raise
        raise fail() from None
    raise fail()


def kohya_module_name(family: str, component: str, module: str,
                      unet_config: Mapping[str, Any] | None = None) -> str:
    """kohya's module name, e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` (SD 1.x),
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` (SDXL; ``unet_config`` for the block layout)."""
    if family not in KOHYA_PREFIX:
        raise ValueError(f"unknown base family {family!r}; expected one of {', '.join(KOHYA_PREFIX)}")
    prefixes = KOHYA_PREFIX[family]
    if component not in prefixes:
        raise ValueError(f"a {family.upper()} base has no {component}; kohya names exist for {', '.join(prefixes)}")
    path = file_module_path(component, module)
    if family == "sdxl" and component == "unet":
        path = sgm_module_path(module, unet_config)
    return prefixes[component] + _sd_kohya_name(path)


def lora_state_dict(factors: Mapping[str, Mapping[str, LoraFactor]], layout: str, family: str = "sd",
                    dtype: torch.dtype = torch.float32,
                    unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """``{component: {module: LoraFactor}}`` as one file's tensors in ``layout`` 'lora' or 'kohya'.

    diffusers' layout has no alpha tensors, so the scale alpha / rank is folded into ``up`` (1 for HRA);
    kohya's keeps it as ``.alpha``.
    """
    out: dict[str, torch.Tensor] = {}
    for component, layers in factors.items():
        for module, f in layers.items():
            if layout == "lora":
                out[lora_key(component, module, "down")] = f.down.to(dtype).contiguous()
                out[lora_key(component, module, "up")] = (f.up * (f.alpha / f.rank)).to(dtype).contiguous()
            else:
                name = kohya_module_name(family, component, module, unet_config)
                out[f"{name}.lora_down.weight"] = f.down.to(dtype).contiguous()
                out[f"{name}.lora_up.weight"] = f.up.to(dtype).contiguous()
                out[f"{name}.alpha"] = torch.tensor(f.alpha, dtype=dtype)
    return out


def base_weights_hash(modules: Mapping[str, Mapping[str, nn.Module]]) -> str:
    """sha256 of the base weights an export used: each adapted layer's name, shape and fp32 weight bytes."""
    h = hashlib.sha256()
    for component in sorted(modules):
        for name in sorted(modules[component]):
            w = modules[component][name].weight.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{component}.{name}:{tuple(w.shape)}\n".encode())
            h.update(w.numpy().tobytes())
    return h.hexdigest()


# ---- the source adapter and the base -------------------------------------------------------------

@dataclass
class _Source:
    """An adapter folder's parts (``unet`` and maybe ``text_encoder``) and what the export records."""

    path: Path
    info: AdapterInfo
    parts: dict[str, Path] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.info.kind


def _read_source(adapter: str | os.PathLike) -> _Source:
    path = Path(adapter)
    info = describe_adapter(path)
    parts = {"unet": path}
    for component in TEXT_COMPONENTS:
        if (path / component / ADAPTER_CONFIG).is_file():
            parts[component] = path / component
    control = (info.kind == "hra" and info.doc.get("extra_tensors")) or (path / CONDITION_ENCODER_FILE).is_file()
    if control:
        raise ValueError(f"adapter {path} is a control adapter: its condition encoder has no place in a LoRA, "
                         "PEFT or merged model, so an export would not reproduce it; use it with "
                         "`hra-diffusion generate --adapter`")
    return _Source(path, info, parts)


def _resolve_base(source: _Source, base: str | None) -> tuple[str, str | None]:
    recorded = source.info.base_model
    if base is None and not recorded:
        raise ValueError(f"adapter {source.path} records no base model: pass --base <diffusers pipeline folder "
                         "or hub id> (the one it was trained on)")
    chosen = str(base or recorded)
    revision = source.info.doc.get("base_model_revision") if chosen == recorded else None
    return chosen, revision


def load_base_component(base: str, component: str, revision: str | None) -> nn.Module:
    """The base pipeline's ``component`` in fp32: a pipeline folder or hub id, or (UNet only) a UNet folder."""
    local = Path(base)
    is_local = local.is_absolute() or base.startswith(".") or local.exists()
    if is_local and not local.is_dir():
        raise FileNotFoundError(f"base model {base!r} does not exist")
    kwargs: dict[str, Any] = {"torch_dtype": torch.float32}
    if revision:
        kwargs["revision"] = revision
    if is_local and not (local / "model_index.json").is_file():
        if component != "unet" or not (local / "config.json").is_file():
            raise FileNotFoundError(f"base model folder {base!r} has no model_index.json" + (
                "" if component == "unet" else f" (the adapter has a {component} part, so the base must be a "
                "pipeline folder)"))
    else:
        kwargs["subfolder"] = component
    try:
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_pretrained(base, **kwargs)
        elif component == "text_encoder_2":  # SDXL's second text encoder (OpenCLIP bigG, with a projection)
            from transformers import CLIPTextModelWithProjection

            model = CLIPTextModelWithProjection.from_pretrained(base, **kwargs)
        else:
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(f"could not load the {component} of base model {base!r}: {first} Pass --base with the "
                      "diffusers folder (or hub id) the adapter was trained on") from None
    return model.eval().requires_grad_(False)


def _unet_config(base: str, revision: str | None) -> dict[str, Any]:
    """The base's UNet config (a pipeline folder / hub id, or a UNet folder) without loading weights."""
    from diffusers import UNet2DConditionModel

    sub = {} if (Path(base) / "config.json").is_file() else {"subfolder": "unet"}
    try:
        return dict(UNet2DConditionModel.load_config(base, revision=revision, **sub))
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(f"could not read the UNet config of base model {base!r}: {first} Pass --base with the "
                      "diffusers folder (or hub id) the adapter was trained on") from None


def _base_modules(source: _Source, base: str, revision: str | None, us: Mapping[str, Mapping[str, torch.Tensor]]):
    """Load each adapted component of the base; check every adapted layer exists with the adapter's shape."""
    models: dict[str, nn.Module] = {}
    modules: dict[str, dict[str, nn.Module]] = {}
    for component, u in us.items():
        model = load_base_component(base, component, revision)
        known = dict(model.named_modules())
        where = source.parts[component]
        for name, tensor in u.items():
            if name not in known:
                raise ValueError(f"adapter {where}: layer {name!r} is not in the {component} of base model {base!r} "
                                 "(a different base model?); pass the base it was trained on with --base")
            _check_shape(name, known[name], tensor, where)
        models[component] = model
        modules[component] = {name: known[name] for name in u}
    return models, modules


# ---- writing -------------------------------------------------------------------------------------

def _check_out(out: Path, to: str, overwrite: bool) -> Path:
    """The file or folder the export writes, refusing an existing one without ``overwrite``."""
    is_file = out.suffix == ".safetensors"
    if to == "kohya" and not is_file:
        raise ValueError(f"a kohya LoRA is one file: give --out NAME.safetensors (got {str(out)!r})")
    if to in ("peft", "merged") and is_file:
        raise ValueError(f"--to {to} writes a folder: give --out a folder path, not {str(out)!r}")
    target = out if is_file else out / DIFFUSERS_LORA_WEIGHTS if to == "lora" else out
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"output {str(out)!r} already exists; pass --overwrite to replace it")
    if out.exists() and is_file != out.is_file():
        raise FileExistsError(f"output {str(out)!r} exists and is a {'folder' if out.is_dir() else 'file'}; "
                              "choose another --out")
    return target


def _write_file(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """One safetensors file, written to a temporary sibling and renamed into place."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the shared file unreadable to others
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _header(doc: dict[str, Any]) -> dict[str, str]:
    return {"format": "pt", METADATA_KEY: json.dumps(doc, default=str)}


def _record(source: _Source, to: str, dtype: str, **fields: Any) -> dict[str, Any]:
    from ..version import __version__

    return {
        "exported_by": f"hra-diffusion {__version__}",
        "format": to,
        "method": source.kind,
        "source_adapter": str(source.path.resolve()),
        "source": source.info.source,
        "components": list(source.parts),
        "dtype": dtype,
        # the separate VAE the adapter was trained with (--pretrained_vae_model): decode with it too
        **({"vae_model": source.info.doc["vae_model"]} if source.info.doc.get("vae_model") else {}),
        **fields,
    }


# ---- per adapter kind ----------------------------------------------------------------------------

def _export_hra(source: _Source, to: str, target: Path, out: Path, base: str | None, dtype: str) -> Path:
    docs, us, biases = {}, {}, {}
    for component, part in source.parts.items():
        docs[component], us[component], biases[component], _ = _read_adapter(part)  # one read: u and biases
    if to in ("kohya", "lora") and any(biases.values()):
        raise ValueError(f"adapter {source.path} trained its layers' biases (--train_bias), which a LoRA file cannot "
                         "carry, so the export would not reproduce it; export a full model with --to merged, or "
                         "PEFT's format with --to peft")
    gs = {component: bool(doc["hra"].get("apply_gs", False)) for component, doc in docs.items()}
    ranks = {component: sorted({int(t.shape[1]) for t in u.values()}) for component, u in us.items()}
    r = {component: rs[0] if len(rs) == 1 else rs for component, rs in ranks.items()}
    torch_dtype = EXPORT_DTYPES[dtype]
    if to == "peft":
        # PEFT stores the trained bias itself: ours hold the shift from the base's, a PEFT source the bias already
        if any(b for c, b in biases.items() if docs[c].get("source") != "peft"):
            base, revision = _resolve_base(source, base)
            _, modules = _base_modules(source, base, revision, us)
        full_biases: dict[str, dict[str, torch.Tensor]] = {component: {name: value if docs[component].get("source") == "peft"
                                   else modules[component][name].bias.detach().float() + value
                                   for name, value in b.items()} for component, b in biases.items()}
        record = _header(_record(source, to, dtype, r=r, base_model=source.info.base_model,
                                 base_model_revision=source.info.doc.get("base_model_revision")))
        with atomic_directory(out) as tmp:
            for component, u in us.items():
                folder = tmp if component == "unet" else tmp / component
                folder.mkdir(exist_ok=True)
                write_peft_hra(folder, {k: v.to(torch_dtype) for k, v in u.items()}, apply_gs=gs[component],
                               biases={k: v.to(torch_dtype) for k, v in full_biases.get(component, {}).items()},
                               base_model_name_or_path=source.info.base_model,
                               revision=source.info.doc.get("base_model_revision"), metadata=record)
        return out
    base, revision = _resolve_base(source, base)
    models, modules = _base_modules(source, base, revision, us)
    record = _record(source, to, dtype, r=r, base_model=base, base_model_revision=revision,
                     base_weights_sha256=base_weights_hash(modules), exact_for_base=True,
                     lora_scale="alpha / rank = 1" if to != "merged" else None)
    if to == "merged":
        from .io import load_adapter

        with atomic_directory(out) as tmp:
            for component, model in models.items():
                load_adapter(model, source.parts[component])
                folder = tmp if component == "unet" else tmp / component
                folder.mkdir(exist_ok=True)
                write_merged(model, folder, metadata=_header(record), dtype=torch_dtype)
        return out
    unet_config = models["unet"].config if "unet" in models else _unet_config(base, revision)
    family = base_family(unet_config)
    if to == "kohya":  # refuse a layer without a kohya name before any maths
        for component, u in us.items():
            for name in u:
                kohya_module_name(family, component, name, unet_config)
    factors = {component: {name: hra_lora_factor(modules[component][name], u[name], gs[component], name)
                           for name in u} for component, u in us.items()}
    record["base_family"] = family
    _write_file(lora_state_dict(factors, to, family, torch_dtype, unet_config), target, _header(record))
    return target


def _peft_lora_factors(part: Path) -> tuple[dict[str, LoraFactor], int]:
    """A PEFT LoRA folder's layers as LoraFactors (scale alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    from safetensors.torch import load_file

    config = json.loads((part / ADAPTER_CONFIG).read_text())
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"adapter {part} uses PEFT's {key}; its export to a LoRA file is not supported "
                             "(export --to merged or --to peft instead)")
    r, alpha = int(config["r"]), float(config.get("lora_alpha") or config["r"])
    scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(part / ADAPTER_WEIGHTS))
    factors = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        module = module[: -len(".lora_A.weight")]
        up = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
        # the file's rank is the layer's rank; alpha = rank·scale keeps each layer's scale exactly
        factors[module] = LoraFactor(down, up, float(down.shape[0]) * scale)
    if not factors:
        raise ValueError(f"{part / ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors")
    return factors, r


def _export_peft_baseline(source: _Source, to: str, target: Path, out: Path, base: str | None, dtype: str) -> Path:
    """A PEFT LoRA/OFT/BOFT folder: LoRA → lora/kohya is a renaming (exact); OFT/BOFT have no LoRA form."""
    torch_dtype = EXPORT_DTYPES[dtype]
    if to in ("lora", "kohya"):
        if source.kind != "lora":
            raise ValueError(f"adapter {source.path} is a PEFT {source.kind.upper()} adapter: it rotates whole blocks "
                             "of each weight, a change of full rank with no exact LoRA form; export --to merged "
                             "(or use it as it is with PEFT)")
        factors, r = _peft_lora_factors(source.path)
        family, unet_config = "sd", None
        if to == "kohya":
            chosen, revision = _resolve_base(source, base)
            unet_config = _unet_config(chosen, revision)
            family = base_family(unet_config)
        record = _record(source, to, dtype, r=r, base_model=source.info.base_model, exact_for_base=True,
                         base_family=family)
        _write_file(lora_state_dict({"unet": factors}, to, family, torch_dtype, unet_config), target,
                    _header(record))
        return target
    if to == "peft":
        from safetensors.torch import load_file

        tensors = {k: v.to(torch_dtype) for k, v in load_file(str(source.path / ADAPTER_WEIGHTS)).items()}
        with atomic_directory(out) as tmp:
            shutil.copyfile(source.path / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
            _write_file(tensors, tmp / ADAPTER_WEIGHTS, _header(_record(source, to, dtype)))
        return out
    from .model import _set_submodule
    from .peft_baselines import load_peft_adapter, peft_layers

    chosen, revision = _resolve_base(source, base)
    unet = load_base_component(chosen, "unet", revision)
    load_peft_adapter(unet, source.path)
    for name, layer in peft_layers(unet):
        layer.merge()
        _set_submodule(unet, name, layer.get_base_layer())
    record = _record(source, to, dtype, base_model=chosen, base_model_revision=revision)
    with atomic_directory(out) as tmp:
        write_merged(unet, tmp, metadata=_header(record), dtype=torch_dtype)
    return out


_EXPORTERS = {"hra": _export_hra, "lora": _export_peft_baseline, "oft": _export_peft_baseline,
              "boft": _export_peft_baseline}


def export_adapter(adapter: str | os.PathLike, to: str, out: str | os.PathLike, *, base: str | None = None,
                   dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Export the adapter folder ``adapter`` as ``to`` (one of EXPORT_FORMATS) to ``out``; returns what was written.

    ``base``: the pipeline (folder or hub id) the adapter was trained on (default: its recorded base); needed
    for lora/kohya/merged from HRA, since B = −W Û T depends on W. ``out``: for lora a folder (it gets
    ``pytorch_lora_weights.safetensors``) or a ``.safetensors`` file; for kohya a ``.safetensors`` file; for
    peft and merged a folder. An existing output is refused unless ``overwrite``.
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    out = Path(out)
    target = _check_out(out, to, overwrite)
    source = _read_source(adapter)
    if source.kind != "hra" and len(source.parts) > 1:
        raise ValueError(f"adapter {source.path} has a text_encoder/ part, which only HRA adapters have here")
    return _EXPORTERS[source.kind](source, to, target, out, base, dtype)
