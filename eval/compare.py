"""HRA against PEFT's LoRA, OFT and BOFT on one task, in the same training loop: the paper's table in miniature.

    python eval/compare.py                       # DreamBooth on the tiny world's subject (the default)
    python eval/compare.py --task control        # the tiny world's control set (outline -> filled shape)
    python eval/compare.py --methods hra,lora --seeds 0 --lr_factors 1 --max_train_steps 50 --output_dir outputs/cmp
    python eval/compare.py --reuse               # continue an interrupted comparison: finished runs are kept

Every method is trained by the real trainer (train/dreambooth_hra.py or train/control_hra.py, its default
recipe unless --config is given; for DreamBooth with --train_text_encoder false, so only the UNet adapters are
compared) with the same data, schedule and steps, each run in its own process, then generated from and scored
with the same sampler and seeds.

Methods (METHODS): HRA r=8; HRA r=8 with the orthogonality regulariser (lambda = 1e-4); HRA r=8 with
Gram-Schmidt (orthonormal planes); PEFT's LoRA, OFT and BOFT. Parameter budgets are matched (--budget match, the
default): each baseline at the size whose trainable count on this task's UNet and targets is closest to HRA
r=8's (LoRA's rank; OFT's and BOFT's block size); the counts are printed.

Learning rate: each method's is chosen by a small sweep (--lr_factors, multiples of the recipe's rate, one run
each with the first seed), scored on a validation split that the test never uses: for DreamBooth, other prompts
than the held-out test prompts (sweep_score: the mean of DINO, CLIP-T and the subject checker's rates of the
subject in the asked context and of the class prompt still plain); for control, a third of the held-out (condition, prompt) pairs (their Canny F1).
The chosen rate is then trained with every seed (--seeds); the table gives mean +- standard deviation over
the seeds.

Metrics:
- dreambooth: DINO, CLIP-I, CLIP-T (hra_diffusion.metrics.score_subject: on tiny-world samples the tiny world's
  stand-in extractors, else the real DINO ViT-S/16 and CLIP ViT-L/14 or --dino_model/--clip_model), LPIPS where
  its weights load, and on the tiny world the subject checker's rates: the striped subject drawn, drawn in the
  asked context, and (with the adapter loaded) the class prompt still drawing a plain object.
  Two reference rows: the base model asked with the class prompt (the test prompts without the identifier),
  and the real held-out photos of the subject (scored against the training photos, with their captions).
- control: Canny-edge F1 between each test condition and the image generated from it (ControlNet++'s pixel-wise
  F1, and with a 1-pixel tolerance), metrics.control_eval.control_consistency. Reference rows: the base model
  (no condition encoder), and the real target images' own edges.
Plus per method: trainable values, time per training step (each run's median, then the median over the seeds)
and peak memory (logs/train_stats.json).

Writes <output_dir>/compare.md, compare.json and (dreambooth) compare.png, the DINO-against-CLIP-T trade-off
plot, and prints the table. Runs of methods, rates and seeds live in <output_dir>/<method>/lr<rate>-seed<seed>/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRAINERS = {"dreambooth": "dreambooth_hra.py", "control": "control_hra.py"}
ORTH_LAMBDA = "1e-4"
# comparable budgets: HRA r·d per layer; LoRA r·(d + d_out); OFT d(b-1)/2; BOFT (1 factor) d·b + d_out
METHODS = {
    "hra": ["--adapter", "hra", "--r", "8"],
    "hra_orth": ["--adapter", "hra", "--r", "8", "--orth_lambda", ORTH_LAMBDA],
    "hra_gs": ["--adapter", "hra", "--r", "8", "--apply_gs", "true"],
    "lora": ["--adapter", "lora", "--r", "4"],
    "oft": ["--adapter", "oft", "--block_size", "16"],
    "boft": ["--adapter", "boft", "--block_size", "8"],
}
BUDGETS = ("match", "fixed")
# the sizes --budget match tries (OFT/BOFT blocks must divide every adapted layer's input width)
CANDIDATES = {"lora": ("--r", range(1, 65)), "oft": ("--block_size", (2, 4, 8, 16, 32, 64, 128)),
              "boft": ("--block_size", (2, 4, 8, 16, 32, 64))}
SUBJECT_METRICS = ("dino", "clip_i", "clip_t", "lpips")
EVAL_VERSION = 2  # bumped when what an evaluation computes changes: --reuse then redoes the evaluations
CHECKER_RATES = ("subject_rate", "subject_in_context_rate", "class_plain_rate", "class_striped_rate")
# the learning-rate flags each task's sweep scales
LR_FLAGS = {"dreambooth": ("learning_rate",), "control": ("learning_rate", "encoder_learning_rate")}


def adapter_kind(method: str) -> str:
    """hra | lora | oft | boft: the trainer's --adapter of a method."""
    return METHODS[method][1]


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated numbers, got {text!r}") from None


