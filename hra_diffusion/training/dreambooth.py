"""Subject-driven (DreamBooth) HRA fine-tuning as a :class:`TrainingTask` for the shared loop, on SD 1.x/2.x
or SDXL bases (the family comes from the base's model_index.json; see :mod:`.sd_task`)."""

from __future__ import annotations

import importlib
import json
import shlex
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters.config import HRAConfig
from ..adapters.io import TEXT_ENCODER_SUBDIR as TEXT_ENCODER_ADAPTER_SUBDIR
from ..adapters.io import save_adapter
from ..adapters.registry import save_any_adapter
from ..conditioning import PromptEmbeds
from ..images import ImageTransform, check_images
from ..models import add_hra, recorded_name
from ..sampling import eval_mode, generate_images, validation_sampling
from ..utils import stream_seed
from .card import adapter_facts, write_model_card
from .config import ConfigError, DreamBoothConfig
from .data import CachedLatent, ImageFolderDataset
from .loss import denoising_loss, pixel_weights, with_orthogonality
from .prior import (
    CLASS_CAPTION_EXTENSION,
    class_prompts,
    existing_class_images,
    generate_class_images,
    missing_class_images,
)
from .runner import run_task
from .sd_task import StableDiffusionTask
from .summary import resume_notes
from .trainer import TrainResult

__all__ = ["apply_subject_file", "DreamBoothTask", "train_dreambooth", "TEXT_ENCODER_ADAPTER_SUBDIR"]

SUBJECT_KEYS = ("class_noun", "identifier", "instance_prompt", "class_prompt", "validation_prompts")


