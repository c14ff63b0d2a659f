"""The package's layers, read from the code: every import (module level and inside functions) of every module of
hra_diffusion, checked against the layer table below, and the layer diagram of docs/architecture.md.

    python -m tools.architecture            # print the diagram (docs/architecture.md holds it between its markers)
    python -m tools.architecture --check    # exit 1 listing each import that points up a layer, and each circle
    python -m tools.architecture --write    # refresh the diagram in docs/architecture.md

A module may import its own layer and the layers below it. tests/test_architecture.py runs the check.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "hra_diffusion"
# lowest first; a module belongs to the first entry that is its name or a parent package of it
LAYERS: list[tuple[str, list[str]]] = [
    ("core", ["hra_diffusion.utils", "hra_diffusion.errors", "hra_diffusion.paths", "hra_diffusion.version", "hra_diffusion.state",
              "hra_diffusion.adapters"]),
    ("building blocks", ["hra_diffusion.conditioning", "hra_diffusion.images", "hra_diffusion.samples",
                         "hra_diffusion.sample_dir", "hra_diffusion.detectors", "hra_diffusion.control",
                         "hra_diffusion.models", "hra_diffusion.sampling", "hra_diffusion.noise"]),
    ("generation, metrics, the tiny world", ["hra_diffusion.generate", "hra_diffusion.metrics", "hra_diffusion.tiny"]),
    ("training", ["hra_diffusion.training"]),
    ("applications", ["hra_diffusion.compare", "hra_diffusion.cli", "hra_diffusion.__main__", "hra_diffusion"]),
]
BEGIN, END = "<!-- layers: begin (python -m tools.architecture) -->", "<!-- layers: end -->"


def modules(package: str = PACKAGE) -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / package).rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom, known: set[str]) -> list[str]:
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith(module.split(".")[0]):
        return []
    # "from .pkg import mod" names a module; "from .mod import name" names the module itself
    named = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return named or [target]


def imports(package: str = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports, anywhere in its body}."""
    mods = modules(package)
    known = set(mods)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path, node, known)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(package)]
            else:
                continue
            graph[name].update(t for t in targets if t != name)
        graph.setdefault(name, set())
    return dict(graph)


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module.startswith(p + ".") and p != PACKAGE  # the package itself: its __init__ only
            if (module == p or inside) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    if best is None:
        raise KeyError(f"{module} is in no layer of tools/architecture.py's LAYERS: add it")
    return best[0]


def outside_imports() -> list[str]:
    """Imports of the repository's scripts and tools (train/, eval/, tools/) from the library: never allowed."""
    bad = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [f"{name} imports {n}" for n in names if n.split(".")[0] in ("train", "eval", "tools", "benchmarks")]
    return bad


def upward_imports() -> list[str]:
    bad = []
    for mod, targets in sorted(imports().items()):
        for t in sorted(targets):
            if layer_of(t) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    return bad


def circles(package: str = PACKAGE) -> list[list[str]]:
    """Import circles between modules (a package's __init__ re-exporting its modules is not one)."""
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in imports(package).items()}
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def diagram() -> str:
    """The layers, top first, each with its modules (folded per sub-package) and what it imports from below."""
    mods = modules()
    graph = imports()
    lines = ["```"]
    for i in reversed(range(len(LAYERS))):
        name, _ = LAYERS[i]
        members = sorted({m if m.count(".") < 2 else ".".join(m.split(".")[:2]) for m in mods if layer_of(m) == i})
        below = sorted({LAYERS[layer_of(t)][0] for m in mods if layer_of(m) == i for t in graph[m]
                        if layer_of(t) < i})
        shown = ", ".join(x.removeprefix(PACKAGE + ".") if x != PACKAGE else f"{PACKAGE} (__init__)" for x in members)
        lines.append(f"{i}. {name}: {shown}")
        if below:
            lines.append(f"     imports from: {', '.join(below)}")
        if i:
            lines.append("     │")
    lines.append("```")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad, loops = upward_imports() + outside_imports(), circles() + circles("tools")
        for line in bad:
            print("up a layer:", line)
        for loop in loops:
            print("circle:", " -> ".join(loop))
        return 1 if bad or loops else 0
    if "--write" in argv:  # refresh docs/architecture.md's copy
        doc = ROOT / "docs" / "architecture.md"
        text = doc.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        doc.write_text(text[:start] + "\n" + diagram() + "\n" + text[end:])
        return 0
    print(diagram())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