@dataclass
class CompareConfig:
    """Settings of one comparison (the command-line flags map one-to-one onto these fields)."""

    task: str = "dreambooth"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    output_dir: str | None = None  # None: outputs/compare-<task>
    config: str | None = None  # the trainer recipe (None: the trainer's default, the tiny world)
    max_train_steps: int | None = None  # None: the recipe's
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr_factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # x the recipe's rate; [1]: no sweep
    train_args: list[str] = field(default_factory=list)  # extra overrides for every method's trainer
    budget: str = "match"  # match: each baseline sized to HRA's trainable count; fixed: METHODS' sizes
    reuse: bool = False  # keep finished runs and evaluations (same arguments) instead of redoing them
    # evaluation
    num_images: int = 4
    eval_steps: int | None = None  # dreambooth: the protocol's 25; control: 20
    guidance: float | None = None  # dreambooth: the recipe's validation guidance on the tiny world, else 7.5; control 4
    dino_model: str | None = None  # None: chosen from the samples' base (score_subject)
    clip_model: str | None = None
    clip_pretrained: str | None = None
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
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not self.lr_factors or any(f <= 0 for f in self.lr_factors) or len(set(self.lr_factors)) != len(self.lr_factors):
            raise ValueError(f"lr_factors must be distinct positive numbers, got {self.lr_factors}")

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
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (the table: mean +- std)")
    p.add_argument("--lr_factors", default="0.5,1,2",
                   help="learning rates to sweep, as multiples of the recipe's (on a validation split, first seed); "
                        "1: no sweep")
    p.add_argument("--train_args", default="", help="extra trainer overrides for every method, one quoted string")
    p.add_argument("--budget", default="match", choices=BUDGETS,
                   help="match (default): size each baseline to HRA r=8's trainable count on this task; "
                        "fixed: LoRA r=4, OFT block 16, BOFT block 8")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs and evaluations in output_dir (same arguments) instead of redoing them")
    p.add_argument("--num_images", type=int, default=4, help="dreambooth: images per prompt")
    p.add_argument("--eval_steps", type=int, help="sampling steps (dreambooth: 25, control: 20)")
    p.add_argument("--guidance", type=float, help="CFG scale (dreambooth: the tiny recipe's 2.0, else 7.5; control: 4.0)")
    p.add_argument("--dino_model", help="default: chosen from the samples' base (the tiny world's stand-in on it)")
    p.add_argument("--clip_model", help="default: chosen from the samples' base (the tiny world's stand-in on it)")
    p.add_argument("--clip_pretrained")
    p.add_argument("--device", help="evaluation device (default: cuda when available, else cpu)")
    a = p.parse_args(argv)
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {a.seeds!r}")
    return CompareConfig(**{**vars(a), "methods": [m.strip() for m in a.methods.split(",") if m.strip()],
                            "seeds": seeds, "lr_factors": _floats(a.lr_factors, "lr_factors"),
                            "train_args": shlex.split(a.train_args)})


# ---- training ------------------------------------------------------------------------------------

def common_args(cfg: CompareConfig) -> list[str]:
    """Overrides every run shares: no intermediate checkpoints/validation, no tensorboard, the steps."""
    args = ["--report_to", "none", "--checkpointing_steps", "1000000",
            "--validation_steps", "1000000"]  # validation only at the end (one grid per run)
    if cfg.config:
        args = ["--config", cfg.config, *args]
    if cfg.max_train_steps:
        args += ["--max_train_steps", str(cfg.max_train_steps)]
    if cfg.task == "dreambooth":  # UNet adapters compared alone: the baselines have no text-encoder path
        args += ["--train_text_encoder", "false", "--showroom_rates", "false"]  # the comparison measures its own
    return args + list(cfg.train_args)


def label(method: str, args: list[str]) -> str:
    """The table's name of a method at its size, e.g. "LoRA r=3 (PEFT)"."""
    opts = dict(zip(args[::2], args[1::2], strict=True))
    kind = opts["--adapter"]
    if kind == "hra":
        extra = (", GS" if opts.get("--apply_gs") == "true" else "") + (
            f", λ={opts['--orth_lambda']}" if float(opts.get("--orth_lambda", 0)) else "")
        return f"HRA r={opts['--r']}{extra} (ours)"
    if kind == "lora":
        return f"LoRA r={opts['--r']} (PEFT)"
    return f"{kind.upper()} block {opts['--block_size']} (PEFT)"


