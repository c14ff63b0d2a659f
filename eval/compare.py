"""HRA against PEFT's LoRA, OFT and BOFT: each method's learning-rate × steps frontier, in the same training loop,
on the same data, modules and schedule; an operating point per method chosen by a rule fixed before the run.

    python eval/compare.py                              # DreamBooth on the tiny world's subject (the default)
    python eval/compare.py --task control               # the tiny world's control set (outline -> filled shape)
    python eval/compare.py --reuse                      # continue an interrupted run: finished runs are kept
    python eval/compare.py --methods hra_r16,hra_attn,lora_attn --reuse     # the ablations (hra_diffusion.compare.VARIANTS)
    python eval/compare.py --config configs/dreambooth/sd15.yaml --eval_at 500,1000,2000   # another recipe

Per method, each learning rate of a log grid (--lr_points around the recipe's, --lr_spacing decades apart;
BOFT, slow on CPU, a coarser grid) is trained once (first seed) to the last of --eval_at steps, with adapter
snapshots at the others, and every (rate, steps) point is scored on the validation prompts. The grid widens on a
side until the best rate is interior. The rule (hra_diffusion.compare.RULES, printed in the results) picks the
operating point; every seed is trained there and scored on the held-out test prompts.

Writes <output_dir>/frontier-<task>.json, .md and .png; runs live in <output_dir>/<method>/lr<factor>-seed<seed>/.
docs/baselines.md explains the protocol and what it costs.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from hra_diffusion.compare import METHODS, VARIANTS, CompareConfig, run_frontier
from hra_diffusion.compare.config import BUDGETS, TRAINERS


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"compare: error: --{what} takes comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    d = CompareConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=d.task, choices=TRAINERS)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join({**METHODS, **VARIANTS})}")
    p.add_argument("--output_dir", help="default: outputs/frontier-<task>")
    p.add_argument("--config", help="trainer YAML recipe (default: the trainer's own, the tiny world)")
    p.add_argument("--eval_at", default=",".join(map(str, d.eval_at)),
                   help="step counts scored; runs train to the last (default %(default)s)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="the operating point's seeds (grid: the first)")
    p.add_argument("--lr_centre", type=float, help="the grid's centre rate (default: the recipe's learning_rate)")
    p.add_argument("--lr_points", type=int, default=d.lr_points, help="starting grid size (odd; default %(default)s)")
    p.add_argument("--lr_spacing", type=float, default=d.lr_spacing, help="decades between rates (default %(default)s)")
    p.add_argument("--coarse_methods", default=",".join(d.coarse_methods), help="methods on the coarse grid")
    p.add_argument("--coarse_points", type=int, default=d.coarse_points)
    p.add_argument("--coarse_spacing", type=float, default=d.coarse_spacing)
    p.add_argument("--max_lr_points", type=int, default=d.max_lr_points, help="widening stops here")
    p.add_argument("--floor_points", type=float, default=d.floor_points,
                   help="the rule's floor: the base's rate minus this (default %(default)s)")
    p.add_argument("--train_args", default="", help="extra trainer overrides for every run, one quoted string")
    p.add_argument("--budget", default=d.budget, choices=BUDGETS,
                   help="match (default): size each baseline to HRA r=8's trainable count; fixed: the listed sizes")
    p.add_argument("--reuse", action="store_true", help="keep finished runs and evaluations (same arguments)")
    p.add_argument("--eval_steps", type=int, default=d.eval_steps, help="sampling steps (default %(default)s)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the recipe's validation_guidance_scale)")
    p.add_argument("--val_images", type=int, default=d.val_images)
    p.add_argument("--test_images", type=int, default=d.test_images)
    p.add_argument("--control_val_images", type=int, default=d.control_val_images)
    p.add_argument("--control_test_images", type=int, default=d.control_test_images)
    p.add_argument("--dino_model", help="default: chosen from the samples' base (the tiny world's stand-in on it)")
    p.add_argument("--clip_model", help="default: chosen from the samples' base (the tiny world's stand-in on it)")
    p.add_argument("--clip_pretrained")
    p.add_argument("--device", help="evaluation device (default: cuda when available, else cpu)")
    a = p.parse_args(argv)
    names = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    return CompareConfig(**{**vars(a), "methods": names(a.methods), "coarse_methods": names(a.coarse_methods),
                            "eval_at": _numbers(a.eval_at, int, "eval_at"), "seeds": _numbers(a.seeds, int, "seeds"),
                            "train_args": shlex.split(a.train_args)})


def main(cfg: CompareConfig) -> dict:
    return run_frontier(cfg)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"compare: error: {err}", file=sys.stderr)
        sys.exit(2)
