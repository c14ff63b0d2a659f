"""Write a scoring result: metrics.json, per_image.csv and a self-contained HTML report (atomic writes)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from .result import ScoreResult

__all__ = ["METRICS_JSON", "PER_IMAGE_CSV", "REPORT_HTML", "write_outputs", "render_html", "image_data_uri"]

METRICS_JSON = "metrics.json"
PER_IMAGE_CSV = "per_image.csv"
REPORT_HTML = "report.html"
LOWER_IS_BETTER = ("lpips", "rmse", "error")

_CSS = """
body { font-family: sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 20px; }
table.summary { border-collapse: collapse; margin: 8px 0; }
table.summary th { background: #1f4e79; color: #fff; padding: 6px 12px; text-align: left; }
table.summary td { border: 1px solid #bbb; padding: 6px 12px; font-family: monospace; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: SIZEpx; }
figure img { width: SIZEpx; height: SIZEpx; object-fit: contain; display: block; image-rendering: pixelated;
             border: 1px solid #999; }
figcaption { font-size: 11px; line-height: 1.3; word-wrap: break-word; }
.pair { display: flex; gap: 4px; padding: 4px; border: 1px solid #ddd; }
.skipped { opacity: 0.5; } .note { color: #a33; font-size: 12px; }
"""


def image_data_uri(path: str | os.PathLike, size: int) -> str:
    """A PNG thumbnail (longest side ``size``) as a data: URI, so the report needs no other file."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = size / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _figure(path: str, caption_lines: list[str], size: int, extra_class: str = "", images: bool = True) -> str:
    img = f'<img src="{image_data_uri(path, size)}" alt="{html.escape(Path(path).name)}">' if images else ""
    cap = "<br>".join(html.escape(line) for line in caption_lines)
    return f'<figure class="{extra_class}">{img}<figcaption>{cap}</figcaption></figure>'


def render_html(result: ScoreResult, thumbnail: int = 160, images: bool = True) -> str:
    """The report page: summary table, reference images, and every generated image with its scores.

    ``images=False`` renders the same page without pictures (used to check a rendering).
    """
    cols = result.metric_columns()
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td><td>{'lower' if any(s in k for s in LOWER_IS_BETTER) else 'higher'}"
        "</td></tr>" for k, v in result.summary.items())
    counts = ", ".join(f"{k}: {v}" for k, v in result.counts.items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>hra-diffusion {result.kind} scores</title><style>{_CSS.replace('SIZE', str(thumbnail))}</style>",
        "</head><body>",
        f"<h1>hra-diffusion: {html.escape(result.kind)} scores</h1>",
        f"<p>{html.escape(result.info.get('samples_dir', ''))}<br>{html.escape(counts)}</p>",
        "<h2>Summary</h2>",
        "<table class='summary' id='summary'><tr><th>metric</th><th>mean</th><th>better</th></tr>",
        rows,
        "</table>",
    ]
    extractors = result.info.get("extractors") or {}
    if extractors:
        why = result.info.get("extractors_chosen_by", "")
        parts.append("<p class='note' id='extractors'>Feature extractors" + (f" ({html.escape(why)})" if why else "")
                     + ": " + "; ".join(f"{html.escape(k)}: {html.escape(str(v))}" for k, v in extractors.items())
                     + "</p>")
    for name, msg in result.info.get("unavailable", {}).items():
        parts.append(f"<p class='note'>{html.escape(name)} not computed: {html.escape(msg)}</p>")
    if result.references:
        parts.append(f"<h2>Reference images ({len(result.references)})</h2><div class='grid' id='references'>")
        parts += [_figure(str(p), [Path(p).name], thumbnail, images=images) for p in result.references]
        parts.append("</div>")
    parts.append(f"<h2>Generated images ({len(result.per_image)})</h2><div class='grid' id='generated'>")
    for row in result.per_image:
        lines = [Path(row["file"]).name]
        if row.get("prompt"):
            lines.append(row["prompt"])
        lines += [f"{c}: {_fmt(row[c])}" for c in cols if c in row]
        if row.get("skipped"):
            lines.append(f"skipped: {row['skipped']}")
        cond = row.get("condition")
        figure = _figure(row["file"], lines, thumbnail, "skipped" if row.get("skipped") else "", images=images)
        if cond:  # control: the condition beside its generated image, kept together when the grid wraps
            figure = f"<div class='pair'>{_figure(cond, ['condition'], thumbnail, images=images)}{figure}</div>"
        parts.append(figure)
    parts.append("</div></body></html>\n")
    return "".join(parts)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _csv_text(result: ScoreResult) -> str:
    fields: list[str] = []
    for row in result.per_image:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in result.per_image:
        writer.writerow({k: _fmt(v) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def write_outputs(result: ScoreResult, out_dir: str | os.PathLike, thumbnail: int = 160) -> dict[str, Path]:
    """Render everything first, then write metrics.json, per_image.csv and report.html, each atomically."""
    out = Path(out_dir)
    doc = {"kind": result.kind, "summary": result.summary, "counts": result.counts, "info": result.info,
           "per_image": result.per_image, "references": [str(p) for p in result.references]}
    texts = {
        METRICS_JSON: json.dumps(doc, indent=2, default=str) + "\n",
        PER_IMAGE_CSV: _csv_text(result),
        REPORT_HTML: render_html(result, thumbnail),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in texts.items():
        _write_text_atomic(out / name, text)
        paths[name] = out / name
    return paths
