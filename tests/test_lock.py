"""One run per output folder: a second run into a running one's folder stops in one line, touching nothing;
a crashed run's lock does not stick."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hra_diffusion.errors import OutputFolderError
from hra_diffusion.training.lock import LOCK_NAME, OutputLock, lock_holder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))

from test_dreambooth import fast_args  # noqa: E402


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _trainer(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hra_diffusion.training", "dreambooth", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_run_into_a_running_folder_stops_and_the_first_finishes(tmp_path, tiny_random_sd_dir,
                                                                       generated_subject_dir):
    out = tmp_path / "out"
    first = _trainer(fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--max_train_steps", "150", "--seed", "0"))
    deadline = time.time() + 120
    while not (out / LOCK_NAME).exists():
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline, "the first run never took its folder"
        time.sleep(0.05)
    second = _trainer(fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--max_train_steps", "5", "--seed", "7",
                                "--overwrite_output_dir", "true"))
    _, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=600)
    assert second.returncode == 2, err2
    lines = [line for line in err2.splitlines() if line.strip() and not line.startswith("note:")]  # the recipe note
    assert len(lines) == 1 and "in use by a running run" in lines[0] and f"pid {first.pid}" in lines[0], err2
    assert first.returncode == 0, err1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "seed: 0" in (out / "config.yaml").read_text()
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_crashed_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))
    assert lock_holder(out) is None
    with OutputLock(out) as lock:
        assert lock.stale_note and "no longer running" in lock.stale_note
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists() and out.is_dir()  # the folder was there before: it stays


def test_a_live_lock_refuses_and_a_refused_run_leaves_no_folder(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "t"}))
        with pytest.raises(OutputFolderError, match=f"pid {sleeper.pid}"):
            OutputLock(out).acquire()
        assert (out / LOCK_NAME).exists()  # the running one's lock is untouched
    finally:
        sleeper.kill()
    fresh = tmp_path / "fresh" / "run"
    with OutputLock(fresh):
        assert fresh.is_dir()
    assert not fresh.exists()  # nothing was written into it
