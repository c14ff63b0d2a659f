"""Both trainers on the tiny SDXL-shaped pipeline: DreamBooth with prior preservation and HRA on both text
encoders (exact resume, save, generate, export), control (save, generate), the time ids each image's size
condition gives the UNet, and the separate VAE. The 2-process DDP run of the SDXL path is in test_dreambooth.py."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hra_diffusion import read_adapter
from hra_diffusion.training import latest_checkpoint

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "train"))
import control_hra  # noqa: E402
import dreambooth_hra  # noqa: E402
from conftest import PLAIN_DREAMBOOTH_ARGS  # noqa: E402
from test_control_data import make_control_dir  # noqa: E402

WIDE = (49, 32)  # (w, h) of the non-square training image: resized to 49 x 32, centre crop left 8 (flipped: 9)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; each in-process run starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def wide_subject(generated_subject_dir, tmp_path_factory) -> Path:
    """The generated subject (four 32 x 32 images) plus one 49 x 32 image."""
    root = tmp_path_factory.mktemp("wide") / "subject"
    shutil.copytree(generated_subject_dir, root)
    Image.new("RGB", WIDE, (220, 30, 30)).save(root / "train" / "wide.png")
    return root


def record_time_ids(monkeypatch) -> list[list[int]]:
    """Every training-time UNet call's ``added_cond_kwargs['time_ids']`` rows (calls with grad only)."""
    from diffusers import UNet2DConditionModel

    seen: list[list[int]] = []
    forward = UNet2DConditionModel.forward

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled():
            added = kwargs.get("added_cond_kwargs") or {}
            assert "time_ids" in added and "text_embeds" in added, "an SDXL UNet call without added_cond_kwargs"
            seen.extend(added["time_ids"].round().long().tolist())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    return seen


def dreambooth_args(base: Path, subject: Path, out: Path, *extra: str) -> list[str]:
    return [
        *PLAIN_DREAMBOOTH_ARGS,
        "--pretrained_model", str(base), "--subject_file", str(subject / "subject.json"), "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--validation_prompts", "[]", "--report_to", "none",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--with_prior_preservation", "true",
        "--num_class_images", "2", "--class_inference_steps", "2", "--train_text_encoder", "true",
        "--learning_rate", "5e-3", *extra,
    ]


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


# ---- DreamBooth ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_dreambooth(tiny_sdxl_dir, wide_subject, tmp_path_factory):
    """One 4-step SDXL DreamBooth run (prior preservation, HRA on both text encoders, cached latents, random flip,
    a checkpoint at step 2, validation at the end) and the time ids its UNet calls got."""
    from _pytest.monkeypatch import MonkeyPatch

    out = tmp_path_factory.mktemp("sdxl-db") / "run"
    with MonkeyPatch.context() as mp:
        seen = record_time_ids(mp)
        result = dreambooth_hra.main(dreambooth_hra.parse_args(dreambooth_args(
            tiny_sdxl_dir, wide_subject, out, "--cache_latents", "true", "--random_flip", "true",
            "--validation_prompts", "a photo of qwe square", "--num_validation_images", "1",
            "--validation_inference_steps", "2")))
    _fresh_state()
    return out, result, seen


