"""Training faults a user meets: changed settings on resume, damaged checkpoints, a second run into a
finished folder, NaN loss, Ctrl-C and kill -9. Each asserts the message and that the user's files survive."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hra_diffusion.training import NonFiniteLossError
from hra_diffusion.training.checkpoint import (
    MARKER,
    OPTIMIZER_FILE,
    CheckpointError,
    list_checkpoints,
    resolve_resume,
    verify_checkpoint,
)
from hra_diffusion.training.config import ConfigError
from hra_diffusion.training.run_guard import identity_changes, resume_command, run_identity
from hra_diffusion.training.threads import _physical_cores, accelerate_default_threads

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "train"))
import dreambooth_hra  # noqa: E402
from conftest import PLAIN_DREAMBOOTH_ARGS  # noqa: E402


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    _reset_accelerate()


def args_for(sd: Path, subject: Path, out: Path, *extra: str) -> list[str]:
    """A few-second run on the random tiny pipeline: 3 steps, a checkpoint after every step."""
    return [
        *PLAIN_DREAMBOOTH_ARGS,
        "--pretrained_model", str(sd), "--subject_file", str(subject / "subject.json"), "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--validation_prompts", "[]", "--learning_rate", "1e-3",
        "--with_prior_preservation", "false", "--report_to", "none", "--max_train_steps", "3",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--showroom_rates", "false", *extra,
    ]


def train(argv: list[str]):
    _reset_accelerate()
    return dreambooth_hra.main(dreambooth_hra.parse_args(argv))


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_random_sd_dir, generated_subject_dir) -> Path:
    """A finished 3-step run: adapter, card, config and checkpoints 1 and 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(args_for(tiny_random_sd_dir, generated_subject_dir, out))
    _reset_accelerate()
    assert [s for s, _ in list_checkpoints(out)] == [1, 2] and (out / "adapter").is_dir()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _optimizer_lrs(ckpt: Path) -> list[float]:
    from hra_diffusion.training.checkpoint import _optimizer_state

    return [g["lr"] for g in _optimizer_state(ckpt / OPTIMIZER_FILE)["param_groups"]]


# ---- resume: identity and optimisation settings ------------------------------------------------------

def test_resume_with_changed_learning_rate_applies_it_and_records_it(run_copy, tiny_random_sd_dir,
                                                                       generated_subject_dir, capsys):
    subject_before = tree(generated_subject_dir)
    assert _optimizer_lrs(run_copy / "checkpoints" / "checkpoint-2") == [1e-3]
    result = train(args_for(tiny_random_sd_dir, generated_subject_dir, run_copy, "--resume_from_checkpoint", "latest",
                            "--learning_rate", "5e-3", "--max_train_steps", "4"))
    said = capsys.readouterr().out
    assert result.resumed_from.name == "checkpoint-2" and result.global_step == 4
    assert "learning_rate 0.001 -> 0.005" in said and "max_train_steps 3 -> 4" in said and "from step 3" in said
    assert result.resume_changes["learning_rate"] == (1e-3, 5e-3)
    # applied: the optimizer that made steps 3 and 4 ran at the new rate (not the restored 1e-3)
    ckpt3 = run_copy / "checkpoints" / "checkpoint-3"
    assert _optimizer_lrs(ckpt3) == [5e-3]
    assert json.loads((ckpt3 / MARKER).read_text())["scheduler"]["last_lr"] == [5e-3]
    # recorded: config.yaml holds the rate used from step 3, and notes the earlier one
    config = (run_copy / "config.yaml").read_text()
    assert "learning_rate: 0.005" in config
    assert "#   learning_rate: 0.001 before step 3 (changed on resume to 0.005)" in config
    card = (run_copy / "README.md").read_text()
    assert "resumed from `checkpoint-2` with changed optimisation settings (learning_rate 0.001 -> 0.005" in card
    assert "resumed from" in said and "training finished" in said
    assert tree(generated_subject_dir) == subject_before


def test_resume_with_other_instance_data_refuses_then_the_flag_accepts(run_copy, tmp_path, tiny_random_sd_dir,
                                                                        generated_subject_dir, capsys):
    other = tmp_path / "other-subject"
    shutil.copytree(generated_subject_dir, other)
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 200, 0)).save(other / "train" / "99-new.png")
    before = tree(run_copy)
    other_before = tree(other)
    args = args_for(tiny_random_sd_dir, generated_subject_dir, run_copy, "--resume_from_checkpoint", "latest",
                    "--instance_data_dir", str(other / "train"))
    with pytest.raises(CheckpointError) as info:
        train(args)
    message = str(info.value)
    assert "\n" not in message
    assert "checkpoint-2 belongs to another run" in message
    assert "instance_data_dir (" in message and "instance_data_dir files (4 files" in message
    assert "--resume_allow_changes true" in message
    assert "learning_rate" not in message  # only identity keys are listed
    assert tree(run_copy) == before and tree(other) == other_before  # nothing written, nothing removed

    result = train([*args, "--resume_allow_changes", "true"])
    assert result.resumed_from.name == "checkpoint-2" and result.global_step == 3
    err = capsys.readouterr().err
    assert "resuming" in err and "with changed run settings" in err and "instance_data_dir files" in err
    assert tree(other) == other_before


