"""DreamBooth-HRA trainer: outputs, exact resume, DDP on CPU, bf16, text-encoder HRA, bad input, NaN guard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hra_diffusion import load_adapter, read_adapter
from hra_diffusion.models import BaseModelError
from hra_diffusion.training import NonFiniteLossError, latest_checkpoint
from hra_diffusion.training.config import ConfigError
from hra_diffusion.training.data import DataError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "train"))
import dreambooth_hra  # noqa: E402
from conftest import PLAIN_DREAMBOOTH_ARGS  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; each in-process run starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def fast_args(sd: Path, subject: Path, out: Path, *extra: str) -> list[str]:
    """A few-second run on the random tiny pipeline: no validation, no tensorboard, no prior unless ``extra``
    turns it on (then its class images are drawn in 2 steps)."""
    flags = list(extra)
    prior = [v for k, v in zip(flags, flags[1:], strict=False) if k == "--with_prior_preservation"][-1:] == ["true"]
    return [
        *PLAIN_DREAMBOOTH_ARGS,
        "--pretrained_model", str(sd), "--subject_file", str(subject / "subject.json"), "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--validation_prompts", "[]",
        "--with_prior_preservation", "false", "--report_to", "none", "--max_train_steps", "2",
        *(["--class_inference_steps", "2"] if prior else []), "--showroom_rates", "false", *flags,
    ]


def train(argv: list[str]):
    return dreambooth_hra.main(dreambooth_hra.parse_args(argv))


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def launch(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the command line (the default command, run in full: tests/test_dreambooth_learning.py) ----------

# SDXL: the same command on the tiny SDXL-shaped pipeline, with HRA on both text encoders too (three DDP-wrapped
# modules; every adapter tensor must get a gradient each step, or DDP stops at the second step)
DDP_RUNS = {"sd": ("tiny_random_sd_dir", []), "sdxl": ("tiny_sdxl_dir", ["--train_text_encoder", "true"])}


@pytest.mark.parametrize("family", list(DDP_RUNS))
def test_two_processes_run_real_ddp(family, tmp_path, generated_subject_dir, request):
    base_fixture, extra = DDP_RUNS[family]
    out = tmp_path / "ddp"
    args = fast_args(request.getfixturevalue(base_fixture), generated_subject_dir, out, "--max_train_steps", "3",
                     "--with_prior_preservation", "true", "--num_class_images", "4", *extra)
    proc = launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "train/dreambooth_hra.py", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((out / "logs" / "ranks.json").read_text())
    assert ranks["num_processes"] == 2 and "MULTI_CPU" in ranks["distributed_type"]  # two real (gloo) ranks
    sums = ranks["adapter_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # identical adapters on both ranks (gathered from each)
    assert "adapter checksums per rank" in proc.stdout + proc.stderr
    parts = ["text_encoder", "text_encoder_2"] if family == "sdxl" else []
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                   *parts]
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1 + len(parts)  # one adapter (+ its text parts)
    assert len(list((out / "class_images").glob("class-*.png"))) == 4  # shared out between ranks


# ---- in-process runs -----------------------------------------------------------------------------

@pytest.mark.slow
def test_per_image_caption_files_train(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    """instance_caption_extension: images with a caption file train with it (the prompt cache holds every caption)."""
    data = tmp_path / "subject"
    shutil.copytree(generated_subject_dir / "train", data)
    first = sorted(data.glob("*.png"))[0]
    first.with_suffix(".txt").write_text("a qwe square on a blue background\n")
    out = tmp_path / "run"
    result = train(fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--instance_data_dir", str(data),
                             "--instance_caption_extension", ".txt", "--max_train_steps", "3"))
    assert result.global_step == 3 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "instance_caption_extension: .txt" in (out / "config.yaml").read_text()


def test_adapter_records_the_separate_vae(tmp_path, tiny_random_sd_dir, generated_subject_dir, monkeypatch):
    """--pretrained_vae_model is written into the adapter (vae_model), so generate decodes with the same VAE; a
    base and VAE typed as relative folders are recorded as absolute paths (found from any folder later)."""
    out = tmp_path / "run"
    monkeypatch.chdir(tiny_random_sd_dir.parent)
    relative = Path(tiny_random_sd_dir.name)
    train(fast_args(relative, generated_subject_dir, out, "--pretrained_vae_model", str(relative)))
    doc = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert doc["vae_model"] == doc["base_model"] == str(tiny_random_sd_dir.resolve())
    assert "pretrained_model: " + str(relative) in (out / "config.yaml").read_text()  # the config keeps what was typed
    plain = tmp_path / "plain"
    train(fast_args(tiny_random_sd_dir, generated_subject_dir, plain))
    assert "vae_model" not in json.loads((plain / "adapter" / "adapter_config.json").read_text())


def test_train_bias_trains_a_shift_the_adapter_keeps(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    """--train_bias (PEFT's hra_bias="hra_only"): the adapted layers that have a bias (UNet and text encoder) train a
    shift of it, saved beside hra_u and loaded back; layers without a bias (to_q) get none; HRA-only option."""
    out = tmp_path / "run"
    train(fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--train_bias", "true",
                    "--train_text_encoder", "true", "--learning_rate", "1e-2"))
    for part in (out / "adapter", out / "adapter" / "text_encoder"):
        tensors = adapter_tensors(part)
        shifts = {k: v for k, v in tensors.items() if k.endswith(".hra_bias")}
        assert shifts and all(v.abs().max() > 0 for v in shifts.values())
        assert json.loads((part / "adapter_config.json").read_text())["hra"]["train_bias"] is True
    unet_shifts = [k for k in adapter_tensors(out / "adapter") if k.endswith(".hra_bias")]
    assert all(".to_out.0." in k for k in unet_shifts)  # to_q/k/v have no bias in SD's UNet
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_random_sd_dir, subfolder="unet")
    load_adapter(unet, out / "adapter")
    layer = unet.get_submodule(unet_shifts[0][: -len(".hra_bias")])
    assert torch.equal(layer.hra_bias, adapter_tensors(out / "adapter")[unet_shifts[0]])
    with pytest.raises(ConfigError, match="train_bias is for hra"):
        train(fast_args(tiny_random_sd_dir, generated_subject_dir, tmp_path / "lora", "--adapter", "lora",
                        "--train_bias", "true"))


def test_class_images_drawn_from_the_instance_captions(tmp_path, tiny_random_sd_dir, generated_subject_dir,
                                                       monkeypatch):
    """class_prompts_from_captions: each class image is drawn from an instance caption without the identifier
    (uncaptioned images add the class prompt), captioned with it, and trains with it (the frozen text encoder's
    prompt cache holds those prompts); without captions to read it is a config error."""
    from hra_diffusion.training.config import DreamBoothConfig
    from hra_diffusion.training.prior import identifier_words

    data = tmp_path / "subject"
    shutil.copytree(generated_subject_dir / "train", data)
    files = sorted(data.glob("*.png"))
    files[0].with_suffix(".txt").write_text("a photo of qwe square on a blue background\n")
    files[1].with_suffix(".txt").write_text("a photo of qwe square in the top left of a green background\n")
    out = tmp_path / "run"
    from hra_diffusion.training import dreambooth

    seen = {}
    real = dreambooth.generate_class_images

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dreambooth, "generate_class_images", spy)
    args = fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--instance_data_dir", str(data),
                     "--instance_caption_extension", ".txt", "--with_prior_preservation", "true",
                     "--class_prompts_from_captions", "true", "--num_class_images", "5", "--class_guidance_scale", "2")
    result = train(args)
    assert seen["guidance_scale"] == 2.0
    assert result.global_step == 2
    expected = ["a photo of square on a blue background", "a photo of square in the top left of a green background",
                "a photo of square"]  # file order; the uncaptioned images add the class prompt once
    captions = [(out / "class_images" / f"class-{i:05d}.txt").read_text().strip() for i in range(5)]
    assert captions == [expected[i % 3] for i in range(5)]
    assert "class images (the instance captions without the identifier)" in (out / "README.md").read_text()
    # one distinct caption is still a caption: its images are captioned (they were not drawn from class_prompt)
    from hra_diffusion.models import load_sd_components
    from hra_diffusion.training.prior import generate_class_images

    one = tmp_path / "one"
    generate_class_images(load_sd_components(str(tiny_random_sd_dir)), one, ["a photo of square on a blue background"],
                          2, batch_size=2, seed=0, steps=1, resolution=32)
    assert [(one / f"class-{i:05d}.txt").read_text().strip() for i in range(2)] == [
        "a photo of square on a blue background"] * 2
    plain = tmp_path / "plain-class"
    generate_class_images(load_sd_components(str(tiny_random_sd_dir)), plain, "a photo of square", 1, batch_size=1,
                          seed=0, steps=1, resolution=32)
    assert not list(plain.glob("*.txt"))  # one class_prompt: no caption files

    assert identifier_words("a photo of qwe square", "a photo of square") == ["qwe"]
    with pytest.raises(ConfigError, match="identifier cannot be found"):
        identifier_words("a photo of square", "a photo of square")
    with pytest.raises(ConfigError, match="class_guidance_scale must be >= 1"):
        DreamBoothConfig(instance_data_dir=str(data), instance_prompt="a photo of qwe square",
                         class_prompt="a photo of square", class_guidance_scale=0.5).validate()
    with pytest.raises(ConfigError, match="class_prompts_from_captions=True needs instance_caption_extension"):
        DreamBoothConfig(instance_data_dir=str(data), instance_prompt="a photo of qwe square",
                         class_prompt="a photo of square", with_prior_preservation=True,
                         class_prompts_from_captions=True).validate()


@pytest.mark.slow
def test_own_class_images_train_with_their_captions_and_a_share_unconditioned(tmp_path, tiny_random_sd_dir,
                                                                              generated_subject_dir, monkeypatch):
    """Own class images ("regularisation images") in class_data_dir with class_caption_extension train with their
    captions (class_prompt without one) and none is generated; class_caption_dropout trains a fixed, seeded share
    of the class samples with the empty prompt; bad settings are named."""
    from hra_diffusion.training import dreambooth
    from hra_diffusion.training.config import DreamBoothConfig

    cls = tmp_path / "reg"
    cls.mkdir()
    captions = ["a photo of square on a blue background", "a photo of red square", "a photo of square"]
    (tmp_path / "reg_masks").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 100, 200)).save(cls / f"r{i}.png")
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 4 * (i + 1), 32))  # class image i: its left (i + 1) eighths are the object
        mask.save(tmp_path / "reg_masks" / f"r{i}.png")
        if i < 3:
            (cls / f"r{i}.txt").write_text(captions[i] + "\n")
    seen_prompts, num_prior, class_masks = [], [], []
    real = dreambooth._collate

    def spy(items):
        batch = real(items)
        seen_prompts.extend(batch["prompts"][len(items):])
        num_prior.append(batch["num_prior"])
        # (class image i's red channel, its mask's share) per class row: the pixels' mask must come with them
        red = batch["pixel_values"][len(items):, 0].mean((1, 2))
        class_masks.extend(zip(((red + 1) * 127.5 / 60).round().int().tolist(),
                               (batch["class_masks"].mean((1, 2, 3)) * 8).round().int().tolist(), strict=True))
        assert batch["class_masks"].shape == (batch["num_prior"], 1, 32, 32)
        return batch

    monkeypatch.setattr(dreambooth, "_collate", spy)
    subject = tmp_path / "subject"  # the masked loss (here for the class masks) needs subject masks too
    shutil.copytree(generated_subject_dir, subject)
    (subject / "masks").mkdir()
    for f in sorted((subject / "train").glob("*.png")):
        Image.new("L", Image.open(f).size, 255).save(subject / "masks" / f.name)
    doc = json.loads((subject / "subject.json").read_text())
    (subject / "subject.json").write_text(json.dumps({**doc, "instance_mask_dir": "masks"}))
    out = tmp_path / "run"
    result = train(fast_args(tiny_random_sd_dir, subject, out, "--with_prior_preservation", "true",
                             "--class_data_dir", str(cls), "--class_caption_extension", ".txt",
                             "--num_class_images", "4", "--class_caption_dropout", "0.5", "--max_train_steps", "6",
                             "--class_mask_dir", str(tmp_path / "reg_masks"), "--mask_loss_weight", "4"))
    assert result.global_step == 6
    # class_mask_dir: each class row comes with its own image's mask
    assert len(class_masks) == 12 and len({i for i, _ in class_masks}) >= 2
    assert all(share == i + 1 for i, share in class_masks), class_masks
    assert sorted(p.name for p in cls.iterdir()) == sorted([f"r{i}.png" for i in range(4)] + [f"r{i}.txt" for i in range(3)])
    assert num_prior and all(n == 2 for n in num_prior) and len(seen_prompts) == 12
    class_prompt = json.loads((generated_subject_dir / "subject.json").read_text())["class_prompt"]
    assert set(seen_prompts) <= {*captions, class_prompt, ""}
    dropped = seen_prompts.count("")
    assert 0 < dropped < 12 and len(set(seen_prompts) - {""}) >= 2
    assert "(captioned by their `.txt` files)" in (out / "README.md").read_text()
    assert f"class objects too (masks in `{tmp_path / 'reg_masks'}`)" in (out / "README.md").read_text()

    # the choice is a fixed function of (seed, position): about the asked share, never at 0
    draws = [dreambooth.caption_dropped(0, i, 0.3) for i in range(4000)]
    assert 0.27 < sum(draws) / 4000 < 0.33 and draws == [dreambooth.caption_dropped(0, i, 0.3) for i in range(4000)]
    assert not any(dreambooth.caption_dropped(0, i, 0.0) for i in range(1000))

    base = dict(instance_data_dir=str(cls), instance_prompt="a photo of qwe square", class_prompt="a photo of square")
    with pytest.raises(ConfigError, match="class_caption_dropout must be in"):
        DreamBoothConfig(**base, with_prior_preservation=True, class_caption_dropout=1.0).validate()
    with pytest.raises(ConfigError, match="class_caption_dropout=0.2 needs with_prior_preservation: true"):
        DreamBoothConfig(**base, class_caption_dropout=0.2).validate()
    with pytest.raises(ConfigError, match="class_caption_extension='.txt' needs with_prior_preservation"):
        DreamBoothConfig(**base, class_caption_extension=".txt").validate()
    with pytest.raises(ConfigError, match="class_mask_dir='m' needs mask_loss_weight > 0"):
        DreamBoothConfig(**base, with_prior_preservation=True, class_data_dir=str(cls), class_mask_dir="m").validate()
    with pytest.raises(ConfigError, match="class_mask_dir='m' needs class_data_dir: your own class images"):
        DreamBoothConfig(**base, with_prior_preservation=True, mask_loss_weight=4, class_mask_dir="m").validate()
    # subject.json's class_mask_dir masks its own class_data_dir only, and only for the masked loss
    from hra_diffusion.training.dreambooth import apply_subject_file

    doc = json.loads((subject / "subject.json").read_text())
    (subject / "subject.json").write_text(json.dumps({**doc, "class_data_dir": "../reg", "class_mask_dir": "../reg_masks"}))
    own = dict(base, subject_file=str(subject / "subject.json"), with_prior_preservation=True, mask_loss_weight=4)
    assert apply_subject_file(DreamBoothConfig(**own, class_data_dir=str(cls))).class_mask_dir == str(
        subject / "../reg_masks")
    assert apply_subject_file(DreamBoothConfig(**own, class_data_dir=str(tmp_path / "other"))).class_mask_dir is None
    assert apply_subject_file(DreamBoothConfig(**{**own, "mask_loss_weight": 0}, class_data_dir=str(cls))).class_mask_dir is None
    # an empty class_mask_dir (--class_mask_dir '') turns subject.json's off; null (unset) takes them
    assert apply_subject_file(DreamBoothConfig(**own, class_data_dir=str(cls), class_mask_dir="")).class_mask_dir == ""
    assert dreambooth_hra.parse_args(["--class_mask_dir", ""]).class_mask_dir == ""
    assert dreambooth_hra.parse_args(["--class_mask_dir", "null"]).class_mask_dir is None
    # too few own class images: the base would draw the rest, unmasked (refused before any model loads)
    with pytest.raises(ConfigError, match="holds fewer than num_class_images=5, so the base would draw the rest"):
        train(fast_args(tiny_random_sd_dir, subject, tmp_path / "few", "--with_prior_preservation", "true",
                        "--class_data_dir", str(cls), "--num_class_images", "5", "--mask_loss_weight", "4",
                        "--class_mask_dir", str(tmp_path / "reg_masks")))


@pytest.mark.slow
def test_masked_loss_trains_and_changes_the_update(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    """mask_loss_weight + instance_mask_dir: the subject's pixels weigh more, so the adapter differs from a plain
    run's; the mask folder comes from subject.json's instance_mask_dir; bad combinations are named."""
    import numpy as np

    subject = tmp_path / "subject"
    shutil.copytree(generated_subject_dir, subject)
    (subject / "masks").mkdir()
    for f in sorted((subject / "train").glob("*.png")):  # the red square is the subject
        rgb = np.asarray(Image.open(f).convert("RGB")).astype(int)
        Image.fromarray(((rgb[..., 0] > 180) & (rgb[..., 1] < 80)).astype(np.uint8) * 255).save(subject / "masks" / f.name)
    doc = json.loads((subject / "subject.json").read_text())
    (subject / "subject.json").write_text(json.dumps({**doc, "instance_mask_dir": "masks"}))
    plain = train(fast_args(tiny_random_sd_dir, subject, tmp_path / "plain", "--learning_rate", "1e-2"))
    masked = train(fast_args(tiny_random_sd_dir, subject, tmp_path / "masked", "--learning_rate", "1e-2",
                             "--mask_loss_weight", "4"))
    assert plain.global_step == masked.global_step == 2
    config = (tmp_path / "masked" / "config.yaml").read_text()
    assert f"instance_mask_dir: {subject / 'masks'}" in config and "mask_loss_weight: 4.0" in config
    a = adapter_tensors(tmp_path / "plain" / "adapter")
    b = adapter_tensors(tmp_path / "masked" / "adapter")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="needs mask_loss_weight > 0"):
        train(fast_args(tiny_random_sd_dir, subject, tmp_path / "x", "--instance_mask_dir", str(subject / "masks")))
    with pytest.raises(ConfigError, match="needs subject masks"):
        train(fast_args(tiny_random_sd_dir, generated_subject_dir, tmp_path / "y", "--mask_loss_weight", "4"))
    (subject / "masks" / "00.png").unlink()
    with pytest.raises(DataError, match="no mask for 00.png"):
        train(fast_args(tiny_random_sd_dir, subject, tmp_path / "z", "--mask_loss_weight", "4"))


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    """N steps straight == N/2, stop, resume from the checkpoint, N/2 more (torch.equal on every tensor)."""
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
             "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--random_flip", "true", "--center_crop", "false",
             "--with_prior_preservation", "true", "--num_class_images", "2", "--orth_lambda", "1e-3"]
    straight = tmp_path / "straight"
    train(fast_args(tiny_random_sd_dir, generated_subject_dir, straight, *extra))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(straight / "class_images", resumed / "class_images")
    ckpt = latest_checkpoint(straight)
    assert ckpt.name == "checkpoint-2"
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)  # as if the first run had stopped at step 2
    result = train(fast_args(tiny_random_sd_dir, generated_subject_dir, resumed, *extra,
                             "--resume_from_checkpoint", "latest"))
    assert result.resumed_from.name == "checkpoint-2" and result.global_step == 4
    a, b = adapter_tensors(straight / "adapter"), adapter_tensors(resumed / "adapter")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    half = load_file(str(ckpt / "unet.safetensors"))
    assert any(not torch.equal(half[k], a[k]) for k in a if k in half)  # the second half did train


@pytest.mark.slow
def test_bf16_trains_with_fp32_adapter(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    out = tmp_path / "bf16"
    train(fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--mixed_precision", "bf16",
                    "--max_train_steps", "3", "--train_text_encoder", "true", "--validation_prompts", "a photo of qwe square",
                    "--num_validation_images", "1", "--validation_inference_steps", "2"))
    unet_u = adapter_tensors(out / "adapter")
    text_u = adapter_tensors(out / "adapter" / "text_encoder")
    for tensors in (unet_u, text_u):
        assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert (out / "validation" / "step-000003.png").is_file()
    doc = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert doc["hra"]["r"] == 8


@pytest.mark.slow
def test_text_encoder_hra_latent_cache_accumulation_checkpointing(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    from transformers import CLIPTextModel

    out = tmp_path / "te"
    train(fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--train_text_encoder", "true",
                    "--text_encoder_lr", "5e-4", "--cache_latents", "true", "--random_flip", "true",
                    "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "true",
                    "--with_prior_preservation", "true", "--num_class_images", "2"))
    te_dir = out / "adapter" / "text_encoder"
    doc, u, _ = read_adapter(te_dir)
    assert u and all(k.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for k in u)
    base = CLIPTextModel.from_pretrained(tiny_random_sd_dir, subfolder="text_encoder")
    names = load_adapter(base, te_dir)
    assert len(names) == len(u)
    assert any(not torch.equal(t[:, 0], t[:, 1]) for t in u.values())  # moved away from the identity init
    card = (out / "README.md").read_text()
    assert "adapter/text_encoder/" in card and "load_adapter(pipe.text_encoder" in card


# ---- bad input --------------------------------------------------------------------------------------

def _corrupt_subject(root: Path, src: Path) -> Path:
    shutil.copytree(src, root)
    (root / "train" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root


@pytest.mark.parametrize(
    "case", ["missing", "empty", "corrupt", "targets", "odd_r", "offline_hub", "missing_local", "adam8bit"]
)
def test_bad_input_gives_a_clear_message(case, tmp_path, tiny_random_sd_dir, generated_subject_dir):
    args = fast_args(tiny_random_sd_dir, generated_subject_dir, tmp_path / "out")
    if case == "missing":
        args += ["--instance_data_dir", str(tmp_path / "nowhere")]
        err, words = DataError, ["nowhere", "does not exist"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args += ["--instance_data_dir", str(tmp_path / "empty")]
        err, words = DataError, ["empty", "has no images"]
    elif case == "corrupt":
        bad = _corrupt_subject(tmp_path / "subj", generated_subject_dir)
        args += ["--instance_data_dir", str(bad / "train")]
        err, words = DataError, ["zz-broken.png", "not an image file"]
    elif case == "targets":
        args += ["--target_modules", "to_qq"]
        err, words = ValueError, ["UNet", "to_qq", "match no module", "to_q"]
    elif case == "odd_r":
        args += ["--r", "5"]
        err, words = ConfigError, ["r=5", "odd"]
    elif case == "offline_hub":
        args += ["--pretrained_model", "some-org/not-downloaded-model"]
        err, words = BaseModelError, ["some-org/not-downloaded-model", "offline", "HF_HUB_OFFLINE"]
    elif case == "adam8bit":
        try:
            import bitsandbytes  # noqa: F401
            pytest.skip("bitsandbytes is installed here: the missing-package message cannot be shown")
        except ImportError:
            pass
        args += ["--use_8bit_adam", "true"]
        err, words = ImportError, ["use_8bit_adam", "bitsandbytes"]
    else:
        args += ["--pretrained_model", str(tmp_path / "no-such-pipeline")]
        err, words = BaseModelError, ["no-such-pipeline", "not an existing folder"]
    with pytest.raises(err) as info:
        train(args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert not (tmp_path / "out" / "adapter").exists()


def test_greyscale_rgba_palette_instance_images_train(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    subj = tmp_path / "subj"
    shutil.copytree(generated_subject_dir, subj)
    src = Image.open(subj / "train" / "00.png")
    src.convert("L").save(subj / "train" / "grey.png")
    src.convert("RGBA").save(subj / "train" / "rgba.png")
    src.convert("P").save(subj / "train" / "pal.png")
    result = train(fast_args(tiny_random_sd_dir, subj, tmp_path / "out", "--train_batch_size", "7",
                             "--max_train_steps", "1"))
    assert result.global_step == 1 and (tmp_path / "out" / "adapter").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["nan", "inf", "crash"])
def test_failure_mid_training_keeps_last_checkpoint(failure, tmp_path, tiny_random_sd_dir, generated_subject_dir, monkeypatch):
    from hra_diffusion.training.dreambooth import DreamBoothTask

    real_loss = DreamBoothTask.loss
    calls = {"n": 0}

    def flaky_loss(self, modules, batch, generator):
        calls["n"] += 1
        loss, logs = real_loss(self, modules, batch, generator)
        if calls["n"] == 3:
            if failure == "crash":
                raise RuntimeError("simulated crash (e.g. out of memory)")
            return loss * float(failure), logs
        return loss, logs

    monkeypatch.setattr(DreamBoothTask, "loss", flaky_loss)
    out = tmp_path / "out"
    args = fast_args(tiny_random_sd_dir, generated_subject_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    expected = RuntimeError if failure == "crash" else NonFiniteLossError
    with pytest.raises(expected) as info:
        train(args)
    if failure != "crash":
        assert failure in str(info.value) and "step 3" in str(info.value)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "checkpoint-2" in notes and "resume" in notes
    assert not (out / "adapter").exists()  # no (possibly broken) adapter is written
    assert latest_checkpoint(out).name == "checkpoint-2"
    ckpt = load_file(str(latest_checkpoint(out) / "unet.safetensors"))
    assert all(torch.isfinite(t).all() for t in ckpt.values())
    # and the run can be resumed from it
    monkeypatch.setattr(DreamBoothTask, "loss", real_loss)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    result = train([*args, "--resume_from_checkpoint", "latest"])
    assert result.resumed_from.name == "checkpoint-2" and (out / "adapter").is_dir()
