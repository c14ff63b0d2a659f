"""generate -> score on a tiny Stable Diffusion pipeline: HRA adapters (ours live/merged, PEFT, with a
text-encoder adapter) and a control adapter; the manifest; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_score import random_hra_adapter, random_image, save_png, tiny_extractors
from PIL import Image

from hra_diffusion.generate import GenerateConfig, generate, read_prompts
from hra_diffusion.samples import read_samples

MANIFEST_KEYS = {"file", "prompt", "seed", "steps", "guidance", "scheduler", "height", "width", "condition",
                 "adapter", "base", "merged", "reference_dir", "dtype", "device", "adapter_kind"}


def _tiny_world_dir() -> Path | None:
    try:
        from hra_diffusion.paths import TINY_MODEL_DIR
    except ImportError:
        return None
    return Path(TINY_MODEL_DIR) if (Path(TINY_MODEL_DIR) / "model_index.json").is_file() else None


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny world when it is built, else a tiny pipeline built from config (random weights)."""
    tiny = _tiny_world_dir()
    if tiny is not None:
        return tiny
    from tiny_models import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.fixture(scope="module")
def hra_adapter(base_dir, tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    return random_hra_adapter(unet, tmp_path_factory.mktemp("adapters") / "subject", scale=1.0,
                              base_model=str(base_dir))


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


def _cfg(out: Path, **kw) -> GenerateConfig:
    # few steps and no CFG keep CPU time small; the control test runs with CFG (the doubled batch)
    defaults = dict(output_dir=str(out), steps=1, num_images_per_prompt=2, scheduler="dpm-solver", batch_size=4,
                    guidance_scale=1.0, progress=False)
    return GenerateConfig(**{**defaults, **kw})


def test_generate_then_score_subject(tmp_path, base_dir, hra_adapter):
    from hra_diffusion.metrics.report import write_outputs
    from hra_diffusion.metrics.subject import score_subject

    refs = tmp_path / "refs"
    for i in range(2):
        save_png(refs / f"real{i}.png", random_image(i, 32))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# subject prompts\na photo of qwe toy\n\na qwe toy on the beach\n")
    out = generate(_cfg(tmp_path / "samples", adapter=str(hra_adapter), prompts_file=str(prompts),
                        reference_dir=str(refs), base_model=str(base_dir), seed=7, batch_size=3))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len(list(out.glob("*.png"))) == 4
    assert all(MANIFEST_KEYS <= set(r) for r in rows)
    assert [r["seed"] for r in rows] == [7, 8, 7, 8]
    assert [r["prompt"] for r in rows] == ["a photo of qwe toy"] * 2 + ["a qwe toy on the beach"] * 2
    assert rows[0]["adapter"] == str(hra_adapter.resolve()) and rows[0]["adapter_kind"] == "subject"
    assert rows[0]["reference_dir"] == str(refs.resolve()) and rows[0]["merged"] is False
    assert rows[0]["scheduler"] == "DPMSolverMultistepScheduler" and rows[0]["dtype"] == "fp32"
    assert not list(tmp_path.glob(".samples.tmp-*"))  # the atomic write left nothing behind
    dino, clip = tiny_extractors()
    result = score_subject(out, dino=dino, clip=clip, metrics="dino,clip_i,clip_t", cache_dir=tmp_path / "cache")
    assert set(result.summary) == {"dino", "clip_i", "clip_t"} and result.counts["scored"] == 4
    assert all(-1.0 <= v <= 1.0 for v in result.summary.values())
    paths = write_outputs(result, out)
    metrics = json.loads(paths["metrics.json"].read_text())
    assert metrics["summary"]["dino"] == pytest.approx(result.summary["dino"])
    assert paths["per_image.csv"].read_text().count("\n") == 5 and "<table" in paths["report.html"].read_text()


@pytest.mark.slow
def test_merged_live_and_peft_give_the_same_images(tmp_path, base_dir, hra_adapter):
    from diffusers import UNet2DConditionModel

    from hra_diffusion import export_peft, load_adapter

    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    load_adapter(unet, hra_adapter)
    export_peft(unet, tmp_path / "peft", base_model_name_or_path=str(base_dir))
    common = dict(prompts=["a photo of qwe toy"], base_model=str(base_dir), seeds=[3, 11], steps=2,
                  guidance_scale=7.5)  # CFG amplifies the adapter's effect on the random tiny UNet
    live = _pixels(generate(_cfg(tmp_path / "live", adapter=str(hra_adapter), **common)))
    merged = _pixels(generate(_cfg(tmp_path / "merged", adapter=str(hra_adapter), merge=True, **common)))
    peft = _pixels(generate(_cfg(tmp_path / "peft_out", adapter=str(tmp_path / "peft"), **common)))
    base = _pixels(generate(_cfg(tmp_path / "base", **common)))
    assert list(live) == ["p0000_00_s3.png", "p0000_01_s11.png"]
    for name in live:
        assert np.abs(live[name] - merged[name]).max() <= 2  # same images within uint8 rounding
        assert np.abs(live[name] - peft[name]).max() <= 2
        assert np.abs(live[name] - base[name]).max() > 4  # the adapter changes them by more than the tolerance
    assert not np.array_equal(*live.values())  # different seeds, different images
    row = json.loads((tmp_path / "merged" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["merged"] is True
    peft_row = json.loads((tmp_path / "peft_out" / "manifest.jsonl").read_text().splitlines()[0])
    assert peft_row["adapter_source"] == "peft"


def test_text_encoder_adapter_is_loaded(tmp_path, base_dir, hra_adapter):
    import shutil

    from transformers import CLIPTextModel

    from hra_diffusion import TEXT_ENCODER_TARGETS

    adapter = tmp_path / "with_te"
    shutil.copytree(hra_adapter, adapter)
    te = CLIPTextModel.from_pretrained(base_dir / "text_encoder")
    random_hra_adapter(te, adapter / "text_encoder", targets=TEXT_ENCODER_TARGETS, scale=1.0)
    common = dict(prompts=["a photo of qwe toy"], base_model=str(base_dir), seeds=[5], steps=2, guidance_scale=7.5)
    with_te = _pixels(generate(_cfg(tmp_path / "a", adapter=str(adapter), **common)))
    without = _pixels(generate(_cfg(tmp_path / "b", adapter=str(hra_adapter), **common)))
    merged = _pixels(generate(_cfg(tmp_path / "c", adapter=str(adapter), merge=True, **common)))
    name = "p0000_00_s5.png"
    assert np.abs(with_te[name] - without[name]).max() > 4  # more than the merge tolerance
    assert np.abs(with_te[name] - merged[name]).max() <= 2
    row = json.loads((tmp_path / "a" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["text_encoder_adapter"] == str((adapter / "text_encoder").resolve())


@pytest.fixture(scope="module")
def control_adapter(base_dir, tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    from hra_diffusion import CONTROL_TARGETS, HRAConfig, inject_hra
    from hra_diffusion.control import build_condition_encoder, save_control_adapter

    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    inject_hra(unet, HRAConfig(r=4, target_modules=list(CONTROL_TARGETS), seed=0))
    vae_cfg = json.loads((base_dir / "vae" / "config.json").read_text())
    encoder = build_condition_encoder(unet, vae_scale_factor=2 ** (len(vae_cfg["block_out_channels"]) - 1))
    torch.manual_seed(0)
    torch.nn.init.normal_(encoder.conv_out.weight, std=0.5)  # a trained-looking, non-zero control path
    path = tmp_path_factory.mktemp("adapters") / "control"
    save_control_adapter(unet, encoder, path, base_model=str(base_dir), condition_type="canny")
    return path


def test_control_adapter_generate_then_score(tmp_path, base_dir, control_adapter):
    from hra_diffusion.metrics.control_metrics import score_control

    sources = []
    for i in range(2):
        img = np.zeros((32, 32, 3), np.uint8)
        img[6 + 4 * i : 26, 8 : 24 - 4 * i] = 255
        sources.append(save_png(tmp_path / "data" / f"src{i}.png", img))
    from hra_diffusion.metrics.control_metrics import canny_edges

    lines = []
    for i, src in enumerate(sources):
        edges = canny_edges(np.asarray(Image.open(src)))
        save_png(tmp_path / "data" / f"cond{i}.png", np.repeat(edges.numpy()[..., None].astype(np.uint8) * 255, 3, 2))
        lines.append(json.dumps({"text": f"a white box {i}", "conditioning_image": f"cond{i}.png", "image": f"src{i}.png"}))
    meta = tmp_path / "data" / "metadata.jsonl"  # the control trainer's data format reads as a prompts file
    meta.write_text("\n".join(lines) + "\n")
    entries = read_prompts(meta)
    assert entries[1].condition == tmp_path / "data" / "cond1.png" and entries[1].condition_source.name == "src1.png"
    out = generate(_cfg(tmp_path / "samples", adapter=str(control_adapter), prompts_file=str(meta),
                        base_model=str(base_dir), seeds=[0], scheduler="ddim", steps=2, guidance_scale=9.0))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["adapter_kind"] for r in rows] == ["control", "control"]
    assert rows[0]["condition"] == "conditions/0000_cond0.png" and (out / rows[0]["condition"]).is_file()
    assert rows[1]["condition_source"] == str(sources[1].resolve())
    imgs = _pixels(out)
    assert np.abs(imgs["p0000_00_s0.png"] - imgs["p0001_00_s0.png"]).max() > 5  # same seed, other condition
    same_cond = generate(_cfg(tmp_path / "same", adapter=str(control_adapter), prompts=["a white box 0"] * 2,
                              conditions=[str(tmp_path / "data" / "cond0.png")], base_model=str(base_dir),
                              seeds=[0], scheduler="ddim", steps=2, guidance_scale=9.0))
    again = _pixels(same_cond)
    assert np.abs(again["p0000_00_s0.png"] - again["p0001_00_s0.png"]).max() == 0
    assert len(read_samples(out)) == 2
    result = score_control(out, metrics="canny")
    assert len(result.per_image) == 2 and 0.0 <= result.summary["canny_f1"] <= 1.0
    assert result.per_image[0]["condition_source"] == str(sources[0].resolve())


def test_generate_bad_input(tmp_path, base_dir, hra_adapter, control_adapter):
    with pytest.raises(ValueError, match="no prompts"):
        generate(_cfg(tmp_path / "o", adapter=str(hra_adapter), base_model=str(base_dir)))
    with pytest.raises(ValueError, match="control adapter: give condition images"):
        generate(_cfg(tmp_path / "o", adapter=str(control_adapter), prompts=["x"], base_model=str(base_dir)))
    cond = save_png(tmp_path / "c.png", random_image(0, 32))
    with pytest.raises(ValueError, match="has no condition encoder"):
        generate(_cfg(tmp_path / "o", adapter=str(hra_adapter), prompts=["x"], conditions=[str(cond)],
                      base_model=str(base_dir)))
    with pytest.raises(ValueError, match="3 condition images for 2 prompts"):
        generate(_cfg(tmp_path / "o", adapter=str(control_adapter), prompts=["x", "y"], conditions=[str(cond)] * 3,
                      base_model=str(base_dir)))
    with pytest.raises(FileNotFoundError, match="condition image .*missing.png"):
        generate(_cfg(tmp_path / "o", adapter=str(control_adapter), prompts=["x"],
                      conditions=[str(tmp_path / "missing.png")], base_model=str(base_dir)))
    with pytest.raises(FileNotFoundError, match="adapter directory .* does not exist"):
        generate(_cfg(tmp_path / "o", adapter=str(tmp_path / "nope"), prompts=["x"], base_model=str(base_dir)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate(_cfg(tmp_path / "o", adapter=str(hra_adapter), prompts=["x"], base_model=str(tmp_path / "nobase")))
    with pytest.raises(OSError, match=r"(?s)could not load base model 'someone/sd-model'.*--base"):
        generate(_cfg(tmp_path / "o", adapter=str(hra_adapter), prompts=["x"], base_model="someone/sd-model"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(_cfg(tmp_path / "full", adapter=str(hra_adapter), prompts=["x"], base_model=str(base_dir)))
    with pytest.raises(ValueError, match="unknown scheduler 'fast'"):
        _cfg(tmp_path / "o", scheduler="fast")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"caption": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2 has no 'prompt'"):
        read_prompts(bad)
    assert not (tmp_path / "o").exists() and (tmp_path / "full" / "keep.txt").exists()


def test_default_base_model(tmp_path):
    """generate loads the base the adapter was trained on, as export does: a folder, or a hub id as such."""
    from hra_diffusion.generate import default_base_model

    assert default_base_model({"base_model": str(tmp_path)}) == str(tmp_path)  # a recorded local folder wins
    hub = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert default_base_model({"base_model": hub}) == hub  # never the tiny world for an SD 1.5 adapter
    with pytest.raises(FileNotFoundError, match=r"trained on '/gone/sd15', which is not a folder here: pass --base"):
        default_base_model({"base_model": "/gone/sd15"})
    tiny = _tiny_world_dir()
    if tiny is not None:  # no record, or the tiny world of another checkout: this one's
        assert default_base_model({}) == default_base_model({"base_model": "/elsewhere/assets/tiny-sd"}) == str(tiny)
    else:
        with pytest.raises(FileNotFoundError, match=r"(?s)--base.*tiny_world build"):
            default_base_model({})


def test_the_recorded_base_revision_goes_with_the_recorded_base_only():
    from hra_diffusion.generate import base_revision

    doc = {"base_model": "org/sd", "base_model_revision": "abc123"}
    assert base_revision(doc, "org/sd") == "abc123"  # as the trainer loaded it, and export loads it
    assert base_revision(doc, "/models/other") is None and base_revision(None, "org/sd") is None


def test_generate_uses_the_vae_the_adapter_was_trained_with(tmp_path, base_dir):
    """An adapter trained with --pretrained_vae_model records it (vae_model); generate loads that VAE by
    default, --vae overrides it, the manifest names it, and a VAE that cannot be loaded names the flag."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from helpers_score import random_hra_adapter

    from hra_diffusion.models import BaseModelError

    vae = AutoencoderKL.from_pretrained(base_dir / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.8)  # a visibly different VAE: every image comes out brighter
    vae.save_pretrained(tmp_path / "vae-fix")
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    plain = random_hra_adapter(unet, tmp_path / "plain", scale=1.0, base_model=str(base_dir))
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    with_vae = random_hra_adapter(unet, tmp_path / "with-vae", scale=1.0, base_model=str(base_dir),
                                  vae_model=str(tmp_path / "vae-fix"))

    a = generate(_cfg(tmp_path / "a", adapter=str(plain), base_model=str(base_dir), prompts=["a red square"]))
    b = generate(_cfg(tmp_path / "b", adapter=str(with_vae), base_model=str(base_dir), prompts=["a red square"]))
    c = generate(_cfg(tmp_path / "c", adapter=str(plain), base_model=str(base_dir), prompts=["a red square"],
                      vae_model=str(tmp_path / "vae-fix")))
    pa, pb, pc = _pixels(a), _pixels(b), _pixels(c)
    assert pa.keys() == pb.keys() == pc.keys()
    for name in pa:  # same UNet update, same seeds: only the VAE differs
        assert pb[name].mean() > pa[name].mean() + 20 and np.array_equal(pb[name], pc[name])
    def vaes(folder):
        return {json.loads(line)["vae"] for line in (folder / "manifest.jsonl").read_text().splitlines()}

    assert vaes(a) == {None} and vaes(b) == vaes(c) == {str((tmp_path / "vae-fix").resolve())}
    ident = json.loads((b / "generate_config.json").read_text())["identity"]
    assert ident["vae"] == str((tmp_path / "vae-fix").resolve())
    assert "vae" not in json.loads((a / "generate_config.json").read_text())["identity"]  # older folders resume
    with pytest.raises(BaseModelError, match=r"--vae"):
        generate(_cfg(tmp_path / "d", adapter=str(plain), base_model=str(base_dir), prompts=["a red square"],
                      vae_model=str(tmp_path / "nowhere")))


def test_adapter_samples_as_its_run_validated_unless_told(tmp_path, base_dir, hra_adapter):
    """The adapter's ``sampling`` record (what its run validated with) is generate's default; typed flags win;
    an adapter's text-encoder part is named as such."""
    import shutil

    from transformers import CLIPTextModel

    from hra_diffusion import TEXT_ENCODER_TARGETS

    adapter = tmp_path / "adapter"
    shutil.copytree(hra_adapter, adapter)
    doc = json.loads((adapter / "adapter_config.json").read_text())
    doc["sampling"] = {"scheduler": "ddim", "steps": 2, "guidance_scale": 1.5}
    (adapter / "adapter_config.json").write_text(json.dumps(doc))
    said: list[str] = []
    common = dict(output_dir=str(tmp_path / "a"), adapter=str(adapter), prompts=["a photo of qwe toy"],
                  base_model=str(base_dir), seeds=[1], progress=False)
    out = generate(GenerateConfig(**common), log=said.append)
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert (row["scheduler"], row["steps"], row["guidance"]) == ("DDIMScheduler", 2, 1.5)
    assert "sampling: ddim, 2 steps, guidance 1.5 (as its run validated, recorded in the adapter" in said[0]
    said.clear()
    out = generate(GenerateConfig(**{**common, "output_dir": str(tmp_path / "b")}, steps=1), log=said.append)
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert (row["scheduler"], row["steps"], row["guidance"]) == ("DDIMScheduler", 1, 1.5)
    assert "scheduler: the adapter's, steps: given, guidance_scale: the adapter's" in said[0]
    te = CLIPTextModel.from_pretrained(base_dir / "text_encoder")
    random_hra_adapter(te, adapter / "text_encoder", targets=TEXT_ENCODER_TARGETS, scale=1.0)
    with pytest.raises(ValueError, match=f"text-encoder part of an adapter.*--adapter {adapter.resolve()}"):
        generate(GenerateConfig(**{**common, "output_dir": str(tmp_path / "c"), "adapter": str(adapter / "text_encoder")}))
    assert not (tmp_path / "c").exists()
