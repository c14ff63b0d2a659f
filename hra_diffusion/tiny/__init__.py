"""The tiny world: procedural scenes, a tiny pretrained text-to-image pipeline and synthetic data (offline, CPU)."""

from ..paths import (
    TINY_CONTROL_DIR,
    TINY_DATA_DIR,
    TINY_EXTRACTORS_DIR,
    TINY_MODEL_DIR,
    TINY_SUBJECT_DIR,
    require_tiny,
)

__all__ = ["TINY_MODEL_DIR", "TINY_DATA_DIR", "TINY_SUBJECT_DIR", "TINY_CONTROL_DIR", "TINY_EXTRACTORS_DIR", "require_tiny"]
