"""How the frontier picks: each task's rule (the metric maximised, the one kept above the base's floor), the rule's
order of points, the best point, and the Pareto set of two metrics. Pure functions on metric dicts."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Rule", "RULES", "point_key", "rule_order", "choose", "interior", "pareto"]


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


def rule_order(p: dict, floor: float, rule: Rule) -> tuple:
    return (*point_key(p["metrics"], floor, rule), -p["steps"], -p["k"])


def choose(points: list[dict], floor: float, rule: Rule) -> dict:
    """The rule's best of ``points`` (each {"k", "steps", "metrics"})."""
    return max(points, key=lambda p: rule_order(p, floor, rule))


def interior(points: list[dict], op: dict, floor: float, rule: Rule) -> bool:
    """Whether ``op`` (the rule's best of ``points``, each with its grid index "k") has both neighbouring rates
    measured and ranking lower, each by its own best point."""
    def best(k: int) -> dict | None:
        at = [p for p in points if p["k"] == k]
        return choose(at, floor, rule) if at else None

    return all((b := best(k)) is not None and rule_order(b, floor, rule) < rule_order(op, floor, rule)
               for k in (op["k"] - 1, op["k"] + 1))


def pareto(points: list[dict], x: str, y: str) -> list[dict]:
    """The points no other point beats on both ``x`` and ``y`` (higher is better), sorted by ``x``."""
    got = [p for p in points if p["metrics"] and x in p["metrics"] and y in p["metrics"]]
    front = [p for p in got if not any(q["metrics"][x] >= p["metrics"][x] and q["metrics"][y] >= p["metrics"][y]
                                       and (q["metrics"][x], q["metrics"][y]) != (p["metrics"][x], p["metrics"][y])
                                       for q in got)]
    return sorted(front, key=lambda p: p["metrics"][x])
