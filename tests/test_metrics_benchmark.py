"""The DreamBooth benchmark protocol data and the benchmark script's planning and aggregation."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dreambooth_benchmark", REPO / "eval" / "dreambooth_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_protocol_is_the_dreambooth_dataset(bench):
    doc = bench.load_protocol(REPO / "eval" / "dreambooth_protocol.json")
    subjects = doc["subjects"]
    assert len(subjects) == 30 and len({s["name"] for s in subjects}) == 30
    assert sum(s["kind"] == "live" for s in subjects) == 9  # the cats and dogs
    assert {s["class"] for s in subjects if s["kind"] == "live"} == {"cat", "dog"}
    assert {s["name"]: s["class"] for s in subjects}["bear_plushie"] == "stuffed animal"
    assert len(doc["prompts"]["object"]) == 25 and len(doc["prompts"]["live"]) == 25
    assert doc["prompts"]["object"][:10] == doc["prompts"]["live"][:10]
    assert doc["prompts"]["object"][-5:] == doc["prompts"]["live"][-5:]
    assert doc["prompts"]["live"][13] == "a {identifier} {class} wearing a black top hat and a monocle"
    assert doc["prompts"]["object"][14] == "a {identifier} {class} floating in an ocean of milk"


def test_plan_and_trainer_command(bench, tmp_path):
    cfg = bench.parse_args(["--dataset_dir", str(tmp_path), "--subjects", "dog2,teapot", "--prompts", "0,24",
                            "--max_train_steps", "500", "--base_model", "/models/sd15", "--dry_run",
                            "--train_args", "--resolution 256"])
    items = bench.plan(cfg, bench.load_protocol(cfg.protocol))
    assert [i["subject"] for i in items] == ["dog2", "teapot"]
    assert items[0]["prompts"] == [(0, "a qwe dog in the jungle"), (24, "a cube shaped qwe dog")]
    assert items[1]["instance_prompt"] == "a photo of qwe teapot" and items[1]["class_prompt"] == "a photo of teapot"
    cmd = bench.train_command(cfg, items[0])
    assert cmd[:2] == ["accelerate", "launch"] and cmd[2].endswith("train/dreambooth_hra.py")
    for flag, value in (("--max_train_steps", "500"), ("--pretrained_model", "/models/sd15"),
                        ("--instance_data_dir", str(tmp_path / "dog2")), ("--resolution", "256")):
        assert cmd[cmd.index(flag) + 1] == value
    with pytest.raises(ValueError, match="unknown subject"):
        bench.plan(bench.parse_args(["--dataset_dir", ".", "--subjects", "unicorn", "--dry_run"]),
                   bench.load_protocol(cfg.protocol))
    with pytest.raises(FileNotFoundError, match="subject folder"):
        bench.plan(bench.parse_args(["--dataset_dir", str(tmp_path), "--subjects", "dog"]),
                   bench.load_protocol(cfg.protocol))


def test_aggregate_and_best_over_checkpoints(bench):
    rows = [
        {"subject": "dog", "kind": "live", "prompt_index": 0, "checkpoint": "step1", "dino": 0.2, "clip_t": 0.30},
        {"subject": "dog", "kind": "live", "prompt_index": 0, "checkpoint": "step2", "dino": 0.6, "clip_t": 0.20},
        {"subject": "can", "kind": "object", "prompt_index": 0, "checkpoint": "step1", "dino": 0.4, "clip_t": 0.25},
        {"subject": "can", "kind": "object", "prompt_index": 0, "checkpoint": "step2", "dino": 0.5, "clip_t": float("nan")},
    ]
    fixed = [r for r in rows if r["checkpoint"] == "step2"]
    table = {e["group"]: e for e in bench.aggregate(fixed, ["dino", "clip_t"])}
    assert table["all"]["dino"] == pytest.approx(0.55) and table["all"]["clip_t"] == pytest.approx(0.20)  # NaN dropped
    assert table["live"]["runs"] == 1 and table["objects"]["dino"] == pytest.approx(0.5)
    best = {r["subject"]: r["checkpoint"] for r in bench.best_over_checkpoints(rows[:3], ["dino", "clip_t"])}
    # dog: step1 -> 0.2/0.6 + 0.3/0.3 = 1.33, step2 -> 1 + 0.2/0.3 = 1.67
    assert best == {"dog": "step2", "can": "step1"}
    assert not math.isnan(table["all"]["clip_t"])
    text = bench.format_table(bench.aggregate(fixed, ["dino"]), ["dino"], "Fixed step 2")
    assert "| all" in text and "0.5500" in text
