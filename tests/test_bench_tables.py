"""The benchmark tables of README.md and docs/benchmarks.md are rendered from the committed results, never typed in."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import render_tables  # noqa: E402


def test_readme_tables_match_the_committed_results():
    results = json.loads(render_tables.RESULTS.read_text())
    assert {"layers", "unet"} <= set(results), "benchmarks/results/bench_hra.json lacks a section"
    for section in ("layers", "unet"):
        env = results[section]["env"]
        assert env["torch"] and env["date"] and env["cpu"], env
    assert results["layers"]["env"]["torch"] == results["unet"]["env"]["torch"], "sections from two torch versions"
    assert render_tables.main(["--check"]) == 0  # README.md and docs/benchmarks.md
    assert "<!-- bench:summary -->" in (REPO / "README.md").read_text()
    assert "<!-- bench:layers -->" in (REPO / "docs" / "benchmarks.md").read_text()


def test_check_fails_on_a_stale_block_and_write_fixes_it(tmp_path):
    results = {"layers": {"env": {"date": "2026-01-01", "cpu": "cpu", "cores": 2, "threads": 2, "device": "cpu",
                                  "torch": "2.x", "python": "3.11", "dtype": "fp32", "r": 8},
                          "repeats": 3,
                          "rows": [{"shape": "(8, 8, 4)", "base_ms": 1.0, "ours_ms": 3.0, "peft_hra_ms": 12.0,
                                    "peft_lora_ms": 2.0, "ours_mib": 1.0, "peft_lora_mib": 1.0, "peft_hra_mib": 5.0}]}}
    res = tmp_path / "r.json"
    res.write_text(json.dumps(results))
    md = tmp_path / "README.md"
    md.write_text("intro\n<!-- bench:layers -->\n| typed in by hand |\n<!-- /bench:layers -->\nend\n")
    assert render_tables.main(["--results", str(res), "--check", str(md)]) == 1
    assert render_tables.main(["--results", str(res), "--write", str(md)]) == 0
    text = md.read_text()
    assert "typed in by hand" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "**1.50x**" in text and "**4.0x**" in text and "torch 2.x" in text  # ours/LoRA, PEFT HRA/ours
    assert render_tables.main(["--results", str(res), "--check", str(md)]) == 0


def test_summary_is_each_variant_against_lora_at_the_same_rank(tmp_path):
    unet = {"env": {"date": "2026-01-01", "cpu": "cpu", "cores": 2, "threads": 1, "device": "cpu", "torch": "2.x",
                    "python": "3.11", "dtype": "fp32", "r": 8},
            "repeats": 3, "step_s": {"ours": 2.0, "peft_hra": 6.0, "peft_lora": 1.6},
            "memory": {k: {"trainable": 10, "peak_kib": kib, "after_build_kib": 1} for k, kib in
                       (("ours", 90), ("peft_hra", 300), ("peft_lora", 100))}}
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"unet": unet}))
    readme, ref = tmp_path / "README.md", tmp_path / "ref.md"
    readme.write_text("<!-- bench:summary -->\n<!-- /bench:summary -->\n")
    ref.write_text("<!-- bench:unet -->\n<!-- /bench:unet -->\n")
    assert render_tables.main(["--results", str(res), "--check", str(readme)]) == 1  # unet has no block there
    assert render_tables.main(["--results", str(res), "--write", str(readme), str(ref)]) == 0
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| ") and "variant" not in line]
    assert rows == ["| ours (HRA r) | 10 | **1.25x** | 0.90x |", "| PEFT HRA r | 10 | **3.75x** | 3.00x |"]
    assert render_tables.main(["--results", str(res), "--check", str(readme), str(ref)]) == 0
