"""Docs that match the code: the architecture page lists every module, and nothing cites files outside the repo."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_architecture_lists_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`(hra_diffusion/[\w/]+(?:\.py)?/?)`", text))
    missing = []
    for path in sorted((REPO / "hra_diffusion").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        folder = path.parent.relative_to(REPO).as_posix() + "/"
        if rel not in listed and folder not in listed:
            missing.append(rel)
    assert not missing, f"docs/architecture.md does not list {missing}"
    stale = [p for p in listed if not (REPO / p.rstrip("/")).exists()]
    assert not stale, f"docs/architecture.md lists paths that do not exist: {stale}"


def test_no_code_or_doc_cites_paths_outside_the_repository():
    files = [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), *(REPO / "hra_diffusion").rglob("*.py"),
             *(REPO / "train").glob("*.py"), *(REPO / "eval").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    bad = [f.relative_to(REPO).as_posix() for f in files if "../shared" in f.read_text(encoding="utf-8")]
    assert not bad, f"these cite ../shared/, which users never see: {bad}"
