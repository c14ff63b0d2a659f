"""Checkpoints: only trainable tensors, safetensors + JSON, checksummed, atomic, keep-last-K pruning,
`latest` ignores half-written ones."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from hra_diffusion import HRAConfig, inject_hra
from hra_diffusion.training.checkpoint import (
    MARKER,
    OPTIMIZER_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    register_checkpoint_hooks,
    resolve_resume,
    save_checkpoint,
)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    inject_hra(model, HRAConfig(r=2, target_modules=["0", "2"], seed=0))
    return model


def _train_step(model, opt):
    loss = model(torch.randn(3, 16)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_save_prune_latest_and_resume(tmp_path, accelerator):
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    register_checkpoint_hooks(accelerator, ["net"])
    for step in range(1, 6):
        _train_step(model, opt)
        save_checkpoint(accelerator, tmp_path, step, keep=2)
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [4, 5]  # exactly the last K=2
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-5"
    tensors = load_file(str(ckpt / "net.safetensors"))
    assert sorted(tensors) == ["0.hra_u", "2.hra_u"]  # adapter only, never the frozen base
    assert not any(p.name.startswith("model") and p.suffix == ".safetensors" for p in ckpt.iterdir())
    doc = json.loads((ckpt / MARKER).read_text())
    assert doc["step"] == 5
    # safetensors + JSON only (nothing to unpickle), every file checksummed in the marker
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([MARKER, OPTIMIZER_FILE, "net.safetensors"])
    assert sorted(doc["files"]) == sorted([OPTIMIZER_FILE, "net.safetensors"])
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in doc["files"].values())

    # half-written checkpoints: a leftover temporary folder, and a folder missing its marker
    (tmp_path / "checkpoints" / ".checkpoint-9.tmp").mkdir()
    (tmp_path / "checkpoints" / ".checkpoint-9.tmp" / "net.safetensors").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "checkpoint-7").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    assert resolve_resume("latest", tmp_path).name == "checkpoint-5"
    with pytest.raises(CheckpointError, match=r"checkpoint-7.*not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "checkpoint-7"), tmp_path)

    # resume restores the adapter and the optimizer's moments exactly
    saved = {k: v.clone() for k, v in tensors.items()}
    moments = {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}
    _train_step(model, opt)
    inner = accelerator.unwrap_model(model)
    assert not torch.equal(inner[0].hra_u.detach(), saved["0.hra_u"])
    load_checkpoint(accelerator, ckpt)
    assert torch.equal(inner[0].hra_u.detach(), saved["0.hra_u"])
    assert torch.equal(inner[2].hra_u.detach(), saved["2.hra_u"])
    restored = opt.state_dict()["state"]
    assert all(torch.equal(restored[i][k], v) for i, st in moments.items() for k, v in st.items())

    # the next save clears the leftover temporary folder
    save_checkpoint(accelerator, tmp_path, 6, keep=2)
    assert not (tmp_path / "checkpoints" / ".checkpoint-9.tmp").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 6]


def test_crash_while_writing_keeps_previous(tmp_path, accelerator, monkeypatch):
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    register_checkpoint_hooks(accelerator, ["net"])
    save_checkpoint(accelerator, tmp_path, 1, keep=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hra_diffusion.training.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, tmp_path, 2, keep=1)
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert (latest_checkpoint(tmp_path) / "net.safetensors").is_file()


def test_load_refuses_a_checkpoint_of_other_modules(tmp_path, accelerator):
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    register_checkpoint_hooks(accelerator, ["net"])
    path = save_checkpoint(accelerator, tmp_path, 1)
    (path / "net.safetensors").rename(path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="net.safetensors is missing"):
        load_checkpoint(accelerator, path)


def test_an_adapter_with_nan_values_is_not_checkpointed(tmp_path, accelerator):
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    register_checkpoint_hooks(accelerator, ["net"])
    save_checkpoint(accelerator, tmp_path, 1)
    with torch.no_grad():
        accelerator.unwrap_model(model)[2].hra_u[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not writing checkpoint-2: the net's 2.hra_u holds NaN/inf"):
        save_checkpoint(accelerator, tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "checkpoints" / ".checkpoint-2.tmp").exists()


def test_optimizer_state_reads_the_current_and_the_format_2_layout(tmp_path):
    """Checkpoints store the optimizer through the one state store (hra_diffusion.state.pack); those written
    before it (format 2: tensors keyed "<param>.<name>", the rest as JSON) still resume."""
    import json

    import torch
    from safetensors.torch import save_file

    from hra_diffusion.training.checkpoint import _optimizer_payload, _optimizer_state

    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.99))
    w.grad = torch.ones_like(w)
    opt.step()
    tensors, meta = _optimizer_payload(opt)
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata=meta)
    old = {f"{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}
    save_file(old, str(tmp_path / "old.safetensors"),
              metadata={"param_groups": json.dumps(opt.state_dict()["param_groups"]), "scalars": "{}"})
    for name in ("new", "old"):
        sd = _optimizer_state(tmp_path / f"{name}.safetensors")
        assert sd["param_groups"][0]["betas"] == (0.9, 0.99) and sd["param_groups"][0]["lr"] == 1e-3
        torch.testing.assert_close(sd["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
        again = torch.optim.AdamW([torch.nn.Parameter(w.detach().clone())], lr=1e-3)
        again.load_state_dict(sd)  # loads as a live optimizer's own
