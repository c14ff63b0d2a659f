"""Where the repository keeps its committed assets (resolved from the repository root): the tiny world's model, data
and stand-in extractors, which the default recipes and the offline fallbacks use."""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO_ROOT", "ASSETS_DIR", "TINY_MODEL_DIR", "TINY_DATA_DIR", "TINY_SUBJECT_DIR", "TINY_CONTROL_DIR", "TINY_EXTRACTORS_DIR",
           "require_tiny"]

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "assets"
TINY_MODEL_DIR = ASSETS_DIR / "tiny-sd"
TINY_DATA_DIR = ASSETS_DIR / "tiny-data"
TINY_SUBJECT_DIR = TINY_DATA_DIR / "subject"
TINY_CONTROL_DIR = TINY_DATA_DIR / "control"
TINY_EXTRACTORS_DIR = ASSETS_DIR / "tiny-extractors"  # the stand-in DINO and CLIP (build-extractors)

_MARKERS = {
    TINY_MODEL_DIR: "model_index.json",
    TINY_SUBJECT_DIR: "subject.json",
    TINY_CONTROL_DIR: "train/metadata.jsonl",
    TINY_EXTRACTORS_DIR: "build_report.json",
}
_COMMANDS = {TINY_MODEL_DIR: "python -m tools.tiny_world build",
             TINY_EXTRACTORS_DIR: "python -m tools.tiny_world build-extractors"}


def require_tiny(path: Path = TINY_MODEL_DIR) -> Path:
    """Return ``path`` if that tiny-world asset is built, else raise naming the command that builds it."""
    path = Path(path)
    marker = _MARKERS.get(path)
    if not path.is_dir() or (marker and not (path / marker).is_file()):
        what = _COMMANDS.get(path, "python -m tools.tiny_world data")
        raise FileNotFoundError(
            f"the tiny-world asset {str(path)!r} is missing or incomplete; build it with `{what}` "
            "from the repository root (or pass a real model/data path instead)"
        )
    return path