REFERENCE_LABELS = {
    "dreambooth": {"base": "base model, class prompt", "real": "real held-out photos"},
    "control": {"base": "base model (no condition)", "real": "real target images"},
}


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
    whose count on this task's UNet and targets is closest to HRA's (ties: the smaller); ``fixed``: METHODS.
    The HRA variants (λ, Gram-Schmidt) have HRA's count."""
    from hra_diffusion import HRAConfig, inject_hra
    from hra_diffusion.adapters.peft_baselines import BaselineSpec, count_trainable, inject_baseline

    tcfg = trainer_config(cfg, "hra", cfg.out / "hra" / "train")
    targets = list(tcfg.target_modules)
    meta_unet = _meta_unet_factory(tcfg.pretrained_model, tcfg.revision)

    def count(kind: str, size: int) -> int | None:
        unet = meta_unet()
        try:
            if kind == "hra":
                inject_hra(unet, HRAConfig(r=size, target_modules=targets))
            else:
                key = "r" if kind == "lora" else "block_size"
                inject_baseline(unet, BaselineSpec(kind, target_modules=targets, **{key: size}))
        except ValueError:  # e.g. a block size that does not divide some layer's width
            return None
        return count_trainable(unet)

    target = count("hra", int(METHODS["hra"][3]))
    chosen = {}
    for method in cfg.methods:
        kind = adapter_kind(method)
        if kind == "hra":
            chosen[method] = {"args": list(METHODS[method]), "trainable": target}
            continue
        flag, candidates = CANDIDATES[kind]
        if cfg.budget == "fixed":
            candidates = (int(METHODS[method][-1]),)
        if kind == "lora":  # LoRA's count is linear in r: one injection gives every rank's
            per_rank = count("lora", 1)
            counts = {r: r * per_rank for r in candidates}
        else:
            counts = {b: n for b in candidates if (n := count(kind, b)) is not None}
        if not counts:
            raise ValueError(f"no {kind} block size in {candidates} fits every target layer "
                             f"({targets}); use --methods without {method}")
        size = min(counts, key=lambda k: (abs(counts[k] - target), k))
        chosen[method] = {"args": ["--adapter", kind, flag, str(size)], "trainable": counts[size]}
    return chosen


def trainer_config(cfg: CompareConfig, method: str, run_dir: Path):
    """The resolved trainer config of one method at the recipe's rate and the first seed (parsed exactly as its
    command line will be)."""
    from hra_diffusion.training import parse_task_config

    return parse_task_config(cfg.task, train_argv(cfg, method, run_dir))


def recipe_rates(cfg: CompareConfig) -> dict[str, float]:
    """The recipe's learning rates (with --config and --train_args applied) that the sweep multiplies."""
    tcfg = trainer_config(cfg, "hra", cfg.out / "hra" / "train")
    return {flag: float(getattr(tcfg, flag)) for flag in LR_FLAGS[cfg.task]}


def train_argv(cfg: CompareConfig, method: str, run_dir: Path, sizes: dict | None = None, seed: int | None = None,
               lr_factor: float = 1.0, rates: dict[str, float] | None = None) -> list[str]:
    """One run's trainer command line; ``sizes``: {method: size arguments} (None: METHODS' fixed sizes);
    ``rates``: the recipe's learning rates (needed when ``lr_factor`` != 1)."""
    args = (sizes or {}).get(method, METHODS[method])
    argv = [*common_args(cfg), "--seed", str(cfg.seeds[0] if seed is None else seed), *args,
            "--output_dir", str(run_dir)]
    if lr_factor != 1.0:
        if rates is None:
            raise ValueError("train_argv: rates are needed to scale the learning rate")
        for flag, value in rates.items():
            argv += [f"--{flag}", f"{value * lr_factor:.6g}"]
    return argv + shared_class_images(cfg)


def shared_class_images(cfg: CompareConfig) -> list[str]:
    """DreamBooth: a recipe with its own class images (class_data_dir: the tiny world's rendered stars, with their
    captions and masks) gives them to every run as they are; otherwise one set drawn by the base under
    <output_dir>/class_images is every run's (drawn once, by prepare_class_images)."""
    if cfg.task != "dreambooth":
        return []
    from hra_diffusion.training import parse_task_config

    recipe = parse_task_config(cfg.task, [*common_args(cfg), "--output_dir", str(cfg.out / "recipe")])
    return [] if recipe.class_data_dir else ["--class_data_dir", str(cfg.out / "class_images")]


def run_dir(cfg: CompareConfig, method: str, lr: float, seed: int) -> Path:
    return cfg.out / method / f"lr{lr:.6g}-seed{seed}"


def prepare_class_images(cfg: CompareConfig) -> None:
    """Generate the prior-preservation class images once, before any timing, for every run to share."""
    tcfg = trainer_config(cfg, "hra", cfg.out / "hra" / "train")
    from hra_diffusion.training.dreambooth import apply_subject_file

    apply_subject_file(tcfg)
    if not tcfg.with_prior_preservation:
        return
    from hra_diffusion.training.models import load_sd_components
    from hra_diffusion.training.prior import class_prompts, generate_class_images

    made = generate_class_images(load_sd_components(tcfg.pretrained_model, tcfg.revision, tcfg.variant),
                                 tcfg.class_data_dir, class_prompts(tcfg), tcfg.num_class_images,
                                 batch_size=tcfg.sample_batch_size, seed=tcfg.seed,
                                 steps=tcfg.class_inference_steps, resolution=tcfg.resolution,
                                 guidance_scale=tcfg.class_guidance_scale)
    if made:
        print(f"generated {made} class images in {tcfg.class_data_dir}", flush=True)


