"""HRA against PEFT's LoRA, OFT and BOFT on one task, in the same training loop: the paper-style table.

    python eval/compare.py                       # DreamBooth on the tiny world's subject (the default)
    python eval/compare.py --task control        # the tiny world's control set (outline -> filled shape)
    python eval/compare.py --methods hra,lora --max_train_steps 50 --output_dir outputs/cmp

Every method is trained by the real trainer (train/dreambooth_hra.py or train/control_hra.py, its default
recipe unless --config is given; for DreamBooth with --train_text_encoder false, so only the UNet adapters are
compared) with the same data, seed, schedule and steps, each in its own process, then
generated from and scored with the same seeds. Parameter budgets are matched (--budget match, the default):
HRA runs at r=8 and each baseline at the size whose trainable count, on this task's UNet and targets, is
closest to HRA's (LoRA's rank; OFT's and BOFT's block size); on attention projections alone that is LoRA r=4,
OFT block 16, BOFT block 8, the fixed sizes of --budget fixed (METHODS). The counts are printed. The table has, per method: trainable values,
median time per training step and peak memory (from the trainer's logs/train_stats.json), and the task's
metrics:
- dreambooth: DINO, CLIP-I, CLIP-T, LPIPS (hra_diffusion.metrics; each needs its weights, and is reported
  n/a with the reason when they cannot be loaded, e.g. offline), plus two weight-free figures from
  metrics.denoising.fixed_noise_loss: the denoising loss on HELD-OUT subject images with the instance prompt
  (lower: the subject was learned) and on fresh base-model class images with the class prompt (close to
  the base's: the class prior was kept).
- control: Canny-edge F1 between each held-out condition and the image generated from it (ControlNet++'s
  pixel-wise F1, and with a 1-pixel tolerance), metrics.control_eval.control_consistency.
A "base" row (no adapter; for control, no condition encoder) is the reference. Writes <output_dir>/compare.md
and compare.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINERS = {"dreambooth": "dreambooth_hra.py", "control": "control_hra.py"}
# comparable budgets: HRA r·d per layer; LoRA r·(d + d_out); OFT d(b-1)/2; BOFT (1 factor) d·b + d_out
METHODS = {
    "hra": ["--adapter", "hra", "--r", "8"],
    "lora": ["--adapter", "lora", "--r", "4"],
    "oft": ["--adapter", "oft", "--block_size", "16"],
    "boft": ["--adapter", "boft", "--block_size", "8"],
}
BUDGETS = ("match", "fixed")
# the sizes --budget match tries (OFT/BOFT blocks must divide every adapted layer's input width)
CANDIDATES = {"lora": ("--r", range(1, 65)), "oft": ("--block_size", (2, 4, 8, 16, 32, 64, 128)),
              "boft": ("--block_size", (2, 4, 8, 16, 32, 64))}
SUBJECT_METRICS = ("dino", "clip_i", "clip_t", "lpips")


@dataclass
class CompareConfig:
    """Settings of one comparison (the command-line flags map one-to-one onto these fields)."""

    task: str = "dreambooth"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    output_dir: str | None = None  # None: outputs/compare-<task>
    config: str | None = None  # the trainer recipe (None: the trainer's default, the tiny world)
    max_train_steps: int | None = None  # None: the recipe's
    seed: int = 0
    train_args: list[str] = field(default_factory=list)  # extra overrides for every method's trainer
    budget: str = "match"  # match: each baseline sized to HRA's trainable count; fixed: METHODS' sizes
    reuse: bool = False  # keep a method's finished run (adapter + train_stats.json) instead of retraining
    # evaluation
    num_images: int = 4
    eval_steps: int | None = None  # dreambooth: the protocol's 25; control: 20
    guidance: float | None = None  # dreambooth: the protocol's 7.5; control: 4.0
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    device: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TRAINERS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TRAINERS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"outputs/compare-{self.task}")


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="dreambooth", choices=list(TRAINERS))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--output_dir", help="default: outputs/compare-<task>")
    p.add_argument("--config", help="trainer YAML recipe (default: the trainer's own, the tiny world)")
    p.add_argument("--max_train_steps", type=int, help="default: the recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_args", default="", help="extra trainer overrides for every method, one quoted string")
    p.add_argument("--budget", default="match", choices=BUDGETS,
                   help="match (default): size each baseline to HRA r=8's trainable count on this task; "
                        "fixed: LoRA r=4, OFT block 16, BOFT block 8")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in output_dir instead of retraining")
    p.add_argument("--num_images", type=int, default=4, help="dreambooth: images per prompt")
    p.add_argument("--eval_steps", type=int, help="sampling steps (dreambooth: 25, control: 20)")
    p.add_argument("--guidance", type=float, help="CFG scale (dreambooth: 7.5, control: 4.0)")
    for name in ("dino_model", "clip_model", "clip_pretrained"):
        p.add_argument(f"--{name}", default=getattr(CompareConfig, name))
    p.add_argument("--device", help="evaluation device (default: cuda when available, else cpu)")
    a = p.parse_args(argv)
    return CompareConfig(**{**vars(a), "methods": [m.strip() for m in a.methods.split(",") if m.strip()],
                            "train_args": shlex.split(a.train_args)})


# ---- training ------------------------------------------------------------------------------------

def common_args(cfg: CompareConfig) -> list[str]:
    """Overrides every method shares: seed, steps, no intermediate checkpoints/validation, no tensorboard."""
    args = ["--seed", str(cfg.seed), "--report_to", "none", "--checkpointing_steps", "1000000",
            "--validation_steps", "1000000"]  # validation only at the end (one grid per method)
    if cfg.config:
        args = ["--config", cfg.config, *args]
    if cfg.max_train_steps:
        args += ["--max_train_steps", str(cfg.max_train_steps)]
    if cfg.task == "dreambooth":  # UNet adapters compared alone: the baselines have no text-encoder path
        args += ["--train_text_encoder", "false"]
    return args + list(cfg.train_args)


def label(method: str, args: list[str]) -> str:
    """The table's name of a method at its size, e.g. "LoRA r=3 (PEFT)"."""
    if method == "base":
        return "base model (no adapter)"
    opts = dict(zip(args[::2], args[1::2], strict=True))
    if method == "hra":
        return f"HRA r={opts['--r']} (ours)"
    if method == "lora":
        return f"LoRA r={opts['--r']} (PEFT)"
    return f"{method.upper()} block {opts['--block_size']} (PEFT)"


