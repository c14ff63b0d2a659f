"""The layers point one way (tools/architecture.py reads every import, module level and inside functions), there is
no import circle, the library never imports the scripts or the tiny world's build tools, and docs/architecture.md
shows the layers as the code has them."""

from __future__ import annotations

from pathlib import Path

from tools import architecture

REPO = Path(__file__).resolve().parent.parent


def test_no_import_points_up_a_layer_or_outside_the_library():
    assert architecture.upward_imports() == []
    assert architecture.outside_imports() == []


def test_no_import_circle():
    assert architecture.circles() == [] and architecture.circles("tools") == []


def test_the_check_finds_an_upward_import(monkeypatch):
    real = architecture.imports()
    fake = {**real, "hra_diffusion.adapters.model": real["hra_diffusion.adapters.model"] | {"hra_diffusion.training.runner"}}
    monkeypatch.setattr(architecture, "imports", lambda package="hra_diffusion": fake)
    assert architecture.upward_imports() == [
        "hra_diffusion.adapters.model (core) imports hra_diffusion.training.runner (training)"]
    fake["hra_diffusion.training.runner"] = fake["hra_diffusion.training.runner"] | {"hra_diffusion.adapters.model"}
    assert ["hra_diffusion.adapters.model", "hra_diffusion.training.runner", "hra_diffusion.adapters.model"] in \
        architecture.circles()


def test_every_module_has_a_layer():
    for module in architecture.modules():
        architecture.layer_of(module)  # raises naming a module that no layer lists


def test_docs_show_the_layers_of_the_code():
    doc = (REPO / "docs" / "architecture.md").read_text()
    start, end = doc.index(architecture.BEGIN) + len(architecture.BEGIN), doc.index(architecture.END)
    assert doc[start:end].strip() == architecture.diagram(), "regenerate it: python -m tools.architecture"
