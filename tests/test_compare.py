"""The comparison (eval/compare.py, hra_diffusion.compare): the selection rule and Pareto sets, the grid that widens
until its best rate is interior and then trains every seed there, the prompt sets, budgets, trainer configs read
through the library, and (slow) a two-step run of the whole protocol on the tiny world. The committed results'
figures are checked in test_results.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from hra_diffusion.compare import frontier, runs, selection
from hra_diffusion.compare.config import METHODS, CompareConfig, lr_factor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "eval"))

import compare  # noqa: E402

RULE = selection.RULES["dreambooth"]


def _p(k: int, steps: int, gain: float, keep: float) -> dict:
    return {"k": k, "steps": steps, "metrics": {RULE.maximise: gain, RULE.keep: keep}}


def test_rule_prefers_points_above_the_floor_then_the_gain():
    floor = 0.6
    best_above = _p(0, 400, 0.3, 0.65)
    points = [_p(-1, 200, 0.0, 0.9), best_above, _p(1, 800, 0.9, 0.3), _p(2, 800, 0.95, 0.59)]
    assert selection.choose(points, floor, RULE) is best_above  # more gain below the floor never wins
    below = [_p(1, 800, 0.9, 0.3), _p(2, 800, 0.1, 0.55)]
    assert selection.choose(below, floor, RULE)["k"] == 2  # below the floor: the one closest to it
    assert selection.point_key(None, floor, RULE) < selection.point_key({RULE.keep: 0.0}, floor, RULE)  # diverged last
    ties = [_p(1, 800, 0.3, 0.7), _p(0, 400, 0.3, 0.7)]
    assert selection.choose(ties, floor, RULE)["k"] == 0  # ties: fewer steps, then the lower rate
    front = selection.pareto(points, RULE.keep, RULE.maximise)
    assert [p["k"] for p in front] == [2, 0, -1]  # each beats the others on one axis; k 1 (0.9 / 0.3) is beaten by 2


def test_config_grid_and_snapshots():
    cfg = CompareConfig()
    assert cfg.start_grid("hra") == [-2, -1, 0, 1, 2] and cfg.start_grid("boft") == [-1, 0, 1]
    assert lr_factor(0.5, -2) == 0.1 and lr_factor(0.5, 1) == 3.16228 and lr_factor(1.0, -1) == 0.1
    assert cfg.snapshot_every() == 200 and CompareConfig(eval_at=[300]).snapshot_every() is None
    assert CompareConfig(eval_at=[800, 200, 500]).eval_at == [200, 500, 800]
    for bad in (dict(methods=["nope"]), dict(lr_points=4), dict(eval_at=[]), dict(seeds=[1, 1]), dict(floor_points=1.5),
                dict(max_lr_points=3), dict(lr_centre=0.0)):
        with pytest.raises(ValueError):
            CompareConfig(**bad)
    assert set(METHODS) == {"hra", "hra_orth", "hra_gs", "lora", "oft", "boft"}


def test_prompt_sets_keep_test_prompts_out_of_choosing():
    from hra_diffusion.tiny import data

    sets = data.frontier_prompts()
    val = {p for ps in sets["val"].values() for p in ps}
    test = {p for ps in sets["test"].values() for p in ps}
    assert val and test and not val & test
    assert not val & set(data.heldout_subject_prompts())  # choosing never sees a showroom prompt either
    assert all("qwe" in p for p in sets["val"]["context"] + sets["test"]["context"])
    assert not any(" in the " in p for p in sets["val"]["context"] + sets["test"]["context"])  # positions apart
    assert all(" in the " in p for p in sets["val"]["position"] + sets["test"]["position"])
    photos = {data.subject_caption(s) for s in data.subject_scenes(split="train")}
    assert not photos & (val | test)  # new contexts: no training caption is asked again


class _FakeTask:
    """A task whose points score by a formula: the gain peaks at k = 3 (the start grid's edge is 2), and the class
    prompt stays above a floor of 0.6 up to k = 5."""

    def evaluate(self, adapter, folder, split, argv):
        k, steps = int(Path(adapter).parts[-2]), int(Path(adapter).parts[-1])
        seed = int(argv[argv.index("--seed") + 1])
        gain = max(0.0, 0.5 - 0.1 * abs(k - 3)) * steps / 800 + 0.01 * seed
        keep = 0.85 - 0.05 * k
        return {"metrics": {RULE.maximise: gain, RULE.keep: keep, "split": {"val": 0, "test": 1}[split]}}


def test_grid_widens_until_the_best_rate_is_interior_then_every_seed_trains_there(monkeypatch, tmp_path):
    cfg = CompareConfig(methods=["hra"], output_dir=str(tmp_path), eval_at=[200, 400, 800], seeds=[0, 1, 2])
    trained = []

    def fake_train(cfg, method, sizes, seed, factor, rates):
        k = round(__import__("math").log10(factor) / cfg.spacing(method))
        trained.append((k, seed))
        return {"argv": ["--seed", str(seed)], "folder": str(tmp_path / f"{k}"), "diverged": None,
                "step_seconds_median": 0.1, "peak_rss_mib": 1.0, "trainable_parameters": {"unet": 8}}

    monkeypatch.setattr(frontier, "train_run", fake_train)
    monkeypatch.setattr(frontier, "adapter_at", lambda stats, step, last: None if stats["diverged"] else
                        Path(stats["folder"]) / str(step))
    got = frontier._method_frontier(cfg, _FakeTask(), "hra", {}, {"learning_rate": 1e-3}, floor=0.6, rule=RULE)
    assert [g["k"] for g in got["grid"]] == [-2, -1, 0, 1, 2, 3, 4]  # widened twice: 3 was the edge, then 4
    op = got["operating_point"]
    assert op["interior"] and op["above_floor"] and op["steps"] == 800 and op["lr_factor"] == lr_factor(0.5, 3)
    assert [s for k, s in trained if k == 3] == [0, 1, 2] and all(s == 0 for k, s in trained if k != 3)
    assert [s["metrics"]["split"] for s in got["seeds"]] == [1, 1, 1]  # the seeds are scored on the test prompts
    assert got["aggregate"][RULE.maximise]["n"] == 3
    assert len(got["points"]) == 7 * 3 and {p["steps"] for p in got["points"]} == {200, 400, 800}
    front = [(p["metrics"][RULE.keep], p["metrics"][RULE.maximise]) for p in got["pareto"]]
    assert front and all(not (a >= x and b >= y and (a, b) != (x, y)) for x, y in front for a, b in front)


def test_the_report_says_how_runs_shared_the_machine():
    """Step times compare only at equal sharing: the .md names each method's threads and load where runs record
    them, and says nothing for results made before they did (the committed tables stay as they are)."""
    from hra_diffusion.compare.report import _sharing_line

    old = {"methods": {"hra": {"label": "HRA r=8", "train_stats": [{"step_seconds_median": 1.0}]}}}
    assert _sharing_line(old) is None
    runs = [{"torch_threads": 1, "cpus": 2, "load_average_15min": 2.1},
            {"torch_threads": 2, "cpus": 2, "load_average_15min": 1.3}]
    new = {"methods": {"hra": {"label": "HRA r=8", "train_stats": runs},
                       "lora": {"label": "LoRA", "train_stats": [{"torch_threads": 2, "cpus": 2}]}}}
    line = _sharing_line(new)
    assert "HRA r=8: torch threads 1/2, CPUs 2, load 1.3-2.1" in line and "LoRA: torch threads 2, CPUs 2." in line


def test_budgets_match_hra_and_configs_are_read_through_the_library(tmp_path, tiny_random_sd_dir,
                                                                     generated_subject_dir):
    """--budget match sizes each baseline to HRA r=8's count on the task's targets; fixed keeps METHODS' sizes; the
    trainer's config is read with hra_diffusion.training.parse_task_config, never through train/."""
    from diffusers import UNet2DConditionModel

    from hra_diffusion.training import ControlConfig, DreamBoothConfig

    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]
    args = ["--output_dir", str(tmp_path), "--train_args",
            f"--pretrained_model {tiny_random_sd_dir} --subject_file {generated_subject_dir / 'subject.json'} "
            f"--target_modules [{','.join(targets)}]", "--methods", "hra,lora,oft,hra_r4"]
    matched = runs.match_budgets(compare.parse_args(args))
    fixed = runs.match_budgets(compare.parse_args([*args, "--budget", "fixed"]))
    layers = [m for n, m in UNet2DConditionModel.from_pretrained(tiny_random_sd_dir, subfolder="unet").named_modules()
              if any(n.endswith("." + t) for t in targets)]
    hra = matched["hra"]["trainable"]
    assert hra == sum(8 * m.in_features for m in layers)
    assert matched["hra_r4"]["trainable"] == hra // 2  # a variant keeps its own size
    per_rank = sum(m.in_features + m.out_features for m in layers)
    r = int(matched["lora"]["args"][-1])
    assert all(abs(r * per_rank - hra) <= abs(k * per_rank - hra) for k in range(1, 65))
    assert fixed["lora"]["args"] == METHODS["lora"] and fixed["lora"]["trainable"] == 4 * per_rank
    assert abs(matched["oft"]["trainable"] - hra) <= abs(fixed["oft"]["trainable"] - hra)
    assert runs.label("lora", matched["lora"]["args"]) == f"LoRA r={r} (PEFT)"
    argv = runs.train_argv(compare.parse_args(args), "lora", tmp_path / "lora", {m: b["args"] for m, b in matched.items()},
                           factor=2.0, rates={"learning_rate": 1e-3})
    assert argv[argv.index("--adapter"):][:4] == ["--adapter", "lora", "--r", str(r)]
    assert argv.index("--adapter") > argv.index("--target_modules")  # the matched size wins over train_args
    assert argv[argv.index("--learning_rate") + 1] == "0.002" and "--adapter_snapshot_steps" in argv

    path = list(sys.path)
    cfg = compare.parse_args(["--task", "control", "--output_dir", str(tmp_path), "--eval_at", "3"])
    tcfg = runs.trainer_config(cfg, "lora", tmp_path / "lora" / "train")
    assert sys.path == path and type(tcfg) is ControlConfig and tcfg.adapter == "lora" and tcfg.max_train_steps == 3
    assert tcfg.train_data_dir == "assets/tiny-data/control/train" and not tcfg.showroom_f1
    db = runs.trainer_config(compare.parse_args(["--output_dir", str(tmp_path)]), "hra")
    assert type(db) is DreamBoothConfig and db.class_data_dir == "assets/tiny-data/subject/class"
    assert not db.train_text_encoder and not db.showroom_rates  # UNet adapters compared alone; its own scoring
    rates = runs.recipe_rates(compare.parse_args(["--task", "control", "--output_dir", str(tmp_path), "--lr_centre", "3e-3"]))
    assert rates == {"learning_rate": 3e-3, "encoder_learning_rate": 3e-3}  # the other rates follow the centre


