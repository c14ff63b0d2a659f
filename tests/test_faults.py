"""Faults a user can cause or meet, through the command as they would run it: every refusal is one line that
names the file and what to do, and the user's files (adapters, inputs, finished images, their own files in
an output folder) are intact afterwards.

generate: kill -9 mid-run then the same command completes only the missing images; a full disk likewise;
other settings into a finished folder are refused, --overwrite removes only generate's files; --out that
overlaps an input is refused; a pickle posing as adapter_model.safetensors is named and never unpickled.
score: a truncated PNG / a non-image named .jpg are named; a manifest shorter than the folder warns.
The boundary: --debug / HRA_DIFFUSION_DEBUG=1 show the traceback; a bug keeps its traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_score import random_hra_adapter, random_image, save_png, write_samples
from PIL import Image

from hra_diffusion.cli import main
from hra_diffusion.errors import (
    EXIT_INTERRUPTED,
    HRAWarning,
    UserError,
    error_boundary,
    pop_debug_flag,
    run_guarded,
)
from hra_diffusion.sample_dir import check_not_input

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of qwe toy"


# ---- helpers ---------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256 of the bytes, mtime in ns)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line of stderr (and it must be exactly one, without a traceback)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def adapter(tiny_random_sd_dir, tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_random_sd_dir / "unet")
    return random_hra_adapter(unet, tmp_path_factory.mktemp("adapters") / "hra", scale=1.0,
                              base_model=str(tiny_random_sd_dir))


def gen_args(adapter: Path, base: Path, out: Path, *extra) -> list:
    return ["generate", "--adapter", adapter, "--base", base, "--prompt", PROMPT, "--steps", "1", "--guidance", "1",
            "--scheduler", "ddim", "--batch-size", "1", "--device", "cpu", "--no-progress", "--out", out, *extra]


# ---- generate: interrupted runs complete -------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
import hra_diffusion.generate as g
calls = [0]
sample = g._sample
def killing_sample(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # two images are written; the third is being made
        os.kill(os.getpid(), signal.SIGKILL)
    return sample(*args, **kwargs)
g._sample = killing_sample
from hra_diffusion.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_generate_then_the_same_command_makes_only_the_missing_images(
        tmp_path, tiny_random_sd_dir, adapter, capsys):
    out = tmp_path / "samples"
    argv = [str(a) for a in gen_args(adapter, tiny_random_sd_dir, out, "--num-images", "4")]
    script = tmp_path / "kill_generate.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -9, proc.stderr  # really killed by SIGKILL
    assert pngs(out) == ["p0000_00_s0.png", "p0000_01_s1.png"]
    assert not (out / "manifest.jsonl").exists()  # an unfinished set never looks finished
    assert json.loads((out / "generate_config.json").read_text())["complete"] is False
    with open(out / ".generate-progress.jsonl", "a") as f:
        f.write('{"file": "p0000_02_s2.png", "prom')  # a row cut short by the kill
    before = snapshot(out)

    rc, _, err = run_cli(["score", "control", "--samples", out], capsys)
    assert rc == 2 and "has not finished" in error_line(err) and "run the same generate command" in err

    rc, stdout, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "resuming: 2 of 4 images are already in" in err and "making the other 2" in err
    after = snapshot(out)
    for name in ("p0000_00_s0.png", "p0000_01_s1.png"):
        assert after[name] == before[name]  # same bytes, same mtime: not made again
    assert pngs(out) == [f"p0000_{k:02d}_s{k}.png" for k in range(4)]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == pngs(out) and [r["seed"] for r in rows] == list(range(4))
    assert json.loads((out / "generate_config.json").read_text())["complete"] is True
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no progress or temporary files

    clean = tmp_path / "clean"  # the resumed set equals an uninterrupted run
    argv_clean = [str(a) for a in gen_args(adapter, tiny_random_sd_dir, clean, "--num-images", "4")]
    assert run_cli(argv_clean, capsys)[0] == 0
    for name in pngs(out):
        assert np.array_equal(pixels(out / name), pixels(clean / name)), name

    rc, _, err = run_cli(argv, capsys)  # a finished set: nothing to do, nothing touched
    assert rc == 0 and "nothing to do" in err and snapshot(out) == after


def test_disk_full_during_generate_is_one_line_and_the_rerun_completes(
        tmp_path, tiny_random_sd_dir, adapter, capsys, monkeypatch):
    import hra_diffusion.generate as g

    out = tmp_path / "samples"
    argv = gen_args(adapter, tiny_random_sd_dir, out, "--num-images", "4")
    save, calls = g._save_image, []

    def full_disk(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(image, path)

    monkeypatch.setattr(g, "_save_image", full_disk)
    rc, _, err = run_cli(argv, capsys)
    line = error_line(err)
    assert rc == 2 and "No space left on device" in line and "p0000_02_s2.png" in line
    assert "free some disk space" in line and "re-run the same command" in line
    assert pngs(out) == ["p0000_00_s0.png", "p0000_01_s1.png"]
    before = snapshot(out)
    monkeypatch.setattr(g, "_save_image", save)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0 and "resuming: 2 of 4" in err
    after = snapshot(out)
    assert all(after[n] == before[n] for n in ("p0000_00_s0.png", "p0000_01_s1.png"))
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 4


def test_ctrl_c_during_generate_says_how_to_finish(tmp_path, tiny_random_sd_dir, adapter, capsys, monkeypatch):
    import hra_diffusion.generate as g

    out = tmp_path / "samples"
    argv = gen_args(adapter, tiny_random_sd_dir, out, "--num-images", "2")
    sample, calls = g._sample, []

    def ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    monkeypatch.setattr(g, "_sample", ctrl_c)
    rc, _, err = run_cli(argv, capsys)
    assert rc == EXIT_INTERRUPTED and "Traceback" not in err
    assert "interrupted with 1 of 2 images" in err and "run the same command again" in err
    assert err.strip().splitlines()[-1] == "hra-diffusion generate: interrupted"
    assert pngs(out) == ["p0000_00_s0.png"] and not (out / "manifest.jsonl").exists()
    monkeypatch.setattr(g, "_sample", sample)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0 and "resuming: 1 of 2" in err and len(pngs(out)) == 2


# ---- generate: the output folder ---------------------------------------------------------------------

def test_other_settings_are_refused_and_overwrite_keeps_foreign_files(tmp_path, tiny_random_sd_dir, adapter, capsys):
    out = tmp_path / "samples"
    assert run_cli(gen_args(adapter, tiny_random_sd_dir, out, "--num-images", "2"), capsys)[0] == 0
    (out / "notes.txt").write_text("my notes on these samples")
    (out / "metrics.json").write_text('{"summary": {}}')  # as `score` writes it
    save_png(out / "holiday.png", random_image(3, 32))  # an image generate did not make
    save_png(out / "conditions" / "mine.png", random_image(4, 32))
    foreign = ["notes.txt", "metrics.json", "holiday.png", "conditions/mine.png"]
    before = snapshot(out)

    rc, _, err = run_cli(gen_args(adapter, tiny_random_sd_dir, out, "--num-images", "2", "--steps", "2"), capsys)
    line = error_line(err)
    assert rc == 2 and "other settings (steps 1 -> 2)" in line and "--overwrite" in line
    assert snapshot(out) == before

    rc, _, err = run_cli(gen_args(adapter, tiny_random_sd_dir, out, "--num-images", "2", "--steps", "2",
                                  "--overwrite"), capsys)
    assert rc == 0, err
    assert "removed 4 files a previous generate run wrote" in err  # 2 images, manifest, config
    after = snapshot(out)
    assert {n: after[n] for n in foreign} == {n: before[n] for n in foreign}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [2, 2] and after["p0000_00_s0.png"] != before["p0000_00_s0.png"]

    stranger = tmp_path / "stranger"  # a folder generate never wrote, with a file of a name it would write
    save_png(stranger / "p0000_00_s0.png", random_image(5, 32))
    before = snapshot(stranger)
    rc, _, err = run_cli(gen_args(adapter, tiny_random_sd_dir, stranger, "--num-images", "1"), capsys)
    assert rc == 2 and "not written by generate" in error_line(err) and "--overwrite" in err
    rc, _, err = run_cli(gen_args(adapter, tiny_random_sd_dir, stranger, "--num-images", "1", "--overwrite"), capsys)
    assert rc == 2 and "p0000_00_s0.png' is in the way" in error_line(err)
    assert snapshot(stranger) == before


@pytest.mark.parametrize("case", ["out-is-adapter", "out-inside-adapter", "out-contains-reference",
                                  "out-is-base", "out-contains-prompts-file", "out-contains-condition"])
def test_out_that_overlaps_an_input_is_refused(case, tmp_path, tiny_random_sd_dir, adapter, capsys):
    mine = tmp_path / "adapter"
    shutil.copytree(adapter, mine)
    base = tmp_path / "base"
    shutil.copytree(tiny_random_sd_dir, base)
    data = tmp_path / "data"
    save_png(data / "ref" / "r0.png", random_image(1, 32))
    (data / "prompts.txt").write_text(PROMPT + "\n")
    inputs = {"adapter": mine, "base": base, "data": data}
    before = {k: snapshot(v) for k, v in inputs.items()}
    adapter_dir, extra = mine, []
    if case == "out-contains-condition":  # a control adapter (checked before any model is loaded)
        adapter_dir = tmp_path / "control-adapter"
        shutil.copytree(adapter, adapter_dir)
        doc = json.loads((adapter_dir / "adapter_config.json").read_text())
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**doc, "condition_encoder": {"x": 1}}))
        extra = ["--condition", data / "ref" / "r0.png"]
    out, expected, more = {
        "out-is-adapter": (mine, "is the adapter folder", []),
        "out-inside-adapter": (mine / "samples", "lies inside the adapter folder", []),
        "out-contains-reference": (data, "contains the reference folder", ["--reference-dir", data / "ref"]),
        "out-is-base": (base, "is the base model folder", []),
        "out-contains-prompts-file": (data, "contains the prompts file", ["--prompts-file", data / "prompts.txt"]),
        "out-contains-condition": (data / "ref", "is the condition image's folder", []),
    }[case]
    argv = gen_args(adapter_dir, base, out, "--num-images", "1", "--overwrite", *extra, *more)
    rc, _, err = run_cli(argv, capsys)
    line = error_line(err)
    assert rc == 2 and expected in line and "choose another --out" in line, line
    assert {k: snapshot(v) for k, v in inputs.items()} == before  # nothing written, nothing removed
    assert not (mine / "samples").exists()
    # a subfolder beside the condition images is fine (--condition edge.png --out samples)
    check_not_input(data / "ref" / "samples", [("condition image's folder", data / "ref", False)])


class _Payload:
    """A pickle that makes a folder when it is unpickled: proof that nothing is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("kind", ["hra", "lora"])