def test_identity_ignores_a_moved_data_folder_with_the_same_files(tmp_path, generated_subject_dir):
    moved = tmp_path / "moved"
    shutil.copytree(generated_subject_dir, moved)
    cfg = dreambooth_hra.parse_args(["--subject_file", str(generated_subject_dir / "subject.json")])
    cfg.instance_data_dir = str(generated_subject_dir / "train")
    saved = json.loads(json.dumps(run_identity(cfg)))  # as stored in checkpoint.json
    cfg.instance_data_dir = str(moved / "train")
    assert identity_changes(saved, run_identity(cfg)) == []
    cfg.instance_prompt = "a photo of zzz square"
    assert [c.split(" (")[0] for c in identity_changes(saved, run_identity(cfg))] == ["instance_prompt"]


# ---- damaged checkpoints -----------------------------------------------------------------------------

def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(run_copy, tiny_random_sd_dir,
                                                                     generated_subject_dir, capsys):
    bad = run_copy / "checkpoints" / "checkpoint-2" / "unet.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    result = train(args_for(tiny_random_sd_dir, generated_subject_dir, run_copy, "--resume_from_checkpoint", "latest"))
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {run_copy / 'checkpoints' / 'checkpoint-2'}" in err
    assert "unet.safetensors is truncated" in err
    assert result.resumed_from.name == "checkpoint-1" and result.global_step == 3
    assert (run_copy / "adapter" / "adapter_model.safetensors").is_file()
    verify_checkpoint(run_copy / "checkpoints" / "checkpoint-2")  # rewritten whole by the resumed run