def test_a_subject_without_the_checker_is_refused_before_training(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    from hra_diffusion.compare.subject import subject_setup

    cfg = compare.parse_args(["--output_dir", str(tmp_path), "--train_args",
                              f"--pretrained_model {tiny_random_sd_dir} --subject_file "
                              f"{generated_subject_dir / 'subject.json'}"])
    with pytest.raises(ValueError, match="subject checker"):
        subject_setup(cfg)


def test_reuse_keeps_but_reports_what_other_code_made(tmp_path, monkeypatch):
    """--reuse does not redo a run or an evaluation made by another code version (or one that recorded none), but
    names it, so the results can say so."""
    assert len(runs.code_version()) == 12 and runs.code_version() == runs.code_version()
    cfg = CompareConfig(methods=["hra"], output_dir=str(tmp_path), reuse=True)
    monkeypatch.setattr(runs, "REUSED_OTHER_CODE", {})
    monkeypatch.setattr(runs, "code_version", lambda: "old")
    path = tmp_path / "eval.json"
    assert runs.cached(cfg, path, {"a": 1}, lambda: {"x": 1}) == {"x": 1}
    assert runs.cached(cfg, path, {"a": 1}, lambda: {"x": 2}) == {"x": 1} and runs.REUSED_OTHER_CODE == {}
    monkeypatch.setattr(runs, "code_version", lambda: "new")
    assert runs.cached(cfg, path, {"a": 1}, lambda: {"x": 3}) == {"x": 1}
    assert runs.cached(cfg, path, {"a": 2}, lambda: {"x": 4}) == {"x": 4}  # other settings: redone
    assert runs.REUSED_OTHER_CODE == {str(path): "old"}

    rates = {"learning_rate": 1e-3}
    folder = runs.run_dir(cfg, "hra", 1.0, 0)  # a finished run from before code versions were recorded
    (folder / "train" / "logs").mkdir(parents=True)
    (folder / "train" / "adapter").mkdir()
    (folder / "train" / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "train" / "logs" / "train_stats.json").write_text('{"steps": 800}')
    argv = runs.train_argv(cfg, "hra", folder / "train", {}, 0, 1.0, rates)
    (folder / "compare_argv.json").write_text(json.dumps(argv))
    stats = runs.train_run(cfg, "hra", {}, 0, 1.0, rates)
    assert stats["steps"] == 800 and runs.REUSED_OTHER_CODE[str(folder)] is None


@pytest.mark.slow
def test_the_whole_protocol_runs_on_the_tiny_world(tmp_path, monkeypatch):
    """Two scored step counts, three rates, two seeds, a few images: the files the results page promises, the rule
    in them, the plot, and --reuse redoing nothing."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "fr"
    argv = ["--methods", "hra", "--eval_at", "2,4", "--lr_points", "3", "--max_lr_points", "3", "--seeds", "0,1",
            "--val_images", "1", "--test_images", "1", "--eval_steps", "2", "--output_dir", str(out)]
    result = compare.main(compare.parse_args(argv))
    doc = json.loads((out / "frontier-dreambooth.json").read_text())
    assert doc["rule"].startswith("Each method's operating point") and "base model's rate - 15 points" in doc["rule"]
    m = doc["methods"]["hra"]
    assert {(p["lr"], p["steps"]) for p in m["points"]} == {(2e-3 * f, s) for f in (0.316228, 1, 3.16228) for s in (2, 4)}
    assert {"lr", "steps"} <= set(m["operating_point"]) and [s["seed"] for s in m["seeds"]] == [0, 1]
    keys = {"subject_rate", "subject_in_context_rate", "class_plain_rate", "class_striped_rate", "position_rate",
            "dino", "clip_i", "clip_t"}
    assert keys <= set(m["points"][0]["metrics"]) and keys <= set(m["seeds"][0]["metrics"])
    assert (out / "frontier-dreambooth.png").stat().st_size > 10_000 and "| HRA r=8 (ours) |" in (
        out / "frontier-dreambooth.md").read_text()
    sharing = r"HRA r=8 \(ours\): torch threads [\d/]+, CPUs \d+"  # how the runs shared the machine, recorded
    assert re.search(sharing, (out / "frontier-dreambooth.md").read_text())
    assert all(s["cpus"] >= 1 for s in m["train_stats"])
    assert doc["references"]["test"]["real"]["metrics"]["subject_rate"] == 1.0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".png", ".safetensors")
              and not p.name.startswith("frontier-")}
    again = compare.main(compare.parse_args([*argv, "--reuse"]))
    assert again["methods"]["hra"]["operating_point"] == result["methods"]["hra"]["operating_point"]
    assert doc["code"] == again["code"] == runs.code_version() and again["reused_other_code"] == {}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing trained or generated again


def test_table_says_what_else_a_method_trained_beside_the_unet():
    """The trainable column is the UNet's count (the matched budget) plus, in brackets, the text or condition
    encoder the runs also trained, read from their train_stats."""
    from hra_diffusion.compare.report import _trainable

    stats = [{"trainable_parameters": {"unet": 446464, "text_encoder": 6144}}]
    assert _trainable({"trainable": 446464, "train_stats": stats}) == "446,464 (+6,144 text encoder)"
    stats = [{"trainable_parameters": {"unet": 223232, "condition_encoder": 25904}}]
    assert _trainable({"trainable": 223232, "train_stats": stats}) == "223,232 (+25,904 condition encoder)"
    assert _trainable({"trainable": 10, "train_stats": [{"trainable_parameters": {"unet": 10}}]}) == "10"


def test_results_say_what_was_reused_from_other_code(tmp_path):
    from hra_diffusion.compare.report import write_report

    result = json.loads((REPO / "eval" / "results" / "frontier-dreambooth.json").read_text())
    result.update(code="abc", reused_other_code={"hra/lr1-seed0": None, "hra/lr1-seed0/val/step-000200/eval.json": "f00"})
    write_report(result, tmp_path)
    md = (tmp_path / "frontier-dreambooth.md").read_text()
    assert "Reused by --reuse from other code: 2 runs or evaluations (made by code f00, not recorded; this run: abc)" in md
