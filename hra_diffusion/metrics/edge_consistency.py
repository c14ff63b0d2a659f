"""Control consistency of a control adapter on held-out (condition, prompt) pairs (ControlNet++ Canny protocol).

F1 between Canny(100, 200) edges of the generated image and the condition's edge map (the condition
binarised, as ``control_metrics.score_control`` does for edge conditions). The same seeds are
used for every model, so base, trained and deliberately broken controllers are compared on equal terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..control import ConditionHandle, prepare_condition
from ..sampling import generate_images
from .control_metrics import canny_edges
from .functional import binarize_edges, edge_f1_tolerant

__all__ = ["edge_consistency", "control_consistency"]


def edge_consistency(generated: Image.Image, condition: Image.Image, low: int = 100, high: int = 200,
                     tolerance: int = 0) -> float:
    """Canny-edge F1 between a generated image and its (edge) condition, at the generated size; pixel-wise
    (ControlNet++) for ``tolerance=0``, else edges within ``tolerance`` pixels count as matched."""
    gen = np.asarray(generated.convert("RGB"), dtype=np.uint8)
    cond = np.asarray(condition.convert("RGB").resize(generated.size, Image.NEAREST), dtype=np.uint8)
    target = binarize_edges(torch.from_numpy(cond.copy()).permute(2, 0, 1))  # (H, W) bool
    return edge_f1_tolerant(canny_edges(gen, low, high), target, tolerance)


@torch.no_grad()
def control_consistency(
    pipe, pairs: Sequence[tuple[Image.Image, str]], handle: ConditionHandle | None, resolution: int,
    seed: int = 0, steps: int = 20, guidance_scale: float = 4.0, condition_order: Sequence[int] | None = None,
    tolerances: Sequence[int] = (0,), images: list[Image.Image] | None = None,
) -> list[float] | dict[int, list[float]]:
    """Per-pair F1 of one image generated per (condition, prompt); image i uses seed ``seed + i``.

    With one tolerance (default: pixel-wise) a list of scores; with several, {tolerance: scores} from the
    same images.

    ``handle`` None: the pipeline as is (the base model). ``condition_order``: feed the encoder the
    condition of pair ``condition_order[i]`` while scoring against pair i's own (a broken controller).
    ``images``: a list the generated images are appended to (for other checks of the same samples).
    """
    device = pipe.unet.device
    scores: dict[int, list[float]] = {}
    for i, (cond, prompt) in enumerate(pairs):
        if handle is not None:
            fed = pairs[condition_order[i]][0] if condition_order is not None else cond
            handle.set_condition(prepare_condition(fed, resolution, resolution).to(device))
        try:
            image = generate_images(pipe, [prompt], 1, seed + i, steps, guidance_scale, resolution)[0][0]
        finally:
            if handle is not None:
                handle.set_condition(None)
        if images is not None:
            images.append(image)
        for k in tolerances:
            scores.setdefault(k, []).append(edge_consistency(image, cond, tolerance=k))
    return scores[tolerances[0]] if len(tolerances) == 1 else scores