@pytest.mark.parametrize("damage", ["optimizer", "marker", "checksum", "pickle"])
def test_every_kind_of_damage_is_named_and_skipped(damage, run_copy):
    ckpt = run_copy / "checkpoints" / "checkpoint-2"
    if damage == "optimizer":
        (ckpt / OPTIMIZER_FILE).write_bytes((ckpt / OPTIMIZER_FILE).read_bytes()[:-10])
        words = f"{OPTIMIZER_FILE} is truncated"
    elif damage == "marker":
        (ckpt / MARKER).unlink()
        words = "no checkpoint.json (it was never finished"
    elif damage == "checksum":  # same size, other bytes
        data = bytearray((ckpt / "unet.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ckpt / "unet.safetensors").write_bytes(bytes(data))
        words = "unet.safetensors fails its SHA-256 checksum"
    else:  # an older checkpoint with a pickled optimizer: never read
        doc = json.loads((ckpt / MARKER).read_text())
        (ckpt / MARKER).write_text(json.dumps({"step": doc["step"]}))
        (ckpt / "optimizer.bin").write_bytes(b"\x80\x04not read")
        words = "older hra-diffusion"
    warnings = []
    assert resolve_resume("latest", run_copy, warn=warnings.append).name == "checkpoint-1"
    assert len(warnings) == 1 and "checkpoint-2" in warnings[0] and words in warnings[0]
    with pytest.raises(CheckpointError, match=re.escape(words.split(" (")[0])):  # named explicitly: no fallback
        resolve_resume(str(ckpt), run_copy)


def test_no_intact_checkpoint_is_one_line(run_copy, tiny_random_sd_dir, generated_subject_dir):
    for step in (1, 2):
        f = run_copy / "checkpoints" / f"checkpoint-{step}" / "unet.safetensors"
        f.write_bytes(f.read_bytes()[:50])
    before = tree(run_copy)
    with pytest.raises(CheckpointError) as info:
        train(args_for(tiny_random_sd_dir, generated_subject_dir, run_copy, "--resume_from_checkpoint", "latest"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no intact checkpoint to resume from under")
    assert "checkpoint-2: unet.safetensors is truncated" in message and "checkpoint-1:" in message
    assert tree(run_copy) == before


# ---- the output folder --------------------------------------------------------------------------------

def test_second_run_into_a_finished_folder_refuses_and_overwrite_says_what_it_removes(
        run_copy, tiny_random_sd_dir, generated_subject_dir, capsys):
    before = tree(run_copy)
    args = args_for(tiny_random_sd_dir, generated_subject_dir, run_copy, "--max_train_steps", "1")
    with pytest.raises(ConfigError) as info:
        train(args)
    message = str(info.value)
    assert "\n" not in message
    assert "holds a finished run (adapter, README.md)" in message and "--overwrite_output_dir true" in message
    assert "--resume_from_checkpoint latest (newest: checkpoint-2)" in message
    assert "removes adapter/, README.md, config.yaml, checkpoints/, logs/" in message
    assert tree(run_copy) == before  # refused before anything was written

    (run_copy / "my-notes.txt").write_text("mine")
    result = train([*args, "--overwrite_output_dir", "true"])
    said = capsys.readouterr().out
    assert f"overwrite_output_dir: removed the previous run in {run_copy}: adapter/, README.md, config.yaml, " \
           "checkpoints/, logs/" in said
    assert result.global_step == 1 and list_checkpoints(run_copy) == []  # the old run's checkpoints are gone
    assert (run_copy / "my-notes.txt").read_text() == "mine"  # not the run's: kept
    assert (run_copy / "adapter" / "adapter_model.safetensors").is_file()


def test_a_readme_of_the_users_is_not_a_finished_run(tmp_path):
    from hra_diffusion.training.run_guard import check_output_dir

    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    cfg = dreambooth_hra.parse_args(["--output_dir", str(out), "--overwrite_output_dir", "true"])
    assert check_output_dir(cfg, is_main=True) == []  # nothing of a run to remove
    assert (out / "README.md").read_text() == "# my project\n"


def test_a_crashed_run_points_to_resume(run_copy, tiny_random_sd_dir, generated_subject_dir):
    shutil.rmtree(run_copy / "adapter")
    (run_copy / "README.md").unlink()
    before = tree(run_copy)
    with pytest.raises(ConfigError) as info:
        train(args_for(tiny_random_sd_dir, generated_subject_dir, run_copy))
    message = str(info.value)
    assert "holds checkpoints of an unfinished run (checkpoint-2 is the newest)" in message
    assert "--resume_from_checkpoint latest" in message and "\n" not in message
    assert tree(run_copy) == before
    with pytest.raises(ConfigError, match="exclude each other"):
        train(args_for(tiny_random_sd_dir, generated_subject_dir, run_copy, "--resume_from_checkpoint", "latest",
                       "--overwrite_output_dir", "true"))


# ---- NaN, Ctrl-C, kill -9 --------------------------------------------------------------------------------

def test_nan_loss_stops_names_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_random_sd_dir,
                                                                      generated_subject_dir, monkeypatch):
    from hra_diffusion.training.dreambooth import DreamBoothTask

    real_loss = DreamBoothTask.loss
    calls = {"n": 0}

    def nan_at_third(self, modules, batch, generator):
        calls["n"] += 1
        loss, logs = real_loss(self, modules, batch, generator)
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    monkeypatch.setattr(DreamBoothTask, "loss", nan_at_third)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train(args_for(tiny_random_sd_dir, generated_subject_dir, out, "--max_train_steps", "4",
                       "--checkpointing_steps", "2"))
    message = str(info.value)
    assert "the loss became nan at step 3" in message
    assert f"the last good checkpoint {out / 'checkpoints' / 'checkpoint-2'} is kept" in message
    assert not (out / "adapter").exists()
    verify_checkpoint(out / "checkpoints" / "checkpoint-2")
    assert [s for s, _ in list_checkpoints(out)] == [2]


def _start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """Start a training process (own session), collecting its output lines in the background."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    chunks: list[str] = []

    def read() -> None:
        for raw in iter(lambda: proc.stdout.read1(4096), b""):
            chunks.append(raw.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.reader = reader  # type: ignore[attr-defined]
    return proc, chunks


def _wait_for(predicate, proc, chunks, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None and not proc.reader.is_alive():  # it ended (and said all it had to) first
            if predicate():
                return
            raise AssertionError(f"the process ended (exit code {proc.returncode}) before the awaited state; "
                                 "output:\n" + "".join(chunks)[-3000:])
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out; output:\n" + "".join(chunks)[-3000:])
        time.sleep(0.2)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra}


def test_ctrl_c_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    """Ctrl-C in a terminal signals the whole process group: `accelerate launch` and the training process."""
    out = tmp_path / "run"
    args = args_for(tiny_random_sd_dir, generated_subject_dir, out, "--max_train_steps", "100000",
                    "--checkpointing_steps", "100000")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "train/dreambooth_hra.py", *args]
    proc, chunks = _start(cmd, _env())  # no OMP_NUM_THREADS: accelerate launch sets it to 1

    def steps_done() -> int:
        found = re.findall(r"(\d+)/100000", "".join(chunks))
        return max(map(int, found), default=0)

    _wait_for(lambda: steps_done() >= 1, proc, chunks)
    os.killpg(proc.pid, signal.SIGINT)
    _wait_for(lambda: not proc.reader.is_alive(), proc, chunks, timeout=180)  # the trainer closed its output
    proc.wait(timeout=30)
    said = "".join(chunks)
    m = re.search(r"training interrupted \(Ctrl-C\) after step (\d+): checkpoint (\S+) is saved\. "
                  r"Resume with: (.*)--resume_from_checkpoint latest", said)
    assert m, said[-3000:]
    step = int(m.group(1))
    assert step >= 1 and Path(m.group(2)) == out / "checkpoints" / f"checkpoint-{step}"
    assert verify_checkpoint(out / "checkpoints" / f"checkpoint-{step}")["step"] == step
    assert "--max_train_steps 100000" in m.group(3)
    assert not (out / "adapter").exists()
    if _physical_cores() > 1:  # accelerate's OMP_NUM_THREADS=1 was replaced by the physical cores
        assert f"training on CPU with {_physical_cores()} threads per process" in said

    _reset_accelerate()
    result = train([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 1)])
    assert result.resumed_from.name == f"checkpoint-{step}" and result.global_step == step + 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_kill_9_during_training_then_resume(tmp_path, tiny_random_sd_dir, generated_subject_dir, capsys):
    out = tmp_path / "run"
    args = args_for(tiny_random_sd_dir, generated_subject_dir, out, "--max_train_steps", "100000",
                    "--checkpointing_steps", "1", "--checkpoints_total_limit", "3")
    proc, chunks = _start([sys.executable, "train/dreambooth_hra.py", *args], _env(OMP_NUM_THREADS="1"))
    _wait_for(lambda: len(list_checkpoints(out)) >= 2, proc, chunks)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    newest = list_checkpoints(out)[-1][0]
    capsys.readouterr()
    result = train([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", str(newest + 1)])
    # the newest complete checkpoint (or, had the kill hit it mid-write, the one before)
    assert result.resumed_from.name in (f"checkpoint-{newest}", f"checkpoint-{newest - 1}")
    assert result.global_step == newest + 1 and (out / "adapter").is_dir()
    said = capsys.readouterr().out
    assert "resumed from" in said and "max_train_steps 100000 -> " in said


# ---- small pieces ------------------------------------------------------------------------------------------

def test_accelerate_default_threads_is_told_from_a_users_choice():
    launched = {"OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}
    launcher = ["python", "accelerate", "launch", "train/dreambooth_hra.py"]
    assert accelerate_default_threads(launched, {}, launcher)  # accelerate's default
    assert not accelerate_default_threads(launched, {"OMP_NUM_THREADS": "1"}, launcher)  # the user's shell
    assert not accelerate_default_threads(launched, {}, [*launcher[:3], "--num_cpu_threads_per_process", "1"])
    assert not accelerate_default_threads(launched, {}, [*launcher[:3], "--num_cpu_threads_per_process=1"])
    assert not accelerate_default_threads({**launched, "OMP_NUM_THREADS": "4"}, {}, launcher)
    assert not accelerate_default_threads({"OMP_NUM_THREADS": "1"}, {}, launcher)  # not accelerate launch
    assert not accelerate_default_threads(launched, None, None)  # parent unreadable: keep it


def test_resume_command_drops_overwrite_and_adds_resume():
    cfg = dreambooth_hra.parse_args(["--output_dir", "o", "--overwrite_output_dir", "true", "--max_train_steps", "5"])
    cfg.command = "accelerate launch train/dreambooth_hra.py --output_dir o --overwrite_output_dir true --max_train_steps 5"
    assert resume_command(cfg) == ("accelerate launch train/dreambooth_hra.py --output_dir o --max_train_steps 5 "
                                   "--resume_from_checkpoint latest")


def test_launchers_sigterm_after_ctrl_c_is_the_same_request_a_second_ctrl_c_is_not():
    """accelerate launch answers Ctrl-C by sending the trainer SIGTERM: that must not cancel the save."""
    from types import SimpleNamespace

    from hra_diffusion.training.run_guard import RunGuard

    guard = RunGuard.__new__(RunGuard)
    guard.accelerator = SimpleNamespace(is_local_main_process=False)
    guard._stop, guard._launcher_term, guard._previous = None, False, {}
    guard._on_signal(signal.SIGINT, None)
    guard._on_signal(signal.SIGTERM, None)  # the launcher passing the Ctrl-C on
    assert guard._stop == "Ctrl-C"
    with pytest.raises(KeyboardInterrupt, match="again"):
        guard._on_signal(signal.SIGINT, None)  # the user pressing Ctrl-C a second time
    guard._stop, guard._launcher_term = None, False
    guard._on_signal(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM again"):
        guard._on_signal(signal.SIGTERM, None)
