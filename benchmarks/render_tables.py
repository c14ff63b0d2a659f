"""Render the benchmark tables of README.md and docs/benchmarks.md from benchmarks/results/bench_hra.json.

    python benchmarks/render_tables.py           # print every table
    python benchmarks/render_tables.py --write   # replace the marked blocks in README.md and docs/benchmarks.md
    python benchmarks/render_tables.py --check   # exit 1 if a block differs from the results, or a table has none

A block in a markdown file is delimited by ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` lines; NAME is a
section of the results file (``layers``, ``unet``, and with ``bench_hra.py --sdxl`` ``layers_sdxl``, ``unet_sdxl``)
or ``summary`` (the README's short table, from ``unet``). Every table says where, when and with which torch
version its figures were measured, so no figure is typed in by hand. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_hra.json"
REPO = Path(__file__).resolve().parent.parent
TARGETS = (REPO / "README.md", REPO / "docs" / "benchmarks.md")
UNET_LABELS = {"ours": "ours (HRA r)", "peft_hra": "PEFT HRA r", "peft_lora": "PEFT LoRA r",
               "peft_lora_half": "PEFT LoRA r/2", "peft_oft": "PEFT OFT block 16", "peft_boft": "PEFT BOFT block 8"}


def env_line(env: dict, what: str) -> str:
    clock = f", {env['clock']}" if env.get("clock") else ""
    return (f"_{what}: measured {env['date']} on {env['cpu']} ({env['cores']} cores, {env['threads']} torch threads, "
            f"{env['device']}{clock}), torch {env['torch']}, Python {env['python']}, {env['dtype']}, r = {env['r']}._")


def layers_table(section: dict) -> str:
    """Per-layer forward + backward: median ms, bytes kept for backward, ratios."""
    lines = [env_line(section["env"], f"median of {section['repeats']} interleaved repeats"), "",
             "| shape (in, out, tokens) | base | ours | PEFT HRA | PEFT LoRA | ours / LoRA | PEFT HRA / ours "
             "| kept for backward: ours / LoRA / PEFT HRA |",
             "|---|---|---|---|---|---|---|---|"]
    for row in section["rows"]:
        lines.append(
            f"| {row['shape']} | {row['base_ms']:.1f} ms | {row['ours_ms']:.1f} | {row['peft_hra_ms']:.1f} | "
            f"{row['peft_lora_ms']:.1f} | **{row['ours_ms'] / row['peft_lora_ms']:.2f}x** | "
            f"**{row['peft_hra_ms'] / row['ours_ms']:.1f}x** | "
            f"{row['ours_mib']:.1f} / {row['peft_lora_mib']:.1f} / {row['peft_hra_mib']:.1f} MiB |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def whole_step_table(t: dict[str, float], mem: dict[str, dict]) -> str:
    """The whole-UNet table and every variant's ratios to LoRA (same rank r and same budget r/2)."""
    lines = ["| variant | trainable | step (median s) | peak RSS (GiB) | peak above built model (MiB) |"
             " time / LoRA r | time / LoRA r/2 | peak RSS / LoRA r/2 |",
             "|---|---|---|---|---|---|---|---|"]
    for k in t:
        m = mem.get(k)
        ref_half = mem.get("peft_lora_half")
        cells = [UNET_LABELS.get(k, k), f"{m['trainable']:,}" if m else "-", f"{t[k]:.2f}",
                 f"{m['peak_kib'] / 2**20:.2f}" if m else "-",
                 f"{(m['peak_kib'] - m['after_build_kib']) / 1024:.0f}" if m else "-",
                 _ratio(t[k], t["peft_lora"]) if "peft_lora" in t else "-",
                 _ratio(t[k], t["peft_lora_half"]) if "peft_lora_half" in t else "-",
                 _ratio(m["peak_kib"], ref_half["peak_kib"]) if m and ref_half else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if {"ours", "peft_lora", "peft_hra"} <= set(t) and {"ours", "peft_lora"} <= set(mem):
        out += (f"\n\nratios: time ours/LoRA = **{t['ours'] / t['peft_lora']:.2f}x**, "
                f"PEFT HRA/ours = **{t['peft_hra'] / t['ours']:.2f}x**, "
                f"peak RSS ours/LoRA = **{mem['ours']['peak_kib'] / mem['peft_lora']['peak_kib']:.3f}x**")
    return out


def unet_table(section: dict) -> str:
    head = env_line(section["env"], f"median of {section['repeats']} interleaved steps; peak memory one fresh "
                                    "process per variant")
    return head + "\n\n" + whole_step_table(section["step_s"], section["memory"])


def layers_sdxl_table(section: dict) -> str:
    """The per-layer table at SDXL's shapes (1280-wide projections, cross-attention k/v 2048 -> 1280)."""
    return "_SDXL shapes (tokens x batch 2)._ " + layers_table(section)


def unet_sdxl_table(section: dict) -> str:
    return "_SDXL-shaped UNet (2.6 B parameters, random weights, 32x32 latent, batch 1)._ " + unet_table(section)


def summary_table(results: dict) -> str:
    """The README's table: each variant's whole SD-1.5-shaped training step against LoRA at the same rank."""
    section = results["unet"]
    t, mem, env = section["step_s"], section["memory"], section["env"]
    lines = [f"_Whole SD-1.5-shaped UNet training step, 128 attention projections adapted, r = 8; measured "
             f"{env['date']} on {env['cores']} CPU cores ({env.get('clock') or 'wall time'}), torch {env['torch']}; "
             "no GPU run._", "",
             "| variant | trainable | step time / LoRA r | peak memory / LoRA r |", "|---|---|---|---|"]
    for k in t:
        if k == "peft_lora" or k not in mem or "peft_lora" not in mem:
            continue
        lines.append(f"| {UNET_LABELS.get(k, k)} | {mem[k]['trainable']:,} | **{_ratio(t[k], t['peft_lora'])}** | "
                     f"{_ratio(mem[k]['peak_kib'], mem['peft_lora']['peak_kib'])} |")
    return "\n".join(lines)


RENDERERS = {"layers": layers_table, "unet": unet_table, "layers_sdxl": layers_sdxl_table,
             "unet_sdxl": unet_sdxl_table}


def render(results: dict) -> dict[str, str]:
    """{section name: markdown} for every section the results file holds."""
    tables = {name: fn(results[name]) for name, fn in RENDERERS.items() if name in results}
    if "unet" in results:
        tables["summary"] = summary_table(results)
    return tables


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- bench:{name} -->\n)(.*?)\n?(<!-- /bench:{name} -->)", re.S)


