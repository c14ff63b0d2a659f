"""Small helpers every part of the package uses: crash-safe folders and the default device."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_directory", "default_device", "dtype_kwargs", "quiet_hub_warnings", "save_nested_state",
           "load_nested_state"]


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


_STATE_TENSORS, _STATE_JSON = "state.safetensors", "state.json"


def save_nested_state(folder: str | os.PathLike, state: dict) -> Path:
    """Write a nested state (dicts with str or int keys, lists, tuples, tensors, JSON scalars: model and
    optimizer state dicts, RNG states) as ``folder/state.safetensors`` + ``folder/state.json``, atomically
    (the whole folder is swapped in). Never a pickle: :func:`load_nested_state` reads it back."""
    import json

    import torch
    from safetensors.torch import save_file

    tensors: dict = {}

    def walk(x):
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().clone().contiguous()  # no shared storage (safetensors refuses it)
            return {"__tensor__": key}
        if isinstance(x, dict):
            bad = [k for k in x if not isinstance(k, (str, int)) or isinstance(k, bool)]
            if bad:
                raise TypeError(f"save_nested_state: dict keys must be str or int, got {bad[0]!r}")
            return {"__dict__": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"save_nested_state: cannot store a {type(x).__name__} (tensors, dicts, lists, scalars only)")

    doc = walk(state)
    with atomic_directory(folder) as tmp:
        save_file(tensors, str(tmp / _STATE_TENSORS))
        (tmp / _STATE_JSON).write_text(json.dumps(doc))
    return Path(folder)


def load_nested_state(folder: str | os.PathLike) -> dict:
    """The state :func:`save_nested_state` wrote (tensors on the CPU; tuples come back as lists)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = load_file(str(folder / _STATE_TENSORS))

    def unwalk(x):
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            return {k: unwalk(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [unwalk(v) for v in x]
        return x

    return unwalk(json.loads((folder / _STATE_JSON).read_text()))
