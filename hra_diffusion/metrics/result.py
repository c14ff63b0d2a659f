"""The result of a scoring run and the metric-name registry shared by subject and control scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ScoreResult", "parse_metric_names"]


@dataclass
class ScoreResult:
    """Summary values, per-image rows and what is needed to draw the report."""

    kind: str  # "subject" or "control"
    summary: dict[str, float]
    per_image: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    references: list[Path] = field(default_factory=list)  # real images shown above the grid

    def metric_columns(self) -> list[str]:
        """Per-image metric columns, in the summary's order."""
        return [k for k in self.summary if any(k in row for row in self.per_image)]


def parse_metric_names(value: str | list[str] | None, known: dict[str, str], default: list[str]) -> list[str]:
    """'dino,clip_i' or ['dino', 'clip_i'] -> validated, de-duplicated names (unknown names raise)."""
    if value is None or value == [] or value == "":
        return list(default)
    items = value.split(",") if isinstance(value, str) else [v for part in value for v in part.split(",")]
    names = []
    for raw in items:
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        if name not in known:
            options = ", ".join(f"{k} ({v})" for k, v in known.items())
            raise ValueError(f"unknown metric {raw.strip()!r}; choose from: {options}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no metric named in {value!r}; choose from: {', '.join(known)}")
    return names
