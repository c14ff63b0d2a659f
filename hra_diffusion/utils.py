"""Small helpers every part of the package uses: crash-safe folders, the default device, how to call the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["stream_seed", "sha256_file", "atomic_directory", "default_device", "dtype_kwargs", "quiet_hub_warnings",
           "cli_command"]


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs, processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class atomic_directory:
    """Write a directory atomically: fill a temporary sibling, then swap it into place.

    A crash while writing leaves any previous directory at ``path`` untouched (the half-written
    temporary is named ``.<name>.tmp-*`` and is ignored and cleaned up by the next write).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the result from other users
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.iterdir():  # flush file contents before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def default_device(name: str | None = None) -> str:
    """``name`` if given, else "cuda" when a GPU is visible, else "cpu"."""
    if name:
        return str(name)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def quiet_hub_warnings():
    """Silence diffusers' own warnings while loading by hub id: offline it logs "Couldn't connect to the Hub"
    before failing, and the caller's one-line error (what to download, where to pass it) says it better."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def dtype_kwargs(dtype, library: str = "diffusers") -> dict:
    """The ``from_pretrained`` keyword that sets the load dtype in the installed ``library``.

    Newer diffusers and transformers (>= 4.56) take ``dtype`` and warn that ``torch_dtype`` is deprecated;
    older ones only know ``torch_dtype``. diffusers has no version switch to read, so its support is
    recognised by the helper that resolves the deprecated name (``deprecation_utils._resolve_dtype``).
    """
    if library == "transformers":
        import transformers
        from packaging.version import Version

        new = Version(transformers.__version__).release >= (4, 56)
    else:
        try:
            from diffusers.utils import deprecation_utils

            new = hasattr(deprecation_utils, "_resolve_dtype")
        except ImportError:  # pragma: no cover - a diffusers without the module
            new = False
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def cli_command() -> str:
    """How to call ``hra-diffusion`` in the shell the run was started from: its name when that is on PATH and
    is this environment's, else its path in this environment (e.g. ``.venv/bin/hra-diffusion`` after the
    README's install, which does not activate the environment), else ``python -m hra_diffusion``."""
    here = Path(sys.executable).parent / "hra-diffusion"
    found = shutil.which("hra-diffusion")
    if found and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "hra-diffusion"
    if here.exists():
        try:
            rel = os.path.relpath(here)
        except ValueError:  # another drive (Windows)
            rel = str(here)
        return shlex.quote(str(here) if rel.startswith("..") else rel)
    return f"{shlex.quote(sys.executable)} -m hra_diffusion"
