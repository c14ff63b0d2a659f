"""The frontier's report: frontier.json, a markdown table (operating points, their test metrics over the seeds,
the rule), and the plots (each method's Pareto set on the task's trade-off; DINO against CLIP-T)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

__all__ = ["write_report", "format_table", "where_measured", "plot_frontier", "COLUMNS"]

COLUMNS = {
    "dreambooth": [("subject_in_context_rate", "subject in context ↑"), ("subject_rate", "subject drawn ↑"),
                   ("class_plain_rate", "class prompt plain ↑"), ("class_striped_rate", "stripes leaking ↓"),
                   ("position_rate", "asked position ↑"), ("dino", "DINO ↑"), ("clip_i", "CLIP-I ↑"),
                   ("clip_t", "CLIP-T ↑")],
    "control": [("canny_f1", "Canny F1 ↑"), ("canny_f1_1px", "Canny F1, 1 px ↑"),
                ("prompt_following", "prompt followed ↑")],
}
PERCENT = {"subject_in_context_rate", "subject_rate", "class_plain_rate", "class_striped_rate", "position_rate",
           "position_subject_rate", "prompt_following"}
TRADEOFF = {"dreambooth": ("class_plain_rate", "subject_in_context_rate",
                           "class prompt still plain (prior kept) →", "subject drawn in the asked context →"),
            "control": ("prompt_following", "canny_f1", "prompt followed (colour and background) →",
                        "Canny-edge F1 with the condition →")}


def where_measured(device: str, base_model: str, task: str = "dreambooth") -> str:
    """One line naming the hardware and the base model the figures come from."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        hw = torch.cuda.get_device_name(0)
    else:
        hw = f"CPU only ({os.cpu_count()} cores, {platform.machine()}), no GPU"
    tiny = "tiny-sd" in base_model
    note = "; DINO/CLIP are the tiny world's stand-ins" if task == "dreambooth" else ""
    return f"{hw}; base {base_model}" + (f" (the tiny world: not real SD weights{note})" if tiny else "")


def _cell(key: str, stat: dict | float | None) -> str:
    if stat is None:
        return "n/a"
    if not isinstance(stat, dict):
        stat = {"mean": stat, "std": None}
    scale, fmt = (100, "{:.0f}") if key in PERCENT else (1, "{:.3f}")
    text = fmt.format(stat["mean"] * scale)
    if stat.get("std") is not None:
        text += " ± " + fmt.format(stat["std"] * scale)
    return text + ("%" if key in PERCENT else "")