def test_pickle_posing_as_adapter_safetensors_is_named_and_never_loaded(kind, tmp_path, tiny_random_sd_dir,
                                                                         adapter, capsys):
    folder = tmp_path / f"{kind}-adapter"
    if kind == "hra":
        shutil.copytree(adapter, folder)
    else:
        from diffusers import UNet2DConditionModel

        from hra_diffusion.adapters.peft_baselines import BaselineSpec, inject_baseline, save_peft_adapter

        unet = UNet2DConditionModel.from_pretrained(tiny_random_sd_dir / "unet")
        inject_baseline(unet, BaselineSpec("lora", r=2, seed=0))
        save_peft_adapter(unet, folder, base_model=str(tiny_random_sd_dir))
    marker = tmp_path / "UNPICKLED"
    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    before = snapshot(folder)
    out = tmp_path / "samples"
    rc, _, err = run_cli(gen_args(folder, tiny_random_sd_dir, out, "--num-images", "1"), capsys)
    line = error_line(err)
    assert rc == 2 and str(folder / "adapter_model.safetensors") in line
    assert "not a valid safetensors file" in line and "pickle" in line and "save or download the adapter again" in line
    assert not marker.exists() and snapshot(folder) == before and not out.exists()


def test_a_condition_image_that_is_not_an_image_is_named_before_anything_is_loaded(tmp_path, tiny_random_sd_dir,
                                                                                   adapter, capsys):
    cond = tmp_path / "edges" / "edge.jpg"
    cond.parent.mkdir()
    cond.write_text("not a JPEG at all")
    before = snapshot(cond.parent)
    rc, _, err = run_cli(gen_args(adapter, tiny_random_sd_dir, tmp_path / "out", "--condition", cond), capsys)
    line = error_line(err)
    assert rc == 2 and f"condition image {str(cond)!r} is not an image file" in line and "replace or remove it" in line
    assert snapshot(cond.parent) == before and not (tmp_path / "out").exists()


