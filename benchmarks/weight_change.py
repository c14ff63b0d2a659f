"""How far an adapter moves the base weights it adapts: per adapted weight, ‖W′ − W‖ / ‖W‖ with the adapter merged.

Works for every adapter the toolkit trains or loads (HRA, and PEFT's LoRA / OFT / BOFT / HRA folders), on the
UNet and on any text-encoder parts the adapter folder holds. Per adapter and component it prints the number of
adapted weights, the median and the largest relative change, and the median per layer kind (to_q, ff.net.2, …).
It is how docs/baselines.md compares methods "at the same learning rate": one number per run, comparable across
adapter types because it is measured on the merged weights, not on the adapter's own parameters.

Usage: python benchmarks/weight_change.py ADAPTER [ADAPTER ...] [--base FOLDER_OR_HUB_ID] [--json FILE]
    python benchmarks/weight_change.py outputs/run-hra/adapter outputs/run-lora/adapter
    python benchmarks/weight_change.py outputs/f/boft/lr1-seed0/train/snapshots/step-000200/adapter
The base is the one each adapter records (as `hra-diffusion generate` finds it), or --base for all of them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hra_diffusion.adapters.export import load_base_component  # noqa: E402
from hra_diffusion.adapters.registry import adapter_type, describe_adapter, load_any_adapter, merge_adapter  # noqa: E402
from hra_diffusion.generate import base_revision, default_base_model  # noqa: E402

TEXT_PARTS = ("text_encoder", "text_encoder_2")
_BLOCK = re.compile(r"^.*\.(?:transformer_blocks|resnets|attentions|downsamplers|upsamplers|layers)\.\d+\.")  # -> attn1.to_q


def relative_changes(model: nn.Module, adapter: str | Path) -> dict[str, float]:
    """``{layer: ‖W′ − W‖ / ‖W‖}`` for every layer the adapter at ``adapter`` adapts in ``model`` (merged in place)."""
    names = load_any_adapter(model, adapter)
    before = {name: model.get_submodule(name).base_layer.weight.detach().clone() for name in names}  # not merged yet
    merge_adapter(model, adapter_type(adapter))
    out = {}
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).base_layer.weight.float()
            w0 = before[name].float()
            out[name] = ((w - w0).norm() / w0.norm()).item()
    return out


def summarise(changes: dict[str, float]) -> dict:
    kinds: dict[str, list[float]] = {}
    for name, value in changes.items():
        kinds.setdefault(_BLOCK.sub("", name), []).append(value)
    return {"weights": len(changes), "median": statistics.median(changes.values()), "max": max(changes.values()),
            "by_kind": {k: statistics.median(v) for k, v in sorted(kinds.items())}}


def measure(adapter: str | Path, base: str | None = None) -> dict:
    """Per component of the adapter folder: the summary of its relative weight changes."""
    adapter = Path(adapter)
    doc = describe_adapter(adapter).doc
    chosen = base or default_base_model(doc)
    revision = base_revision(doc, chosen)
    parts = {"unet": adapter, **{c: adapter / c for c in TEXT_PARTS if (adapter / c).is_dir()}}
    result = {"adapter": str(adapter), "kind": adapter_type(adapter), "base": chosen, "components": {}}
    for component, path in parts.items():
        model = load_base_component(chosen, component, revision)  # fp32, eval, frozen
        result["components"][component] = summarise(relative_changes(model, path))
    return result


def table(results: list[dict]) -> str:
    lines = ["| adapter | kind | component | weights | median | max | median by layer kind |", "|---|---|---|--:|--:|--:|---|"]
    for r in results:
        for component, s in r["components"].items():
            by_kind = ", ".join(f"{k} {v:.2%}" for k, v in s["by_kind"].items())
            lines.append(f"| {r['adapter']} | {r['kind']} | {component} | {s['weights']} | {s['median']:.2%} | "
                         f"{s['max']:.2%} | {by_kind} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", help="adapter folders (a run's adapter/, or a snapshot folder)")
    p.add_argument("--base", help="base model for all adapters (default: the one each adapter records)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    results = [measure(a, args.base) for a in args.adapters]
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