def format_table(result: dict) -> str:
    """Operating points and their held-out metrics (mean ± std over the seeds), the references first."""
    task = result["task"]
    methods, refs = result["methods"], result["references"]["test"]
    cols = [(k, n) for k, n in COLUMNS[task] if any(k in m["aggregate"] for m in methods.values())]
    head = ["method", "trainable", "lr", "steps", "s / step", *(n for _, n in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {"base": "*base model*" + (", class prompt" if task == "dreambooth" else ", no condition"),
             "real": "*real held-out photos*" if task == "dreambooth" else "*real target images*"}
    for ref, r in refs.items():
        lines.append("| " + " | ".join([names[ref], "", "", "", "", *(_cell(k, r["metrics"].get(k)) for k, _ in cols)])
                     + " |")
    for m in methods.values():
        op = m["operating_point"]
        secs = [s["step_seconds_median"] for s in m["train_stats"] if s.get("step_seconds_median")]
        lr = f"{op['lr']:.2g}" + ("" if op["interior"] else " (edge)") + ("" if op["above_floor"] else " (below floor)")
        lines.append("| " + " | ".join([m["label"], _trainable(m), lr, str(op["steps"]),
                                        f"{statistics.median(secs):.2f}" if secs else "n/a",
                                        *(_cell(k, m["aggregate"].get(k)) for k, _ in cols)]) + " |")
    return "\n".join(lines)


def _trainable(m: dict) -> str:
    """The UNet's trainable count (the budget matched), and what else the runs trained (text / condition encoder)."""
    parts = next((s["trainable_parameters"] for s in m.get("train_stats", [])
                  if isinstance(s.get("trainable_parameters"), dict)), {})
    extra = ", ".join(f"+{n:,} {name.replace('_', ' ')}" for name, n in parts.items() if name != "unet" and n)
    return f"{m['trainable']:,}" + (f" ({extra})" if extra else "")


def _grid_line(m: dict) -> str:
    rates = ", ".join(f"{g['lr']:.2g}" for g in m["grid"])
    return f"{m['label']}: {len(m['grid'])} rates ({rates}; {m['grid_spacing_decades']:g} decade apart)"


def write_report(result: dict, out: Path) -> None:
    """frontier.json, frontier.md and the plots in ``out``; prints the table."""
    from ..utils import default_device

    task = result["task"]
    result["measured"] = where_measured(default_device(result["config"].get("device")),
                                        result["setup"].get("base_model", ""), task)
    table = format_table(result)
    seeds = result["config"]["seeds"]
    lines = [f"### {task}: each method's operating point on its learning-rate × steps frontier; "
             f"held-out test prompts, {len(seeds)} seeds, mean ± std", "", table, "",
             f"- Rule (fixed before the run): {result['rule']}",
             f"- Floor: {result['rule_floor']['metric']} ≥ {result['rule_floor']['floor']:.2f} (base model on the "
             f"validation prompts: {result['rule_floor']['base']:.2f}).",
             "- Grids: " + "; ".join(_grid_line(m) for m in result["methods"].values()) + ".",
             f"- Steps scored per rate: {', '.join(map(str, result['config']['eval_at']))}.",
             f"- Measured on: {result['measured']}. s / step: the median over the seeds' runs on a shared machine.",
             "- '(edge)': the best rate is at the grid's edge (max_lr_points reached); '(below floor)': no point "
             "met the floor."]
    sharing = _sharing_line(result)
    if sharing:
        lines.append(sharing)
    stale = result.get("reused_other_code") or {}
    if stale:
        made = sorted({v or "not recorded" for v in stale.values()})
        lines.append(f"- Reused by --reuse from other code: {len(stale)} runs or evaluations (made by code "
                     f"{', '.join(made)}; this run: {result['code']}), listed in the JSON's reused_other_code.")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    (out / f"frontier-{task}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"frontier-{task}.md").write_text(report)
    try:
        for path in plot_frontier(result, out):
            print(f"wrote {path}")
    except ImportError:
        print("plots not drawn: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)


def _sharing_line(result: dict) -> str | None:
    """How each method's runs shared the machine (runs that record it): step times compare only at equal sharing."""
    parts = []
    for m in result["methods"].values():
        runs = [s for s in m.get("train_stats", []) if s.get("torch_threads")]
        if runs:
            threads = "/".join(str(t) for t in sorted({s["torch_threads"] for s in runs}))
            loads = [s["load_average_15min"] for s in runs if s.get("load_average_15min") is not None]
            load = f", load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
            parts.append(f"{m['label']}: torch threads {threads}, CPUs {runs[0].get('cpus')}{load}")
    if not parts:
        return None
    return ("- Step times were measured with (torch threads per run; the 15-minute load average at each run's end, "
            "above the CPU count means runs shared the machine and ran slower): " + "; ".join(parts) + ".")


def _short(lr: float, steps: int) -> str:
    return f"{lr:.0e}".replace("e-0", "e-") + f"/{steps}"


def _panel(ax, result: dict, x: str, y: str, xlabel: str, ylabel: str, floor: float | None = None) -> None:
    """One trade-off panel: each method's Pareto set (line, points labelled lr/steps), its operating point ringed,
    the base model as a grey star."""
    import matplotlib.pyplot as plt

    from .selection import pareto

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(result["methods"].values()):
        pts = [p for p in m["points"] if p["metrics"] and x in p["metrics"] and y in p["metrics"]]
        front = pareto([{**p, "k": 0} for p in pts], x, y)
        c = colours[i % len(colours)]
        ax.scatter([p["metrics"][x] for p in pts], [p["metrics"][y] for p in pts], s=10, color=c, alpha=0.25)
        ax.plot([p["metrics"][x] for p in front], [p["metrics"][y] for p in front], "-o", color=c, ms=4,
                label=m["label"])
        for p in front:
            ax.annotate(_short(p["lr"], p["steps"]), (p["metrics"][x], p["metrics"][y]), textcoords="offset points",
                        xytext=(3, 3), fontsize=6, color=c)
        op = m["operating_point"]["validation_metrics"] or {}
        if x in op and y in op:
            ax.scatter([op[x]], [op[y]], s=120, facecolors="none", edgecolors=c, linewidths=1.5)
    base = result["references"]["val"]["base"]["metrics"]
    if x in base and y in base:
        ax.scatter([base[x]], [base[y]], marker="*", s=160, color="grey", zorder=3)
        ax.annotate("base", (base[x], base[y]), textcoords="offset points", xytext=(5, -8), fontsize=8, color="dimgrey")
    if floor is not None:
        ax.axvline(floor, ls="--", color="grey", lw=0.8)
        ax.annotate("floor", (floor, ax.get_ylim()[1]), textcoords="offset points", xytext=(2, -10), fontsize=7,
                    color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_frontier(result: dict, out: Path) -> list[Path]:
    """frontier-<task>.png: the rule's trade-off (and, for DreamBooth, DINO against CLIP-T), validation prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = result["task"]
    x, y, xl, yl = TRADEOFF[task]
    panels = 2 if task == "dreambooth" else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 5.0), dpi=110, squeeze=False)
    _panel(axes[0][0], result, x, y, xl, yl, floor=result["rule_floor"]["floor"])
    axes[0][0].set_title("Pareto set per method (points: lr/steps; ring: operating point)", fontsize=9)
    if panels == 2:
        _panel(axes[0][1], result, "clip_t", "dino", "CLIP-T (prompt fidelity) →", "DINO (subject fidelity) →")
        axes[0][1].set_title("DINO against CLIP-T, Pareto set per method", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{task}: validation prompts; {result['measured']}", fontsize=8)
    fig.tight_layout()
    path = out / f"frontier-{task}.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]
