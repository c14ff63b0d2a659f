"""The one resumable-state store: nested state round-trips, a damaged or foreign state is refused naming why."""

from __future__ import annotations

import pytest
import torch

from hra_diffusion.state import StateError, load_state, save_state


def test_round_trip_checksum_and_settings(tmp_path):
    state = {"step": 3, "model": {"w": torch.arange(6.0).view(2, 3)}, "opt": {"state": {0: {"m": torch.ones(2)}},
                                                                            "groups": [{"betas": (0.9, 0.99)}]}}
    save_state(tmp_path / "s", state, {"seed": 0, "threads": 2})
    got = load_state(tmp_path / "s", {"seed": 0, "threads": 1}, ignore={"threads"})
    assert got["step"] == 3 and got["opt"]["state"][0]["m"].tolist() == [1.0, 1.0]
    assert got["opt"]["groups"][0]["betas"] == [0.9, 0.99]  # tuples come back as lists
    torch.testing.assert_close(got["model"]["w"], state["model"]["w"])
    assert load_state(tmp_path / "none") is None
    with pytest.raises(StateError, match=r"other settings \(seed\)"):
        load_state(tmp_path / "s", {"seed": 1, "threads": 2})
    (tmp_path / "s" / "state.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(StateError, match="damaged"):
        load_state(tmp_path / "s")
    with pytest.raises(TypeError, match="cannot store a set"):
        save_state(tmp_path / "t", {"x": {1, 2}})
