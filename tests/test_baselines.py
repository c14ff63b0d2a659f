"""PEFT baselines (LoRA, OFT, BOFT) in the same trainers: parameter counts equal PEFT's own, each trains a few
steps through the real trainer, saves in PEFT's format, reloads (ours, PEFT's, diffusers' for LoRA) and
generates; the control trainer keeps its encoder beside the adapter; resume is exact; bad options are refused;
the benchmark uses the trainers' baselines."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hra_diffusion.adapters.config import DEFAULT_TARGETS
from hra_diffusion.adapters.peft_baselines import (
    DIFFUSERS_LORA_WEIGHTS,
    BaselineSpec,
    count_trainable,
    inject_baseline,
    load_peft_adapter,
    peft_config,
    save_peft_adapter,
)
from hra_diffusion.adapters.registry import adapter_type
from hra_diffusion.control import CONDITION_ENCODER_FILE, load_trained_adapter
from hra_diffusion.training import latest_checkpoint
from hra_diffusion.training.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "train"))
sys.path.insert(0, str(REPO / "eval"))
import control_hra  # noqa: E402
import dreambooth_hra  # noqa: E402
from conftest import PLAIN_DREAMBOOTH_ARGS  # noqa: E402
from test_control_data import make_control_dir  # noqa: E402
from tiny_models import tiny_unet, unet_inputs  # noqa: E402

# the comparison's fixed sizes (hra_diffusion.compare.METHODS)
SPECS = {"lora": dict(r=4), "oft": dict(block_size=16), "boft": dict(block_size=8)}
KIND_ARGS = {"lora": ["--adapter", "lora", "--r", "4"], "oft": ["--adapter", "oft", "--block_size", "16"],
             "boft": ["--adapter", "boft", "--block_size", "8"]}


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def db_args(sd: Path, subject: Path, out: Path, *extra: str) -> list[str]:
    return [*PLAIN_DREAMBOOTH_ARGS,
            "--pretrained_model", str(sd), "--subject_file", str(subject / "subject.json"), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "2", "--validation_prompts", "[]",
            "--with_prior_preservation", "false", "--report_to", "none", "--max_train_steps", "2",
            "--learning_rate", "1e-2", "--showroom_rates", "false", *extra]


def train_db(argv: list[str]):
    return dreambooth_hra.main(dreambooth_hra.parse_args(argv))


def linear_targets(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for n, m in model.named_modules() if any(n.endswith("." + t) for t in DEFAULT_TARGETS)]


# ---- parameter counts ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SPECS))
def test_parameter_counts_match_peft_and_the_formula(kind):
    """Our injection's trainable count == PEFT's own (get_peft_model) == the per-layer formula."""
    from peft import get_peft_model

    unet = tiny_unet()
    plain = copy.deepcopy(unet)
    spec = BaselineSpec(kind, target_modules=list(DEFAULT_TARGETS), seed=0, **SPECS[kind])
    names = inject_baseline(unet, spec)
    ours = count_trainable(unet)
    peft_model = get_peft_model(plain, peft_config(spec))
    theirs, _ = peft_model.get_nb_trainable_parameters()
    layers = linear_targets(tiny_unet())
    assert len(names) == len(layers) and ours == theirs
    per_layer = {"lora": lambda m: 4 * (m.in_features + m.out_features),
                 "oft": lambda m: m.in_features * (16 - 1) // 2,
                 "boft": lambda m: m.in_features * 8 + m.out_features}[kind]
    assert ours == sum(per_layer(m) for m in layers)
    hra = sum(8 * m.in_features for m in layers)  # HRA r=8
    assert 0.75 < ours / hra < 1.25, (kind, ours, hra)  # a comparable budget


def test_injection_starts_at_the_base_model_and_is_seeded():
    unet = tiny_unet()
    sample, t, enc = unet_inputs(unet)
    with torch.no_grad():
        base = unet(sample, t, enc).sample
    a, b = tiny_unet(), tiny_unet()
    for m in (a, b):
        inject_baseline(m, BaselineSpec("lora", r=4, seed=3))
    with torch.no_grad():
        assert torch.equal(a(sample, t, enc).sample, base)  # lora_B = 0: the base model at step 0
    sa, sb = ({n: p for n, p in m.named_parameters() if p.requires_grad} for m in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same init
    assert all(p.dtype == torch.float32 for p in sa.values())
    assert not any(p.requires_grad for n, p in a.named_parameters() if "lora_" not in n)  # base frozen


@pytest.mark.parametrize("kind", list(SPECS))
def test_sampling_folds_the_baseline_in_and_puts_the_exact_base_back(kind):
    """The trainers sample (validation, end-of-run figures) inside ``eval_mode``: there the PEFT layers are
    merged (the same outputs as unmerged, at the base's speed), and after it the base weights are bit-for-bit
    what they were, the layers unmerged and in training mode again."""
    from hra_diffusion.adapters.peft_baselines import peft_layers
    from hra_diffusion.sampling import eval_mode

    unet = tiny_unet()
    inject_baseline(unet, BaselineSpec(kind, target_modules=list(DEFAULT_TARGETS), seed=0, **SPECS[kind]))
    torch.manual_seed(0)
    with torch.no_grad():  # move the adapter off its identity start, so merging changes the base weights
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    sample, t, enc = unet_inputs(unet)
    unet.eval()
    with torch.no_grad():
        unmerged = unet(sample, t, enc).sample
    unet.train()
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    with eval_mode(unet):
        layers = [layer for _, layer in peft_layers(unet)]
        assert layers and all(layer.merged for layer in layers)
        assert not unet.training
        changed = [n for n, p in unet.named_parameters() if not p.requires_grad and not torch.equal(p, before[n])]
        assert changed  # the base weights hold the adapter now
        with torch.no_grad():
            merged = unet(sample, t, enc).sample
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    assert unet.training and not any(layer.merged for _, layer in peft_layers(unet))
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters() if not p.requires_grad)


# ---- trainer -> save -> reload -> generate --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SPECS))
def test_baseline_trains_saves_reloads_and_generates(kind, tmp_path, tiny_random_sd_dir, generated_subject_dir):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from hra_diffusion.generate import GenerateConfig, generate

    out = tmp_path / kind
    result = train_db(db_args(tiny_random_sd_dir, generated_subject_dir, out, *KIND_ARGS[kind]))
    adapter = out / "adapter"
    assert result.global_step == 2 and adapter_type(adapter) == kind
    doc = json.loads((adapter / "adapter_config.json").read_text())
    assert doc["peft_type"] == kind.upper() and doc["base_model_name_or_path"] == str(tiny_random_sd_dir)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert (adapter / DIFFUSERS_LORA_WEIGHTS).is_file() == (kind == "lora")
    # the run records its adapter kind and a trainable count equal to the saved tensors'
    assert "adapter: " + kind in (out / "config.yaml").read_text()
    stats = json.loads((out / "logs" / "train_stats.json").read_text())
    n_saved = sum(t.numel() for t in tensors.values())
    assert stats["adapter"] == kind and stats["trainable_parameters"]["unet"] == n_saved
    assert stats["step_seconds_median"] > 0 and stats["peak_rss_mib"] > 0
    card = (out / "README.md").read_text()
    assert f"{n_saved:,} trainable UNet values" in card and "load_any_adapter(pipe.unet" in card

    def fresh():
        return UNet2DConditionModel.from_pretrained(tiny_random_sd_dir, subfolder="unet").eval()

    base = fresh()
    sample, t, enc = unet_inputs(base, tokens=16)
    ours = fresh()
    load_peft_adapter(ours, adapter)
    peft_loaded = PeftModel.from_pretrained(fresh(), str(adapter)).base_model.model  # PEFT's own loader
    with torch.no_grad():
        y_base, y_ours, y_peft = (m(sample, t, enc).sample for m in (base, ours, peft_loaded))
    assert torch.equal(y_ours, y_peft)
    assert (y_ours - y_base).abs().max() > 1e-4  # training moved the adapter away from the identity
    if kind == "lora":  # diffusers alone reads it too
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(tiny_random_sd_dir, safety_checker=None)
        pipe.load_lora_weights(str(adapter))
        with torch.no_grad():
            assert torch.allclose(pipe.unet(sample, t, enc).sample, y_ours, atol=1e-6)

    common = dict(adapter=str(adapter), prompts=["a photo of qwe square"], num_images_per_prompt=2, steps=2,
                  guidance_scale=2.0, progress=False)
    # generate folds a PEFT baseline in by default (as the trainers' validation does; merged == live is
    # test_sampling_folds_the_baseline_in_and_puts_the_exact_base_back), so --merge changes nothing for it
    folded = generate(GenerateConfig(output_dir=str(tmp_path / "folded"), **common))
    merged = generate(GenerateConfig(output_dir=str(tmp_path / "merged"), merge=True, **common))
    base = generate(GenerateConfig(output_dir=str(tmp_path / "base"), **{**common, "adapter": None}))
    rows = [json.loads(line) for line in (folded / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["adapter_type"] == kind and rows[0]["adapter_source"] == "peft"
    assert all(r["merged"] is True for r in rows)
    for r in rows:
        a, b, c = (np.asarray(Image.open(d / r["file"]), dtype=np.int16) for d in (folded, merged, base))
        assert np.array_equal(a, b) and np.abs(a - c).max() > 0  # the adapter is in the images


@pytest.mark.slow
def test_control_baseline_keeps_its_encoder_and_generates(tmp_path, tiny_random_sd_dir):
    from diffusers import UNet2DConditionModel

    from hra_diffusion.generate import GenerateConfig, generate

    data = make_control_dir(tmp_path / "data", n=4)
    out = tmp_path / "run"
    control_hra.main(control_hra.parse_args([
        "--pretrained_model", str(tiny_random_sd_dir), "--train_data_dir", str(data), "--validation_data_dir", "none",
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2", "--validation_prompts", "[]",
        "--report_to", "none", "--max_train_steps", "2", "--learning_rate", "1e-2", *KIND_ARGS["oft"]]))
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          CONDITION_ENCODER_FILE]
    saved = load_file(str(adapter / CONDITION_ENCODER_FILE))
    assert saved["conv_out.weight"].abs().max() > 0  # the zero-initialised last conv was trained and saved
    unet = UNet2DConditionModel.from_pretrained(tiny_random_sd_dir, subfolder="unet")
    kind, names, encoder = load_trained_adapter(unet, adapter)
    assert kind == "oft" and names and encoder is not None
    assert all(torch.equal(v, saved[k]) for k, v in encoder.state_dict().items())
    cond = tmp_path / "cond.png"
    Image.open(data / json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["conditioning_image"]).save(cond)
    samples = generate(GenerateConfig(output_dir=str(tmp_path / "gen"), adapter=str(adapter), prompts=["a red box"],
                                      conditions=[str(cond)], num_images_per_prompt=1, steps=2, progress=False))
    row = json.loads((samples / "manifest.jsonl").read_text().splitlines()[0])
    assert row["adapter_kind"] == "control" and row["adapter_type"] == "oft" and (samples / row["file"]).is_file()


@pytest.mark.slow
def test_baseline_resume_is_exact(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    """4 steps straight == 2 steps, stop, resume from the checkpoint, 2 more (LoRA; torch.equal)."""
    extra = [*KIND_ARGS["lora"], "--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    straight = tmp_path / "straight"
    train_db(db_args(tiny_random_sd_dir, generated_subject_dir, straight, *extra))
    ckpt = latest_checkpoint(straight)
    assert ckpt.name == "checkpoint-2" and any(".lora_A." in k for k in load_file(str(ckpt / "unet.safetensors")))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    result = train_db(db_args(tiny_random_sd_dir, generated_subject_dir, resumed, *extra,
                              "--resume_from_checkpoint", "latest"))
    assert result.resumed_from.name == "checkpoint-2" and result.global_step == 4
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--adapter", "dora"], ["adapter must be one of", "hra, lora, oft, boft", "'dora'"]),
    (["--adapter", "lora", "--orth_lambda", "0.1"], ["orth_lambda", "does not apply", "'lora'", "hra"]),
    (["--adapter", "oft", "--apply_gs", "true"], ["apply_gs", "does not apply", "'oft'"]),
    (["--block_size", "16"], ["block_size", "does not apply", "'hra'", "oft, boft"]),
    (["--adapter", "oft", "--r", "4"], ["r does not apply", "'oft'", "block_size"]),
    (["--adapter", "boft", "--lora_alpha", "8"], ["lora_alpha", "does not apply", "'boft'"]),
    (["--adapter", "boft", "--block_size", "5"], ["block_size must be >= 2 and even"]),
    (["--adapter", "lora", "--train_text_encoder", "true"], ["train_text_encoder", "'hra' only", "'lora'"]),
])
def test_bad_adapter_options_are_refused(extra, words, tmp_path):
    with pytest.raises(ConfigError) as info:
        dreambooth_hra.parse_args(["--output_dir", str(tmp_path / "out"), *extra])
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_adapter_on_the_command_line_drops_the_recipes_other_adapter_settings(tmp_path, capsys):
    """A recipe tuned for HRA (r 16, text-encoder HRA) stays usable with --adapter oft/lora on the command line."""
    recipe = tmp_path / "hra.yaml"
    recipe.write_text("r: 16\ntrain_text_encoder: true\north_lambda: 0.001\nlearning_rate: 0.002\n")
    oft = dreambooth_hra.parse_args(["--config", str(recipe), "--adapter", "oft", "--block_size", "16"])
    assert (oft.adapter, oft.r, oft.train_text_encoder, oft.orth_lambda, oft.block_size) == ("oft", 8, False, 0.0, 16)
    assert oft.learning_rate == 0.002  # the rest of the recipe is kept
    said = capsys.readouterr().err
    assert "the recipe's r: 16, train_text_encoder: True, orth_lambda: 0.001 (not for adapter 'oft')" in said
    lora = dreambooth_hra.parse_args(["--config", str(recipe), "--adapter", "lora"])
    assert lora.r == 16 and not lora.train_text_encoder  # r is LoRA's rank too
    assert dreambooth_hra.parse_args(["--config", str(recipe)]).train_text_encoder  # no switch: nothing dropped
    with pytest.raises(ConfigError, match="r does not apply"):  # asked for on the command line: still an error
        dreambooth_hra.parse_args(["--config", str(recipe), "--adapter", "oft", "--r", "4"])
    with pytest.raises(ConfigError, match="'hra' only"):
        dreambooth_hra.parse_args(["--config", str(recipe), "--adapter", "lora", "--train_text_encoder", "true"])


def test_odd_lora_rank_is_fine_and_control_takes_the_same_flag(tmp_path):
    assert dreambooth_hra.parse_args(["--adapter", "lora", "--r", "3"]).r == 3  # the even-r rule is HRA's
    with pytest.raises(ConfigError, match="adapter must be one of hra, lora, oft, boft"):
        control_hra.parse_args(["--adapter", "LoRA"])


def test_block_size_that_does_not_divide_a_layer_names_it(tmp_path, tiny_random_sd_dir, generated_subject_dir):
    with pytest.raises(ValueError) as info:
        train_db(db_args(tiny_random_sd_dir, generated_subject_dir, tmp_path / "out", "--adapter", "oft",
                         "--block_size", "24"))
    message = str(info.value)  # the random tiny UNet's attention layers are 64 wide
    assert "block_size=24 does not divide the input width 64" in message and "attn1.to_q" in message
    assert "UNet" in message
    assert not (tmp_path / "out" / "adapter").exists()


# ---- the benchmark's variants ------------------------------------------------------------------------------

@pytest.mark.slow
def test_benchmark_variants_are_the_trainers_baselines():
    """bench_hra.py's whole-UNet variants: the trainers' injection and budgets; its ratio table (no timings)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_hra
    finally:
        sys.path.pop(0)
    counts = {}
    base = tiny_unet()
    for kind in bench_hra.UNET_VARIANTS:
        model = bench_hra.make_variant(kind, base, 8, bench_hra.TARGETS)
        counts[kind] = count_trainable(model)
        if kind in ("peft_oft", "peft_boft"):
            reference = tiny_unet()
            inject_baseline(reference, BaselineSpec(kind.removeprefix("peft_"), target_modules=bench_hra.TARGETS,
                                                    **SPECS[kind.removeprefix("peft_")]))
            assert counts[kind] == count_trainable(reference)
        opt = torch.optim.AdamW(bench_hra.params_of(model), lr=1e-2)
        before = [p.detach().clone() for p in bench_hra.params_of(model)]
        sample, t, enc = unet_inputs(model, batch=1)
        bench_hra.train_step(model, opt, (sample, t, enc))
        assert any(not torch.equal(a, p) for a, p in zip(before, bench_hra.params_of(model), strict=True)), kind
    assert counts["peft_lora_half"] * 2 == counts["peft_lora"] and counts["ours"] == counts["peft_hra"]
    assert all(0.75 < counts[k] / counts["ours"] < 1.25 for k in ("peft_lora_half", "peft_oft", "peft_boft"))
    times = {"ours": 3.0, "peft_lora": 2.0, "peft_lora_half": 1.5, "peft_oft": 6.0}
    mem = {k: {"trainable": counts[k], "peak_kib": 2**20 * (2 if k == "ours" else 1), "after_build_kib": 2**19}
           for k in times}
    report = bench_hra.whole_step_report(times, mem)
    row = next(line for line in report.splitlines() if line.startswith("| ours"))
    assert "| 1.50x | 2.00x | 2.00x |" in row  # time vs LoRA r, vs LoRA r/2, peak vs LoRA r/2
    assert "| 4.00x |" in next(line for line in report.splitlines() if line.startswith("| PEFT OFT"))


def test_weight_change_tool_measures_the_merged_change(tmp_path, tiny_random_sd_dir):
    """benchmarks/weight_change.py: per adapted weight ‖W′ − W‖ / ‖W‖ of the merged adapter, for ours and PEFT's
    formats alike; an adapter at its identity start measures 0."""
    from diffusers import UNet2DConditionModel

    from hra_diffusion.adapters import HRAConfig, inject_hra, save_adapter
    from hra_diffusion.adapters.model import hra_layers

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import weight_change
    finally:
        sys.path.pop(0)
    load = lambda: UNet2DConditionModel.from_pretrained(tiny_random_sd_dir, subfolder="unet")  # noqa: E731
    hra = load()
    inject_hra(hra, HRAConfig(r=2, init_identity=False, seed=0))
    with torch.no_grad():
        expected = sorted(((layer.merged_weight() - layer.base_layer.weight).norm()
                           / layer.base_layer.weight.norm()).item() for _, layer in hra_layers(hra))
    save_adapter(hra, tmp_path / "hra", base_model=str(tiny_random_sd_dir))
    lora = load()
    inject_baseline(lora, BaselineSpec("lora", target_modules=list(DEFAULT_TARGETS), seed=0, **SPECS["lora"]))
    save_peft_adapter(lora, tmp_path / "lora-start", base_model=str(tiny_random_sd_dir))
    results = [weight_change.measure(tmp_path / name) for name in ("hra", "lora-start")]
    got = results[0]["components"]["unet"]
    assert got["weights"] == len(expected) and got["max"] == pytest.approx(expected[-1], rel=1e-4)
    assert got["median"] == pytest.approx(np.median(expected), rel=1e-4) and got["median"] > 0.01
    assert "attn1.to_q" in got["by_kind"]
    assert results[1]["kind"] == "lora" and results[1]["components"]["unet"]["max"] == 0  # B starts at zero
    assert "| lora | unet |" in weight_change.table(results)
