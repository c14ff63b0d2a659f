"""Controllable generation with HRA: ``accelerate launch train/control_hra.py [--config recipe.yaml] [--key value ...]``.

With no arguments it trains on the embedded tiny-world control set (configs/control/tiny.yaml).
Every key of hra_diffusion.training.ControlConfig can be overridden as ``--key value``.
"""

from __future__ import annotations

from hra_diffusion.training import ControlConfig, parse_task_config, run_script
from hra_diffusion.training.control_task import train_control


def parse_args(argv: list[str] | None = None) -> ControlConfig:
    return parse_task_config("control", argv)


def main(cfg: ControlConfig):
    return train_control(cfg)


if __name__ == "__main__":
    run_script("control")