def train_run(cfg: CompareConfig, method: str, sizes: dict, seed: int, lr_factor: float,
              rates: dict[str, float]) -> dict:
    """Train one (method, rate, seed) in its own process (clean memory figures); returns its train_stats.json."""
    folder = run_dir(cfg, method, lr_factor, seed)
    train = folder / "train"
    stats_file = train / "logs" / "train_stats.json"
    argv = train_argv(cfg, method, train, sizes, seed, lr_factor, rates)
    argv_file = folder / "compare_argv.json"  # a reused run must have been trained with the same arguments
    same = argv_file.is_file() and json.loads(argv_file.read_text()) == argv
    if not (cfg.reuse and same and stats_file.is_file() and (train / "adapter" / "adapter_config.json").is_file()):
        # retraining replaces this run's earlier one (other arguments, or no reuse): say so to the trainer
        cmd = [sys.executable, str(REPO / "train" / TRAINERS[cfg.task]), *argv, "--overwrite_output_dir", "true"]
        print("+ " + shlex.join(cmd), flush=True)
        started = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)  # same cwd: same relative paths
        if proc.returncode != 0:
            raise RuntimeError(f"training {method} (lr x{lr_factor:g}, seed {seed}) failed (exit {proc.returncode}):"
                               f"\n{proc.stderr[-3000:]}")
        argv_file.write_text(json.dumps(argv) + "\n")
        print(f"  {method} lr x{lr_factor:g} seed {seed}: trained in {time.time() - started:.0f} s", flush=True)
    stats = json.loads(stats_file.read_text())
    stats["adapter_dir"] = str(train / "adapter")
    stats["argv"] = argv
    return stats


