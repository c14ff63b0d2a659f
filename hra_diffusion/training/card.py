"""Model card (README.md) for a trained adapter: what it is, how it was made, samples, how to load it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["write_model_card"]


def _rel(path: str | os.PathLike, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    title: str,
    base_model: str,
    command: str,
    summary: str,
    adapters: dict[str, str],
    facts: dict[str, object],
    sample_images: Sequence[str | os.PathLike] = (),
    usage: str = "",
    notes: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> Path:
    """Write ``<output_dir>/README.md``. ``adapters`` maps a folder to what it holds; ``facts`` is a table;
    ``tags`` are added to the front matter's (e.g. ``stable-diffusion-xl`` for an SDXL base)."""
    root = Path(output_dir)
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: hra-diffusion",
        f"tags: [{', '.join(['hra', 'householder-reflection-adaptation', 'stable-diffusion', *tags, 'text-to-image'])}]",
        "---",
        "",
        f"# {title}",
        "",
        summary,
        "",
        "## Files",
        "",
        "| folder | what |",
        "|---|---|",
        *[f"| `{_rel(k, root)}/` | {v} |" for k, v in adapters.items()],
        "| `config.yaml` | the resolved training config (reusable: `--config config.yaml`) |",
        "| `validation/` | validation grids (one row per prompt, fixed seeds) |",
        "| `logs/` | tensorboard logs (`tensorboard --logdir logs`) |",
        "",
        "## Training",
        "",
        "Exact command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        "",
    ]
    if sample_images:
        lines += ["## Samples", ""]
        lines += [f"![sample]({_rel(p, root)})" for p in sample_images]
        lines.append("")
    if usage:
        lines += ["## Use", "", "```python", usage.strip(), "```", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = root / "README.md"
    path.write_text("\n".join(lines))
    return path


ADAPTER_NAMES = {"hra": "HRA", "lora": "LoRA", "oft": "OFT", "boft": "BOFT"}


def adapter_facts(cfg, trainable: int) -> tuple[str, str, str]:
    """(display name, one-line description with the trainable count, Python lines that load it into a pipe).

    ``cfg`` is a TrainConfig; the adapter folder is ``<output_dir>/adapter``.
    """
    folder = f"{cfg.output_dir}/adapter"
    name = ADAPTER_NAMES[cfg.adapter]
    targets = ", ".join(cfg.target_modules)
    if cfg.adapter == "hra":
        fact = (f"HRA r={cfg.r} on {targets}, Gram-Schmidt={cfg.apply_gs}, λ={cfg.orth_lambda}, "
                + ("biases trained, " if cfg.train_bias else "") + f"{trainable:,} trainable UNet values")
        return name, fact, ""
    fact = f"{cfg.baseline_spec().describe()} on {targets} (PEFT's format), {trainable:,} trainable UNet values"
    load = (f'from hra_diffusion import load_any_adapter\nload_any_adapter(pipe.unet, "{folder}")\n')
    if cfg.adapter == "lora":
        load += f'# or, with diffusers alone: pipe.load_lora_weights("{folder}")\n'
    return name, fact, load
