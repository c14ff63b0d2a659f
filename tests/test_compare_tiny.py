"""eval/compare.py on the tiny world: the learning-rate sweep on the validation split, seeds aggregated into
mean ± std, the reference rows, the subject checker's rates, the tiny-world extractors chosen without flags,
and the trade-off plot. A reduced run (two training steps); the full table's figures are in eval/results/."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "eval"))

import compare  # noqa: E402


def test_validation_split_never_uses_a_test_prompt():
    from hra_diffusion.tiny import data

    test = set(data.heldout_subject_prompts()) | set(data.class_check_prompts())
    val = data.sweep_subject_prompts() + data.sweep_class_prompts()
    assert val and not test & set(val)
    assert all("qwe" in p for p in data.sweep_subject_prompts()) and not any("qwe" in p for p in data.sweep_class_prompts())


def test_aggregate_and_cells():
    agg = compare.aggregate([{"dino": 0.5, "subject_rate": 0.25}, {"dino": 0.7, "subject_rate": 0.75}, {"dino": 0.6}])
    assert agg["dino"] == {"mean": pytest.approx(0.6), "std": pytest.approx(statistics.stdev([0.5, 0.7, 0.6])), "n": 3}
    assert agg["subject_rate"]["n"] == 2
    assert compare._cell("dino", agg["dino"]) == "0.600 ± 0.100"
    assert compare._cell("subject_rate", agg["subject_rate"]) == "50 ± 35%"
    assert compare._cell("dino", {"mean": 0.5, "std": None}) == "0.500" and compare._cell("dino", None) == "n/a"
    assert compare.sweep_score("dreambooth", {"subject_in_context_rate": 0.5, "class_plain_rate": 1.0}) == 0.75
    assert compare.sweep_score("dreambooth", {"dino": 0.8, "clip_t": 0.4, "subject_in_context_rate": 0.5,
                                              "class_plain_rate": 1.0, "clip_i": 0.0}) == pytest.approx(0.675)
    with pytest.raises(ValueError, match="no sweep metric"):
        compare.sweep_score("dreambooth", {"clip_i": 0.5})


def test_methods_cover_the_papers_variants():
    budgets = {m: compare.label(m, compare.METHODS[m]) for m in compare.METHODS}
    assert budgets["hra"] == "HRA r=8 (ours)" and budgets["hra_gs"] == "HRA r=8, GS (ours)"
    assert budgets["hra_orth"] == f"HRA r=8, λ={compare.ORTH_LAMBDA} (ours)" and float(compare.ORTH_LAMBDA) > 0
    assert {compare.adapter_kind(m) for m in compare.METHODS} == {"hra", "lora", "oft", "boft"}
    with pytest.raises(ValueError, match="lr_factors"):
        compare.CompareConfig(lr_factors=[1.0, 1.0])
    with pytest.raises(ValueError, match="seeds"):
        compare.CompareConfig(seeds=[])


@pytest.mark.slow
def test_tiny_world_comparison_sweeps_rates_and_aggregates_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's relative paths
    out = tmp_path / "cmp"
    cfg = compare.parse_args(["--methods", "hra", "--seeds", "0,1", "--lr_factors", "1,2", "--max_train_steps", "2",
                              "--num_images", "1", "--eval_steps", "2", "--output_dir", str(out),
                              "--train_args", "--num_class_images 4"])
    result = compare.main(cfg)
    row, sweep = result["rows"]["hra"], result["sweep"]["hra"]
    # the sweep ran both rates on the validation split with the first seed and kept the best (ties: the recipe's)
    assert set(sweep["scores"]) == {"1", "2"} and sweep["chosen"] in (1.0, 2.0)
    best = max(sweep["scores"].values())
    assert sweep["scores"][f"{sweep['chosen']:g}"] == best
    assert sweep["chosen"] == 1.0 or sweep["scores"]["1"] < best
    for f in ("1", "2"):
        val = json.loads((out / "hra" / f"lr{f}-seed0" / "val" / "eval.json").read_text())["result"]
        prompts = {json.loads(line)["prompt"] for line in
                   (out / "hra" / f"lr{f}-seed0" / "val" / "samples" / "manifest.jsonl").read_text().splitlines()}
        assert prompts == set(result["setup"]["val_prompts"]) and not prompts & set(result["setup"]["test_prompts"])
        assert compare.sweep_score("dreambooth", val["metrics"]) == pytest.approx(sweep["scores"][f])
    # every seed at the chosen rate, aggregated
    argvs = [s["argv"] for s in row["train_stats"]]
    assert [a[a.index("--seed") + 1] for a in argvs] == ["0", "1"]
    assert row["lr"] == pytest.approx(result["recipe_rates"]["learning_rate"] * sweep["chosen"])
    for key in ("dino", "clip_i", "clip_t", "subject_rate", "class_plain_rate"):
        values = [m[key] for m in row["per_seed"]]
        assert row["aggregate"][key]["mean"] == pytest.approx(statistics.fmean(values))
        assert row["aggregate"][key]["std"] == pytest.approx(statistics.stdev(values))
    # the tiny world's stand-in extractors, chosen without flags, named
    assert "tiny-world stand-in DINO" in row["info"]["extractors"]["dino"]
    # the reference rows rank as they must: the real photos are the subject, the base asked for a star is not
    real, base = result["references"]["real"]["metrics"], result["references"]["base"]["metrics"]
    assert real["subject_rate"] == 1.0 and base["subject_rate"] == 0.0
    assert real["dino"] > base["dino"] and real["clip_i"] > base["clip_i"]
    table = (out / "compare.md").read_text()
    assert result["table_markdown"] in table and " ± " in table and "*real held-out photos*" in table
    assert (out / "compare.png").stat().st_size > 10_000
    # --reuse keeps every run and evaluation: nothing is trained or generated again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = compare.main(compare.parse_args([*sys_argv(cfg), "--reuse"]))
    assert again["table_markdown"] == result["table_markdown"]
    assert {p: p.stat().st_mtime_ns for p in before if p.name != "compare.png"} == {
        p: t for p, t in before.items() if p.name != "compare.png"}


def sys_argv(cfg: compare.CompareConfig) -> list[str]:
    import shlex

    return ["--methods", ",".join(cfg.methods), "--seeds", ",".join(map(str, cfg.seeds)),
            "--lr_factors", ",".join(f"{f:g}" for f in cfg.lr_factors), "--max_train_steps", str(cfg.max_train_steps),
            "--num_images", str(cfg.num_images), "--eval_steps", str(cfg.eval_steps), "--output_dir", str(cfg.out),
            "--train_args", shlex.join(cfg.train_args)]


def test_readme_shows_the_committed_comparison():
    """The README's DreamBooth comparison table is the one in the committed results file, with its plot."""
    results = REPO / "eval" / "results"
    doc = json.loads((results / "compare-dreambooth.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert doc["table_markdown"] in readme
    assert (results / "compare-dreambooth.png").is_file() and "eval/results/compare-dreambooth.png" in readme
    assert len(doc["config"]["seeds"]) >= 3 and len(doc["config"]["lr_factors"]) >= 3
    assert set(doc["rows"]) == set(compare.METHODS) and set(doc["references"]) == {"base", "real"}
    for row in doc["rows"].values():
        assert all(row["aggregate"][k]["n"] == len(doc["config"]["seeds"]) for k in ("dino", "clip_i", "clip_t"))


def test_readme_shows_the_committed_control_comparison():
    """The README's control comparison table is the committed results file's: 3 seeds, a 3-rate sweep on the
    validation pairs, every row's F1 over all seeds, above the unconditioned base and below the real images."""
    results = REPO / "eval" / "results"
    doc = json.loads((results / "compare-control.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert doc["table_markdown"] in readme and "eval/results/compare-control.json" in readme
    assert doc["config"]["task"] == "control"
    assert len(doc["config"]["seeds"]) >= 3 and len(doc["config"]["lr_factors"]) >= 3
    assert {"hra", "hra_orth", "hra_gs", "lora", "oft"} <= set(doc["rows"]) <= set(compare.METHODS)
    for method in set(compare.METHODS) - set(doc["rows"]):  # a method left out is said to be
        assert f"{method.upper()} is not in it yet" in readme
    base, real = (doc["references"][k]["metrics"]["canny_f1"] for k in ("base", "real"))
    for row in doc["rows"].values():
        agg = row["aggregate"]["canny_f1"]
        assert agg["n"] == len(doc["config"]["seeds"])
        assert base < agg["mean"] < real
