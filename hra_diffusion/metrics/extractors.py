"""Feature extractors behind one interface: images in, L2-normalised features out.

Every extractor takes images as float tensors in [0, 1], either a batch (B, 3, H, W) or a list of
(3, H, W) of any sizes, and does its own resizing and normalisation (k-diffusion's evaluation.py
style). Loaders accept a model name / local path (real weights) or an already-built model (tests build
the real architectures from config with random weights and go through the same class).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import l2_normalize

__all__ = [
    "WeightsUnavailableError",
    "FeatureExtractor",
    "DINOExtractor",
    "CLIPExtractor",
    "load_dino",
    "load_clip",
    "DEFAULT_DINO",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
]

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailableError(RuntimeError):
    """A metric's model weights could not be loaded (offline, wrong name, missing file)."""

    hra_user_error = True  # an expected error: entry points print it as one line (hra_diffusion.errors)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers: the cache key of a model passed in as an object."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resize_and_crop(image: torch.Tensor, size: int | tuple[int, int], mode: str = "shortest") -> torch.Tensor:
    """(3, H, W) -> (3, h, w): 'shortest' resizes the short side to size then centre-crops (CLIP),
    'squash' resizes straight to (size, size) (HF ViTImageProcessor, used for DINO)."""
    h_out, w_out = (size, size) if isinstance(size, int) else size
    x = image[None].float()
    if mode == "squash":
        x = F.interpolate(x, size=(h_out, w_out), mode="bilinear", antialias=True, align_corners=False)
    elif mode == "shortest":
        h, w = x.shape[-2:]
        scale = max(h_out / h, w_out / w)
        nh, nw = max(h_out, round(h * scale)), max(w_out, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - h_out) // 2, (nw - w_out) // 2
        x = x[..., top : top + h_out, left : left + w_out]
    else:
        raise ValueError(f"unknown resize mode {mode!r}; use 'shortest' or 'squash'")
    return x[0].clamp(0, 1)


class FeatureExtractor(nn.Module):
    """Images in [0, 1] -> (B, D) L2-normalised features. Subclasses define ``embed`` on a prepared batch."""

    name: str = "features"

    def __init__(self, image_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 resize_mode: str, cache_key: str) -> None:
        super().__init__()
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.cache_key = cache_key
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def prepare(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Resize/crop each image and normalise: -> (B, 3, h, w) on the extractor's device."""
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images[None]
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise ValueError(f"expected images (B, 3, H, W) or a list of (3, H, W), got shape {tuple(images.shape)}")
        batch = torch.stack([resize_and_crop(img, self.image_size, self.resize_mode) for img in images])
        batch = batch.to(self.device)
        return (batch - self.mean) / self.std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, h, w) -> (B, D)
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("no images given to the feature extractor")
        return l2_normalize(self.embed(self.prepare(images)).float()).cpu()


class DINOExtractor(FeatureExtractor):
    """DINO ViT (Caron et al. 2021): the CLS token of the last hidden state, as in the HRA/DreamBooth evaluation."""

    name = "dino"

    def __init__(self, model: nn.Module, cache_key: str, image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__(image_size, mean, std, "squash", cache_key)
        self.model = model.eval()

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype))
        return out.last_hidden_state[:, 0]  # (B, hidden): CLS token


class CLIPExtractor(FeatureExtractor):
    """CLIP image features (CLIP-I) and text features (CLIP-T), from an open_clip model."""

    name = "clip"

    def __init__(self, model: nn.Module, tokenizer, cache_key: str, image_size: int | tuple[int, int] = 224,
                 mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)) -> None:
        super().__init__(image_size, mean, std, "shortest", cache_key)
        self.model = model.eval()
        self.tokenizer = tokenizer

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N,) prompts -> (N, D) L2-normalised text features (CLIP-T compares them with image features)."""
        if not prompts:
            raise ValueError("no prompts given to encode_text")
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return l2_normalize(self.model.encode_text(tokens).float()).cpu()


def weights_error(what: str, name: str, flag: str, err: BaseException) -> WeightsUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    return WeightsUnavailableError(
        f"could not load {what} weights {name!r}"
        + (" (HF_HUB_OFFLINE is set)" if offline else "")
        + f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"Download them on a machine with internet access (e.g. `hf download {name} --local-dir DIR` or "
        f"`snapshot_download`) and pass the local folder with {flag} /path/to/folder."
    )


def load_dino(model: str | os.PathLike | nn.Module = DEFAULT_DINO, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> DINOExtractor:
    """DINO extractor from a hub id / local folder (transformers ViTModel) or an already-built ViTModel."""
    if isinstance(model, nn.Module):
        return DINOExtractor(model.to(device, dtype), cache_key=f"dino|model-{model_fingerprint(model)}").to(device)
    from transformers import ViTModel

    name = str(model)
    try:
        vit = ViTModel.from_pretrained(name, add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise weights_error("DINO", name, "--dino-model", err) from None
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    proc = Path(name) / "preprocessor_config.json"
    if proc.is_file():  # a local folder: follow its own preprocessing
        cfg = json.loads(proc.read_text())
        size_cfg = cfg.get("size", 224)
        size = size_cfg.get("height", 224) if isinstance(size_cfg, dict) else int(size_cfg)
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    key = f"dino|{name}|{size}" + (_folder_stamp(Path(name)) if Path(name).is_dir() else "")
    extractor = DINOExtractor(vit.to(device, dtype), cache_key=key, image_size=size, mean=mean, std=std)
    return extractor.to(device)


def _folder_stamp(folder: Path) -> str:
    """Size and mtime of a local model folder's weight and config files: a rebuilt model gets a new cache key."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    return "|" + ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _clip_preprocess_cfg(model: nn.Module) -> dict:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(getattr(model, "visual", None), "image_size", 224))
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = int(size[0])
    return {
        "image_size": size if isinstance(size, int) else tuple(size),
        "mean": cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
        "std": cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
    }