def _fresh_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow
def test_dreambooth_sdxl_outputs(sdxl_dreambooth, tiny_sdxl_dir):
    from transformers import CLIPTextModel

    out, result, seen = sdxl_dreambooth
    assert result.global_step == 4
    # the UNet adapter and both text-encoder parts, fp32, moved away from the identity init
    for part, n_layers in (("", None), ("text_encoder", 1), ("text_encoder_2", 3)):
        doc, u, _ = read_adapter(out / "adapter" / part)
        assert u and all(t.dtype == torch.float32 for t in u.values())
        assert any(not torch.equal(t[:, 0], t[:, 1]) for t in u.values()), part  # trained
        if n_layers is not None:
            assert all(k.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for k in u)
            assert len({k.split(".layers.")[1].split(".")[0] for k in u}) == n_layers, sorted(u)
    # the first text encoder's last layer feeds nothing SDXL reads (penultimate states): left out
    layers = CLIPTextModel.from_pretrained(tiny_sdxl_dir, subfolder="text_encoder").config.num_hidden_layers
    assert not any(f"layers.{layers - 1}." in k for k in read_adapter(out / "adapter" / "text_encoder")[1])
    # class images from the SDXL pipeline, validation grid, model card naming the SDXL pipeline
    assert len(list((out / "class_images").glob("class-*.png"))) == 2
    assert (out / "validation" / "step-000004.png").is_file()
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "StableDiffusionPipeline" not in card
    assert 'load_adapter(pipe.text_encoder_2, "' in card and "(SDXL)" in card
    assert "stable-diffusion, stable-diffusion-xl, text-to-image]" in card.split("---")[1]  # the hub's SDXL tag
    # the UNet got each image's time ids: original (h, w), crop (top, left), target; the 49 x 32 image at
    # crop left 8, or 9 when flipped (the left in the mirrored image, as diffusers records it)
    assert seen and {tuple(r) for r in seen} <= {(32, 32, 0, 0, 32, 32), (32, 49, 0, 8, 32, 32), (32, 49, 0, 9, 32, 32)}
    assert any(r[1] == 49 for r in seen)  # the wide image was trained on, with its own size


