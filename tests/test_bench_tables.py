"""The README's benchmark tables are rendered from the committed results file, never typed in."""

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
    assert render_tables.main(["--check", str(REPO / "README.md")]) == 0


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