def load_clip(model: str | nn.Module = DEFAULT_CLIP_MODEL, pretrained: str | os.PathLike | None = DEFAULT_CLIP_PRETRAINED,
              device: str | torch.device = "cpu", tokenizer=None) -> CLIPExtractor:
    """CLIP extractor: an open_clip model name + pretrained tag, a local .safetensors checkpoint as
    ``pretrained``, a ``local-dir:`` / folder as ``model``, or an already-built open_clip model
    (then ``tokenizer`` must be given, or ``model`` must be the name string)."""
    import open_clip

    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("load_clip(model=<nn.Module>) needs tokenizer=open_clip.get_tokenizer(<model name>)")
        return CLIPExtractor(model.to(device), tokenizer, cache_key=f"clip|model-{model_fingerprint(model)}",
                             **_clip_preprocess_cfg(model)).to(device)
    name = str(model)
    if Path(name).is_dir():
        name = "local-dir:" + name
    if name.startswith("local-dir:"):
        pretrained = None
        folder = Path(name[len("local-dir:"):])
        if not any(folder.glob("*.safetensors")):
            raise WeightsUnavailableError(
                f"{folder} has no *.safetensors weights; this tool does not unpickle .bin/.pt files. "
                "Convert the checkpoint to safetensors (safetensors.torch.save_file) first."
            )
    elif pretrained is not None and (Path(str(pretrained)).exists() or os.sep in str(pretrained)):
        path = Path(str(pretrained))
        if not path.is_file():
            raise WeightsUnavailableError(f"CLIP checkpoint {str(path)!r} does not exist")
        if path.suffix != ".safetensors":
            raise WeightsUnavailableError(
                f"CLIP checkpoint {str(path)!r} is not a .safetensors file; this tool does not unpickle "
                ".bin/.pt files. Convert it with safetensors.torch.save_file first."
            )
        pretrained = str(path)
    elif name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() (e.g. ViT-L-14, ViT-B-32)")
    elif pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if str(pretrained) not in tags:
            raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {name}; known tags: {tags}")
        try:  # fetch (or find in the cache) before building the model, so an offline failure is fast
            cfg = open_clip.get_pretrained_cfg(name, str(pretrained))
            open_clip.download_pretrained(cfg)
        except Exception as err:  # hub/network errors come in many types
            hub = cfg.get("hf_hub", "") if isinstance(cfg, dict) else ""
            raise weights_error("CLIP", f"{name} / {pretrained}" + (f" (hub: {hub})" if hub else ""),
                                "--clip-pretrained <file.safetensors> (or --clip-model local-dir:...)", err) from None
    try:
        clip_model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except (RuntimeError, OSError, ValueError) as err:
        raise weights_error("CLIP", f"{name} / {pretrained}", "--clip-pretrained", err) from None
    tok = tokenizer or open_clip.get_tokenizer(name)
    key = f"clip|{name}|{pretrained}"
    if pretrained is not None and Path(str(pretrained)).is_file():  # a local file can change: key on its stat
        st = Path(str(pretrained)).stat()
        key += f"|{st.st_size}|{st.st_mtime_ns}"
    elif name.startswith("local-dir:"):
        key += _folder_stamp(Path(name[len("local-dir:"):]))
    return CLIPExtractor(clip_model, tok, cache_key=key, **_clip_preprocess_cfg(clip_model)).to(device)
