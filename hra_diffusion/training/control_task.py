"""Controllable generation with HRA (OFT/HRA papers' control setting) as a :class:`TrainingTask`, on SD 1.x/2.x
or SDXL bases (the family comes from the base's model_index.json; see :mod:`.sd_task`).

A condition encoder (ControlNetConditioningEmbedding, zero-initialised last conv) adds its output to the
UNet's conv_in output, through the library's conv_in hook (``hra_diffusion.control``); the frozen UNet is
tuned with HRA on the attention projections and ``ff.net.0.proj``. Both train together: the UNet and the
encoder are two modules of one optimizer (two parameter groups, so the encoder has its own learning rate).
The encoder is sized from the UNet's conv_in (320 channels on SDXL) and the VAE's downsampling.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..control import (
    attach_condition_encoder,
    build_condition_encoder,
    prepare_condition,
    save_control_adapter,
)
from ..detectors import ConditionCache, detector_key, make_detector
from ..errors import DataError
from ..images import CONDITION_BACKGROUND, ImageTransform, open_image
from ..models import recorded_name
from ..samples import read_prompts
from ..sampling import eval_mode, generate_images, sampler_for, validation_sampling
from .card import adapter_facts, write_model_card
from .config import ConfigError, ControlConfig
from .control_data import (
    ControlDataset,
    ControlRow,
    attach_computed_conditions,
    check_rows,
    collate_control,
    rows_from_dataset,
    rows_from_folder,
)
from .loss import denoising_loss, with_orthogonality
from .runner import run_task
from .sd_task import StableDiffusionTask
from .summary import resume_notes
from .trainer import TrainResult

# ControlConfig lives in .config with the other task configs (re-exported here)
__all__ = ["ControlConfig", "ControlTask", "train_control"]


def _require(cfg: ControlConfig) -> None:
    if bool(cfg.train_data_dir) == bool(cfg.dataset_name):
        raise ConfigError(
            "give exactly one data source: --train_data_dir FOLDER (metadata.jsonl of image, conditioning_image, "
            "text) or --dataset_name NAME (a datasets hub id or a save_to_disk folder)"
            + (f"; got both {cfg.train_data_dir!r} and {cfg.dataset_name!r}" if cfg.train_data_dir else "")
        )
    if cfg.validation_conditions and cfg.validation_prompts is None:
        raise ConfigError("validation_conditions needs validation_prompts (one per condition image, or one for all)")
    if cfg.validation_conditions and cfg.validation_prompts and len(cfg.validation_prompts) not in (1, len(cfg.validation_conditions)):
        raise ConfigError(
            f"{len(cfg.validation_prompts)} validation_prompts for {len(cfg.validation_conditions)} validation_conditions: "
            "give one per condition image, or one for all"
        )


def load_rows(cfg: ControlConfig, folder: str | None = None) -> list[ControlRow]:
    """Rows of ``folder`` (or the configured training source), conditions not yet computed."""
    need_condition = cfg.condition is None
    if folder is not None or cfg.train_data_dir:
        rows = rows_from_folder(folder or cfg.train_data_dir, cfg.columns(), need_condition)
        check_rows(rows)
    else:
        rows = rows_from_dataset(cfg.dataset_name, cfg.columns(), need_condition, cfg.dataset_config_name,
                                 cfg.dataset_split, cfg.cache_dir)
    return rows


class ControlTask(StableDiffusionTask):
    """HRA on the UNet + a fully trained condition encoder on (image, condition, caption) rows."""

    trainer = "control_hra"
    summary_kind = "Control"
    exportable = False  # export refuses control adapters: a LoRA file has no place for the condition encoder

    def generate_hint(self) -> str:
        """The held-out pairs as generate's prompts file when generate reads a condition from every row of their
        metadata.jsonl, else placeholders to fill in."""
        meta = Path(self.cfg.validation_data_dir or "") / "metadata.jsonl"
        if self.cfg.validation_data_dir and meta.is_file():
            try:
                usable = all(entry.condition is not None for entry in read_prompts(meta))
            except DataError:
                usable = False
            if usable:
                return f"--prompts-file {shlex.quote(str(meta))} --num-images 1 "
        return "--condition CONDITION.png --prompt 'PROMPT' "
    cfg: ControlConfig

    @classmethod
    def check_config(cls, cfg: ControlConfig) -> ControlConfig:
        _require(cfg)
        return cfg

    def __init__(self, cfg: ControlConfig, accelerator) -> None:
        _require(cfg)
        super().__init__(cfg, accelerator)
        # data first: bad columns/files/condition types fail before any model is loaded
        self.detector = None
        if cfg.condition is not None:
            self.detector = make_detector(cfg.condition, cfg.condition_model_path, cfg.canny_low_threshold,
                                          cfg.canny_high_threshold)
        rows = load_rows(cfg)
        if cfg.max_train_samples is not None:
            rows = rows[: cfg.max_train_samples]
        self._compute_conditions(rows)
        transform = ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip)
        self.data = ControlDataset(rows, transform, cfg.seed, cfg.proportion_empty_prompts)
        self.validation_rows = self._validation_rows(rows)

        self.load_base()
        self.add_unet_adapter()  # HRA, or a PEFT baseline (unet_hra None)
        self.vae_scale_factor = 2 ** (len(self.sd.vae.config.block_out_channels) - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same encoder init on every rank and every (resumed) run
            self.encoder = build_condition_encoder(self.sd.unet, vae_scale_factor=self.vae_scale_factor)
        self.encoder.to(device=accelerator.device, dtype=torch.float32).train()  # fp32 like the adapter tensors
        # the library's conv_in hook; its encoder is the DDP-wrapped one in training, the plain one in validation
        self.handle = attach_condition_encoder(self.sd.unet, self.encoder)

    # ---- pieces --------------------------------------------------------------------------------
    def _compute_conditions(self, rows: list[ControlRow]) -> None:
        if self.detector is None:
            return
        cfg = self.cfg
        root = Path(cfg.condition_cache_dir or Path(cfg.output_dir) / "condition_cache")
        cache = ConditionCache(root, detector_key(cfg.condition, cfg.canny_low_threshold, cfg.canny_high_threshold),
                               self.detector)
        with self.accelerator.main_process_first():  # rank 0 computes, the others read the cache
            attach_computed_conditions(rows, cache)
        self.condition_cache = cache.folder

    def _validation_rows(self, train_rows: list[ControlRow]) -> list[tuple[Image.Image, str]]:
        """(condition image, prompt) pairs for the validation grid; [] when validation is off."""
        cfg = self.cfg
        if cfg.validation_prompts == []:
            return []
        if cfg.validation_conditions:
            conds = [open_image(p, "validation condition", background=CONDITION_BACKGROUND) for p in cfg.validation_conditions]
            prompts = cfg.validation_prompts * len(conds) if len(cfg.validation_prompts) == 1 else cfg.validation_prompts
            return list(zip(conds, prompts, strict=True))
        rows = train_rows
        if cfg.validation_data_dir:
            rows = load_rows(cfg, cfg.validation_data_dir)[: cfg.num_validation_conditions]
            self._compute_conditions(rows)
        rows = rows[: cfg.num_validation_conditions]
        prompts = [r.caption for r in rows]
        if cfg.validation_prompts:
            prompts = cfg.validation_prompts * len(rows) if len(cfg.validation_prompts) == 1 else cfg.validation_prompts[: len(rows)]
        return [(r.load_condition(), p) for r, p in zip(rows, prompts, strict=False)]

    # ---- TrainingTask ----------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.sd.unet, "condition_encoder": self.encoder}

    def learning_rates(self) -> dict[str, float]:
        return {"unet": self.cfg.learning_rate, "condition_encoder": self.cfg.encoder_learning_rate or self.cfg.learning_rate}

    def dataset(self):
        return self.data, len(self.data), collate_control

    def loss(self, modules, batch, generator):
        device = self.accelerator.device
        mean, std = self._encode_pixels(batch["pixel_values"])
        with torch.no_grad():
            embeds = self._encode_prompts(batch["prompts"])
        noisy = self._noisy_latents(mean, std, generator)
        self.handle.encoder = modules["condition_encoder"]  # wrapped: DDP syncs the encoder's gradients
        self.handle.set_condition(batch["condition"].to(device))
        try:
            pred = modules["unet"](noisy.noisy, noisy.timesteps, **self._unet_kwargs(embeds, batch["sizes"])).sample
        finally:
            self.handle.set_condition(None)
            self.handle.encoder = self.encoder
        loss, logs = denoising_loss(pred, noisy.target)
        loss, orth = with_orthogonality(loss, [self.accelerator.unwrap_model(modules["unet"])], self.cfg.orth_lambda)
        return loss, {**logs, **orth}

    @torch.no_grad()
    def generate(self, modules, conditions: list[Image.Image], prompts: list[str], num_images: int, seed: int,
                 steps: int, guidance_scale: float, scheduler: str = "dpm++") -> list[list[Image.Image]]:
        """Images per (condition, prompt) from the training modules (no copy); image i uses seed + i."""
        cfg = self.cfg
        unet, encoder = modules["unet"], modules["condition_encoder"]
        pipe = self._pipeline(unet)
        pipe.scheduler = sampler_for(self.sd.noise_scheduler, scheduler)
        rows = []
        self.handle.encoder = encoder
        with eval_mode(unet, encoder):
            for cond, prompt in zip(conditions, prompts, strict=True):
                tensor = prepare_condition(cond, cfg.resolution, cfg.resolution).to(self.accelerator.device)
                self.handle.set_condition(tensor.expand(num_images, -1, -1, -1))  # CFG: both branches, see control.py
                try:
                    rows += generate_images(pipe, [prompt], num_images, seed, steps, guidance_scale, cfg.resolution,
                                            autocast_dtype=self.autocast_dtype)
                finally:
                    self.handle.set_condition(None)
        self.handle.encoder = self.encoder
        return rows

    def validate(self, modules, step):
        cfg = self.cfg
        if not self.validation_rows:
            return None
        conds = [c for c, _ in self.validation_rows]
        prompts = [p for _, p in self.validation_rows]
        images = self.generate(modules, conds, prompts, cfg.num_validation_images, cfg.validation_seed,
                               cfg.validation_inference_steps, cfg.validation_guidance_scale, cfg.validation_scheduler)
        size = (cfg.resolution, cfg.resolution)
        rows = [[c.resize(size, Image.BILINEAR), *imgs] for c, imgs in zip(conds, images, strict=True)]
        return rows, [p or "(empty prompt)" for p in prompts]

    def after_training(self, modules, result: TrainResult) -> None:
        """With ``showroom_f1`` and edge-map conditions given in ``validation_data_dir``, the held-out control
        consistency of the trained adapter: Canny F1 of one image per pair against its condition, pixel-wise and 1-px
        tolerant, and the same with each pair fed another pair's condition (a controller that ignores its
        condition scores alike). Saved to ``logs/heldout_f1.json``, printed, and put in the model card."""
        from ..metrics.edge_consistency import control_consistency

        cfg = self.cfg
        # (given condition images only: computing them here, on the main process alone, would need the ranks)
        if not (cfg.showroom_f1 and cfg.condition is None and cfg.validation_data_dir):
            return
        pairs = [(r.load_condition(), r.caption) for r in load_rows(cfg, cfg.validation_data_dir)]
        unet, encoder = modules["unet"], modules["condition_encoder"]
        pipe = self._pipeline(unet)
        shifted = [(i + len(pairs) // 2) % len(pairs) for i in range(len(pairs))]
        score = dict(resolution=cfg.resolution, steps=cfg.validation_inference_steps,  # as the grids and generate
                     guidance_scale=cfg.validation_guidance_scale, seed=0, tolerances=(0, 1))
        self.handle.encoder = encoder
        with eval_mode(unet, encoder):
            own = control_consistency(pipe, pairs, self.handle, **score)
            other = control_consistency(pipe, pairs, self.handle, condition_order=shifted, **score)
        self.handle.encoder = self.encoder
        f1 = {"pairs": len(pairs), **score, "tolerances": [0, 1],
              "f1": float(np.mean(own[0])), "f1_1px": float(np.mean(own[1])),
              "f1_other_condition": float(np.mean(other[0])), "f1_1px_other_condition": float(np.mean(other[1]))}
        out = Path(cfg.output_dir)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / "heldout_f1.json").write_text(json.dumps(f1, indent=2) + "\n")
        result.stats["heldout_f1"] = f1
        result.stats.setdefault("report", []).append("held-out control consistency: " + format_f1(f1))

    def save(self, modules, output_dir: Path) -> list[Path]:
        cfg = self.cfg
        path = output_dir / "adapter"
        save_control_adapter(
            modules["unet"], modules["condition_encoder"], path, cfg.adapter, base_model=recorded_name(cfg.pretrained_model),
            base_model_revision=cfg.revision, trainer=self.trainer, condition_type=cfg.condition or "given",
            resolution=cfg.resolution, sampling=validation_sampling(cfg),  # generate samples as validation did
            **({"vae_model": recorded_name(cfg.pretrained_vae_model)} if cfg.pretrained_vae_model else {}),  # generate's default
        )
        return [path]

    # ---- the model card ------------------------------------------------------------------------
    def write_card(self, result: TrainResult) -> Path:
        """The README.md: what the adapter and encoder are, how they were trained, samples, how to load them."""
        cfg = self.cfg
        out = Path(cfg.output_dir)
        source = f"`{cfg.train_data_dir}`" if cfg.train_data_dir else f"dataset `{cfg.dataset_name}` ({cfg.dataset_split})"
        n_encoder = sum(p.numel() for p in self.encoder.parameters())
        name, _, _ = adapter_facts(cfg, self.trainable_unet)
        loader = "from hra_diffusion.control import attach_condition_encoder, load_control_adapter, prepare_condition\n"
        load_line = (f'_, encoder = load_control_adapter(pipe.unet, "{out}/adapter")'
                     + ("\n" if cfg.adapter == "hra" else f"  # PEFT {name} + encoder\n"))
        usage = (
            self.card_pipeline_lines("from PIL import Image\n" + loader) + load_line +
            "handle = attach_condition_encoder(pipe.unet, encoder)\n"
            f'handle.set_condition(prepare_condition(Image.open("condition.png"), {cfg.resolution}, {cfg.resolution}))\n'
            f"image = pipe({(self.validation_rows[0][1] if self.validation_rows else 'a prompt')!r}, "
            f"height={cfg.resolution}, width={cfg.resolution}, {self.card_sampling_args()}).images[0]\n"
        )
        facts = self.card_facts(result, data={
            "data": f"{len(self.data)} pairs from {source}",
            "condition": (f"computed with `{cfg.condition}` (cached in `{self.condition_cache}`)" if cfg.condition
                          else f"column `{cfg.conditioning_image_column}`"),
            "empty prompts": f"{cfg.proportion_empty_prompts:.0%}",
        }, model={
            "condition encoder": f"{n_encoder:,} values, lr {cfg.encoder_learning_rate or cfg.learning_rate}, "
                                 f"channels {self.encoder.hra_condition_config['block_out_channels']}",
        }, run={
            "validation": f"{cfg.validation_scheduler}, {cfg.validation_inference_steps} steps, CFG {cfg.validation_guidance_scale}",
        })
        if result.stats.get("heldout_f1"):
            f1 = result.stats["heldout_f1"]
            facts["held-out control consistency"] = (
                f"{format_f1(f1)}; {f1['steps']} steps, CFG {f1['guidance_scale']}, seed {f1['seed']} + pair index")
        return write_model_card(
            out, title=f"{name} control adapter ({cfg.condition or 'condition images'})", base_model=cfg.pretrained_model,
            command=cfg.command or "accelerate launch train/control_hra.py",
            summary=(
                ("A Householder Reflection Adaptation (HRA) adapter" if cfg.adapter == "hra" else
                 f"A {name} adapter (PEFT's, a baseline for HRA)") + " for controllable generation, trained with "
                f"hra-diffusion's `train/control_hra.py`: {name} on the UNet plus a condition encoder whose output is "
                "added to the UNet's conv_in output. Both live in one adapter folder. Validation grids show the "
                "condition in the first column, then the generated images."),
            adapters={str(out / "adapter"): "the UNet's HRA tensors and the condition encoder (`condition_encoder.*`); "
                      "load with `hra_diffusion.control.load_control_adapter(pipe.unet, ...)`"} if cfg.adapter == "hra" else
            {str(out / "adapter"): f"the UNet's {name} adapter in PEFT's format and the condition encoder "
                                   "(`condition_encoder.safetensors`); load both with "
                                   "`hra_diffusion.control.load_control_adapter(pipe.unet, ...)`"},
            facts=facts, sample_images=result.validation_grids[-1:], usage=usage,
            notes=([f"validation prompts: {', '.join(shlex.quote(p) for _, p in self.validation_rows)}"]
                   if self.validation_rows else []) + resume_notes(result), tags=self.card_tags(),
        )


def format_f1(f1: dict) -> str:
    """One line for logs and the model card."""
    return (f"held-out Canny F1 {f1['f1']:.3f} (1-px tolerant {f1['f1_1px']:.3f}) over {f1['pairs']} pairs; "
            f"fed another pair's condition {f1['f1_other_condition']:.3f} ({f1['f1_1px_other_condition']:.3f})")


def train_control(cfg: ControlConfig) -> TrainResult:
    """Run control-HRA end to end: data and model checks, training, adapter + encoder, card, config, logs."""
    return run_task(ControlTask, cfg)
