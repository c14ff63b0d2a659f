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


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for md in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        text = md.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(REPO)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{md.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken
