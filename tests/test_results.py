"""The committed frontier results (eval/results/frontier-*.json) are what the protocol promises and what the rule
picks: CI never reruns them, so it checks them. Every method's operating point is the rule's choice among its
committed points, interior to its grid, scored at three or more step counts, with every seed; the .md beside each
JSON is its table."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from hra_diffusion.compare.report import format_table
from hra_diffusion.compare.selection import RULES, choose, interior

RESULTS = sorted((Path(__file__).resolve().parent.parent / "eval" / "results").glob("frontier-*.json"))


def test_there_are_results_for_both_tasks():
    tasks = {json.loads(p.read_text())["task"] for p in RESULTS}
    assert tasks == {"dreambooth", "control"}


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_each_operating_point_is_the_rules_choice_interior_and_seeded(path):
    doc = json.loads(path.read_text())
    rule = RULES[doc["task"]]
    assert doc["rule"] == rule.text.format(floor=doc["config"]["floor_points"] * 100)
    floor = doc["rule_floor"]["floor"]
    assert math.isclose(floor, doc["rule_floor"]["base"] - doc["config"]["floor_points"])
    for name, m in doc["methods"].items():
        spacing = m["grid_spacing_decades"]
        points = [{**p, "k": round(math.log10(p["lr_factor"]) / spacing)} for p in m["points"]]
        assert len({p["steps"] for p in points}) >= 3, name
        op = choose(points, floor, rule)
        assert (op["lr"], op["steps"]) == (m["operating_point"]["lr"], m["operating_point"]["steps"]), name
        assert interior(points, op, floor, rule) and m["operating_point"]["interior"], name
        seeds = m["seeds"]
        assert [s["seed"] for s in seeds] == doc["config"]["seeds"] and len(seeds) >= 3, name
        assert all(s["metrics"] for s in seeds), name
        gain = [s["metrics"][rule.maximise] for s in seeds]
        assert math.isclose(m["aggregate"][rule.maximise]["mean"], statistics.fmean(gain)), name


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_the_markdown_beside_each_result_is_its_table(path):
    doc = json.loads(path.read_text())
    assert format_table(doc) in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").is_file()
