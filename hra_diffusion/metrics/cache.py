"""Feature cache keyed by (extractor, file content hash), stored as one safetensors file per extractor."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils import sha256_file

__all__ = ["default_cache_dir", "file_hash", "FeatureCache", "cached_features"]


def default_cache_dir() -> Path:
    """$HRA_DIFFUSION_CACHE, else $XDG_CACHE_HOME/hra-diffusion, else ~/.cache/hra-diffusion."""
    env = os.environ.get("HRA_DIFFUSION_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hra-diffusion"


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the cache key: renaming or copying a file keeps its features)."""
    return sha256_file(path)


class FeatureCache:
    """{file hash: feature vector} for one extractor, in ``<dir>/features-<extractor>.safetensors``."""

    def __init__(self, directory: str | os.PathLike, extractor_key: str) -> None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor_key)[:80]
        digest = hashlib.sha256(extractor_key.encode()).hexdigest()[:10]
        self.path = Path(directory) / f"features-{slug}-{digest}.safetensors"
        self.extractor_key = extractor_key
        self.entries: dict[str, torch.Tensor] = {}
        self.dirty = False
        self.hits = 0
        self.misses = 0
        if self.path.is_file():
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    if (f.metadata() or {}).get("extractor") == extractor_key:
                        self.entries = {k: f.get_tensor(k) for k in f.keys()}
            except Exception:  # a corrupt cache is only a cache: start again
                self.entries = {}

    def get(self, key: str) -> torch.Tensor | None:
        return self.entries.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.entries[key] = value.detach().to("cpu", torch.float32).contiguous()
        self.dirty = True

    def save(self) -> None:
        """Write atomically (temporary file + rename), only when something new was added."""
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            save_file(self.entries, tmp, metadata={"extractor": self.extractor_key})
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.dirty = False


def cached_features(
    paths: Sequence[str | os.PathLike],
    extractor: Callable,
    load_image: Callable[[Path], torch.Tensor],
    cache: FeatureCache | None,
    batch_size: int = 16,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Features (N, D) for image files: cached ones are read, the rest extracted in batches and stored."""
    if not paths:
        raise ValueError("cached_features: no image files given")
    hashes = [file_hash(p) for p in paths]
    out: dict[str, torch.Tensor] = {}
    todo: list[tuple[str, Path]] = []
    queued: set[str] = set()
    for h, p in zip(hashes, paths, strict=True):
        hit = cache.get(h) if cache is not None else None
        if hit is not None:
            out[h] = hit
            cache.hits += 1
        elif h not in out and h not in queued:  # byte-identical files are extracted once
            todo.append((h, Path(p)))
            queued.add(h)
    batches = range(0, len(todo), batch_size)
    for start in progress(batches) if progress else batches:
        chunk = todo[start : start + batch_size]
        feats = extractor([load_image(p) for _, p in chunk])
        for (h, _), f in zip(chunk, feats, strict=True):
            out[h] = f
            if cache is not None:
                cache.put(h, f)
                cache.misses += 1
    if cache is not None:
        cache.save()
    return torch.stack([out[h] for h in hashes])
