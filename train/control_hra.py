"""Controllable generation with HRA: ``accelerate launch train/control_hra.py [--config recipe.yaml] [--key value ...]``.

With no arguments it trains on the embedded tiny-world control set (configs/control/tiny.yaml).
Every key of hra_diffusion.training.control_task.ControlConfig can be overridden as ``--key value``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hra_diffusion.training import ConfigError, parse_config
from hra_diffusion.training.control_task import ControlConfig, train_control

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "control" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> ControlConfig:
    argv = sys.argv[1:] if argv is None else argv
    return parse_config(ControlConfig, argv, DEFAULT_RECIPE, program="accelerate launch train/control_hra.py")


def main(cfg: ControlConfig):
    return train_control(cfg)


if __name__ == "__main__":
    try:
        config = parse_args()
    except ConfigError as err:  # a bad key or value: the message names it; no traceback
        print(f"control_hra.py: error: {err}\n(run with --help for every key)", file=sys.stderr)
        sys.exit(2)
    main(config)
