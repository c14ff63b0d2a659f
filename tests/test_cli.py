"""The hra-diffusion command: help, generate -> score in-process, the feature cache, bad input messages."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_score import random_hra_adapter, random_image, save_png, tiny_clip, tiny_dino, write_samples

from hra_diffusion.cli import SUBCOMMANDS, build_parser, main


def test_help_from_the_console_script_and_python_m(capsys):
    script = Path(sys.executable).parent / "hra-diffusion"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "generate" in out.stdout and "score" in out.stdout and "examples:" in out.stdout
    # python -m, with an import trace: --help never imports the heavy libraries
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "hra_diffusion", "generate", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--merge" in out.stdout and "--scheduler" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "torch" in imported  # (the package __init__ imports the core, which needs torch)
    assert not imported & {"diffusers", "open_clip", "transformers", "controlnet_aux"}
    with pytest.raises(SystemExit):
        main(["score", "subject", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--reference" in text and "ALL real x generated pairs" in text and "facebook/dino-vits16" in text
    assert "(default: None)" not in text


def test_parser_has_one_function_pair_per_subcommand():
    assert set(SUBCOMMANDS) == {"generate", "score", "export"}
    args = build_parser().parse_args(["generate", "--out", "x", "--prompt", "a", "--prompt", "b", "--merge",
                                      "--scheduler", "euler", "--seeds", "1", "2"])
    assert args.prompts == ["a", "b"] and args.merge and args.seeds == [1, 2] and args.func is SUBCOMMANDS["generate"][1]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--out", "x", "--scheduler", "warp"])


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_bad_input_messages(tmp_path, capsys):
    rc, _, err = _run(["score", "subject", "--samples", str(tmp_path / "missing"), "--metrics", "dino"], capsys)
    assert rc == 2 and "samples folder" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(["score", "control", "--samples", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "has no images" in err
    samples = write_samples(tmp_path / "s", [random_image(0)])
    rc, _, err = _run(["score", "subject", "--samples", str(samples), "--reference", str(tmp_path / "noref"),
                       "--metrics", "dino"], capsys)
    assert rc == 2 and "reference folder" in err and "does not exist" in err
    (tmp_path / "emptyref").mkdir()
    rc, _, err = _run(["score", "subject", "--samples", str(samples), "--reference", str(tmp_path / "emptyref"),
                       "--metrics", "dino"], capsys)
    assert rc == 2 and "reference folder" in err and "has no images" in err
    rc, _, err = _run(["score", "subject", "--samples", str(samples), "--metrics", "dino,fid"], capsys)
    assert rc == 2 and "unknown metric 'fid'" in err and "clip_t" in err
    rc, _, err = _run(["score", "control", "--samples", str(samples), "--metrics", "sharpness"], capsys)
    assert rc == 2 and "unknown metric 'sharpness'" in err and "canny" in err
    (samples / "img000.png").unlink()
    rc, _, err = _run(["score", "control", "--samples", str(samples)], capsys)
    assert rc == 2 and "manifest.jsonl:1" in err and "img000.png" in err and "does not exist" in err
    rc, _, err = _run(["generate", "--out", str(tmp_path / "g"), "--adapter", str(tmp_path / "noadapter"),
                       "--prompt", "x"], capsys)
    assert rc == 2 and "adapter directory" in err and "does not exist" in err
    assert not list(tmp_path.rglob("metrics.json"))


def test_missing_weights_name_the_model_and_write_nothing(tmp_path, capsys):
    ref = save_png(tmp_path / "ref" / "r.png", random_image(1))
    samples = write_samples(tmp_path / "s", [random_image(2)], reference_dir=ref.parent)
    rc, _, err = _run(["score", "subject", "--samples", str(samples), "--metrics", "dino"], capsys)
    assert rc == 2 and "facebook/dino-vits16" in err and "--dino-model" in err
    rc, _, err = _run(["score", "subject", "--samples", str(samples), "--metrics", "clip_t"], capsys)
    assert rc == 2 and "ViT-L-14 / openai" in err and "--clip-pretrained" in err
    assert not (samples / "metrics.json").exists() and not (samples / "report.html").exists()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Random-weight DINO (a transformers folder) and CLIP (a .safetensors file): the real-weights CLI path."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    tiny_dino().save_pretrained(root / "dino-vits16")
    model, _ = tiny_clip()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "clip.safetensors"))
    return {"dino": str(root / "dino-vits16"), "clip": str(root / "clip.safetensors")}


@pytest.mark.slow
def test_generate_then_score_through_the_cli(tmp_path, capsys, weights):
    from diffusers import UNet2DConditionModel
    from tiny_models import tiny_pipeline_dir

    base = tiny_pipeline_dir(tmp_path / "base")
    adapter = random_hra_adapter(UNet2DConditionModel.from_pretrained(base / "unet"), tmp_path / "adapter",
                                 base_model=str(base))
    refs = tmp_path / "refs"
    for i in range(2):
        save_png(refs / f"r{i}.png", random_image(i, 32))
    out = tmp_path / "samples"
    rc, stdout, err = _run(["generate", "--adapter", str(adapter), "--prompt", "a photo of qwe toy", "--num-images",
                            "2", "--steps", "1", "--guidance", "1", "--reference-dir", str(refs), "--out", str(out),
                            "--no-progress"], capsys)  # no --base: the adapter's recorded base folder
    assert rc == 0, err
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["base"] == str(base.resolve())
    argv = ["score", "subject", "--samples", str(out), "--metrics", "dino,clip_i,clip_t",
            "--dino-model", weights["dino"], "--clip-model", "ViT-S-32",
            "--clip-pretrained", weights["clip"], "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    t0 = time.perf_counter()
    rc, stdout, err = _run(argv, capsys)
    first = time.perf_counter() - t0
    assert rc == 0, err
    assert "dino" in stdout and "clip_t" in stdout and "report.html" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["summary"]) == {"dino", "clip_i", "clip_t"} and metrics["counts"]["scored"] == 2
    t0 = time.perf_counter()
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text())["summary"] == metrics["summary"]
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 2  # one file per extractor
    print(f"score subject: first {first:.1f}s, cached {time.perf_counter() - t0:.1f}s")


def test_score_control_through_the_cli(tmp_path, capsys):
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:50, 12:40] = 255
    src = save_png(tmp_path / "src.png", img)
    samples = write_samples(tmp_path / "s", [img, np.roll(img, 20, axis=1)], extra=[{"condition_source": str(src)}] * 2)
    rc, stdout, err = _run(["score", "control", "--samples", str(samples), "--out", str(tmp_path / "report"),
                            "--no-progress"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert doc["per_image"][0]["canny_f1"] == pytest.approx(1.0) and doc["per_image"][1]["canny_f1"] < 0.5
    assert doc["summary"]["canny_f1"] == pytest.approx((1.0 + doc["per_image"][1]["canny_f1"]) / 2)
    rc, _, err = _run(["score", "control", "--samples", str(samples), "--metrics", "canny,depth",
                       "--out", str(tmp_path / "r2")], capsys)
    assert rc == 2 and "Intel/dpt-hybrid-midas" in err and "--depth-model" in err
    rc, _, err = _run(["score", "control", "--samples", str(samples), "--metrics", "canny,depth", "--skip-unavailable",
                       "--out", str(tmp_path / "r3")], capsys)
    assert rc == 0 and "depth not computed" in (tmp_path / "r3" / "report.html").read_text()


def test_generate_suggests_the_score_command_for_its_samples(tmp_path):
    from hra_diffusion.cli import score_hint

    (tmp_path / "manifest.jsonl").write_text('{"file": "p0000_00_s0.png", "adapter_kind": "control"}\n')
    assert score_hint(tmp_path).endswith(f"score control --samples {tmp_path}")
    (tmp_path / "manifest.jsonl").write_text('{"adapter_kind": "subject", "reference_dir": "/photos"}\n')
    assert score_hint(tmp_path).endswith(f"score subject --samples {tmp_path}")
    (tmp_path / "manifest.jsonl").write_text('{"adapter_kind": "subject", "reference_dir": null}\n')
    assert f"score subject --samples {tmp_path} --metrics clip_t (add --reference" in score_hint(tmp_path)
    assert " score subject --samples " in score_hint(tmp_path / "none")
