"""The folder ``generate`` writes: what it owns, resuming an interrupted run, a safe ``--overwrite``.

Layout (every file written atomically: a temporary sibling, then a rename):
  generate_config.json      written first: the settings, the run's identity, and every file it will write
  p<prompt>_<k>_s<seed>.png  one per image, as soon as it is made
  .generate-progress.jsonl   one manifest row per finished image (appended, flushed); removed at the end
  conditions/                copies of the condition images
  manifest.jsonl             written last, in job order: its presence means the set is complete

A re-run with the same identity completes only the missing images; other settings are refused unless
``overwrite``, which removes only the files generate wrote there (never anything else in the folder).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputFolderError

__all__ = [
    "CONFIG",
    "MANIFEST",
    "PROGRESS",
    "CONDITIONS_DIR",
    "image_name",
    "check_not_input",
    "OutputPlan",
    "plan_output",
    "write_file_atomic",
    "append_row",
    "finish_output",
]

CONFIG = "generate_config.json"
MANIFEST = "manifest.jsonl"
PROGRESS = ".generate-progress.jsonl"
CONDITIONS_DIR = "conditions"
FORMAT = "hra-diffusion generate"
_TMP = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")


def image_name(prompt_index: int, image_index: int, seed: int) -> str:
    return f"p{prompt_index:04d}_{image_index:02d}_s{seed}.png"


def check_not_input(out: Path, inputs: Iterable[tuple[str, Path | None, bool]]) -> None:
    """Refuse an ``out`` that is, contains or lies inside an input folder, or is / contains an input file.

    ``inputs``: (what, path, inside_too) — e.g. ("adapter folder", Path("out/dog"), True); with
    ``inside_too`` False only ``out`` being or containing ``path`` is refused.
    """
    o = Path(out).resolve()
    for what, path, inside_too in inputs:
        if path is None:
            continue
        p = Path(path).resolve()
        relation = None
        if o == p:
            relation = "is"
        elif p.is_relative_to(o):
            relation = "contains"
        elif inside_too and o.is_relative_to(p):
            relation = "lies inside"
        if relation:
            raise OutputFolderError(
                f"--out {str(out)!r} {relation} the {what} {str(path)!r}: generate writes (and with --overwrite "
                "removes) files in --out, so it must not overlap any input; choose another --out"
            )


def _own_name(rel: Any) -> str | None:
    """``rel`` if it is a name generate may have written in its folder (a plain name or conditions/<name>)."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == CONDITIONS_DIR):
        return rel
    return None


def _read_rows(file: Path) -> list[dict[str, Any]]:
    """Manifest rows of ``file``; an unreadable line (a write cut short by a kill) is skipped."""
    rows = []
    if not file.is_file():
        return rows
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and _own_name(doc.get("file")):
            rows.append(doc)
    return rows


def _describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        scalar = all(x is None or isinstance(x, (str, int, float, bool)) for x in (a, b))
        changes.append(f"{key} {a!r} -> {b!r}" if scalar and len(repr(a)) + len(repr(b)) < 120 else key)
    return ", ".join(changes)


@dataclass
class OutputPlan:
    """What ``plan_output`` found: finished images to keep, and generate's own old files to remove."""

    out: Path
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # image name -> its manifest row
    complete: bool = False  # the folder already holds this exact, finished set
    previous: dict[str, Any] | None = None  # the previous generate_config.json of the same identity
    remove: list[str] = field(default_factory=list)  # our previous run's files (--overwrite)

    def remove_previous(self) -> int:
        """Delete the previous run's own files (only those; a foreign file is never touched)."""
        removed = 0
        for rel in self.remove:
            path = self.out / rel
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
        cond = self.out / CONDITIONS_DIR
        if cond.is_dir() and not any(cond.iterdir()):
            cond.rmdir()
        return removed


