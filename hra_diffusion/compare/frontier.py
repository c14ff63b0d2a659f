"""The frontier protocol: per method, a learning-rate grid (widened until the best rate is interior) × the scored
step counts on the validation prompts; the operating point chosen by the task's rule; three seeds there on the
held-out test prompts; the table, the Pareto sets and the plots."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import METHODS, CompareConfig, lr_factor
from .runs import (
    REUSED_OTHER_CODE,
    adapter_at,
    cached,
    code_version,
    label,
    match_budgets,
    prepare_class_images,
    recipe_rates,
    run_dir,
    train_run,
)
from .selection import RULES, Rule, choose, interior, pareto, point_key

__all__ = ["run_frontier", "aggregate", "EVAL_VERSION"]

EVAL_VERSION = 1  # bumped when what a point's evaluation computes changes: --reuse then redoes the evaluations


class _Task:
    """The task-specific half: its setup, one evaluation (cached), its references."""

    def __init__(self, cfg: CompareConfig) -> None:
        self.cfg = cfg
        if cfg.task == "dreambooth":
            from .subject import subject_setup

            self.setup = subject_setup(cfg)
            self.settings = self.setup.settings()
            prepare_class_images(cfg)
        else:
            from .control import control_setup

            self.pairs, self.settings = control_setup(cfg)

    def evaluate(self, adapter: Path, folder: Path, split: str, argv: list[str]) -> dict:
        settings = {"argv": argv, "setup": self.settings, "split": split, "version": EVAL_VERSION,
                    "adapter": str(adapter)}
        if self.cfg.task == "dreambooth":
            from .subject import evaluate_subject

            return cached(self.cfg, folder / "eval.json", settings,
                          lambda: evaluate_subject(self.cfg, self.setup, str(adapter), folder, split))
        from .control import evaluate_control

        return cached(self.cfg, folder / "eval.json", settings,
                      lambda: evaluate_control(self.cfg, self.settings, self.pairs[split], str(adapter), split))

    def references(self) -> dict[str, dict]:
        """{"val": {...}, "test": {...}}: the base (and real photos/images on test) per split."""
        if self.cfg.task == "dreambooth":
            from .subject import evaluate_subject_references

            return {s: evaluate_subject_references(self.cfg, self.setup, s) for s in ("val", "test")}
        from .control import evaluate_control_references

        refs = evaluate_control_references(self.cfg, self.settings, self.pairs)
        return {"val": {"base": refs["base_val"]}, "test": {"base": refs["base_test"], "real": refs["real"]}}


def _method_frontier(cfg: CompareConfig, task: _Task, method: str, sizes: dict, rates: dict, floor: float,
                     rule: Rule) -> dict[str, Any]:
    """One method's grid (widened until interior), its points, operating point, seeds and Pareto set."""
    spacing, seed0, last = cfg.spacing(method), cfg.seeds[0], cfg.eval_at[-1]
    runs: dict[int, dict] = {}
    points: list[dict] = []

    def measure(k: int) -> None:
        factor = lr_factor(spacing, k)
        stats = train_run(cfg, method, sizes, seed0, factor, rates)
        runs[k] = stats
        for step in cfg.eval_at:
            adapter = adapter_at(stats, step, last)
            metrics = None if adapter is None else task.evaluate(
                adapter, run_dir(cfg, method, factor, seed0) / "val" / f"step-{step:06d}", "val", stats["argv"])["metrics"]
            points.append({"k": k, "lr_factor": factor, "lr": rates["learning_rate"] * factor, "steps": step,
                           "metrics": metrics, "diverged": metrics is None})

    def best_k() -> int:
        return choose(points, floor, rule)["k"]

    grid = cfg.start_grid(method)
    for k in grid:
        measure(k)
    while True:
        b = best_k()
        side = -1 if b == min(grid) else 1 if b == max(grid) else 0
        if side == 0 or len(grid) >= cfg.max_lr_points:
            break
        k = b + side
        print(f"  {method}: best rate x{lr_factor(spacing, b):g} is at the grid's edge: adding x{lr_factor(spacing, k):g}",
              flush=True)
        grid.append(k)
        measure(k)
    grid.sort()
    op = choose(points, floor, rule)
    is_interior = interior(points, op, floor, rule)
    seeds, stats = [], []
    for seed in cfg.seeds:
        s = runs[op["k"]] if seed == seed0 else train_run(cfg, method, sizes, seed, op["lr_factor"], rates)
        adapter = adapter_at(s, op["steps"], last)
        metrics = None if adapter is None else task.evaluate(
            adapter, run_dir(cfg, method, op["lr_factor"], seed) / "test" / f"step-{op['steps']:06d}", "test",
            s["argv"])["metrics"]
        seeds.append({"seed": seed, "metrics": metrics, "diverged": metrics is None})
        if not s["diverged"]:
            stats.append(s)
    print(f"  {method}: operating point lr {op['lr']:.3g} (x{op['lr_factor']:g}), {op['steps']} steps"
          + ("" if is_interior else " (NOT interior: the grid reached max_lr_points)"), flush=True)
    return {
        "grid": [{"k": k, "lr_factor": lr_factor(spacing, k), "lr": rates["learning_rate"] * lr_factor(spacing, k)}
                 for k in grid],
        "grid_spacing_decades": spacing,
        "points": [{key: p[key] for key in ("lr", "lr_factor", "steps", "metrics", "diverged")} for p in points],
        "operating_point": {"lr": op["lr"], "lr_factor": op["lr_factor"], "steps": op["steps"],
                            "validation_metrics": op["metrics"], "above_floor": point_key(op["metrics"], floor, rule)[0] == 1.0,
                            "interior": is_interior},
        "pareto": [{"lr": p["lr"], "steps": p["steps"], "metrics": p["metrics"]}
                   for p in pareto(points, rule.keep, rule.maximise)],
        "seeds": seeds,
        "aggregate": aggregate([s["metrics"] for s in seeds if s["metrics"]]),
        "train_stats": [{k: s.get(k) for k in ("step_seconds_median", "peak_rss_mib", "cuda_peak_allocated_mib",
                                               "trainable_parameters", "torch_threads", "cpus",
                                               "load_average_15min") if s.get(k) is not None} for s in stats],
    }


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """{metric: {"mean", "std", "n"}} over the seeds' metrics (std: the sample standard deviation)."""
    out = {}
    for k in sorted({k for m in per_seed for k in m}):
        vals = [m[k] for m in per_seed if k in m]
        out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                  "n": len(vals)}
    return out


