"""DreamBooth with HRA: ``accelerate launch train/dreambooth_hra.py [--config recipe.yaml] [--key value ...]``.

With no arguments it trains on the embedded tiny-world subject (configs/dreambooth/tiny.yaml).
Every key of hra_diffusion.training.DreamBoothConfig can be overridden as ``--key value``.
"""

from __future__ import annotations

from hra_diffusion.training import DreamBoothConfig, parse_task_config, run_script
from hra_diffusion.training.dreambooth import train_dreambooth


def parse_args(argv: list[str] | None = None) -> DreamBoothConfig:
    return parse_task_config("dreambooth", argv)


def main(cfg: DreamBoothConfig):
    return train_dreambooth(cfg)


if __name__ == "__main__":
    run_script("dreambooth")
