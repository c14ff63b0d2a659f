"""The frontier protocol: per method, a learning-rate grid (widened until the best rate is interior) × the scored
step counts on the validation prompts; the operating point chosen by the task's rule; three seeds there on the
held-out test prompts; the table, the Pareto sets and the plots."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import METHODS, CompareConfig, lr_factor
from .runs import (
    adapter_at,
    cached,
    label,
    match_budgets,
    prepare_class_images,
    recipe_rates,
    run_dir,
    train_run,
)

__all__ = ["Rule", "RULES", "point_key", "choose", "pareto", "run_frontier", "EVAL_VERSION"]

EVAL_VERSION = 1  # bumped when what a point's evaluation computes changes: --reuse then redoes the evaluations


@dataclass(frozen=True)
class Rule:
    """How a task's operating point is chosen: the highest ``maximise`` among the points whose ``keep`` is at least
    the base model's minus ``CompareConfig.floor_points``."""

    maximise: str
    keep: str
    text: str


RULES = {
    "dreambooth": Rule(
        "subject_in_context_rate", "class_plain_rate",
        "Each method's operating point is, among its (learning rate, steps) points on the validation prompts, the "
        "one with the highest subject-in-context rate (the striped subject drawn with the asked background and "
        "size) among the points whose class prompt is still drawn plain in at least (the base model's rate - "
        "{floor:.0f} points) of samples; ties: the higher class-plain rate, then fewer steps, then the lower rate. "
        "Points below the floor rank below every point above it, by how far below they are. A rate is as good as "
        "its best point; the grid is widened on a side until the best rate's neighbours on both sides are "
        "measured and rank lower. That rate and step count is then trained with every seed and scored on the "
        "held-out test prompts."),
    "control": Rule(
        "canny_f1", "prompt_following",
        "Each method's operating point is, among its (learning rate, steps) points on the validation pairs, the one "
        "with the highest Canny-edge F1 (pixel-wise, ControlNet++'s) among the points whose prompt following (the "
        "asked colour and background drawn) is at least (the base model's rate - {floor:.0f} points); ties: the "
        "higher prompt following, then fewer steps, then the lower rate. Points below the floor rank below every "
        "point above it, by how far below they are. A rate is as good as its best point; the grid is widened on a "
        "side until the best rate's neighbours on both sides are measured and rank lower. That rate and step count "
        "is then trained with every seed and scored on the held-out test pairs."),
}


def point_key(metrics: dict[str, float] | None, floor: float, rule: Rule) -> tuple[float, float, float]:
    """The rule's order of one point (bigger is better): above the floor first, then the maximised metric (below
    it: how far below), then the kept one. A diverged run (``metrics`` None) ranks last."""
    if metrics is None:
        return (-1.0, 0.0, 0.0)
    keep, gain = metrics.get(rule.keep, 0.0), metrics.get(rule.maximise, 0.0)
    ok = keep >= floor - 1e-9
    return (1.0, gain, keep) if ok else (0.0, keep - floor, keep)


def _full_key(p: dict, floor: float, rule: Rule) -> tuple:
    return (*point_key(p["metrics"], floor, rule), -p["steps"], -p["k"])


def choose(points: list[dict], floor: float, rule: Rule) -> dict:
    """The rule's best of ``points`` (each {"k", "steps", "metrics"})."""
    return max(points, key=lambda p: _full_key(p, floor, rule))


def pareto(points: list[dict], x: str, y: str) -> list[dict]:
    """The points no other point beats on both ``x`` and ``y`` (higher is better), sorted by ``x``."""
    got = [p for p in points if p["metrics"] and x in p["metrics"] and y in p["metrics"]]
    front = [p for p in got if not any(q["metrics"][x] >= p["metrics"][x] and q["metrics"][y] >= p["metrics"][y]
                                       and (q["metrics"][x], q["metrics"][y]) != (p["metrics"][x], p["metrics"][y])
                                       for q in got)]
    return sorted(front, key=lambda p: p["metrics"][x])


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
    per_k = {k: choose([p for p in points if p["k"] == k], floor, rule) for k in grid}
    interior = all(j in per_k and _full_key(per_k[j], floor, rule) < _full_key(op, floor, rule)
                   for j in (op["k"] - 1, op["k"] + 1))
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
          + ("" if interior else " (NOT interior: the grid reached max_lr_points)"), flush=True)
    return {
        "grid": [{"k": k, "lr_factor": lr_factor(spacing, k), "lr": rates["learning_rate"] * lr_factor(spacing, k)}
                 for k in grid],
        "grid_spacing_decades": spacing,
        "points": [{key: p[key] for key in ("lr", "lr_factor", "steps", "metrics", "diverged")} for p in points],
        "operating_point": {"lr": op["lr"], "lr_factor": op["lr_factor"], "steps": op["steps"],
                            "validation_metrics": op["metrics"], "above_floor": point_key(op["metrics"], floor, rule)[0] == 1.0,
                            "interior": interior},
        "pareto": [{"lr": p["lr"], "steps": p["steps"], "metrics": p["metrics"]}
                   for p in pareto(points, rule.keep, rule.maximise)],
        "seeds": seeds,
        "aggregate": aggregate([s["metrics"] for s in seeds if s["metrics"]]),
        "train_stats": [{k: s.get(k) for k in ("step_seconds_median", "peak_rss_mib", "cuda_peak_allocated_mib",
                                               "trainable_parameters") if s.get(k) is not None} for s in stats],
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
        "seconds": time.time() - started, "commit": _commit(),
    }
    write_report(result, out)
    return result