def test_base_model_not_on_this_machine_is_one_line(tmp_path, adapter, capsys):
    before = snapshot(adapter)
    rc, _, err = run_cli(["generate", "--adapter", adapter, "--base", "someone/sd-model", "--prompt", PROMPT,
                          "--device", "cpu", "--out", tmp_path / "out"], capsys)
    line = error_line(err)
    assert rc == 2 and "could not load base model 'someone/sd-model'" in line and "--base DIR" in line
    assert snapshot(adapter) == before and not (tmp_path / "out").exists()


def test_debug_flag_and_env_show_the_traceback_and_bugs_keep_theirs(tmp_path, tiny_random_sd_dir, adapter,
                                                                    capsys, monkeypatch):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    argv = gen_args(folder, tiny_random_sd_dir, tmp_path / "o", "--num-images", "1")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "not a valid safetensors file" in error_line(err) and "truncated" in err
    for variant in (["--debug", *argv], [*argv, "--debug"]):
        rc, _, err = run_cli(variant, capsys)
        assert rc == 2 and "Traceback (most recent call last)" in err and "AdapterFileError" in err
        assert err.strip().splitlines()[-1].startswith("hra-diffusion generate: error: ")
    monkeypatch.setenv("HRA_DIFFUSION_DEBUG", "1")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and "Traceback" in err
    monkeypatch.setenv("HRA_DIFFUSION_DEBUG", "0")
    assert "Traceback" not in run_cli(argv, capsys)[2]

    import hra_diffusion.generate as g

    def bug(*args, **kwargs):
        return {}["missing key"]

    monkeypatch.setattr(g, "generate", bug)
    with pytest.raises(KeyError):  # not an expected error: it propagates with its traceback
        main([str(a) for a in gen_args(adapter, tiny_random_sd_dir, tmp_path / "o2", "--num-images", "1")])