def replace_blocks(text: str, tables: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with every marked block replaced; also the names whose block differed."""
    changed = []
    for name, table in tables.items():
        pattern = _block(name)
        match = pattern.search(text)
        if match is None:
            continue
        if match.group(2) != table:
            changed.append(name)
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(3), text, count=1)
    return text, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, nargs="*", metavar="MARKDOWN",
                       help="replace the marked blocks in these files (default: README.md, docs/benchmarks.md)")
    group.add_argument("--check", type=Path, nargs="*", metavar="MARKDOWN",
                       help="exit 1 when a block in these files is stale or a table has a block in none of them")
    args = ap.parse_args(argv)
    if not args.results.is_file():
        print(f"error: {args.results} does not exist; run python benchmarks/bench_hra.py first", file=sys.stderr)
        return 2
    tables = render(json.loads(args.results.read_text()))
    if args.write is None and args.check is None:
        for name, table in tables.items():
            print(f"<!-- bench:{name} -->\n{table}\n<!-- /bench:{name} -->\n")
        return 0
    targets = (args.write if args.write is not None else args.check) or list(TARGETS)
    placed, stale, updates = set(), [], {}
    for target in targets:
        text = target.read_text()
        placed |= {n for n in tables if _block(n).search(text)}
        new, changed = replace_blocks(text, tables)
        stale += [f"{target}: {name}" for name in changed]
        updates[target] = (new, changed)
    missing = [n for n in tables if n not in placed]
    if args.check is not None:
        if stale or missing:
            print(f"benchmark blocks differ from {args.results}: {stale + [f'{n} (no block)' for n in missing]} "
                  f"(run python benchmarks/render_tables.py --write {' '.join(map(str, targets))})", file=sys.stderr)
            return 1
        return 0
    for target, (new, changed) in updates.items():
        target.write_text(new)
        print(f"{target}: updated {changed or 'nothing (already current)'}")
    if missing:
        print(f"no block for {missing} in {', '.join(map(str, targets))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