def _commit() -> str | None:
    """The repository's commit (what the runs were made with), if this is a git checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_frontier(cfg: CompareConfig) -> dict:
    """Run (or, with --reuse, continue) the whole protocol; writes frontier.json / .md / .png in the output folder."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .report import write_report

    diffusers_logging.disable_progress_bar()  # a long run's log: one line per run, not per pipeline load
    transformers_logging.disable_progress_bar()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    REUSED_OTHER_CODE.clear()
    task = _Task(cfg)
    rule = RULES[cfg.task]
    budgets = match_budgets(cfg)
    sizes = {m: b["args"] for m, b in budgets.items()}
    rates = recipe_rates(cfg)
    labels = {m: label(m, sizes[m]) for m in cfg.methods}
    print("methods: " + "; ".join(f"{labels[m]}: {b['trainable']:,} trainable" for m, b in budgets.items()), flush=True)
    references = task.references()
    base_keep = references["val"]["base"]["metrics"][rule.keep]
    floor = base_keep - cfg.floor_points
    print(f"rule floor: {rule.keep} >= {floor:.2f} (the base's {base_keep:.2f} - {cfg.floor_points:.2f})", flush=True)
    methods = {}
    for method in cfg.methods:
        methods[method] = {"label": labels[method], "trainable": budgets[method]["trainable"],
                           "budget_matched": method in METHODS and cfg.budget == "match",
                           **_method_frontier(cfg, task, method, sizes, rates, floor, rule)}
    result = {
        "rule": rule.text.format(floor=cfg.floor_points * 100),
        "rule_floor": {"metric": rule.keep, "base": base_keep, "floor": floor},
        "task": cfg.task, "config": asdict(cfg), "recipe_rates": rates, "setup": task.settings,
        "references": references, "methods": methods,
        "measured": "CPU (2 cores, shared), tiny world (assets/tiny-sd), stand-in DINO/CLIP; no GPU, no real weights",
        "seconds": time.time() - started, "commit": _commit(), "code": code_version(),
        "reused_other_code": {str(Path(k).relative_to(out)) if Path(k).is_relative_to(out) else k: v
                              for k, v in sorted(REUSED_OTHER_CODE.items())},
    }
    write_report(result, out)
    return result
