"""What a comparison runs: its methods (and the ablation variants), the learning-rate grid, the step counts,
the evaluation's size; :class:`CompareConfig` holds one comparison's settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TRAINERS", "ORTH_LAMBDA", "METHODS", "VARIANTS", "BUDGETS", "LR_FLAGS", "CompareConfig", "adapter_kind",
           "method_args", "lr_factor"]

TRAINERS = ("dreambooth", "control")
ORTH_LAMBDA = "1e-4"
# the compared methods: HRA r = 8 (the paper's size) and its two variants, PEFT's baselines sized to its budget
# (--budget match); comparable budgets: HRA r·d per layer, LoRA r·(d + d_out), OFT d(b-1)/2, BOFT d·b + d_out
METHODS: dict[str, list[str]] = {
    "hra": ["--adapter", "hra", "--r", "8"],
    "hra_orth": ["--adapter", "hra", "--r", "8", "--orth_lambda", ORTH_LAMBDA],
    "hra_gs": ["--adapter", "hra", "--r", "8", "--apply_gs", "true"],
    "lora": ["--adapter", "lora", "--r", "4"],
    "oft": ["--adapter", "oft", "--block_size", "16"],
    "boft": ["--adapter", "boft", "--block_size", "8"],
}
ATTENTION = "to_q,to_k,to_v,to_out.0"
# ablations (not budget-matched): how HRA's best rate moves with r, with the adapted modules, with trained biases,
# and where the default recipe (r = 16 with the text encoder) sits
VARIANTS: dict[str, list[str]] = {
    "hra_r4": ["--adapter", "hra", "--r", "4"],
    "hra_r16": ["--adapter", "hra", "--r", "16"],
    "hra_attn": ["--adapter", "hra", "--r", "8", "--target_modules", ATTENTION],
    "lora_attn": ["--adapter", "lora", "--r", "4", "--target_modules", ATTENTION],
    "hra_recipe": ["--adapter", "hra", "--r", "16", "--train_text_encoder", "true"],
    # the recipe with PEFT's hra_bias="hra_only" (the setting where HRA learns the tiny subject, so an effect shows)
    "hra_recipe_bias": ["--adapter", "hra", "--r", "16", "--train_text_encoder", "true", "--train_bias", "true"],
}
BUDGETS = ("match", "fixed")
# the learning-rate flags each task's grid scales together
LR_FLAGS = {"dreambooth": ("learning_rate",), "control": ("learning_rate", "encoder_learning_rate")}


def method_args(method: str) -> list[str]:
    return list(METHODS.get(method) or VARIANTS[method])


def adapter_kind(method: str) -> str:
    """hra | lora | oft | boft: the trainer's --adapter of a method."""
    args = method_args(method)
    return args[args.index("--adapter") + 1]


def lr_factor(spacing: float, k: int) -> float:
    """The k-th grid point's multiple of the recipe's rate: 10^(spacing·k), rounded so run folders are stable."""
    return float(f"{10 ** (spacing * k):.6g}")


@dataclass
class CompareConfig:
    """Settings of one comparison (the command-line flags of eval/compare.py map one-to-one onto these)."""

    task: str = "dreambooth"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    output_dir: str | None = None  # None: outputs/frontier-<task>
    config: str | None = None  # the trainer recipe (None: the trainer's default, the tiny world)
    # the step counts scored: every run trains to the last, and its adapter snapshots give the others
    eval_at: list[int] = field(default_factory=lambda: [200, 400, 800])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the operating point's; the grid uses the first
    lr_centre: float | None = None  # the grid's centre (None: the recipe's learning_rate; other rate flags follow it)
    lr_points: int = 5  # the starting grid: this many rates centred on lr_centre
    lr_spacing: float = 0.5  # decades between grid points
    coarse_methods: list[str] = field(default_factory=lambda: ["boft"])  # these use coarse_spacing (slow on CPU)
    coarse_spacing: float = 1.0
    coarse_points: int = 3
    max_lr_points: int = 9  # widening stops here (the table then says the best rate is at the grid's edge)
    floor_points: float = 0.15  # the rule's prior floor: the base's rate minus this
    train_args: list[str] = field(default_factory=list)  # extra overrides for every run's trainer
    budget: str = "match"  # match: each baseline sized to HRA r=8's trainable count; fixed: METHODS' sizes
    reuse: bool = False  # keep finished runs and evaluations (same arguments) instead of redoing them
    # evaluation (sampler: the recipe's validation sampler and guidance)
    eval_steps: int = 20
    guidance: float | None = None  # None: the recipe's validation_guidance_scale
    val_images: int = 6  # per prompt (position prompts: 4)
    test_images: int = 6  # per prompt (class prompts: 8; position: 4)
    control_val_images: int = 3  # per (condition, prompt) pair
    control_test_images: int = 2
    dino_model: str | None = None  # None: chosen from the samples' base (score_subject)
    clip_model: str | None = None
    clip_pretrained: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TRAINERS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TRAINERS)}")
        known = {**METHODS, **VARIANTS}
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"unknown or repeated method(s) {unknown or self.methods}; choose from "
                             f"{', '.join(known)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if not self.eval_at or min(self.eval_at) < 1 or len(set(self.eval_at)) != len(self.eval_at):
            raise ValueError(f"eval_at must be distinct step counts >= 1, got {self.eval_at}")
        self.eval_at = sorted(self.eval_at)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        for name in ("lr_points", "coarse_points"):
            if getattr(self, name) < 3 or getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd and >= 3 (a centre and both sides), got {getattr(self, name)}")
        if self.lr_centre is not None and not self.lr_centre > 0:
            raise ValueError(f"lr_centre must be > 0, got {self.lr_centre}")
        if not (self.lr_spacing > 0 and self.coarse_spacing > 0):
            raise ValueError("lr_spacing and coarse_spacing must be > 0 (decades between grid points)")
        if self.max_lr_points < max(self.lr_points, self.coarse_points):
            raise ValueError(f"max_lr_points ({self.max_lr_points}) must be >= the starting grid's points")
        if not 0 <= self.floor_points < 1:
            raise ValueError(f"floor_points must be in [0, 1), got {self.floor_points}")
        for name in ("eval_steps", "val_images", "test_images", "control_val_images", "control_test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"outputs/frontier-{self.task}")

    def spacing(self, method: str) -> float:
        return self.coarse_spacing if method in self.coarse_methods else self.lr_spacing

    def start_grid(self, method: str) -> list[int]:
        """The grid's starting exponents k (factor 10^(spacing·k)), centred on the recipe's rate."""
        n = self.coarse_points if method in self.coarse_methods else self.lr_points
        return list(range(-(n // 2), n // 2 + 1))

    def snapshot_every(self) -> int | None:
        """The trainer's adapter_snapshot_steps that writes every step count of eval_at but the last."""
        inner = self.eval_at[:-1]
        return math.gcd(*inner) if inner else None
