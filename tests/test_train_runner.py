"""The task runner and the training loop on a toy task (a linear model, seconds on a CPU): the order of
run_task's steps and its outputs, exact resume after a crash, and the model card's common facts."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from hra_diffusion.training import StableDiffusionTask, TrainConfig, TrainingTask, TrainResult, run_task
from hra_diffusion.utils import cli_command


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; each in-process run starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class ToyTask(TrainingTask):
    """y = x·w + noise drawn from the step's generator; fails once at ``fail_at`` (a micro-step) if set."""

    trainer = "toy"
    calls: list[str] = []
    fail_at: int | None = None

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> TrainConfig:
        cls.calls.append("check")
        return cfg

    def __init__(self, cfg: TrainConfig, accelerator) -> None:
        self.calls.append("task")
        self.cfg, self.accelerator = cfg, accelerator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(6, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        self.micro = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def dataset(self):
        x, y = self.x, self.y

        class Rows(torch.utils.data.Dataset):
            def __getitem__(self, position: int):
                return x[position % len(x)], y[position % len(x)]

            def __len__(self) -> int:
                return len(x)

        return Rows(), len(x), None

    def loss(self, modules, batch, generator):
        if self.micro == self.fail_at:
            raise RuntimeError("toy failure")
        self.micro += 1
        x, y = batch
        noisy = y + 0.1 * torch.randn(y.shape, generator=generator)
        return ((modules["net"](x) - noisy) ** 2).mean(), {"extra": 1.0}

    def save(self, modules, output_dir: Path) -> list[Path]:
        self.calls.append("save")
        path = output_dir / "adapter"
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in modules["net"].state_dict().items()}, str(path / "net.safetensors"))
        return [path]

    def write_card(self, result: TrainResult) -> Path:
        self.calls.append("card")
        assert (Path(self.cfg.output_dir) / "config.yaml").is_file()  # the resolved config came first
        path = Path(self.cfg.output_dir) / "README.md"
        path.write_text(f"steps {result.global_step}\n")
        return path


def toy_config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(out), max_train_steps=4, train_batch_size=2, learning_rate=0.05,
                       checkpointing_steps=2, validation_steps=100, report_to="none", seed=3, **kw)


def test_run_task_checks_builds_trains_saves_and_writes_the_card(tmp_path):
    ToyTask.calls, ToyTask.fail_at = [], None
    result = run_task(ToyTask, toy_config(tmp_path / "run"))
    assert ToyTask.calls == ["check", "task", "save", "card"]
    out = tmp_path / "run"
    assert result.global_step == 4 and result.adapter_paths == [out / "adapter"]
    assert (out / "README.md").read_text() == "steps 4\n"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # none at the last step
    assert result.stats["trainable_parameters"] == {"net": 5} and result.stats["steps_timed"] == 3
    assert result.stats["torch_threads"] == torch.get_num_threads() and result.stats["cpus"] >= 1  # the sharing
    assert (out / "logs" / "train_stats.json").is_file() and (out / "logs" / "ranks.json").is_file()


def test_a_crash_keeps_the_checkpoint_and_resuming_ends_where_a_straight_run_does(tmp_path):
    ToyTask.calls, ToyTask.fail_at = [], None
    run_task(ToyTask, toy_config(tmp_path / "straight"))
    straight = load_file(str(tmp_path / "straight" / "adapter" / "net.safetensors"))

    ToyTask.fail_at = 2  # the third micro-batch: step 3, after checkpoint-2
    with pytest.raises(RuntimeError, match="toy failure") as err:
        run_task(ToyTask, toy_config(tmp_path / "crash"))
    note = " ".join(getattr(err.value, "__notes__", []))
    assert "training stopped at step 2" in note and "checkpoint-2" in note and "--resume_from_checkpoint latest" in note
    assert not (tmp_path / "crash" / "adapter").exists()

    ToyTask.fail_at = None
    result = run_task(ToyTask, toy_config(tmp_path / "crash", resume_from_checkpoint="latest"))
    assert result.resumed_from == tmp_path / "crash" / "checkpoints" / "checkpoint-2" and result.global_step == 4
    resumed = load_file(str(tmp_path / "crash" / "adapter" / "net.safetensors"))
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)
    assert not torch.equal(straight["weight"], ToyTask(toy_config(tmp_path), None).net.weight.detach())  # it trained


class FactsTask(StableDiffusionTask):
    """Just enough of a Stable Diffusion task for its model-card facts (no model is loaded)."""

    trainer = "facts"

    def modules(self):  # pragma: no cover - not trained here
        return {}

    def dataset(self):  # pragma: no cover
        raise NotImplementedError

    def loss(self, modules, batch, generator):  # pragma: no cover
        raise NotImplementedError

    def save(self, modules, output_dir):  # pragma: no cover
        return []

    def write_card(self, result):  # pragma: no cover
        raise NotImplementedError


