"""Per-architecture prompt conditioning: what a Stable Diffusion UNet takes besides the noisy latent and timestep.

SD 1.x / 2.x (``StableDiffusionPipeline``): one CLIP tokenizer and text encoder; the UNet gets the encoder's
last hidden states as ``encoder_hidden_states``.

SDXL (``StableDiffusionXLPipeline``): two tokenizers and text encoders (CLIP ViT-L, then OpenCLIP ViT-bigG with
a projection). ``encoder_hidden_states`` is the two encoders' *penultimate* hidden states concatenated on the
feature axis (768 + 1280 = 2048 wide), and ``added_cond_kwargs`` holds

* ``text_embeds``: the second encoder's pooled, projected embedding (B, 1280), and
* ``time_ids``: the micro-conditioning of each image, original size (h, w) + crop top-left (top, left) +
  target size (h, w), (B, 6).

These are the conventions of diffusers' ``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids`` and
of its ``train_dreambooth_lora_sdxl.py`` (no clip skip; the prompt padded to each tokenizer's max length).
Both trainers use :func:`conditioner_from_pipeline` / :class:`PromptConditioner` so neither has its own copy::

    family = pipeline_family("path/to/base")               # 'sd' or 'sdxl', from model_index.json
    cond = load_conditioner("path/to/base")                # its tokenizer(s) + text encoder(s), frozen
    cond = conditioner_from_pipeline(pipe)                 # or from a loaded pipeline
    embeds = cond.encode(["a photo of sks dog"])           # PromptEmbeds, cacheable per prompt
    sizes = [SizeCondition((768, 1024), (0, 128), (512, 512))]   # per image, SDXL only
    pred = unet(noisy, t, **cond.unet_kwargs(embeds, sizes)).sample
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "FAMILIES",
    "read_model_index",
    "pipeline_family",
    "SizeCondition",
    "PromptEmbeds",
    "PromptConditioner",
    "SDConditioner",
    "SDXLConditioner",
    "conditioner_from_pipeline",
    "load_conditioner",
]

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
"""model_index.json ``_class_name`` -> family: 'sd' (SD 1.x / 2.x) or 'sdxl'."""


def read_model_index(base: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """The ``model_index.json`` of a local pipeline folder, or of a hub id (from the cache when offline)."""
    local = Path(base).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"base model folder {str(local)!r} has no model_index.json: it is not a "
                                    "diffusers pipeline folder (expected unet/, vae/, text_encoder/, ... and "
                                    "model_index.json)")
        try:
            return json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{index} is not valid JSON ({err})") from None
    if str(base).startswith((".", "/", "~")) or local.exists():
        raise FileNotFoundError(f"base model folder {str(base)!r} does not exist")
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(str(base), revision=revision))
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(f"could not read model_index.json of base model {str(base)!r}: {first}. Pass a local "
                      "diffusers pipeline folder, or download it first (`hf download <id>`)") from None


def pipeline_family(base: str | os.PathLike | dict[str, Any], revision: str | None = None) -> str:
    """'sd' or 'sdxl' from a pipeline folder / hub id (or an already read model_index dict)."""
    index = base if isinstance(base, dict) else read_model_index(base, revision)
    name = index.get("_class_name")
    if name not in FAMILIES:
        where = "" if isinstance(base, dict) else f"base model {str(base)!r}: "
        raise ValueError(f"{where}pipeline class {name!r} is not supported; hra-diffusion handles "
                         f"{' and '.join(FAMILIES)} folders (SD 1.x/2.x and SDXL base models)")
    return FAMILIES[name]


@dataclass(frozen=True)
class SizeCondition:
    """SDXL's micro-conditioning of one image, all in pixels as (height, width) / (top, left).

    ``original_size``: the image before any resize; ``crop_top_left``: where the training crop starts in the
    resized image; ``target_size``: the size the model is trained / asked to generate at.
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def as_list(self) -> list[int]:
        return [*map(int, self.original_size), *map(int, self.crop_top_left), *map(int, self.target_size)]