def _cached(cfg: CompareConfig, path: Path, settings: dict, compute) -> dict:
    """``compute()``'s result, kept in ``path`` with the settings it was made with; reused under --reuse."""
    if cfg.reuse and path.is_file():
        doc = json.loads(path.read_text())
        if doc.get("settings") == settings:
            return doc["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "result": result}, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return result


# ---- evaluation: DreamBooth ----------------------------------------------------------------------

def _device(cfg: CompareConfig) -> str:
    from hra_diffusion.utils import default_device

    return default_device(cfg.device)


@dataclass
class SubjectSetup:
    """What every DreamBooth evaluation shares: prompts of both splits, the sampler, the subject's folders."""

    base_model: str
    reference_dir: str
    identifier: str
    test_prompts: list[str]
    test_class_prompts: list[str]  # the prior check (adapter loaded, no identifier)
    val_prompts: list[str]
    val_class_prompts: list[str]
    heldout_dir: Path | None
    checker: bool  # the tiny world's subject: the rates can be read
    generation: dict[str, Any]

    def settings(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def subject_setup(cfg: CompareConfig) -> SubjectSetup:
    from hra_diffusion.tiny import data
    from hra_diffusion.tiny.measure import has_showroom
    from hra_diffusion.training.dreambooth import apply_subject_file

    tcfg = apply_subject_file(trainer_config(cfg, "hra", cfg.out / "hra" / "train"))
    protocol = json.loads((REPO / "eval" / "dreambooth_protocol.json").read_text())["generation"]
    checker = has_showroom(tcfg.subject_file)
    doc = json.loads(Path(tcfg.subject_file).read_text()) if tcfg.subject_file else {}
    identifier = doc.get("identifier") or " ".join(w for w in tcfg.instance_prompt.split()
                                                    if w not in (tcfg.class_prompt or "").split())
    test = list(doc.get("heldout_prompts") or tcfg.validation_prompts or [tcfg.instance_prompt])
    test = [p for p in test if identifier in p.split()] or [tcfg.instance_prompt]
    if checker:
        test_class = list(doc.get("class_check_prompts") or data.class_check_prompts())
        val, val_class = data.sweep_subject_prompts(), data.sweep_class_prompts()
    else:
        test_class, val, val_class = [], [], []
    if len(cfg.lr_factors) > 1 and not checker:
        raise ValueError("the learning-rate sweep scores each rate with the tiny world's subject checker on a "
                         "validation split, and this subject has none (its subject.json lists no heldout_prompts); "
                         "pass --lr_factors 1 (the recipe's rate) or a list of one factor")
    guidance = cfg.guidance if cfg.guidance is not None else (
        tcfg.validation_guidance_scale if checker else protocol["guidance_scale"])
    subject_dir = Path(tcfg.instance_data_dir).parent
    return SubjectSetup(
        base_model=tcfg.pretrained_model, reference_dir=tcfg.instance_data_dir, identifier=identifier,
        test_prompts=test, test_class_prompts=test_class, val_prompts=val, val_class_prompts=val_class,
        heldout_dir=subject_dir / "heldout" if (subject_dir / "heldout").is_dir() else None, checker=checker,
        generation={"images_per_prompt": cfg.num_images, "scheduler": protocol["scheduler"],
                    "steps": cfg.eval_steps or protocol["steps"], "guidance": guidance, "seed": protocol["seed"]})


def without_identifier(prompt: str, identifier: str) -> str:
    return " ".join(w for w in prompt.split() if w != identifier)


def _generate(cfg: CompareConfig, setup: SubjectSetup, adapter: str | None, folder: Path, prompts: list[str]) -> Path:
    from hra_diffusion.generate import GenerateConfig, generate

    g = setup.generation
    return generate(GenerateConfig(
        output_dir=str(folder), adapter=adapter, base_model=setup.base_model, prompts=prompts,
        reference_dir=setup.reference_dir, num_images_per_prompt=g["images_per_prompt"], seed=g["seed"],
        steps=g["steps"], scheduler=g["scheduler"], guidance_scale=g["guidance"], device=_device(cfg),
        safety_checker=False, overwrite=True, progress=False))


def _manifest_images(folder: Path) -> tuple[list, list[str]]:
    from PIL import Image

    from hra_diffusion.samples import read_samples

    rows = read_samples(folder)
    return [Image.open(r.file).convert("RGB") for r in rows], [r.prompt for r in rows]


def _subject_scores(cfg: CompareConfig, folder: Path, metrics: list[str] | None = None
                    ) -> tuple[dict[str, float], dict[str, Any]]:
    """score_subject's summary and (extractors, unavailable metrics) of one samples folder (``metrics`` None: the
    default set, LPIPS noted as unavailable when its weights do not load)."""
    from hra_diffusion.metrics.subject import score_subject

    result = score_subject(folder, metrics=metrics, dino=cfg.dino_model, clip=cfg.clip_model,
                           **({"clip_pretrained": cfg.clip_pretrained} if cfg.clip_pretrained else {}),
                           device=_device(cfg))
    return ({k: float(v) for k, v in result.summary.items() if k in SUBJECT_METRICS},
            {"extractors": result.info.get("extractors", {}), "unavailable": result.info.get("unavailable", {})})


def _scores_or_missing(cfg: CompareConfig, folder: Path, metrics: list[str] | None = None
                       ) -> tuple[dict[str, float], dict[str, Any]]:
    """_subject_scores, or every metric n/a with the reason when an extractor cannot be loaded (offline...)."""
    from hra_diffusion.metrics.extractors import WeightsUnavailableError

    try:
        return _subject_scores(cfg, folder, metrics)
    except (WeightsUnavailableError, FileNotFoundError, OSError) as err:  # e.g. offline without local weights
        why = str(err).splitlines()[0]
        return {}, {"extractors": {}, "unavailable": {m: why for m in metrics or SUBJECT_METRICS}}


def _rates(images: list, prompts: list[str]) -> dict[str, float]:
    from hra_diffusion.tiny import checker

    got = checker.subject_rates(images, prompts)
    return {k: got[k] for k in CHECKER_RATES if got.get(k) is not None}


def evaluate_subject_run(cfg: CompareConfig, setup: SubjectSetup, adapter: str | None, folder: Path,
                         split: str) -> dict:
    """One adapter (None: the base) on a split: subject metrics (test only) and the checker's rates."""
    prompts, class_prompts = ((setup.test_prompts, setup.test_class_prompts) if split == "test"
                              else (setup.val_prompts, setup.val_class_prompts))
    out: dict[str, Any] = {"metrics": {}, "info": {}}
    samples = _generate(cfg, setup, adapter, folder / "samples", prompts)
    out["metrics"], out["info"] = _scores_or_missing(cfg, samples)
    if setup.checker:
        images, used = _manifest_images(samples)
        out["metrics"].update(_rates(images, used))
        if class_prompts:
            images, used = _manifest_images(_generate(cfg, setup, adapter, folder / "class_samples", class_prompts))
            out["metrics"].update(_rates(images, used))
    return out


SWEEP_KEYS = {"dreambooth": ("dino", "clip_t", "subject_in_context_rate", "class_plain_rate"), "control": ("canny_f1",)}


def sweep_score(task: str, metrics: dict[str, float]) -> float:
    """What the learning-rate sweep maximises on the validation split. DreamBooth: the mean of DINO (subject
    fidelity), CLIP-T (prompt fidelity) and the checker's subject-in-context and class-plain rates (the subject
    where it was asked for; the prior kept), those of them that could be computed; control: the Canny F1."""
    got = [metrics[k] for k in SWEEP_KEYS[task] if k in metrics]
    if not got:
        raise ValueError(f"no sweep metric ({', '.join(SWEEP_KEYS[task])}) could be computed on the validation split")
    return statistics.fmean(got)


def evaluate_subject_references(cfg: CompareConfig, setup: SubjectSetup) -> dict[str, dict]:
    """The base model asked with the class prompt, and the real held-out photos (captions from .txt files)."""
    refs: dict[str, dict] = {}
    folder = cfg.out / "reference" / "base"
    class_prompts = [without_identifier(p, setup.identifier) for p in setup.test_prompts]
    samples = _generate(cfg, setup, None, folder / "samples", class_prompts)
    metrics, info = _scores_or_missing(cfg, samples)
    if setup.checker:  # how often the base, asked for the class, draws the subject (read as the identifier's prompts)
        images, used = _manifest_images(samples)
        asked = dict(zip(class_prompts, setup.test_prompts, strict=True))
        metrics.update(_rates(images, [asked[p] for p in used]))
        images, used = _manifest_images(_generate(cfg, setup, None, folder / "class_samples", setup.test_class_prompts))
        metrics.update(_rates(images, used))
    refs["base"] = {"metrics": metrics, "info": info}
    if setup.heldout_dir is not None:
        refs["real"] = evaluate_real_photos(cfg, setup)
    return refs


def evaluate_real_photos(cfg: CompareConfig, setup: SubjectSetup) -> dict:
    """The held-out photos scored as if generated: a manifest with each photo's caption (its .txt) and the base."""
    from hra_diffusion.samples import list_images

    folder = cfg.out / "reference" / "real"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in list_images(setup.heldout_dir):
        caption = photo.with_suffix(".txt")
        row = {"file": str(photo.resolve()), "reference_dir": str(Path(setup.reference_dir).resolve()),
               "base": setup.base_model}
        if caption.is_file():
            row["prompt"] = caption.read_text(encoding="utf-8").strip()
        rows.append(row)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    captioned = all("prompt" in r for r in rows)
    metrics, info = _scores_or_missing(cfg, folder, None if captioned else ["dino", "clip_i"])
    if not captioned:
        info.setdefault("unavailable", {})["clip_t"] = f"the photos in {setup.heldout_dir} have no .txt captions"
    if setup.checker and captioned:
        images, prompts = _manifest_images(folder)
        metrics.update(_rates(images, prompts))
    return {"metrics": metrics, "info": info, "photos": len(rows)}


# ---- evaluation: control -------------------------------------------------------------------------

def control_pairs(cfg: CompareConfig) -> tuple[dict[str, list], dict[str, Any]]:
    """{"val": [...], "test": [...]} (condition, prompt, image path) from the held-out metadata: every third pair
    is the validation split (the sweep), the rest the test."""
    from PIL import Image

    tcfg = trainer_config(cfg, "hra", cfg.out / "hra" / "train")
    folder = Path(tcfg.validation_data_dir or tcfg.train_data_dir)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    pairs = [(Image.open(folder / r[tcfg.conditioning_image_column]).convert("RGB"), r[tcfg.caption_column],
              folder / r[tcfg.image_column]) for r in rows]
    split = {"val": pairs[0::3], "test": [p for i, p in enumerate(pairs) if i % 3]}
    return split, {"pairs_from": str(folder), "val_pairs": len(split["val"]), "test_pairs": len(split["test"]),
                   "base_model": tcfg.pretrained_model, "resolution": tcfg.resolution,
                   "steps": cfg.eval_steps or 20, "guidance": 4.0 if cfg.guidance is None else cfg.guidance}


def evaluate_control_run(cfg: CompareConfig, setup: dict, pairs: list, adapter: str | None) -> dict:
    """Canny F1 (pixel, 1 px) of one adapter (None: the base, no condition encoder) on ``pairs``."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from hra_diffusion.control import attach_condition_encoder, load_trained_adapter
    from hra_diffusion.metrics.control_eval import control_consistency
    from hra_diffusion.training.validation import build_pipeline, eval_mode

    base = StableDiffusionPipeline.from_pretrained(setup["base_model"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe = build_pipeline(base.unet, base.text_encoder, base.vae, base.tokenizer, base.scheduler)
    pipe.to(_device(cfg))
    handle = None
    if adapter is not None:
        _, _, encoder = load_trained_adapter(pipe.unet, adapter)
        handle = attach_condition_encoder(pipe.unet, encoder)
    with eval_mode(pipe.unet):  # PEFT layers folded in: OFT/BOFT rebuild their rotation in every forward
        f1 = control_consistency(pipe, [(c, p) for c, p, _ in pairs], handle, resolution=setup["resolution"], seed=0,
                                 steps=setup["steps"], guidance_scale=setup["guidance"], tolerances=(0, 1))
    return {"metrics": {"canny_f1": float(np.mean(f1[0])), "canny_f1_1px": float(np.mean(f1[1]))}, "info": {}}


def evaluate_control_references(cfg: CompareConfig, setup: dict, pairs: list) -> dict[str, dict]:
    import numpy as np
    from PIL import Image

    from hra_diffusion.metrics.control_eval import edge_consistency

    real = {k: float(np.mean([edge_consistency(Image.open(img).convert("RGB"), cond, tolerance=k)
                              for cond, _, img in pairs])) for k in (0, 1)}
    return {"base": evaluate_control_run(cfg, setup, pairs, None),
            "real": {"metrics": {"canny_f1": real[0], "canny_f1_1px": real[1]}, "info": {}}}


# ---- the sweep, the seeds, the table -------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """{metric: {"mean", "std", "n"}} over the seeds' metrics (std: the sample standard deviation)."""
    keys = sorted({k for m in per_seed for k in m})
    out = {}
    for k in keys:
        vals = [m[k] for m in per_seed if k in m]
        mean, std = _mean_std(vals)
        out[k] = {"mean": mean, "std": std, "n": len(vals)}
    return out


COLUMNS = {
    "dreambooth": [("dino", "DINO ↑"), ("clip_i", "CLIP-I ↑"), ("clip_t", "CLIP-T ↑"), ("lpips", "LPIPS ↓"),
                   ("subject_rate", "subject drawn ↑"), ("subject_in_context_rate", "subject in context ↑"),
                   ("class_plain_rate", "class prompt plain ↑")],
    "control": [("canny_f1", "Canny F1 ↑"), ("canny_f1_1px", "Canny F1, 1 px ↑")],
}
PERCENT = {"subject_rate", "subject_in_context_rate", "class_plain_rate", "class_striped_rate"}


def _cell(key: str, stat: dict | None) -> str:
    if not stat:
        return "n/a"
    scale, fmt = (100, "{:.0f}") if key in PERCENT else (1, "{:.3f}")
    text = fmt.format(stat["mean"] * scale)
    if stat.get("std") is not None:
        text += " ± " + fmt.format(stat["std"] * scale)
    return text + ("%" if key in PERCENT else "")


def format_table(task: str, rows: dict[str, dict], references: dict[str, dict], labels: dict[str, str]) -> str:
    cols = [(k, name) for k, name in COLUMNS[task]
            if any(k in r["aggregate"] for r in rows.values()) or any(k in r["metrics"] for r in references.values())]
    cuda = any("cuda_peak_allocated_mib" in s for r in rows.values() for s in r["train_stats"])
    head = ["method", "lr", "trainable", "s / step", "peak RSS (MiB)"] + (["CUDA peak (MiB)"] if cuda else [])
    head += [name for _, name in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blank = [""] * (4 + cuda)
    for ref, r in references.items():
        stats = {k: {"mean": v, "std": None} for k, v in r["metrics"].items()}
        lines.append("| " + " | ".join([f"*{labels[ref]}*", *blank, *(_cell(k, stats.get(k)) for k, _ in cols)]) + " |")
    for method, r in rows.items():
        stats = r["train_stats"]
        n = r["trainable"]
        cells = [labels[method], f"{r['lr']:.2g}", f"{n['unet']:,}" + (f" (+{n['total'] - n['unet']:,} encoder)"
                                                                        if n["total"] != n["unet"] else ""),
                 # the median over seeds: one run slowed by other load on a shared machine does not move it
                 f"{statistics.median(s['step_seconds_median'] for s in stats):.3f}",
                 f"{statistics.fmean(s['peak_rss_mib'] for s in stats):.0f}"]
        if cuda:
            cells.append(f"{statistics.fmean(s.get('cuda_peak_allocated_mib', float('nan')) for s in stats):.0f}")
        cells += [_cell(k, r["aggregate"].get(k)) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _trainable(stats: dict) -> dict[str, int]:
    t = stats["trainable_parameters"]
    total = sum(t.values()) if isinstance(t, dict) else int(t)
    return {"unet": int(t.get("unet", total)) if isinstance(t, dict) else total, "total": total}


def plot_tradeoff(result: dict, path: Path) -> Path | None:
    """DINO (subject fidelity) against CLIP-T (prompt fidelity), mean ± std per method, the references marked."""
    rows, refs = result["rows"], result["references"]
    if not any("dino" in r["aggregate"] and "clip_t" in r["aggregate"] for r in rows.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    for method, r in rows.items():
        a = r["aggregate"]
        if "dino" in a and "clip_t" in a:
            ax.errorbar(a["clip_t"]["mean"], a["dino"]["mean"], xerr=a["clip_t"]["std"] or 0,
                        yerr=a["dino"]["std"] or 0, fmt="o", capsize=3, label=result["labels"][method])
    for ref, r in refs.items():
        m = r["metrics"]
        if "dino" in m and "clip_t" in m:
            ax.scatter(m["clip_t"], m["dino"], marker="*", s=140, color="grey", zorder=3)
            ax.annotate(result["labels"][ref], (m["clip_t"], m["dino"]), textcoords="offset points", xytext=(6, -4),
                        fontsize=8, color="dimgrey")
    extractors = next((r["info"].get("extractors") for r in refs.values() if r.get("info", {}).get("extractors")), {})
    tiny = any("tiny-world" in str(v) for v in (extractors or {}).values())
    ax.set_xlabel("CLIP-T (prompt fidelity) ↑" + (" — tiny-world stand-in CLIP" if tiny else ""))
    ax.set_ylabel("DINO (subject fidelity) ↑" + (" — tiny-world stand-in" if tiny else ""))
    seeds = result["config"]["seeds"]
    ax.set_title(f"DreamBooth on the tiny world: {len(seeds)} seed(s), mean ± std" if tiny else
                 f"DreamBooth: {len(seeds)} seed(s), mean ± std", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(cfg: CompareConfig) -> dict:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if cfg.task == "dreambooth":
        setup = subject_setup(cfg)
        prepare_class_images(cfg)
        setup_settings = setup.settings()
    else:
        pairs, setup = control_pairs(cfg)
        setup_settings = dict(setup)
    budgets = match_budgets(cfg)
    sizes = {m: b["args"] for m, b in budgets.items()}
    rates = recipe_rates(cfg)
    labels = {**REFERENCE_LABELS[cfg.task], **{m: label(m, sizes[m]) for m in cfg.methods}}
    print(f"parameter budgets ({cfg.budget}): " + "; ".join(f"{labels[m]}: {b['trainable']:,}"
                                                           for m, b in budgets.items()), flush=True)

    trained: dict[tuple, dict] = {}  # each run trains once per invocation (and not at all when --reuse keeps it)

    def train(method: str, factor: float, seed: int) -> dict:
        if (method, factor, seed) not in trained:
            trained[method, factor, seed] = train_run(cfg, method, sizes, seed, factor, rates)
        return trained[method, factor, seed]

    def evaluate(method: str, factor: float, seed: int, split: str) -> dict:
        stats = train(method, factor, seed)
        folder = run_dir(cfg, method, factor, seed) / split
        settings = {"argv": stats["argv"], "setup": setup_settings, "split": split, "version": EVAL_VERSION}
        if cfg.task == "dreambooth":
            return _cached(cfg, folder / "eval.json", settings,
                           lambda: evaluate_subject_run(cfg, setup, stats["adapter_dir"], folder, split))
        return _cached(cfg, folder / "eval.json", settings,
                       lambda: evaluate_control_run(cfg, setup, pairs[split], stats["adapter_dir"]))

    # 1. the learning-rate sweep on the validation split (first seed)
    sweep: dict[str, dict] = {}
    for method in cfg.methods:
        if len(cfg.lr_factors) == 1:
            sweep[method] = {"chosen": cfg.lr_factors[0], "scores": {}}
            continue
        scores = {f: sweep_score(cfg.task, evaluate(method, f, cfg.seeds[0], "val")["metrics"]) for f in cfg.lr_factors}
        best = max(scores.values())
        chosen = min((f for f, s in scores.items() if s == best), key=lambda f: abs(f - 1.0))  # ties: nearest the recipe
        sweep[method] = {"chosen": chosen, "scores": {f"{f:g}": s for f, s in scores.items()}}
        print(f"  {method}: lr sweep {sweep[method]['scores']} -> x{chosen:g}", flush=True)
    # 2. every seed at the chosen rate, on the test split
    rows: dict[str, dict] = {}
    for method in cfg.methods:
        f = sweep[method]["chosen"]
        per_seed, stats, infos = [], [], []
        for seed in cfg.seeds:
            got = evaluate(method, f, seed, "test")
            per_seed.append(got["metrics"])
            infos.append(got.get("info", {}))
            stats.append(train(method, f, seed))
        lr = rates["learning_rate"] * f
        rows[method] = {"lr": lr, "lr_factor": f, "per_seed": per_seed, "aggregate": aggregate(per_seed),
                        "train_stats": stats, "trainable": _trainable(stats[0]), "info": infos[0]}
    train_eval_seconds = time.time() - started
    # 3. the reference rows
    if cfg.task == "dreambooth":
        references = _cached(cfg, out / "reference" / "eval.json", {"setup": setup_settings},
                             lambda: evaluate_subject_references(cfg, setup))
    else:
        references = _cached(cfg, out / "reference" / "eval.json", {"setup": setup_settings},
                             lambda: evaluate_control_references(cfg, setup, pairs["test"]))
    table = format_table(cfg.task, rows, references, labels)
    total = time.time() - started
    info = next((r["info"] for r in rows.values() if r["info"]), {})
    notes = [f"- {k}: n/a, {why}" for k, why in (info.get("unavailable") or {}).items()]
    if info.get("extractors"):
        notes.append("- extractors: " + "; ".join(f"{k}: {v}" for k, v in info["extractors"].items()))
    def swept(m: str) -> str:
        scores = ", ".join(f"x{k}: {v:.2f}" for k, v in sweep[m]["scores"].items())
        return f"{labels[m]}: x{sweep[m]['chosen']:g}" + (f" (validation score {scores})" if scores else "")

    sweep_line = "; ".join(swept(m) for m in sweep)
    report = (f"### {cfg.task}: HRA vs PEFT baselines, same loop, data and schedule; {len(cfg.seeds)} seed(s), "
              f"mean ± std\n\n{table}\n\n" + ("\n".join(notes) + "\n" if notes else "")
              + f"- learning rate (x the recipe's {rates['learning_rate']:g}, chosen on the validation split): "
                f"{sweep_line}\n"
              + f"\nWall-clock: {total / 60:.1f} min.\n")
    print("\n" + report)
    result = {"config": asdict(cfg), "budgets": budgets, "labels": labels, "recipe_rates": rates,
              "setup": setup_settings, "sweep": sweep, "rows": rows, "references": references,
              "table_markdown": table, "seconds": {"total": total, "training_and_evaluation": train_eval_seconds}}
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "compare.md").write_text(report)
    if cfg.task == "dreambooth":
        try:
            plot = plot_tradeoff(result, out / "compare.png")
            if plot:
                print(f"wrote {plot}")
        except ImportError:
            print("compare.png not drawn: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"compare: error: {err}", file=sys.stderr)
        sys.exit(2)