def _meta_unet_factory(pretrained_model: str, revision: str | None):
    """A function building the task's UNet on the meta device from its config (read once; no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(pretrained_model, subfolder="unet", revision=revision)
    except OSError as err:
        raise ValueError(f"cannot read the UNet config of {pretrained_model!r} to match parameter budgets "
                         f"({str(err).splitlines()[0]}); pass a local model folder, or --budget fixed") from None

    def build():
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        return unet.requires_grad_(False)

    return build


def match_budgets(cfg: CompareConfig) -> dict[str, dict]:
    """Per method: its size arguments and trainable count. ``match``: each baseline at the candidate size
    whose count on this task's UNet and targets is closest to HRA's (ties: the smaller); ``fixed``: METHODS."""
    from hra_diffusion import HRAConfig, inject_hra
    from hra_diffusion.adapters.peft_baselines import BaselineSpec, count_trainable, inject_baseline

    tcfg = trainer_config(cfg, "hra", cfg.out / "hra" / "train")
    targets = list(tcfg.target_modules)
    meta_unet = _meta_unet_factory(tcfg.pretrained_model, tcfg.revision)

    def count(method: str, size: int) -> int | None:
        unet = meta_unet()
        try:
            if method == "hra":
                inject_hra(unet, HRAConfig(r=size, target_modules=targets))
            else:
                key = "r" if method == "lora" else "block_size"
                inject_baseline(unet, BaselineSpec(method, target_modules=targets, **{key: size}))
        except ValueError:  # e.g. a block size that does not divide some layer's width
            return None
        return count_trainable(unet)

    target = count("hra", int(METHODS["hra"][-1]))
    chosen = {"hra": {"args": METHODS["hra"], "trainable": target}}
    for method in cfg.methods:
        if method == "hra":
            continue
        flag, candidates = CANDIDATES[method]
        if cfg.budget == "fixed":
            candidates = (int(METHODS[method][-1]),)
        if method == "lora":  # LoRA's count is linear in r: one injection gives every rank's
            per_rank = count("lora", 1)
            counts = {r: r * per_rank for r in candidates}
        else:
            counts = {b: n for b in candidates if (n := count(method, b)) is not None}
        if not counts:
            raise ValueError(f"no {method} block size in {candidates} fits every target layer "
                             f"({targets}); use --methods without {method}")
        size = min(counts, key=lambda k: (abs(counts[k] - target), k))
        chosen[method] = {"args": ["--adapter", method, flag, str(size)], "trainable": counts[size]}
    return {m: chosen[m] for m in cfg.methods}


def trainer_config(cfg: CompareConfig, method: str, run_dir: Path):
    """The resolved trainer config of one method (parsed exactly as its command line will be)."""
    from hra_diffusion.training import parse_task_config

    return parse_task_config(cfg.task, train_argv(cfg, method, run_dir))


def train_argv(cfg: CompareConfig, method: str, run_dir: Path, sizes: dict | None = None) -> list[str]:
    """One method's trainer command line; ``sizes``: {method: size arguments} (None: METHODS' fixed sizes)."""
    args = (sizes or {}).get(method, METHODS[method])
    argv = [*common_args(cfg), "--adapter", method, *args[2:], "--output_dir", str(run_dir)]
    if cfg.task == "dreambooth":
        argv += ["--class_data_dir", str(cfg.out / "class_images")]  # one class-image set for every method
    return argv


def prepare_class_images(cfg: CompareConfig) -> None:
    """Generate the prior-preservation class images once, before any timing, for every method to share."""
    tcfg = trainer_config(cfg, "hra", cfg.out / "hra" / "train")
    from hra_diffusion.training.dreambooth import apply_subject_file

    apply_subject_file(tcfg)
    if not tcfg.with_prior_preservation:
        return
    from hra_diffusion.training.models import load_sd_components
    from hra_diffusion.training.prior import generate_class_images

    made = generate_class_images(load_sd_components(tcfg.pretrained_model, tcfg.revision, tcfg.variant),
                                 tcfg.class_data_dir, tcfg.class_prompt, tcfg.num_class_images,
                                 batch_size=tcfg.sample_batch_size, seed=tcfg.seed,
                                 steps=tcfg.class_inference_steps, resolution=tcfg.resolution)
    if made:
        print(f"generated {made} class images in {tcfg.class_data_dir}", flush=True)


def train_method(cfg: CompareConfig, method: str, sizes: dict) -> dict:
    """Train one method in its own process (clean memory figures); returns its logs/train_stats.json."""
    run_dir = cfg.out / method / "train"
    stats_file = run_dir / "logs" / "train_stats.json"
    argv = train_argv(cfg, method, run_dir, sizes)
    argv_file = run_dir / "compare_argv.json"  # a reused run must have been trained with the same arguments
    same = argv_file.is_file() and json.loads(argv_file.read_text()) == argv
    if not (cfg.reuse and same and stats_file.is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()):
        # retraining replaces this method's earlier run (other arguments, or no reuse): say so to the trainer
        cmd = [sys.executable, str(REPO / "train" / TRAINERS[cfg.task]), *argv, "--overwrite_output_dir", "true"]
        print("+ " + shlex.join(cmd), flush=True)
        started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)  # same cwd: same relative paths
        if proc.returncode != 0:
            raise RuntimeError(f"training {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        argv_file.write_text(json.dumps(argv) + "\n")
        print(f"  {method}: trained in {time.time() - started:.0f} s", flush=True)
    stats = json.loads(stats_file.read_text())
    stats["adapter_dir"] = str(run_dir / "adapter")
    return stats


# ---- evaluation ----------------------------------------------------------------------------------

def _device(cfg: CompareConfig) -> str:
    from hra_diffusion.utils import default_device

    return default_device(cfg.device)


def load_subject_extractors(cfg: CompareConfig, device: str) -> tuple[dict, list[str], dict[str, str]]:
    """(extractor models, subject metrics that can be computed, {metric: why not} for the rest)."""
    from hra_diffusion.metrics.extractors import WeightsUnavailableError, load_clip, load_dino
    from hra_diffusion.metrics.subject import load_lpips, lpips_available

    models: dict = {}
    missing: dict[str, str] = {}
    try:
        models["dino"] = load_dino(cfg.dino_model, device=device)
    except WeightsUnavailableError as err:
        missing["dino"] = str(err).splitlines()[0]
    try:
        models["clip"] = load_clip(cfg.clip_model, cfg.clip_pretrained, device=device)
    except WeightsUnavailableError as err:
        missing["clip_i"] = missing["clip_t"] = str(err).splitlines()[0]
    if not lpips_available():
        missing["lpips"] = "the lpips package is not installed"
    else:
        try:
            models["lpips_model"] = load_lpips("vgg", device=device)
        except WeightsUnavailableError as err:
            missing["lpips"] = str(err).splitlines()[0]
    return models, [m for m in SUBJECT_METRICS if m not in missing], missing


def evaluate_dreambooth(cfg: CompareConfig, runs: dict[str, dict]) -> dict:
    """Per method (and the base): subject metrics of generated samples and the fixed-noise losses."""
    from hra_diffusion.adapters.registry import load_any_adapter
    from hra_diffusion.generate import GenerateConfig, generate
    from hra_diffusion.metrics.denoising import fixed_noise_loss
    from hra_diffusion.metrics.subject import score_subject
    from hra_diffusion.samples import list_images
    from hra_diffusion.training.dreambooth import apply_subject_file
    from hra_diffusion.training.models import load_sd_components
    from hra_diffusion.training.prior import generate_class_images

    tcfg = apply_subject_file(trainer_config(cfg, "hra", cfg.out / "hra" / "train"))
    protocol = json.loads((REPO / "eval" / "dreambooth_protocol.json").read_text())["generation"]
    subject_dir = Path(tcfg.instance_data_dir).parent
    heldout = list_images(subject_dir / "heldout") if (subject_dir / "heldout").is_dir() else []
    prompts = list(tcfg.validation_prompts or [tcfg.instance_prompt])
    fresh = cfg.out / "eval_class_images"  # never seen in training (other seeds than the trainer's)
    generate_class_images(load_sd_components(tcfg.pretrained_model, tcfg.revision, tcfg.variant), fresh,
                          tcfg.class_prompt, 8, batch_size=8, seed=12345, steps=tcfg.class_inference_steps,
                          resolution=tcfg.resolution)
    classes = list_images(fresh)
    device = _device(cfg)
    models, metrics, missing = load_subject_extractors(cfg, device)
    results: dict[str, dict] = {}
    for method in ["base", *runs]:
        adapter = runs[method]["adapter_dir"] if method != "base" else None
        row: dict = {}
        samples = cfg.out / method / "samples"
        generate(GenerateConfig(
            output_dir=str(samples), adapter=adapter, base_model=tcfg.pretrained_model, prompts=prompts,
            reference_dir=tcfg.instance_data_dir, num_images_per_prompt=cfg.num_images, seed=protocol["seed"],
            steps=cfg.eval_steps or protocol["steps"], scheduler=protocol["scheduler"],
            guidance_scale=protocol["guidance_scale"] if cfg.guidance is None else cfg.guidance,
            device=device, safety_checker=False, overwrite=True, progress=False))
        if metrics:
            scored = score_subject(samples, metrics=metrics, device=device, **models)
            row.update({k: v for k, v in scored.summary.items() if k in SUBJECT_METRICS})
        c = load_sd_components(tcfg.pretrained_model, tcfg.revision, tcfg.variant)
        if adapter is not None:
            load_any_adapter(c.unet, adapter)
        args = (c.unet, c.vae, c.text_encoder, c.tokenizer, c.noise_scheduler)
        if heldout:
            row["heldout_subject_loss"] = fixed_noise_loss(*args, heldout, tcfg.instance_prompt, tcfg.resolution, seed=1)
        if tcfg.class_prompt:
            row["class_loss"] = fixed_noise_loss(*args, classes, tcfg.class_prompt, tcfg.resolution, seed=2)
        results[method] = row
        print(f"  evaluated {method}", flush=True)
    return {"metrics": results, "unavailable": missing, "prompts": prompts,
            "generation": {"images_per_prompt": cfg.num_images, "scheduler": protocol["scheduler"],
                           "steps": cfg.eval_steps or protocol["steps"],
                           "guidance": protocol["guidance_scale"] if cfg.guidance is None else cfg.guidance,
                           "seed": protocol["seed"], "reference": tcfg.instance_data_dir},
            "heldout_images": len(heldout), "fresh_class_images": len(classes)}


def evaluate_control(cfg: CompareConfig, runs: dict[str, dict]) -> dict:
    """Per method (and the base): Canny-edge F1 on the held-out (condition, prompt) pairs."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from hra_diffusion.control import attach_condition_encoder, load_trained_adapter
    from hra_diffusion.metrics.control_eval import control_consistency
    from hra_diffusion.training.validation import build_pipeline

    tcfg = trainer_config(cfg, "hra", cfg.out / "hra" / "train")
    folder = Path(tcfg.validation_data_dir or tcfg.train_data_dir)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    pairs = [(Image.open(folder / r[tcfg.conditioning_image_column]).convert("RGB"), r[tcfg.caption_column])
             for r in rows]
    steps, guidance = cfg.eval_steps or 20, 4.0 if cfg.guidance is None else cfg.guidance
    results: dict[str, dict] = {}
    for method in ["base", *runs]:
        base = StableDiffusionPipeline.from_pretrained(tcfg.pretrained_model, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe = build_pipeline(base.unet, base.text_encoder, base.vae, base.tokenizer, base.scheduler)
        pipe.to(_device(cfg))
        handle = None
        if method != "base":
            _, _, encoder = load_trained_adapter(pipe.unet, runs[method]["adapter_dir"])
            handle = attach_condition_encoder(pipe.unet, encoder)
        f1 = control_consistency(pipe, pairs, handle, resolution=tcfg.resolution, seed=cfg.seed, steps=steps,
                                 guidance_scale=guidance, tolerances=(0, 1))
        results[method] = {"canny_f1": float(np.mean(f1[0])), "canny_f1_1px": float(np.mean(f1[1]))}
        print(f"  evaluated {method}", flush=True)
    return {"metrics": results, "unavailable": {}, "pairs": len(pairs), "pairs_from": str(folder),
            "generation": {"scheduler": "DPM-Solver++ (the trainer's validation sampler)", "steps": steps,
                           "guidance": guidance, "seed": cfg.seed}}


# ---- the table -----------------------------------------------------------------------------------

COLUMNS = {
    "dreambooth": [("dino", "DINO ↑"), ("clip_i", "CLIP-I ↑"), ("clip_t", "CLIP-T ↑"), ("lpips", "LPIPS ↓"),
                   ("heldout_subject_loss", "held-out subject loss ↓"), ("class_loss", "class loss (base ≈)")],
    "control": [("canny_f1", "Canny F1 ↑"), ("canny_f1_1px", "Canny F1, 1 px ↑")],
}


def format_table(task: str, runs: dict[str, dict], evaluation: dict, labels: dict[str, str]) -> str:
    cols = COLUMNS[task]
    head = ["method", "trainable", "s / step", "peak RSS (MiB)", "RSS growth in training (MiB)"]
    cuda = any("cuda_peak_allocated_mib" in r for r in runs.values())
    if cuda:
        head.append("CUDA peak (MiB)")
    head += [label for _, label in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in ["base", *runs]:
        m = evaluation["metrics"].get(method, {})
        if method == "base":
            cells = [labels["base"], "0", "", "", ""] + ([""] if cuda else [])
        else:
            r = runs[method]
            n = sum(r["trainable_parameters"].values()) if isinstance(r["trainable_parameters"], dict) else r["trainable_parameters"]
            unet = r["trainable_parameters"].get("unet", n) if isinstance(r["trainable_parameters"], dict) else n
            cells = [labels[method], f"{unet:,}" + (f" (+{n - unet:,} encoder)" if n != unet else ""),
                     f"{r['step_seconds_median']:.3f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['peak_rss_mib'] - r['peak_rss_mib_before_training']:.0f}"]
            if cuda:
                cells.append(f"{r.get('cuda_peak_allocated_mib', float('nan')):.0f}")
        for key, _ in cols:
            cells.append(f"{m[key]:.4f}" if key in m else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg: CompareConfig) -> dict:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if cfg.task == "dreambooth":
        prepare_class_images(cfg)
    budgets = match_budgets(cfg)
    sizes = {m: b["args"] for m, b in budgets.items()}
    labels = {"base": label("base", []), **{m: label(m, sizes[m]) for m in cfg.methods}}
    print(f"parameter budgets ({cfg.budget}): " + "; ".join(f"{labels[m]}: {b['trainable']:,}"
                                                           for m, b in budgets.items()), flush=True)
    runs = {m: train_method(cfg, m, sizes) for m in cfg.methods}
    train_seconds = time.time() - started
    evaluation = (evaluate_dreambooth if cfg.task == "dreambooth" else evaluate_control)(cfg, runs)
    table = format_table(cfg.task, runs, evaluation, labels)
    total = time.time() - started
    notes = [f"- {k}: n/a, {why}" for k, why in evaluation["unavailable"].items()]
    report = (f"### {cfg.task}: HRA vs PEFT baselines, same loop, data, seed and schedule\n\n{table}\n\n"
              + ("\n".join(notes) + "\n\n" if notes else "")
              + f"Wall-clock: {total / 60:.1f} min ({train_seconds / 60:.1f} min training, "
                f"{(total - train_seconds) / 60:.1f} min evaluation).\n")
    print("\n" + report)
    result = {"config": asdict(cfg), "budgets": budgets, "labels": labels,
              "train_args": {m: train_argv(cfg, m, out / m / "train", sizes) for m in cfg.methods},
              "runs": runs, "evaluation": evaluation, "table_markdown": table,
              "seconds": {"total": total, "training": train_seconds}}
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "compare.md").write_text(report)
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"compare: error: {err}", file=sys.stderr)
        sys.exit(2)
