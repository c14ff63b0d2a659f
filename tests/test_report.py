"""The HTML report: self-contained, and rendered by a real headless Chromium (screenshot checked)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers_score import save_png
from PIL import Image

from hra_diffusion.metrics.report import render_html, write_outputs
from hra_diffusion.metrics.result import ScoreResult

MAGENTA = (255, 0, 255)  # reference images
CYAN = (0, 255, 255)  # generated images
TABLE_HEAD = (0x1F, 0x4E, 0x79)  # the summary table's header background (report.py's CSS)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _result(tmp_path: Path) -> ScoreResult:
    refs = [save_png(tmp_path / "ref" / f"r{i}.png", np.full((40, 40, 3), MAGENTA, np.uint8)) for i in range(2)]
    gens = [save_png(tmp_path / "s" / f"g{i}.png", np.full((32, 32, 3), CYAN, np.uint8)) for i in range(3)]
    rows = [{"file": str(g), "prompt": f"a photo of qwe dog {i}", "dino": 0.5 + 0.1 * i, "clip_i": 0.7, "clip_t": 0.3,
             "skipped": ""} for i, g in enumerate(gens)]
    return ScoreResult(kind="subject", summary={"dino": 0.6, "clip_i": 0.7, "clip_t": 0.3}, per_image=rows,
                       counts={"images": 3, "scored": 3, "skipped_black": 0}, info={"samples_dir": str(tmp_path / "s")},
                       references=refs)


def _colour_mask(img: np.ndarray, colour: tuple[int, int, int], tol: int = 8) -> np.ndarray:
    return (np.abs(img[..., :3].astype(int) - np.array(colour)) <= tol).all(-1)


def _screenshot(chromium: str, page: Path, out: Path, tmp: Path) -> np.ndarray:
    profile = tmp / f"profile-{out.stem}"
    profile.mkdir()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--screenshot={out}",
           "--window-size=1000,1100", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("RGB"))


def test_outputs_are_complete_and_self_contained(tmp_path):
    result = _result(tmp_path)
    paths = write_outputs(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "per_image.csv", "report.html"]
    doc = json.loads(paths["metrics.json"].read_text())
    assert doc["summary"] == result.summary and len(doc["per_image"]) == 3
    rows = list(csv.DictReader(paths["per_image.csv"].open()))
    assert [r["dino"] for r in rows] == ["0.5000", "0.6000", "0.7000"] and rows[0]["prompt"] == "a photo of qwe dog 0"
    page = paths["report.html"].read_text()
    assert page.count("data:image/png;base64,") == 5  # 2 references + 3 generated, embedded
    assert "http://" not in page and "https://" not in page and "src=\"/" not in page  # nothing external
    assert "dino: 0.6000" in page and "<td>dino</td><td>0.6000</td>" in page


def test_failed_write_leaves_previous_outputs_untouched(tmp_path, monkeypatch):
    from hra_diffusion.metrics import report

    result = _result(tmp_path)
    write_outputs(result, tmp_path / "out")
    before = (tmp_path / "out" / "metrics.json").read_text()
    result.summary["dino"] = 0.1
    monkeypatch.setattr(report, "render_html", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        write_outputs(result, tmp_path / "out")
    assert (tmp_path / "out" / "metrics.json").read_text() == before  # rendering happens before any write
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = _chromium()
    assert chromium, "this test needs Chromium: apt-get install chromium (Debian/Ubuntu)"
    result = _result(tmp_path)
    page = write_outputs(result, tmp_path / "out")["report.html"]
    bare = tmp_path / "bare.html"
    bare.write_text(render_html(result, images=False))
    shot = _screenshot(chromium, page, tmp_path / "shot.png", tmp_path)
    bare_shot = _screenshot(chromium, bare, tmp_path / "bare.png", tmp_path)
    thumb = 160 * 160  # each image is drawn 160 x 160 CSS px
    ref_px, gen_px, head = _colour_mask(shot, MAGENTA), _colour_mask(shot, CYAN), _colour_mask(shot, TABLE_HEAD)
    assert ref_px.sum() >= 0.9 * 2 * thumb, f"reference images not drawn: {ref_px.sum()} magenta pixels"
    assert gen_px.sum() >= 0.9 * 3 * thumb, f"generated images not drawn: {gen_px.sum()} cyan pixels"
    assert head.sum() >= 1000, "the summary table's header is not drawn"
    assert not _colour_mask(bare_shot, MAGENTA).any() and not _colour_mask(bare_shot, CYAN).any()
    assert _colour_mask(bare_shot, TABLE_HEAD).sum() >= 1000
    # layout: table first, then the references, then the generated grid
    rows_of = lambda mask: np.nonzero(mask.any(1))[0]  # noqa: E731
    assert rows_of(head).max() < rows_of(ref_px).min() < rows_of(ref_px).max() < rows_of(gen_px).min()
    # the table's text is drawn: dark pixels in the table's band, right of the header's left edge
    band = shot[rows_of(head).max() + 1 : rows_of(ref_px).min() - 40]
    assert (band.sum(-1) < 200).sum() > 200