def apply_subject_file(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """Fill unset prompts/folders from ``cfg.subject_file`` (a subject.json beside train/ and heldout/); its
    ``instance_mask_dir`` (relative to it) fills the mask folder when ``mask_loss_weight`` is set, and its
    ``class_mask_dir`` the class masks when, in addition, prior preservation uses its own ``class_data_dir`` (the
    masks belong to those images and no others)."""
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
    if cfg.instance_mask_dir is None and cfg.mask_loss_weight and doc.get("instance_mask_dir"):
        cfg.instance_mask_dir = str(path.parent / doc["instance_mask_dir"])
    if cfg.class_prompt is None:
        cfg.class_prompt = doc.get("class_prompt")
    if (cfg.class_mask_dir is None and cfg.mask_loss_weight and cfg.with_prior_preservation and cfg.class_data_dir
            and doc.get("class_mask_dir") and doc.get("class_data_dir")
            and Path(cfg.class_data_dir).resolve() == (path.parent / doc["class_data_dir"]).resolve()):
        cfg.class_mask_dir = str(path.parent / doc["class_mask_dir"])
    if cfg.validation_prompts is None:
        cfg.validation_prompts = list(doc.get("validation_prompts") or [])
    return cfg


def _require(cfg: DreamBoothConfig) -> None:
    if not cfg.instance_data_dir:
        raise ConfigError("instance_data_dir is not set: pass --instance_data_dir FOLDER (or --subject_file subject.json)")
    if not cfg.instance_prompt:
        raise ConfigError("instance_prompt is not set: pass --instance_prompt 'a photo of qwe dog' (identifier + class)")
    if cfg.mask_loss_weight and not cfg.instance_mask_dir:
        raise ConfigError(f"mask_loss_weight={cfg.mask_loss_weight} needs subject masks: pass --instance_mask_dir FOLDER "
                          "(one mask per instance image, same file name, white = subject), or set mask_loss_weight: 0")
    if cfg.with_prior_preservation and not cfg.class_prompt:
        raise ConfigError("with_prior_preservation needs class_prompt, e.g. --class_prompt 'a photo of dog'")
    if cfg.class_mask_dir and cfg.class_data_dir and missing_class_images(cfg.class_data_dir, cfg.num_class_images):
        raise ConfigError(f"class_mask_dir={cfg.class_mask_dir!r} masks your own class images, but class_data_dir "
                          f"{cfg.class_data_dir!r} holds fewer than num_class_images={cfg.num_class_images}, so the "
                          "base would draw the rest, and those have no masks: add images (each with its mask) "
                          "or lower num_class_images")


class DreamBoothTask(StableDiffusionTask):
    """UNet (and optionally text-encoder) HRA on instance images, with optional prior preservation."""

    trainer = "dreambooth_hra"
    summary_kind = "DreamBooth"

    def generate_hint(self) -> str:
        return f"--prompt {shlex.quote(self.cfg.instance_prompt)} "
    cfg: DreamBoothConfig

    @classmethod
    def check_config(cls, cfg: DreamBoothConfig) -> DreamBoothConfig:
        apply_subject_file(cfg)
        _require(cfg)
        return cfg

    def __init__(self, cfg: DreamBoothConfig, accelerator) -> None:
        _require(cfg)
        super().__init__(cfg, accelerator)
        transform = ImageTransform(cfg.resolution, cfg.center_crop, cfg.random_flip)
        # data first: a bad folder fails before any model is loaded
        self.instance = ImageFolderDataset(cfg.instance_data_dir, cfg.instance_prompt, transform, cfg.seed, "instance image",
                                           caption_extension=cfg.instance_caption_extension,
                                           mask_dir=cfg.instance_mask_dir)  # set only with mask_loss_weight > 0
        for note in self.instance.notes:
            accelerator.print(note)
        self.classes = None
        class_dir = Path(cfg.class_data_dir or Path(cfg.output_dir) / "class_images") \
            if cfg.with_prior_preservation else None
        if class_dir is not None:
            cfg.class_data_dir = str(class_dir)
            if not missing_class_images(class_dir, cfg.num_class_images):  # complete: read before the base loads
                self.classes = self._class_dataset(class_dir, transform)
            else:  # the ones already there fail before the base loads, too
                check_images(existing_class_images(class_dir), "class image")
        self.load_base()
        if class_dir is not None and self.classes is None:
            made = generate_class_images(
                self.sd, class_dir, class_prompts(cfg), cfg.num_class_images, batch_size=cfg.sample_batch_size,
                seed=cfg.seed, steps=cfg.class_inference_steps, resolution=cfg.resolution,
                guidance_scale=cfg.class_guidance_scale, accelerator=accelerator, autocast_dtype=self.autocast_dtype,
            )
            if made:
                accelerator.print(f"generated {made} class images in {class_dir}")
            self.classes = self._class_dataset(class_dir, transform)
        # the adapter (HRA, or a PEFT baseline): the base was cast to weight_dtype above; adapter tensors are fp32
        self.add_unet_adapter()
        # text-encoder HRA: {pipeline component name: text encoder}, both encoders on SDXL
        self.text_parts: dict[str, nn.Module] = self._add_text_encoder_adapters() if cfg.train_text_encoder else {}
        self.prompt_cache: dict[str, PromptEmbeds] = {}  # frozen encoders: each prompt encoded once
        if not cfg.train_text_encoder:
            with torch.no_grad():
                for prompt in {*self.instance.prompts, *(self.classes.prompts if self.classes else ()),
                               cfg.class_prompt, "" if cfg.class_caption_dropout else None} - {None}:
                    self.prompt_cache[prompt] = self._encode_prompts([prompt])
        if cfg.cache_latents:
            self._cache_latents()

    # ---- pieces --------------------------------------------------------------------------------
    def _class_dataset(self, class_dir: Path, transform: ImageTransform) -> ImageFolderDataset:
        """The class images (checked, with their captions and masks), its notes printed."""
        cfg = self.cfg
        classes = ImageFolderDataset(class_dir, cfg.class_prompt, transform, cfg.seed + 1, "class image",
                                     caption_extension=CLASS_CAPTION_EXTENSION
                                     if cfg.class_prompts_from_captions else cfg.class_caption_extension,
                                     mask_dir=cfg.class_mask_dir)
        for note in classes.notes:
            self.accelerator.print(note)
        if cfg.class_prompts_from_captions and all(p == cfg.class_prompt for p in classes.prompts):
            self.accelerator.print(f"note: the class images in {class_dir} have no captions (made before "
                                   "class_prompts_from_captions was set), so they all train with "
                                   f"{cfg.class_prompt!r}: delete the folder to draw them from the captions")
        return classes

    def _add_text_encoder_adapters(self) -> dict[str, nn.Module]:
        """HRA on every text encoder of the base (SDXL: both), keyed by the pipeline component it adapts (its
        adapter subfolder). Layers whose output the conditioning never reads are left out (SDXL's first encoder
        gives its penultimate hidden states, so its last layer would get no gradient, and DDP would stop)."""
        cfg = self.cfg
        parts = {}
        encoders = zip(self.cond.component_names, self.cond.text_encoders, self.cond.unused_layers(), strict=True)
        for i, (name, te, unused) in enumerate(encoders):
            exclude = [n for n, _ in te.named_modules() if unused and n.startswith(unused)]
            hra = HRAConfig(r=cfg.text_encoder_r, target_modules=cfg.text_encoder_target_modules, apply_gs=cfg.apply_gs,
                            orth_lambda=cfg.orth_lambda, train_bias=cfg.train_bias, seed=cfg.seed + 1 + i,
                            exclude_modules=exclude)
            add_hra(te, hra, name.replace("_", " "))
            if cfg.gradient_checkpointing:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            parts[name] = te
        return parts

    def _cache_latents(self) -> None:
        for ds in [self.instance, self.classes]:
            if ds is None:
                continue
            cache = {}
            for key in ds.cache_keys():
                pixels, size = ds.cache_pixels(key)
                mean, std = self._encode_pixels(pixels[None])
                cache[key] = CachedLatent(mean[0].cpu(), std[0].cpu(), size)  # the size condition stays with it
            ds.latent_cache = cache

    # ---- TrainingTask ----------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.sd.unet, **self.text_parts}

    def learning_rates(self) -> dict[str, float]:
        text_lr = self.cfg.text_encoder_lr or self.cfg.learning_rate
        return {"unet": self.cfg.learning_rate, **{name: text_lr for name in self.text_parts}}

    def dataset(self):
        instance, classes = self.instance, self.classes
        drop, seed = self.cfg.class_caption_dropout, self.cfg.seed

        class Paired(torch.utils.data.Dataset):
            def __getitem__(self, position: int) -> dict:
                cls = classes[position] if classes is not None else None
                if cls is not None and drop and caption_dropped(seed, position, drop):
                    cls = {**cls, "prompt": ""}
                return {"instance": instance[position], "class": cls}

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
        noisy = self._noisy_latents(mean, std, generator)
        if cfg.train_text_encoder:
            embeds = self._encode_prompts(batch["prompts"], [modules[name] for name in self.text_parts])
        else:
            embeds = PromptEmbeds.cat([self.prompt_cache[p] for p in batch["prompts"]])
        pred = modules["unet"](noisy.noisy, noisy.timesteps, **self._unet_kwargs(embeds, batch["sizes"])).sample
        weights, prior_weights = (pixel_weights(batch[key], pred.shape[-2:], cfg.mask_loss_weight) if key in batch else None
                                  for key in ("masks", "class_masks"))
        loss, logs = denoising_loss(pred, noisy.target, batch["num_prior"], cfg.prior_loss_weight, weights, prior_weights)
        unwrapped = [self.accelerator.unwrap_model(m) for m in modules.values()]
        loss, orth = with_orthogonality(loss, unwrapped, cfg.orth_lambda)
        return loss, {**logs, **orth}

    def validate(self, modules, step):
        cfg = self.cfg
        if not cfg.validation_prompts:
            return None
        unet = modules["unet"]
        encoders = [modules.get(name, te) for name, te in zip(self.cond.component_names, self.cond.text_encoders,
                                                              strict=True)]
        pipe = self._pipeline(unet, encoders)
        with eval_mode(unet, *encoders):
            rows = generate_images(pipe, cfg.validation_prompts, cfg.num_validation_images, cfg.validation_seed,
                                   cfg.validation_inference_steps, cfg.validation_guidance_scale, cfg.resolution,
                                   autocast_dtype=self.autocast_dtype)
        return rows, list(cfg.validation_prompts)

    def save(self, modules, output_dir: Path) -> list[Path]:
        cfg = self.cfg
        meta = dict(base_model=recorded_name(cfg.pretrained_model), base_model_revision=cfg.revision,
                    instance_prompt=cfg.instance_prompt, trainer=self.trainer,
                    sampling=validation_sampling(cfg))  # generate's defaults
        if cfg.pretrained_vae_model:  # generate loads the same VAE by default
            meta["vae_model"] = recorded_name(cfg.pretrained_vae_model)
        paths = [save_any_adapter(modules["unet"], output_dir / "adapter", cfg.adapter, **meta)]
        for name in self.text_parts:  # adapter/text_encoder/ (and adapter/text_encoder_2/ on SDXL)
            paths.append(save_adapter(modules[name], output_dir / "adapter" / name, **meta))
        return paths

    def after_training(self, modules, result: TrainResult) -> None:
        """The subject's own check, when its subject.json names one (``"showroom": "module:function"``; the tiny
        world's reads its showroom rates): run on the trained pipeline, its results saved to
        ``logs/showroom_rates.json``, printed, and put in the model card."""
        cfg = self.cfg
        check = subject_check(cfg.subject_file) if cfg.showroom_rates else None
        if check is None:
            return
        unet = modules["unet"]
        encoders = [modules.get(name, te) for name, te in zip(self.cond.component_names, self.cond.text_encoders,
                                                              strict=True)]
        with eval_mode(unet, *encoders):
            got = check(self._pipeline(unet, encoders), subject_file=cfg.subject_file,
                        guidance=cfg.validation_guidance_scale, steps=cfg.validation_inference_steps,
                        out_dir=cfg.output_dir)  # sampled as the grids were and as generate samples the adapter
        out = Path(cfg.output_dir)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / "showroom_rates.json").write_text(json.dumps(got["results"], indent=2) + "\n")
        result.stats["showroom_rates"] = got["results"]
        result.stats["showroom"] = {k: got[k] for k in ("name", "line", "card", "figure")}
        result.stats.setdefault("report", []).append(f"{got['name']}: {got['line']} (grid: {got['figure']})")

    # ---- the model card ------------------------------------------------------------------------
    def write_card(self, result: TrainResult) -> Path:
        """The README.md: what the adapter is, how it was trained, samples, how to load it."""
        cfg = self.cfg
        out = Path(cfg.output_dir)
        name, _, peft_load = adapter_facts(cfg, self.trainable_unet)
        adapters = {str(out / "adapter"): f"the UNet's HRA adapter (r={cfg.r}, {', '.join(cfg.target_modules)}); "
                    "load with `hra_diffusion.load_adapter(pipe.unet, ...)`"}
        if cfg.adapter != "hra":
            adapters = {str(out / "adapter"): f"the UNet's {name} adapter in PEFT's format; load with "
                        "`hra_diffusion.load_any_adapter(pipe.unet, ...)`"
                        + (" or diffusers' `pipe.load_lora_weights(...)`" if cfg.adapter == "lora" else "")}
        for part in self.text_parts:
            which = "the text encoder's" if len(self.text_parts) == 1 else f"`{part}`'s"
            adapters[str(out / "adapter" / part)] = (
                f"{which} HRA adapter (r={cfg.text_encoder_r}, {', '.join(cfg.text_encoder_target_modules)}); "
                f"load with `load_adapter(pipe.{part}, ...)`")
        samples = result.validation_grids[-1:]
        te_lines = "".join(f'load_adapter(pipe.{part}, "{out}/adapter/{part}")\n' for part in self.text_parts)
        load = (f'from hra_diffusion import load_adapter\nload_adapter(pipe.unet, "{out}/adapter")\n{te_lines}'
                if cfg.adapter == "hra" else peft_load)
        usage = (self.card_pipeline_lines() + load
                 + f"image = pipe({(cfg.validation_prompts or [cfg.instance_prompt])[0]!r}, "
                   f"{self.card_sampling_args()}).images[0]\n")
        facts = self.card_facts(result, data={
            "instance prompt": f"`{cfg.instance_prompt}`",
            "instance images": f"{len(self.instance)} from `{cfg.instance_data_dir}`",
            "masked loss": (f"subject pixels weighted {1 + cfg.mask_loss_weight:g}x (masks in `{cfg.instance_mask_dir}`)"
                            + (f", class objects too (masks in `{cfg.class_mask_dir}`)" if cfg.class_mask_dir else "")
                            if cfg.mask_loss_weight else "no"),
            "prior preservation": _prior_fact(cfg),
        }, model={
            "text encoder HRA": (f"r={cfg.text_encoder_r} on {cfg.text_encoder_target_modules}"
                                 + (f" of {', '.join(self.text_parts)}" if len(self.text_parts) > 1 else "")
                                 if cfg.train_text_encoder else "no"),
        })
        showroom = result.stats.get("showroom")
        if showroom:
            facts[f"{showroom['name']} rates"] = showroom["card"]
        command = cfg.command or "accelerate launch train/dreambooth_hra.py"
        return write_model_card(
            out, title=f"{name} DreamBooth adapter: {cfg.instance_prompt}", base_model=cfg.pretrained_model,
            command=command, summary=(
                ("A Householder Reflection Adaptation (HRA) adapter" if cfg.adapter == "hra" else
                 f"A {name} adapter (PEFT's, a baseline for HRA)") + " for subject-driven generation, trained with "
                f"hra-diffusion's `train/dreambooth_hra.py`. Use the prompt `{cfg.instance_prompt}` (or any prompt "
                "with its identifier) to generate the subject."),
            adapters=adapters, facts=facts, sample_images=samples, usage=usage,
            notes=([f"validation prompts: {', '.join(shlex.quote(p) for p in cfg.validation_prompts)}"]
                   if cfg.validation_prompts else []) + resume_notes(result), tags=self.card_tags(),
        )