@dataclass
class PromptEmbeds:
    """Encoded prompts: ``hidden`` (B, L, D) for cross-attention and, for SDXL, ``pooled`` (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def to(self, *args: Any, **kwargs: Any) -> PromptEmbeds:
        return PromptEmbeds(self.hidden.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def __getitem__(self, index: Any) -> PromptEmbeds:
        """Rows ``index`` (an int keeps the batch axis: one prompt is a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return PromptEmbeds(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch axis (e.g. cached per-prompt embeddings into a batch)."""
        if not parts:
            raise ValueError("PromptEmbeds.cat needs at least one part")
        pooled = [p.pooled for p in parts]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("PromptEmbeds.cat: some parts have a pooled embedding and some do not")
        return PromptEmbeds(torch.cat([p.hidden for p in parts]),
                            None if pooled[0] is None else torch.cat(pooled))  # type: ignore[arg-type]


def _tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class PromptConditioner:
    """Prompts -> the UNet's conditioning arguments, for one architecture family.

    ``tokenize`` / ``encode_tokens`` are separate so a trainer can tokenize in its data pipeline and encode
    with grad when text encoders are trained; ``encode`` does both. ``unet_kwargs`` builds the UNet call's
    keyword arguments from (cached or fresh) embeddings plus, for SDXL, each image's :class:`SizeCondition`.
    """

    family: str = ""
    tokenizers: tuple[Any, ...] = ()
    text_encoders: tuple[nn.Module, ...] = ()
    component_names: tuple[str, ...] = ()  # the pipeline's attribute / folder names of the text encoders

    def tokenize(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, ...]:
        """One (B, L) id tensor per tokenizer, padded to its ``model_max_length`` (on the CPU)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return tuple(_tokenize(tok, prompts) for tok in self.tokenizers)

    def encode_tokens(self, ids: Sequence[torch.Tensor]) -> PromptEmbeds:
        raise NotImplementedError

    def using(self, text_encoders: Sequence[nn.Module]) -> PromptConditioner:
        """This conditioner encoding with ``text_encoders`` instead (same order and kind), e.g. the DDP-wrapped
        copies a trainer tunes, so their gradients are synchronised. Their attributes are never read."""
        if len(text_encoders) != len(self.text_encoders):
            raise ValueError(f"{type(self).__name__} encodes with {len(self.text_encoders)} text encoder(s), "
                             f"got {len(text_encoders)}")
        other = copy.copy(self)
        other.text_encoders = tuple(text_encoders)
        return other

    def unused_layers(self) -> tuple[tuple[str, ...], ...]:
        """Per text encoder, the module-name prefixes whose outputs the conditioning never reads (an adapter
        there would get no gradient: a trainer leaves them out). Default: none."""
        return tuple(() for _ in self.text_encoders)

    def encode(self, prompts: Sequence[str] | str) -> PromptEmbeds:
        """Tokenize and encode (grad follows the caller's mode: wrap in ``torch.no_grad()`` for frozen encoders)."""
        return self.encode_tokens(self.tokenize(prompts))

    def unet_kwargs(self, embeds: PromptEmbeds, sizes: Sequence[SizeCondition] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def check_unet(self, unet: nn.Module) -> None:
        """Raise a clear error when the text encoders' widths do not fit ``unet``'s config."""
        width = sum(int(te.config.hidden_size) for te in self.text_encoders)
        want = unet.config.cross_attention_dim
        want = want[0] if isinstance(want, (list, tuple)) else want
        if int(want) != width:
            raise ValueError(f"the text encoders give {width}-wide hidden states but the UNet's cross_attention_dim "
                             f"is {want}: the text encoders and the UNet come from different models")


class SDConditioner(PromptConditioner):
    """SD 1.x / 2.x: ``encoder_hidden_states`` = the text encoder's last hidden states."""

    family = "sd"
    component_names = ("text_encoder",)

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        self.tokenizers = (tokenizer,)
        self.text_encoders = (text_encoder,)
        # read once here: encode_tokens may run on a wrapped copy (see using) that has no .config
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))

    def encode_tokens(self, ids: Sequence[torch.Tensor]) -> PromptEmbeds:
        (te,) = self.text_encoders
        (tokens,) = ids
        mask = None
        if self.use_attention_mask:  # as StableDiffusionPipeline.encode_prompt
            mask = (tokens != self.tokenizers[0].pad_token_id).long().to(_device_of(te))
        return PromptEmbeds(te(tokens.to(_device_of(te)), attention_mask=mask)[0])

    def unet_kwargs(self, embeds: PromptEmbeds, sizes: Sequence[SizeCondition] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Any]:
        hidden = embeds.hidden if dtype is None else embeds.hidden.to(dtype)
        return {"encoder_hidden_states": hidden}


class SDXLConditioner(PromptConditioner):
    """SDXL: penultimate hidden states of both encoders concatenated, the second's pooled embedding, time ids."""

    family = "sdxl"
    component_names = ("text_encoder", "text_encoder_2")

    def __init__(self, tokenizers: Sequence[Any], text_encoders: Sequence[nn.Module]) -> None:
        if len(tokenizers) != 2 or len(text_encoders) != 2:
            raise ValueError(f"SDXL needs two tokenizers and two text encoders, got {len(tokenizers)} and "
                             f"{len(text_encoders)}")
        self.tokenizers = tuple(tokenizers)
        self.text_encoders = tuple(text_encoders)

    def encode_tokens(self, ids: Sequence[torch.Tensor]) -> PromptEmbeds:
        if len(ids) != 2:
            raise ValueError(f"SDXL prompts are tokenized twice (one id tensor per tokenizer), got {len(ids)}")
        hidden, pooled = [], None
        for te, tokens in zip(self.text_encoders, ids, strict=True):
            out = te(tokens.to(_device_of(te)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds (B, P)
        if pooled is None or pooled.ndim != 2:
            raise ValueError(f"SDXL's second text encoder must return a pooled embedding (B, P) first, got "
                             f"{type(self.text_encoders[1]).__name__}; it should be CLIPTextModelWithProjection")
        device = hidden[-1].device
        return PromptEmbeds(torch.cat([h.to(device) for h in hidden], dim=-1), pooled)

    def unused_layers(self) -> tuple[tuple[str, ...], ...]:
        """The first encoder's last layer: only its penultimate hidden states are read (its pooled output is
        not), so that layer's output reaches nothing. The second encoder's last layer feeds the pooled
        embedding."""
        te = self.text_encoders[0]
        last = f"encoder.layers.{int(te.config.num_hidden_layers) - 1}"  # 'text_model.' before it in older transformers
        return tuple(f"{n}." for n, _ in te.named_modules() if n == last or n.endswith("." + last)), ()

    @staticmethod
    def time_ids(sizes: Sequence[SizeCondition], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """(B, 6): original size + crop top-left + target size per image (``_get_add_time_ids``'s order)."""
        return torch.tensor([s.as_list() for s in sizes], dtype=dtype, device=device)

    def unet_kwargs(self, embeds: PromptEmbeds, sizes: Sequence[SizeCondition] | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, Any]:
        if embeds.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embedding: encode the prompts with "
                             "SDXLConditioner (PromptEmbeds.pooled is None)")
        if sizes is None or len(sizes) != len(embeds):
            got = "none" if sizes is None else str(len(sizes))
            raise ValueError(f"SDXL needs one SizeCondition (original size, crop top-left, target size) per image: "
                             f"{len(embeds)} prompt embeddings, {got} sizes")
        dtype = dtype or embeds.hidden.dtype
        return {
            "encoder_hidden_states": embeds.hidden.to(dtype),
            "added_cond_kwargs": {"text_embeds": embeds.pooled.to(dtype),
                                  "time_ids": self.time_ids(sizes, dtype, embeds.hidden.device)},
        }

    def check_unet(self, unet: nn.Module) -> None:
        super().check_unet(unet)
        if unet.config.get("addition_embed_type") != "text_time":
            raise ValueError("the UNet has no SDXL text/time conditioning (addition_embed_type != 'text_time'): "
                             "it is not an SDXL UNet")
        projection = int(self.text_encoders[1].config.projection_dim)
        passed = int(unet.config.addition_time_embed_dim) * 6 + projection
        expected = unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(f"the UNet's added embedding takes {expected} features but 6 time ids x "
                             f"{unet.config.addition_time_embed_dim} + the second text encoder's projection_dim "
                             f"{projection} give {passed}: the text encoder and the UNet come from different models")


def conditioner_from_pipeline(pipe: Any) -> PromptConditioner:
    """The conditioner for a loaded diffusers pipeline (or any object with the same attributes)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLConditioner((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2))
    return SDConditioner(pipe.tokenizer, pipe.text_encoder)


def load_conditioner(base: str | os.PathLike, revision: str | None = None, variant: str | None = None,
                     dtype: torch.dtype = torch.float32, local_files_only: bool | None = None) -> PromptConditioner:
    """The tokenizer(s) and text encoder(s) of pipeline ``base`` (folder or hub id) as its family's conditioner.

    The text encoders are loaded in ``dtype`` and frozen (``requires_grad_(False)``, eval mode); a trainer that
    tunes them puts its adapter on ``cond.text_encoders`` afterwards.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .utils import dtype_kwargs

    family = pipeline_family(base, revision)
    base = str(Path(base).expanduser()) if Path(base).expanduser().is_dir() else str(base)
    if local_files_only is None:
        local_files_only = Path(base).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true")
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
    names = [("tokenizer", "text_encoder", CLIPTextModel)]
    if family == "sdxl":
        names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    tokenizers, encoders = [], []
    for tok_dir, te_dir, cls in names:
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(base, subfolder=tok_dir, **kwargs))
            encoders.append(cls.from_pretrained(base, subfolder=te_dir, variant=variant,
                                                **dtype_kwargs(dtype, "transformers"), **kwargs))
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise OSError(f"could not load {tok_dir}/ and {te_dir}/ of base model {base!r} ({family.upper()}): "
                          f"{first}") from None
    for te in encoders:
        te.requires_grad_(False).to(dtype).eval()
    if family == "sdxl":
        return SDXLConditioner(tokenizers, encoders)
    return SDConditioner(tokenizers[0], encoders[0])
