"""Subject-driven (DreamBooth) HRA fine-tuning as a :class:`TrainingTask` for the shared loop."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters.config import HRAConfig
from ..adapters.io import TEXT_ENCODER_SUBDIR as TEXT_ENCODER_ADAPTER_SUBDIR
from ..adapters.io import save_adapter
from ..adapters.peft_baselines import count_trainable
from ..adapters.registry import save_any_adapter
from .card import adapter_facts, write_model_card
from .config import ConfigError, DreamBoothConfig, save_resolved_config
from .data import ImageFolderDataset, ImageTransform
from .loss import add_noise, denoising_loss, sample_latents, with_orthogonality
from .models import SDComponents, add_hra, add_unet_adapter, load_sd_components, weight_dtype_for
from .prior import generate_class_images
from .run_guard import check_run_start, print_summary, resume_notes, use_cpu_threads
from .trainer import TrainingTask, TrainResult, make_accelerator, run_training
from .validation import build_pipeline, eval_mode, generate_images

__all__ = ["apply_subject_file", "DreamBoothTask", "train_dreambooth", "TEXT_ENCODER_ADAPTER_SUBDIR"]

SUBJECT_KEYS = ("class_noun", "identifier", "instance_prompt", "class_prompt", "validation_prompts")


def apply_subject_file(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """Fill unset prompts/folders from ``cfg.subject_file`` (a subject.json beside train/ and heldout/)."""
    if not cfg.subject_file:
        return cfg
    path = Path(cfg.subject_file)
    if not path.is_file():
        raise ConfigError(f"subject_file {str(path)!r} does not exist (expected a subject.json with keys {', '.join(SUBJECT_KEYS)})")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"subject_file {str(path)!r} is not valid JSON: {err}") from None
    if cfg.instance_data_dir is None:
        cfg.instance_data_dir = str(path.parent / "train")
    if cfg.instance_prompt is None:
        cfg.instance_prompt = doc.get("instance_prompt")
    if cfg.class_prompt is None:
        cfg.class_prompt = doc.get("class_prompt")
    if cfg.validation_prompts is None:
        cfg.validation_prompts = list(doc.get("validation_prompts") or [])
    return cfg


def _require(cfg: DreamBoothConfig) -> None:
    if not cfg.instance_data_dir:
        raise ConfigError("instance_data_dir is not set: pass --instance_data_dir FOLDER (or --subject_file subject.json)")
    if not cfg.instance_prompt:
        raise ConfigError("instance_prompt is not set: pass --instance_prompt 'a photo of qwe dog' (identifier + class)")
    if cfg.with_prior_preservation and not cfg.class_prompt:
        raise ConfigError("with_prior_preservation needs class_prompt, e.g. --class_prompt 'a photo of dog'")


class DreamBoothTask(TrainingTask):
    """UNet (and optionally text-encoder) HRA on instance images, with optional prior preservation."""

    def __init__(self, cfg: DreamBoothConfig, accelerator) -> None:
        _require(cfg)
        self.cfg = cfg
        self.accelerator = accelerator
        self.weight_dtype = weight_dtype_for(cfg.mixed_precision)
        self.autocast_dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype
        transform = ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip)
        # data first: a bad folder fails before any model is loaded
        self.instance = ImageFolderDataset(cfg.instance_data_dir, cfg.instance_prompt, transform, cfg.seed, "instance image")
        self.sd: SDComponents = load_sd_components(cfg.pretrained_model, cfg.revision, cfg.variant, self.weight_dtype)
        device = accelerator.device
        for m in (self.sd.unet, self.sd.vae, self.sd.text_encoder):
            m.to(device)
        self.classes = None
        if cfg.with_prior_preservation:
            class_dir = Path(cfg.class_data_dir or Path(cfg.output_dir) / "class_images")
            cfg.class_data_dir = str(class_dir)
            made = generate_class_images(
                self.sd, class_dir, cfg.class_prompt, cfg.num_class_images, batch_size=cfg.sample_batch_size,
                seed=cfg.seed, steps=cfg.class_inference_steps, resolution=cfg.resolution,
                accelerator=accelerator, autocast_dtype=self.autocast_dtype,
            )
            if made:
                accelerator.print(f"generated {made} class images in {class_dir}")
            self.classes = ImageFolderDataset(class_dir, cfg.class_prompt, transform, cfg.seed + 1, "class image")
        # the adapter (HRA, or a PEFT baseline): the base was cast to weight_dtype above; adapter tensors are fp32
        self.unet_hra = add_unet_adapter(self.sd.unet, cfg, "UNet")
        self.trainable_unet = count_trainable(self.sd.unet)
        self.text_hra = None
        if cfg.train_text_encoder:
            self.text_hra = HRAConfig(r=cfg.text_encoder_r, target_modules=cfg.text_encoder_target_modules,
                                      apply_gs=cfg.apply_gs, orth_lambda=cfg.orth_lambda, seed=cfg.seed + 1)
            add_hra(self.sd.text_encoder, self.text_hra, "text encoder")
        if cfg.gradient_checkpointing:
            self.sd.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                self.sd.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.prompt_cache: dict[str, torch.Tensor] = {}
        if not cfg.train_text_encoder:
            with torch.no_grad():
                for prompt in {cfg.instance_prompt, cfg.class_prompt} - {None}:
                    self.prompt_cache[prompt] = self.sd.text_encoder(self._tokens([prompt]))[0][0]
        if cfg.cache_latents:
            self._cache_latents()

    # ---- pieces --------------------------------------------------------------------------------
    def _tokens(self, prompts: list[str]) -> torch.Tensor:
        tok = self.sd.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(self.accelerator.device)

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.sd.vae.encode(pixels.to(self.accelerator.device, self.weight_dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _cache_latents(self) -> None:
        for ds in [self.instance, self.classes]:
            if ds is None:
                continue
            cache = {}
            for key in ds.cache_keys():
                mean, std = self._encode_pixels(ds.cache_pixels(key)[None])
                cache[key] = (mean[0].cpu(), std[0].cpu())
            ds.latent_cache = cache

    # ---- TrainingTask ----------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        mods = {"unet": self.sd.unet}
        if self.cfg.train_text_encoder:
            mods["text_encoder"] = self.sd.text_encoder
        return mods

    def learning_rates(self) -> dict[str, float]:
        lrs = {"unet": self.cfg.learning_rate}
        if self.cfg.train_text_encoder:
            lrs["text_encoder"] = self.cfg.text_encoder_lr or self.cfg.learning_rate
        return lrs

    def dataset(self):
        instance, classes = self.instance, self.classes

        class Paired(torch.utils.data.Dataset):
            def __getitem__(self, position: int) -> dict:
                return {"instance": instance[position], "class": classes[position] if classes is not None else None}

            def __len__(self) -> int:
                return len(instance)

        return Paired(), len(instance), _collate

    def loss(self, modules, batch, generator):
        cfg = self.cfg
        device = self.accelerator.device
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            mean, std = self._encode_pixels(batch["pixel_values"])
        latents = sample_latents(mean, std, generator, self.sd.vae.config.scaling_factor)
        noisy = add_noise(self.sd.noise_scheduler, latents, generator)
        if cfg.train_text_encoder:
            states = modules["text_encoder"](self._tokens(batch["prompts"]))[0]
        else:
            states = torch.stack([self.prompt_cache[p] for p in batch["prompts"]])
        pred = modules["unet"](noisy.noisy, noisy.timesteps, states).sample
        loss, logs = denoising_loss(pred, noisy.target, batch["num_prior"], cfg.prior_loss_weight)
        unwrapped = [self.accelerator.unwrap_model(m) for m in modules.values()]
        loss, orth = with_orthogonality(loss, unwrapped, cfg.orth_lambda)
        return loss, {**logs, **orth}

    def validate(self, modules, step):
        cfg = self.cfg
        if not cfg.validation_prompts:
            return None
        unet = modules["unet"]
        text_encoder = modules.get("text_encoder", self.sd.text_encoder)
        pipe = build_pipeline(unet, text_encoder, self.sd.vae, self.sd.tokenizer, self.sd.noise_scheduler)
        with eval_mode(unet, text_encoder):
            rows = generate_images(pipe, cfg.validation_prompts, cfg.num_validation_images, cfg.validation_seed,
                                   cfg.validation_inference_steps, cfg.validation_guidance_scale, cfg.resolution,
                                   autocast_dtype=self.autocast_dtype)
        return rows, list(cfg.validation_prompts)

    def save(self, modules, output_dir: Path) -> list[Path]:
        cfg = self.cfg
        meta = dict(base_model=cfg.pretrained_model, base_model_revision=cfg.revision,
                    instance_prompt=cfg.instance_prompt, trainer="dreambooth_hra")
        paths = [save_any_adapter(modules["unet"], output_dir / "adapter", cfg.adapter, **meta)]
        if "text_encoder" in modules:
            paths.append(save_adapter(modules["text_encoder"], output_dir / "adapter" / TEXT_ENCODER_ADAPTER_SUBDIR, **meta))
        return paths


def _collate(items: list[dict]) -> dict:
    rows = [it["instance"] for it in items] + [it["class"] for it in items if it["class"] is not None]
    batch = {"prompts": [r["prompt"] for r in rows], "num_prior": len(rows) - len(items)}
    if "latent_mean" in rows[0]:
        batch["latent_mean"] = torch.stack([r["latent_mean"] for r in rows])
        batch["latent_std"] = torch.stack([r["latent_std"] for r in rows])
    else:
        batch["pixel_values"] = torch.stack([r["pixel_values"] for r in rows])
    return batch


def train_dreambooth(cfg: DreamBoothConfig) -> TrainResult:
    """Run DreamBooth-HRA end to end: data and model checks, training, adapter, card, config, logs."""
    apply_subject_file(cfg)
    _require(cfg)
    check_run_start(cfg)  # never silently replace a previous run, nor resume another run's checkpoint
    accelerator = make_accelerator(cfg, "dreambooth_hra")
    use_cpu_threads(accelerator)
    try:
        out = Path(cfg.output_dir)
        task = DreamBoothTask(cfg, accelerator)
        if accelerator.is_main_process:
            save_resolved_config(cfg, out)
        result = run_training(task, accelerator)
        if accelerator.is_main_process:
            _write_card(cfg, task, result, out)
            print_summary(cfg, result, "DreamBooth", f"--prompt {shlex.quote(cfg.instance_prompt)} ")
        accelerator.wait_for_everyone()
        return result
    finally:
        accelerator.end_training()


def _write_card(cfg: DreamBoothConfig, task: DreamBoothTask, result: TrainResult, out: Path) -> None:
    name, adapter_fact, peft_load = adapter_facts(cfg, task.trainable_unet)
    adapters = {str(out / "adapter"): f"the UNet's HRA adapter (r={cfg.r}, {', '.join(cfg.target_modules)}); "
                "load with `hra_diffusion.load_adapter(pipe.unet, ...)`"}
    if cfg.adapter != "hra":
        adapters = {str(out / "adapter"): f"the UNet's {name} adapter in PEFT's format; load with "
                    "`hra_diffusion.load_any_adapter(pipe.unet, ...)`"
                    + (" or diffusers' `pipe.load_lora_weights(...)`" if cfg.adapter == "lora" else "")}
    if cfg.train_text_encoder:
        adapters[str(out / "adapter" / TEXT_ENCODER_ADAPTER_SUBDIR)] = (
            f"the text encoder's HRA adapter (r={cfg.text_encoder_r}, {', '.join(cfg.text_encoder_target_modules)}); "
            "load with `load_adapter(pipe.text_encoder, ...)`")
    samples = result.validation_grids[-1:]
    te_line = (f'load_adapter(pipe.text_encoder, "{out}/adapter/{TEXT_ENCODER_ADAPTER_SUBDIR}")\n'
               if cfg.train_text_encoder else "")
    load = (f'from hra_diffusion import load_adapter\nload_adapter(pipe.unet, "{out}/adapter")\n{te_line}'
            if cfg.adapter == "hra" else peft_load)
    usage = (
        "from diffusers import StableDiffusionPipeline\n\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({cfg.pretrained_model!r})\n{load}"
        f"image = pipe({(cfg.validation_prompts or [cfg.instance_prompt])[0]!r}).images[0]\n"
    )
    facts = {
        "base model": f"`{cfg.pretrained_model}`" + (f" @ {cfg.revision}" if cfg.revision else ""),
        "instance prompt": f"`{cfg.instance_prompt}`",
        "instance images": f"{len(task.instance)} from `{cfg.instance_data_dir}`",
        "prior preservation": (f"yes: {cfg.num_class_images} class images (`{cfg.class_prompt}`) in `{cfg.class_data_dir}`, "
                               f"weight {cfg.prior_loss_weight}") if cfg.with_prior_preservation else "no",
        "adapter": adapter_fact,
        "text encoder HRA": f"r={cfg.text_encoder_r} on {cfg.text_encoder_target_modules}" if cfg.train_text_encoder else "no",
        "steps": f"{result.global_step} (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps} "
                 f"x {task.accelerator.num_processes} process(es))",
        "optimizer": f"{'8-bit ' if cfg.use_8bit_adam else ''}AdamW lr {cfg.learning_rate}, {cfg.lr_scheduler} "
                     f"(warm-up {cfg.lr_warmup_steps}), wd {cfg.adam_weight_decay}, clip {cfg.max_grad_norm}",
        "resolution": cfg.resolution,
        "mixed precision": cfg.mixed_precision,
        "seed": cfg.seed,
        "training time": f"{result.seconds:.0f} s" + (f" (resumed from {result.resumed_from.name})" if result.resumed_from else ""),
    }
    command = cfg.command or "accelerate launch train/dreambooth_hra.py"
    write_model_card(
        out, title=f"{name} DreamBooth adapter: {cfg.instance_prompt}", base_model=cfg.pretrained_model,
        command=command, summary=(
            ("A Householder Reflection Adaptation (HRA) adapter" if cfg.adapter == "hra" else
             f"A {name} adapter (PEFT's, a baseline for HRA)") + " for subject-driven generation, trained with "
            f"hra-diffusion's `train/dreambooth_hra.py`. Use the prompt `{cfg.instance_prompt}` (or any prompt "
            "with its identifier) to generate the subject."),
        adapters=adapters, facts=facts, sample_images=samples, usage=usage,
        notes=([f"validation prompts: {', '.join(shlex.quote(p) for p in cfg.validation_prompts)}"] if cfg.validation_prompts else []) + resume_notes(result),
    )
