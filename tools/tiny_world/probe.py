"""Word-use probes for the tiny world's next build: train a fresh UNet + text encoder on a built world's latents
and read, every few hundred steps, which caption words it uses (``build.word_use`` on the EMA weights).

    python -m tools.tiny_world probe --steps 1500 --every 250 --out outputs/probe-frozen --freeze-text-encoder

Each probe is a short, cheap version of the build's UNet stage (same scenes, captions, loss, learning rates and
EMA; the VAE of ``--model``, the committed one by default, so no VAE training), meant to compare levers before
spending the 120-min build budget on one. ``results.json`` in ``--out`` holds one row per reading; the final
EMA weights are written there as safetensors (``--init`` continues from them). docs/history.md has the
probes measured so far.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hra_diffusion.paths import TINY_MODEL_DIR
from hra_diffusion.tiny import scenes

from .build import (
    BuildConfig,
    _encode,
    apply_ema,
    images_to_tensor,
    load_pipeline,
    make_models,
    make_scheduler,
    make_unet,
    object_masks,
    train_unet,
    word_use,
)

UNET_KINDS = ("default", "three-level")


def _check_unet(kind: str, conv_in_kernel: int) -> None:
    if kind not in UNET_KINDS:
        raise ValueError(f"unknown UNet kind {kind!r}; choose one of {list(UNET_KINDS)}")
    if conv_in_kernel < 1 or conv_in_kernel % 2 == 0:
        raise ValueError(f"conv_in_kernel must be odd and >= 1, got {conv_in_kernel}")


def probe_unet(kind: str, conv_in_kernel: int, cfg: BuildConfig):
    """A fresh UNet seeded from ``cfg.seed``: the build's (``default``) or one level deeper (``three-level``),
    with an odd ``conv_in_kernel`` (3 in the build)."""
    _check_unet(kind, conv_in_kernel)
    torch.manual_seed(cfg.seed)
    return make_unet(cfg, levels=2 if kind == "default" else 3, conv_in_kernel=conv_in_kernel)


class _Reader:
    """Stands in for the build's checkpointer: at each ``checkpoint_every`` step it reads word use instead."""

    def __init__(self, unet, text_encoder, vae, tokenizer, sched, n: int, out: Path | None, verbose: bool):
        self.models = (unet, text_encoder)
        self.vae, self.tokenizer, self.sched, self.n, self.out, self.verbose = vae, tokenizer, sched, n, out, verbose
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.time()

    def save(self, state: dict[str, Any]) -> None:
        unet, te = (copy.deepcopy(m) for m in self.models)
        apply_ema({"unet": unet, "text_encoder": te}, state["ema_weights"])
        unet.eval()
        te.eval()
        w = word_use(self.vae, te, self.tokenizer, unet, self.sched, n=self.n)
        row = {"step": state["step"], "seconds": round(time.time() - self.t0, 1), "loss_ema": state["loss_ema"],
               **{k: w[k] for k in ("shape", "colour", "position", "caption")}, "bands": w["bands"]}
        self.rows.append(row)
        if self.verbose:
            print(json.dumps(row), flush=True)
        if self.out is not None:
            (self.out / "results.json").write_text(json.dumps(self.rows, indent=1) + "\n")


def run_probe(steps: int, every: int, out: Path | None = None, model: Path = TINY_MODEL_DIR,
              unet_kind: str = "default", conv_in_kernel: int = 3, freeze_text_encoder: bool = False,
              init: Path | None = None, n_probe: int = 180, cfg: BuildConfig | None = None,
              verbose: bool = True) -> list[dict[str, Any]]:
    """Train ``steps`` UNet steps from scratch (or from ``init``'s weights) on ``model``'s VAE latents of the
    build's scene pool, reading word use every ``every`` steps and at the end. Returns the rows."""
    from safetensors.torch import load_file, save_file

    if steps < 1 or every < 1:
        raise ValueError(f"steps and every must be >= 1, got {steps} and {every}")
    _check_unet(unet_kind, conv_in_kernel)
    cfg = replace(cfg or BuildConfig(), unet_steps=steps, checkpoint_every=every, steps_scale=1.0)
    if freeze_text_encoder:
        cfg = replace(cfg, train_text_encoder=False)
    torch.set_num_threads(cfg.threads)
    pipe = load_pipeline(Path(model))
    vae, tokenizer = pipe.vae.float(), pipe.tokenizer
    _, text_encoder, unet = make_models(cfg, cfg.seed)
    if unet_kind != "default" or conv_in_kernel != 3:
        unet = probe_unet(unet_kind, conv_in_kernel, cfg)
    if init is not None:
        unet.load_state_dict(load_file(Path(init) / "unet.safetensors"))
        text_encoder.load_state_dict(load_file(Path(init) / "text_encoder.safetensors"))
    pool = scenes.sample_scenes(cfg.seed, cfg.pool_size)
    pixels = images_to_tensor([scenes.render(s, cfg.resolution) for s in pool])
    with torch.no_grad():
        mean, std = _encode(vae, pixels)
    masks = object_masks(pool, cfg.resolution // 2)
    sched = make_scheduler(cfg)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    reader = _Reader(unet, text_encoder, vae, tokenizer, sched, n_probe, out, verbose)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    loss, ema_w = train_unet(unet, text_encoder, tokenizer, sched, (mean, std, masks), pool,
                             float(vae.config.scaling_factor), cfg, rng, verbose=False, ckpt=reader, extra={})
    reader.save({"step": steps, "loss_ema": loss, "ema_weights": ema_w})
    if out is not None:
        apply_ema({"unet": unet, "text_encoder": text_encoder}, ema_w)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(out / "unet.safetensors"))
        save_file({k: v.contiguous() for k, v in text_encoder.state_dict().items()},
                  str(out / "text_encoder.safetensors"))
    return reader.rows
