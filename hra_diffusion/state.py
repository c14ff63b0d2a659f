"""The one resumable-state store: nested training state (model and optimizer state dicts, RNG states, counters) as
safetensors + JSON, never a pickle, written atomically, checksummed, and tied to the settings it was made with.

Used by the trainers' checkpoints (their optimizer file: :func:`pack` / :func:`unpack`) and by the tiny world's
build tools (:func:`save_state` / :func:`load_state`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .utils import atomic_directory, sha256_file

__all__ = ["pack", "unpack", "save_state", "load_state", "StateError"]

TENSORS, DOC = "state.safetensors", "state.json"


class StateError(ValueError):
    """A saved state that is damaged, or was made with other settings (the message names them)."""

    hra_user_error = True


def pack(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, JSON document) of a nested state: dicts with str or int keys, lists, tuples, tensors, JSON scalars.
    Tuples come back as lists."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().clone().contiguous()  # no shared storage (safetensors refuses it)
            return {"__tensor__": key}
        if isinstance(x, dict):
            bad = [k for k in x if not isinstance(k, (str, int)) or isinstance(k, bool)]
            if bad:
                raise TypeError(f"state dict keys must be str or int, got {bad[0]!r}")
            return {"__dict__": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a state (tensors, dicts, lists, scalars only)")

    return tensors, walk(state)


def unpack(tensors: dict[str, torch.Tensor], doc: Any) -> Any:
    """The nested state :func:`pack` made."""
    def unwalk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            return {k: unwalk(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [unwalk(v) for v in x]
        return x

    return unwalk(doc)


def save_state(folder: str | os.PathLike, state: dict, settings: dict | None = None) -> Path:
    """Write ``state`` to ``folder`` (``state.safetensors`` + ``state.json``, the folder swapped in whole), with
    the ``settings`` it belongs to and the tensors file's checksum."""
    from safetensors.torch import save_file

    tensors, doc = pack(state)
    with atomic_directory(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / DOC).write_text(json.dumps({"state": doc, "settings": json.loads(json.dumps(settings or {})),
                                           "sha256": sha256_file(tmp / TENSORS)}))
    return Path(folder)


def load_state(folder: str | os.PathLike, settings: dict | None = None, ignore: Iterable[str] = ()) -> dict | None:
    """The state in ``folder`` (None: there is none). Raises StateError when its tensors do not match their
    checksum, or when ``settings`` (minus ``ignore``) differ from the saved ones, naming the keys."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / DOC).is_file():
        return None
    saved = json.loads((folder / DOC).read_text())
    if not (folder / TENSORS).is_file() or sha256_file(folder / TENSORS) != saved["sha256"]:
        raise StateError(f"the state in {folder} is damaged ({TENSORS} is missing or does not match its checksum); "
                         "remove the folder and start again")
    if settings is not None:
        skip = set(ignore)
        mine = {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in skip}
        theirs = {k: v for k, v in saved["settings"].items() if k not in skip}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise StateError(f"{folder} holds a state made with other settings ({', '.join(diff)}); resume with the "
                             f"same settings, or remove {folder} to start over")
    return unpack(load_file(str(folder / TENSORS)), saved["state"])