def subject_check(subject_file: str | None) -> Callable[..., dict] | None:
    """The check a subject.json names under ``showroom`` ("module:function"), imported by that name (the trainer
    knows no subject's checker), or None. The function takes (pipeline, subject_file=, guidance=, steps=, out_dir=) and
    returns {"name", "results", "line", "card", "figure"}."""
    if not subject_file or not Path(subject_file).is_file():
        return None
    name = json.loads(Path(subject_file).read_text()).get("showroom")
    if not name:
        return None
    module, _, attr = str(name).partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{subject_file}: showroom {name!r} cannot be imported ({err}); fix the name, or "
                          "train with --showroom_rates false") from None


def _prior_fact(cfg: DreamBoothConfig) -> str:
    """The model card's line on prior preservation: how many class images, captioned how, where, at what weight."""
    if not cfg.with_prior_preservation:
        return "no"
    if cfg.class_prompts_from_captions:
        captions = "the instance captions without the identifier"
    elif cfg.class_caption_extension:
        captions = f"captioned by their `{cfg.class_caption_extension}` files"
    else:
        captions = f"`{cfg.class_prompt}`"
    dropout = (f", {cfg.class_caption_dropout:.0%} of class samples with the empty prompt"
               if cfg.class_caption_dropout else "")
    return (f"yes: {cfg.num_class_images} class images ({captions}) in `{cfg.class_data_dir}`, "
            f"weight {cfg.prior_loss_weight}{dropout}")