@pytest.mark.slow
def test_dreambooth_sdxl_resume_is_exact(sdxl_dreambooth, tiny_sdxl_dir, wide_subject, tmp_path):
    """Steps 3-4 resumed from the first run's checkpoint-2 give bit-identical UNet and text-encoder adapters."""
    straight = sdxl_dreambooth[0]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "class_images", resumed / "class_images")
    ckpt = latest_checkpoint(straight)
    assert ckpt.name == "checkpoint-2"
    assert {p.name for p in ckpt.glob("*.safetensors")} >= {"unet.safetensors", "text_encoder.safetensors",
                                                             "text_encoder_2.safetensors"}
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    result = dreambooth_hra.main(dreambooth_hra.parse_args(dreambooth_args(
        tiny_sdxl_dir, wide_subject, resumed, "--cache_latents", "true", "--random_flip", "true",
        "--validation_prompts", "a photo of qwe square", "--num_validation_images", "1",
        "--validation_inference_steps", "2", "--resume_from_checkpoint", "latest")))
    assert result.resumed_from.name == "checkpoint-2" and result.global_step == 4
    for part in ("", "text_encoder", "text_encoder_2"):
        a = load_file(str(straight / "adapter" / part / "adapter_model.safetensors"))
        b = load_file(str(resumed / "adapter" / part / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.slow
def test_dreambooth_sdxl_adapter_generates_and_exports(sdxl_dreambooth, tmp_path):
    from hra_diffusion.cli import main

    out = sdxl_dreambooth[0]
    common = ["--prompt", "a photo of qwe square", "--seeds", "1", "--steps", "2", "--no-progress"]
    # no --base: the adapter records the tiny SDXL folder it was trained on
    assert main(["generate", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "trained"), *common]) == 0
    base = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert main(["generate", "--base", base, "--out", str(tmp_path / "base"), *common]) == 0
    row = json.loads((tmp_path / "trained" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["text_encoders_adapted"] == ["text_encoder", "text_encoder_2"] and row["base"] == base
    trained, plain = _pixels(tmp_path / "trained"), _pixels(tmp_path / "base")
    assert list(trained) == list(plain) == ["p0000_00_s1.png"]
    assert np.abs(trained["p0000_00_s1.png"] - plain["p0000_00_s1.png"]).max() > 4  # the adapter changes the image
    assert main(["export", "--adapter", str(out / "adapter"), "--to", "lora", "--out", str(tmp_path / "lora")]) == 0
    keys = list(load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")))
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in keys), prefix


# ---- control ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_control_on_sdxl_trains_saves_generates(tiny_sdxl_dir, tmp_path, monkeypatch):
    from hra_diffusion.generate import GenerateConfig, generate

    data = make_control_dir(tmp_path / "data", n=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for key in ("image", "conditioning_image"):  # one 49 x 32 pair
        Image.open(data / rows[0][key]).resize(WIDE).save(data / rows[0][key])
    out = tmp_path / "run"
    seen = record_time_ids(monkeypatch)
    control_hra.main(control_hra.parse_args([
        "--pretrained_model", str(tiny_sdxl_dir), "--train_data_dir", str(data), "--validation_data_dir", "none",
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2", "--report_to", "none",
        "--max_train_steps", "3", "--encoder_learning_rate", "0.05", "--num_validation_conditions", "1",
        "--num_validation_images", "1", "--validation_inference_steps", "2"]))
    doc, u, extra = read_adapter(out / "adapter")
    assert doc["condition_encoder"]["conditioning_embedding_channels"] == 32  # the SDXL UNet's conv_in
    assert any(k.endswith("ff.net.0.proj") for k in u) and extra
    assert (out / "validation" / "step-000003.png").is_file()
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()
    assert {tuple(r) for r in seen} == {(32, 32, 0, 0, 32, 32), (32, 49, 0, 8, 32, 32)}  # no flip here
    # generate with the control adapter: the condition steers the SDXL UNet
    conditions = []
    for i, fill in enumerate((0, 255)):
        Image.new("RGB", (32, 32), (fill, fill, fill)).save(tmp_path / f"cond{i}.png")
        conditions.append(str(tmp_path / f"cond{i}.png"))
    images = [_pixels(generate(GenerateConfig(
        output_dir=str(tmp_path / f"out{i}"), adapter=str(out / "adapter"), prompts=["a red square"],
        conditions=[c], seeds=[1], steps=2, guidance_scale=5.0, progress=False)))["p0000_00_s1.png"]
        for i, c in enumerate(conditions)]
    assert np.abs(images[0] - images[1]).max() > 4


# ---- the separate VAE and the size condition's rules -----------------------------------------------

def test_separate_vae_is_loaded_and_checked(tiny_sdxl_dir, tiny_random_sd_dir, tmp_path):
    from diffusers import AutoencoderKL

    from hra_diffusion.models import BaseModelError, load_sd_components, vae_dtype_for

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    vae.register_to_config(scaling_factor=0.5, force_upcast=False)
    vae.save_pretrained(tmp_path / "vae-fix")  # a bare AutoencoderKL folder, like madebyollin/sdxl-vae-fp16-fix
    sd = load_sd_components(str(tiny_sdxl_dir), vae_model=str(tmp_path / "vae-fix"))
    assert sd.family == "sdxl" and sd.vae.config.scaling_factor == 0.5 and sd.vae_source == str(tmp_path / "vae-fix")
    assert sd.pipeline_class_name == "StableDiffusionXLPipeline" and len(sd.text_encoders) == 2
    own = load_sd_components(str(tiny_sdxl_dir), vae_model=str(tiny_sdxl_dir))  # a pipeline folder's vae/ works too
    assert own.vae.config.scaling_factor != 0.5
    with pytest.raises(BaseModelError, match=r"pretrained_vae_model .*nowhere.*AutoencoderKL"):
        load_sd_components(str(tiny_sdxl_dir), vae_model=str(tmp_path / "nowhere"))
    wrong = AutoencoderKL(latent_channels=8, block_out_channels=(32,), norm_num_groups=16)
    wrong.save_pretrained(tmp_path / "vae8")
    with pytest.raises(BaseModelError, match="8-channel latents but the UNet takes 4"):
        load_sd_components(str(tiny_sdxl_dir), vae_model=str(tmp_path / "vae8"))
    # fp16: SDXL's own VAE (force_upcast) stays fp32 as in diffusers; fp16-safe ones and SD 1.x VAEs follow
    assert vae_dtype_for("sdxl", torch.float16, True) == torch.float32
    assert vae_dtype_for("sdxl", torch.float16, False) == torch.float16
    assert vae_dtype_for("sd", torch.float16, True) == torch.float16
    assert vae_dtype_for("sdxl", torch.bfloat16, True) == torch.bfloat16
