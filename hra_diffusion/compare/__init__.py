"""The adapter comparison (``python eval/compare.py``): HRA against PEFT's LoRA, OFT and BOFT on one task, each
method's learning-rate × steps frontier measured in the same loop, its operating point chosen by a rule written
before the run, then three seeds there on held-out prompts.

Layers: this package runs the trainers as processes (``python -m hra_diffusion.training``) and reads their
adapters with the library; nothing below it imports it. docs/baselines.md describes the protocol.
"""

from .config import METHODS, VARIANTS, CompareConfig
from .frontier import run_frontier
from .selection import RULES

__all__ = ["CompareConfig", "METHODS", "VARIANTS", "RULES", "run_frontier"]
