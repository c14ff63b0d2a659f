"""The end of a run: the summary it prints (where things are, key figures, the next commands, which run as printed)
and the model card's notes on settings changed at a resume."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..utils import cli_command
from .recipes import RESOLVED_CONFIG_NAME

__all__ = ["print_summary", "resume_notes"]


def resume_notes(result) -> list[str]:
    """Model-card notes for optimisation settings changed on resume (the card's table shows the new ones)."""
    if not getattr(result, "resume_changes", None) or result.resumed_from is None:
        return []
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in result.resume_changes.items())
    return [f"resumed from `{Path(result.resumed_from).name}` with changed optimisation settings ({listed}); "
            "the earlier values were used before it"]


def print_summary(cfg, result, kind: str, generate_hint: str = "", exportable: bool = True) -> str:
    """Print (and return) the end-of-run summary: files, key figures, next commands."""
    out = Path(cfg.output_dir)
    adapter = out / "adapter"
    stats = result.stats or {}
    trainable = stats.get("trainable_parameters") or {}
    loss = stats.get("final_loss")
    figures = [f"{result.global_step} steps", f"{result.seconds:.0f} s"]
    if result.resumed_from is not None:
        figures.append(f"resumed from {Path(result.resumed_from).name}")
    if loss is not None:
        figures.append(f"final loss {loss:.4f}")
    if trainable:
        figures.append("trainable values " + ", ".join(f"{n} {v:,}" for n, v in trainable.items()))
    q = shlex.quote
    cli = cli_command()  # base, sampler, steps and guidance come from the adapter (how this run validated)
    lines = [
        f"{kind} training finished: {'; '.join(figures)}",
        *[f"  {line}" for line in stats.get("report", [])],
        f"  adapter:    {adapter}",
        f"  model card: {out / 'README.md'}",
        f"  config:     {out / RESOLVED_CONFIG_NAME}",
        "next:",
        f"  {cli} generate --adapter {q(str(adapter))} {generate_hint}--out {q(str(out / 'samples'))}",
    ]
    if exportable:
        lines.append(f"  {cli} export --adapter {q(str(adapter))} --to lora --out {q(str(out / 'adapter-lora'))}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
