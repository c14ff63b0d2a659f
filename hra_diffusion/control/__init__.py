"""Controllable generation the OFT/HRA way: a small condition encoder whose output is added to the UNet's
``conv_in`` output while the frozen UNet is tuned with an adapter.

``encoder``: the encoder, the ``conv_in`` hook (both classifier-free-guidance branches get the control),
``ControlledUNet``, ``prepare_condition``. ``io``: the control adapter folder (any adapter kind + encoder).
``hra_diffusion.detectors`` computes condition images (Canny, HED, ...).
"""

from .encoder import (
    ConditionHandle,
    ControlledUNet,
    attach_condition_encoder,
    build_condition_encoder,
    default_block_out_channels,
    prepare_condition,
)
from .io import (
    CONDITION_ENCODER_FILE,
    ENCODER_PREFIX,
    encoder_config,
    has_condition_encoder,
    load_condition_encoder,
    load_control_adapter,
    load_trained_adapter,
    save_condition_encoder,
    save_control_adapter,
)

__all__ = [
    "ENCODER_PREFIX", "CONDITION_ENCODER_FILE", "build_condition_encoder", "default_block_out_channels",
    "ConditionHandle", "attach_condition_encoder", "ControlledUNet", "prepare_condition", "encoder_config",
    "has_condition_encoder", "save_condition_encoder", "load_condition_encoder", "save_control_adapter",
    "load_control_adapter", "load_trained_adapter",
]
