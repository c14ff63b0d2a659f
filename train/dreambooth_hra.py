"""DreamBooth with HRA: ``accelerate launch train/dreambooth_hra.py [--config recipe.yaml] [--key value ...]``.

With no arguments it trains on the embedded tiny-world subject (configs/dreambooth/tiny.yaml).
Every key of hra_diffusion.training.DreamBoothConfig can be overridden as ``--key value``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hra_diffusion.training import ConfigError, DreamBoothConfig, parse_config
from hra_diffusion.training.dreambooth import train_dreambooth

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "dreambooth" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> DreamBoothConfig:
    argv = sys.argv[1:] if argv is None else argv
    return parse_config(DreamBoothConfig, argv, DEFAULT_RECIPE, program="accelerate launch train/dreambooth_hra.py")


def main(cfg: DreamBoothConfig):
    return train_dreambooth(cfg)


if __name__ == "__main__":
    try:
        config = parse_args()
    except ConfigError as err:  # a bad key or value: the message names it; no traceback
        print(f"dreambooth_hra.py: error: {err}\n(run with --help for every key)", file=sys.stderr)
        sys.exit(2)
    main(config)