def test_card_facts_put_the_tasks_own_rows_in_place():
    cfg = TrainConfig(pretrained_model="base/x", revision="abc", r=4, target_modules=["to_q"], learning_rate=2e-4,
                      train_batch_size=3, gradient_accumulation_steps=2, mixed_precision="bf16", seed=9)
    task = FactsTask(cfg, SimpleNamespace(num_processes=2))
    assert task.weight_dtype == torch.bfloat16 and task.autocast_dtype == torch.bfloat16
    task.trainable_unet = 1234
    result = TrainResult(global_step=7, seconds=65.4, resumed_from=Path("out/checkpoints/checkpoint-5"))
    facts = task.card_facts(result, data={"data": "D"}, model={"encoder": "E"}, run={"validation": "V"})
    assert list(facts) == ["base model", "data", "adapter", "encoder", "steps", "optimizer", "resolution",
                           "mixed precision", "validation", "seed", "training time"]
    assert facts["base model"] == "`base/x` @ abc"
    assert facts["adapter"].startswith("HRA r=4 on to_q") and "1,234 trainable UNet values" in facts["adapter"]
    assert facts["steps"] == "7 (batch 3 x accumulation 2 x 2 process(es))"
    assert facts["optimizer"] == "AdamW lr 0.0002, constant (warm-up 0), wd 0.01, clip 1.0"
    assert facts["training time"] == "65 s (resumed from checkpoint-5)"
    assert (facts["seed"], facts["mixed precision"]) == (9, "bf16")


def test_summary_next_commands(tmp_path, capsys):
    """generate reads the base, sampler, steps and guidance from the adapter: no flags for them; export is
    suggested only where it works (it refuses control adapters)."""
    from hra_diffusion.training.summary import print_summary

    result = TrainResult(global_step=3, seconds=1.0)
    cli = cli_command()
    hub = print_summary(TrainConfig(pretrained_model="stabilityai/stable-diffusion-xl-base-1.0",
                                    output_dir=str(tmp_path / "a")), result, "DreamBooth", "--prompt 'a qwe star' ")
    assert f"{cli} generate --adapter" in hub and "--base" not in hub  # generate loads the recorded hub id
    assert "--prompt 'a qwe star' --out" in hub and not {"--scheduler", "--steps", "--guidance"} & set(hub.split())
    assert f"{cli} export --adapter" in hub
    control = print_summary(TrainConfig(pretrained_model=str(tmp_path), output_dir=str(tmp_path / "b")), result,
                            "Control", "--prompts-file p.jsonl ", exportable=False)
    assert f"{cli} generate --adapter" in control and "export" not in control


def test_control_next_command_uses_the_held_out_pairs_as_prompts(tmp_path):
    from hra_diffusion.training.config import ControlConfig
    from hra_diffusion.training.control_task import ControlTask

    task = ControlTask.__new__(ControlTask)
    task.cfg = ControlConfig(validation_data_dir=str(tmp_path))
    assert task.generate_hint() == "--condition CONDITION.png --prompt 'PROMPT' "  # no metadata.jsonl
    (tmp_path / "metadata.jsonl").write_text('{"image": "a.png", "text": "a red square"}\n')
    assert task.generate_hint() == "--condition CONDITION.png --prompt 'PROMPT' "  # conditions computed, not listed
    (tmp_path / "metadata.jsonl").write_text('{"image": "a.png", "conditioning_image": "c.png", "text": "t"}\n')
    assert task.generate_hint() == f"--prompts-file {tmp_path / 'metadata.jsonl'} --num-images 1 "


def test_next_commands_name_the_entry_point_that_runs_in_this_shell(tmp_path, monkeypatch):
    """After the README's install (a .venv, not activated) `hra-diffusion` is not on PATH: the summary names
    the environment's own script, which runs as printed."""
    import shutil
    import subprocess

    script = Path(sys.executable).parent / "hra-diffusion"
    if not script.exists():
        pytest.skip("the package's console script is not installed next to this Python")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv not activated
    assert shutil.which("hra-diffusion") is None
    cli = cli_command()
    assert cli != "hra-diffusion" and Path(cli).resolve() == script.resolve()
    proc = subprocess.run(f"{cli} generate --help", shell=True, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--adapter" in proc.stdout
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # activated
    assert cli_command() == "hra-diffusion"


def test_validation_samplers_are_the_ones_generate_and_the_card_name():
    """Each config.VALIDATION_SCHEDULERS entry builds (from the base's noise schedule) the class that generate's
    --scheduler of the same name and the model card's snippet build, so all three sample alike."""
    from diffusers import DDPMScheduler

    from hra_diffusion.sampling import SCHEDULERS, VALIDATION_SCHEDULERS, sampler_for, validation_sampler
    from hra_diffusion.training.config import ControlConfig

    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    built = {}
    for name, generate_name in VALIDATION_SCHEDULERS.items():
        cfg = ControlConfig(pretrained_model="x", output_dir="o", validation_scheduler=name)
        sampler = sampler_for(noise, name)
        assert validation_sampler(cfg) == (generate_name, type(sampler).__name__) == (generate_name, SCHEDULERS[generate_name])
        assert sampler.config.prediction_type == "v_prediction" and sampler.config.beta_schedule == "scaled_linear"
        built[name] = type(sampler).__name__
    assert built == {"dpm++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}
    assert validation_sampler(TrainConfig(pretrained_model="x", output_dir="o")) == ("dpm-solver", built["dpm++"])