def caption_dropped(seed: int, position: int, rate: float) -> bool:
    """Whether the class sample at stream ``position`` trains with the empty prompt (``rate`` of them; fixed by the
    seed and position, so a resumed or multi-process run drops the same ones)."""
    return stream_seed(seed, "class-caption-dropout", position) / float(1 << 63) < rate


def _collate(items: list[dict]) -> dict:
    rows = [it["instance"] for it in items] + [it["class"] for it in items if it["class"] is not None]
    batch = {"prompts": [r["prompt"] for r in rows], "sizes": [r["size"] for r in rows],
             "num_prior": len(rows) - len(items)}
    if "latent_mean" in rows[0]:
        batch["latent_mean"] = torch.stack([r["latent_mean"] for r in rows])
        batch["latent_std"] = torch.stack([r["latent_std"] for r in rows])
    else:
        batch["pixel_values"] = torch.stack([r["pixel_values"] for r in rows])
    if "mask" in rows[0]:  # the instance rows' subject masks
        batch["masks"] = torch.stack([it["instance"]["mask"] for it in items])
    if batch["num_prior"] and "mask" in rows[-1]:  # the class rows' object masks (class_mask_dir)
        batch["class_masks"] = torch.stack([it["class"]["mask"] for it in items if it["class"] is not None])
    return batch


def train_dreambooth(cfg: DreamBoothConfig) -> TrainResult:
    """Run DreamBooth-HRA end to end: data and model checks, training, adapter, card, config, logs."""
    return run_task(DreamBoothTask, cfg)