def _owned_files(out: Path, doc: dict[str, Any] | None) -> list[str]:
    """Every file of ``out`` that a previous generate run there wrote (per its config, manifest, progress)."""
    names: dict[str, None] = {}
    for rel in (doc or {}).get("files", []) + (doc or {}).get("conditions", []):
        if _own_name(rel):
            names[rel] = None
    for row in _read_rows(out / MANIFEST) + _read_rows(out / PROGRESS):
        for key in ("file", "condition"):
            if _own_name(row.get(key)):
                names[row[key]] = None
    for sub in (out, out / CONDITIONS_DIR):
        if sub.is_dir():
            for p in sub.iterdir():
                if p.is_file() and _TMP.match(p.name):  # a temporary file of a killed write
                    names[str(p.relative_to(out))] = None
    names.update({MANIFEST: None, PROGRESS: None, CONFIG: None})
    return [n for n in names if (out / n).is_file()]


def plan_output(out: Path, identity: dict[str, Any], files: list[str], conditions: list[str],
                overwrite: bool) -> OutputPlan:
    """Decide how ``generate`` may use ``out`` before anything is loaded, written or removed.

    New or empty: start. Written by generate with the same identity: resume (or, with ``overwrite``,
    start again). Otherwise refuse unless ``overwrite``, which removes only generate's own files.
    A planned file name held by a file generate did not write is always refused.
    """
    out = Path(out)
    identity = json.loads(json.dumps(identity))
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {str(out)!r} is a file, not a folder; choose a folder for the images")
    plan = OutputPlan(out)
    if not out.exists() or not any(out.iterdir()):
        return plan
    ours: set[str] = set()
    if (out / CONFIG).is_file():
        try:
            doc = json.loads((out / CONFIG).read_text(encoding="utf-8"))
            doc = doc if isinstance(doc, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        owned = _owned_files(out, doc)
        same = doc is not None and doc.get("identity") == identity
        if same and not overwrite:
            ours = set(files) | set(conditions) | set(owned)
            rows = _read_rows(out / MANIFEST) or _read_rows(out / PROGRESS)
            wanted = set(files)
            plan.done = {r["file"]: r for r in rows if r["file"] in wanted and (out / r["file"]).is_file()}
            plan.previous = doc
            plan.complete = len(plan.done) == len(files) and (out / MANIFEST).is_file()
            plan.remove = [n for n in owned if _TMP.match(Path(n).name)]
        elif overwrite:
            plan.remove = owned
            ours = set(owned)
        else:
            if doc is None:
                why = f"its {CONFIG} is unreadable"
            elif "identity" not in doc:
                why = "it was written by an older version of generate"
            else:
                why = f"it holds images made with other settings ({_describe_changes(doc['identity'], identity)})"
            raise OutputFolderError(
                f"--out {str(out)!r} cannot be completed: {why}; pass --overwrite to replace generate's files "
                "there (other files are kept), or choose another --out"
            )
    elif not overwrite:
        raise OutputFolderError(
            f"output folder {str(out)!r} is not empty and was not written by generate; choose a new or empty "
            "folder, or pass --overwrite to write beside its files (they are kept)"
        )
    for rel in [*files, *conditions, MANIFEST, CONFIG, PROGRESS]:
        if rel not in ours and (out / rel).exists():
            raise OutputFolderError(
                f"{str(out / rel)!r} is in the way: generate would write a file of that name but did not write "
                "this one; move it away, or choose another --out"
            )
    return plan


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary sibling, flush it to disk, then rename it to ``path``: a reader (or a
    re-run after a kill) sees the old file or the complete new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_text(path: Path, text: str) -> Path:
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_config(out: Path, doc: dict[str, Any]) -> Path:
    return _write_text(out / CONFIG, json.dumps({"format": FORMAT, **doc}, indent=2, default=str) + "\n")


def append_row(out: Path, row: dict[str, Any]) -> None:
    """Record one finished image (after its file is in place)."""
    with open(out / PROGRESS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def finish_output(out: Path, rows: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    """The manifest (job order), the config marked complete, the progress file removed."""
    _write_text(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))
    write_config(out, {**doc, "complete": True})
    (out / PROGRESS).unlink(missing_ok=True)