def test_the_boundary_for_scripts(capsys):
    with pytest.raises(SystemExit) as stop:
        with error_boundary("train.py"):
            raise UserError("config 'x.yaml': key 'lr' is not a number\nfix it and run again")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "train.py: error: config 'x.yaml': key 'lr' is not a number fix it and run again\n"
    with pytest.raises(ValueError, match="invalid literal"):  # raised outside the package: a bug, not a refusal
        with error_boundary("train.py"):
            int("x")
    with pytest.raises(SystemExit) as stop:
        with error_boundary("train.py"):
            open("/nonexistent/folder/file.txt")
    assert stop.value.code == 2 and "No such file or directory: '/nonexistent/folder/file.txt'" in capsys.readouterr().err

    def interrupted():
        raise KeyboardInterrupt

    assert run_guarded(interrupted, prog="train.py") == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "train.py: interrupted\n"
    assert run_guarded(lambda: 7, prog="train.py") == 7
    argv = ["--config", "x.yaml", "--debug", "--lr", "1"]
    assert pop_debug_flag(argv) and argv == ["--config", "x.yaml", "--lr", "1"] and not pop_debug_flag(argv)


# ---- score -----------------------------------------------------------------------------------------

def _control_samples(folder: Path, n: int) -> Path:
    img = np.zeros((32, 32, 3), np.uint8)
    img[6:26, 8:24] = 255
    src = save_png(folder.parent / "src.png", img)
    return write_samples(folder, [np.roll(img, i, axis=1) for i in range(n)], extra=[{"condition_source": str(src)}] * n)


def test_score_names_a_truncated_png_and_a_non_image(tmp_path, capsys):
    samples = _control_samples(tmp_path / "s", 2)
    data = (samples / "img001.png").read_bytes()
    (samples / "img001.png").write_bytes(data[: len(data) // 2])
    before = snapshot(samples)
    rc, _, err = run_cli(["score", "control", "--samples", samples], capsys)
    line = error_line(err)
    assert rc == 2 and str(samples / "img001.png") in line and "cannot be decoded" in line and "truncated" in line
    assert "replace or remove it" in line
    assert snapshot(samples) == before and not (samples / "metrics.json").exists()

    (samples / "img001.png").write_bytes(data)
    (samples / "fake.jpg").write_text("this is not a JPEG")
    rows = (samples / "manifest.jsonl").read_text().splitlines()
    rows[1] = json.dumps({**json.loads(rows[1]), "file": "fake.jpg"})
    (samples / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    rc, _, err = run_cli(["score", "control", "--samples", samples], capsys)
    line = error_line(err)
    assert rc == 2 and str(samples / "fake.jpg") in line and "is not an image file" in line


def test_score_warns_when_the_manifest_lists_fewer_images_than_the_folder_holds(tmp_path, capsys):
    from hra_diffusion.metrics.control_metrics import score_control

    samples = _control_samples(tmp_path / "s", 3)
    rows = (samples / "manifest.jsonl").read_text().splitlines()
    (samples / "manifest.jsonl").write_text("\n".join(rows[:2]) + "\n")
    rc, _, err = run_cli(["score", "control", "--samples", samples, "--no-progress"], capsys)
    assert rc == 0, err
    warnings_ = [line for line in err.splitlines() if line.strip()]
    assert len(warnings_) == 1 and warnings_[0].startswith("hra-diffusion score: warning: 1 image in "), err
    assert "'img002.png'" in warnings_[0] and "will not be scored" in warnings_[0] and "the 2 listed images" in err
    assert json.loads((samples / "metrics.json").read_text())["counts"]["scored"] == 2
    with pytest.warns(HRAWarning, match="1 image in .* not in manifest.jsonl"):
        score_control(samples)
    (samples / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    rc, _, err = run_cli(["score", "control", "--samples", samples, "--no-progress"], capsys)
    assert rc == 0 and "warning" not in err
