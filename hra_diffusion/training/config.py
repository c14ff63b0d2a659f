"""Typed training configs: one dataclass per task (subclasses of :class:`TrainConfig`), each field's default and its
``--help`` text in one place (:func:`arg`), and ``validate()`` for the values no trainer can use. Reading recipes
and the command line into them: :mod:`.recipes`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..adapters.config import CONTROL_TARGETS, DEFAULT_TARGETS, TEXT_ENCODER_TARGETS
from ..errors import UserError
from ..sampling import VALIDATION_SCHEDULERS

if TYPE_CHECKING:
    from .control_data import ColumnNames

__all__ = ["ConfigError", "TrainConfig", "DreamBoothConfig", "ControlConfig", "arg", "ADAPTER_ONLY"]


class ConfigError(UserError):
    """A bad recipe key/value or command-line override (the message names the key)."""


def arg(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str = "",
        whole: bool = False) -> Any:
    """A config field with its ``--help`` text; ``whole``: a list field whose command-line value is one item
    (prompts hold commas) unless written as a YAML list."""
    return field(default=default, default_factory=factory, metadata={"help": help, "whole": whole})


def _internal(default: Any) -> Any:
    """A field filled by the program, not settable from a recipe or the command line."""
    return field(default=default, metadata={"internal": True})


# Settings that belong to some adapter kinds only (TrainConfig._validate_adapter checks them): a recipe tuned for one
# kind may hold them; the command line may pick another kind.
ADAPTER_ONLY = {"apply_gs": ("hra",), "orth_lambda": ("hra",), "train_bias": ("hra",), "train_text_encoder": ("hra",),
                 "r": ("hra", "lora"), "block_size": ("oft", "boft"), "lora_alpha": ("lora",)}


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default value (factories called)."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING}


def is_set(value: Any, default: Any) -> bool:
    """An option counts as set when it differs from its default and is not empty (None, '', [], False, 0)."""
    return value != default and value not in (None, "", [], False, 0)


def unmet_needs(cls: type, values: dict[str, Any]) -> dict[str, list[str]]:
    """{option: [options it needs that are off]} for each set option of ``cls.NEEDS`` (``values``: every key)."""
    defaults = field_defaults(cls)
    return {k: off for k, needs in cls.NEEDS.items()
            if is_set(values[k], defaults[k]) and (off := [n for n in needs if not values[n]])}


@dataclass
class TrainConfig:
    """Settings every HRA trainer shares (model, data transform, optimisation, checkpoints, logging)."""

    # option -> the options it needs on (truthy); a recipe's setting whose need the command line turns off is
    # dropped with a note, a typed one is an error (see recipes.parse_config)
    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {}

    pretrained_model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5", help=(
        "base model: an SD 1.x/2.x or SDXL diffusers pipeline (folder or hub id; its model_index.json "
        "says which)"))
    revision: str | None = None
    variant: str | None = None
    pretrained_vae_model: str | None = arg(None, help=(
        "a separate VAE instead of the base's vae/ (an AutoencoderKL folder or hub id, e.g. SDXL's "
        "fp16-safe madebyollin/sdxl-vae-fp16-fix); null: the base's own"))
    # output
    output_dir: str = "outputs/run"
    seed: int = 0
    # data transform
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    dataloader_num_workers: int = 0
    cache_latents: bool = False
    adapter: str = arg("hra", help=(
        "the adapter on the UNet: hra (this library's; the default), or a PEFT baseline lora | oft | "
        "boft"))
    r: int = arg(8, help="HRA: reflections; LoRA: rank; unused by OFT/BOFT (their size is block_size)")
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    apply_gs: bool = arg(False, help="HRA only")
    orth_lambda: float = arg(0.0, help="HRA only")
    train_bias: bool = arg(False, help=(
        "HRA only: also train a shift of each adapted layer's bias (PEFT's hra_bias='hra_only'); "
        "exports to PEFT or a merged model, not to a LoRA file"))
    block_size: int | None = arg(None, help=(
        "OFT/BOFT only; None: 16 (OFT) / 8 (BOFT), budgets near HRA r=8's"))
    lora_alpha: float | None = arg(None, help="LoRA only; None: r (scale 1)")
    # optimisation
    train_batch_size: int = 1
    max_train_steps: int = 1000
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    resume_allow_changes: bool = arg(False, help=(
        "resume although the run's data, prompts, base model or adapter changed"))
    overwrite_output_dir: bool = arg(False, help=(
        "replace a previous run in output_dir (says what it removes)"))
    adapter_snapshot_steps: int | None = arg(None, help=(
        "also save the adapter every N steps, as <output_dir>/snapshots/step-<N>/adapter (loadable as "
        "the final one); null: the final adapter only"))
    # validation
    validation_prompts: list[str] | None = arg(None, whole=True, help=(
        "None: from the subject file, if any; []: no validation. On the command line: one prompt, or a "
        "YAML list"))
    num_validation_images: int = 4
    validation_steps: int = 200
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    validation_seed: int = 0
    # logging
    report_to: str = "tensorboard"
    logging_steps: int = 1
    command: str = _internal("")  # filled by the program

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values no trainer can use (each message names the key)."""
        positive = ["resolution", "r", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                    "checkpointing_steps", "num_validation_images", "validation_steps",
                    "validation_inference_steps", "logging_steps", "lr_num_cycles"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ["learning_rate", "adam_epsilon"]:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        for key in ["lr_warmup_steps", "adam_weight_decay", "orth_lambda", "max_grad_norm", "dataloader_num_workers"]:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.adapter_snapshot_steps is not None and self.adapter_snapshot_steps < 1:
            raise ConfigError(f"adapter_snapshot_steps must be >= 1 (or null for none), got {self.adapter_snapshot_steps!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(
                f"checkpoints_total_limit must be >= 1 (or null for no limit), got {self.checkpoints_total_limit!r}"
            )
        if self.report_to not in ("tensorboard", "none"):
            raise ConfigError(f"report_to must be 'tensorboard' or 'none', got {self.report_to!r}")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (the VAE downsamples), got {self.resolution}")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module-name suffix, e.g. [to_q, to_v]")
        self._validate_adapter()
        if self.adapter == "hra" and self.r % 2 and not self.apply_gs:
            raise ConfigError(
                f"r={self.r} is odd: HRA's identity initialisation pairs equal reflections, so r must be even "
                f"(e.g. r={self.r + 1}); or set apply_gs: true (Gram-Schmidt, which starts non-identity)"
            )
        if self.cache_latents and not self.center_crop:
            raise ConfigError(
                "cache_latents needs center_crop: true (a cached latent cannot be re-cropped at random)"
            )

    def _validate_adapter(self) -> None:
        """The adapter kind is known and every adapter-specific option set applies to it."""
        from ..adapters.registry import ADAPTERS

        if self.adapter not in ADAPTERS:
            raise ConfigError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        if self.adapter != "hra":
            from ..adapters.peft_baselines import peft_missing

            missing = peft_missing(f"adapter {self.adapter!r}")
            if missing:
                raise ConfigError(f"{missing}; or train adapter 'hra'")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        # set away from its default for an adapter it is not for (train_text_encoder: DreamBoothConfig's own message)
        wrong = [k for k, kinds in ADAPTER_ONLY.items()
                 if k != "train_text_encoder" and self.adapter not in kinds and getattr(self, k) != defaults[k]]
        if wrong:
            owners = {k: ", ".join(kinds) for k, kinds in ADAPTER_ONLY.items()}
            owners["r"] += "; oft and boft are sized by block_size"
            raise ConfigError(
                f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to adapter {self.adapter!r} ("
                + "; ".join(f"{k} is for {owners[k]}" for k in wrong)
                + f"); leave {'it' if len(wrong) == 1 else 'them'} unset, or choose another adapter ({', '.join(ADAPTERS)})")
        if self.block_size is not None and (self.block_size < 2 or (self.adapter == "boft" and self.block_size % 2)):
            raise ConfigError(f"block_size must be >= 2{' and even for boft' if self.adapter == 'boft' else ''}, "
                              f"got {self.block_size}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0 (or null for r), got {self.lora_alpha!r}")

    def baseline_spec(self, seed: int | None = None):
        """The PEFT baseline for this config (``adapter`` must not be hra)."""
        from ..adapters.peft_baselines import BaselineSpec

        return BaselineSpec(self.adapter, r=self.r, target_modules=list(self.target_modules),
                            block_size=self.block_size, lora_alpha=self.lora_alpha,
                            seed=self.seed if seed is None else seed)


@dataclass
class DreamBoothConfig(TrainConfig):
    """Subject-driven (DreamBooth) HRA fine-tuning settings."""

    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        **{k: ("with_prior_preservation",) for k in (
            "class_data_dir", "num_class_images", "prior_loss_weight", "sample_batch_size", "class_inference_steps",
            "class_guidance_scale", "class_caption_dropout", "class_caption_extension")},
        "class_prompts_from_captions": ("with_prior_preservation", "instance_caption_extension"),
        "class_mask_dir": ("with_prior_preservation", "mask_loss_weight", "class_data_dir"),
        "instance_mask_dir": ("mask_loss_weight",),
        **{k: ("train_text_encoder",) for k in ("text_encoder_r", "text_encoder_target_modules", "text_encoder_lr")},
    }

    subject_file: str | None = None
    instance_data_dir: str | None = None
    instance_prompt: str | None = None
    instance_caption_extension: str | None = arg(None, help=(
        "per-image captions: NAME.png trains with the text of NAME<ext> beside it when present (kohya's "
        "convention, e.g. \".txt\"); instance_prompt for images without one. None: instance_prompt for "
        "every image"))
    instance_mask_dir: str | None = arg(None, help=(
        "masked loss: a folder of subject masks (NAME.png per instance image NAME.*, white = subject, "
        "same size as the image); the instance loss then counts the subject's latent pixels 1 + "
        "mask_loss_weight times, the rest once. For small subjects on plain backgrounds, whose photos "
        "are mostly background (kohya's masked loss, softened)."))
    mask_loss_weight: float = 0.0
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    class_prompts_from_captions: bool = arg(False, help=(
        "draw the class images from the instance captions with the identifier taken out (\"a qwe star on "
        "a green background\" -> \"a star on a green background\"), each captioned with its prompt, "
        "instead of class_prompt alone: the prior then covers the contexts the instance captions name, "
        "so those words keep their meaning and only the identifier carries the subject. Needs "
        "instance_caption_extension."))
    class_caption_extension: str | None = arg(None, help=(
        "your own class images (\"regularisation images\", kohya's name): put them in class_data_dir (at "
        "least num_class_images of them, or the base draws the rest) with a caption NAME<ext> beside "
        "each NAME.png; they then train with their captions, class_prompt for those without one. Implied "
        "(.txt) by class_prompts_from_captions."))
    class_mask_dir: str | None = arg(None, help=(
        "masks for your own class images (NAME.png per class image NAME.*, white = object), used with "
        "mask_loss_weight: the prior loss then weights the class object's pixels as the instance loss "
        "weights the subject's. Without them a masked instance loss puts 1 + mask_loss_weight times more "
        "pull on the subject's pixels than the prior puts on the class object's, which mostly sits on "
        "background. null: subject.json's class_mask_dir where it has one for these class images; '' "
        "(empty): none"))
    num_class_images: int = 100
    class_caption_dropout: float = arg(0.0, help=(
        "share of the class-image samples trained with the empty prompt (a fixed, seeded choice per "
        "sample). The adapter also changes the unconditional prediction, which classifier-free guidance "
        "subtracts: drifted towards the subject, it makes guided class prompts come out empty. Anchoring "
        "it to the prior keeps them drawn."))
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4
    class_inference_steps: int = 25
    class_guidance_scale: float = arg(7.5, help=(
        "CFG scale of the class images (diffusers' DreamBooth script uses the pipeline's 7.5); a model "
        "sampled at a lower scale (the tiny world: 2) draws its prior better there"))
    train_text_encoder: bool = False
    text_encoder_r: int = 8
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    text_encoder_lr: float | None = None
    showroom_rates: bool = arg(True, help=(
        "after training, run the check the subject's subject.json names under \"showroom\" (the tiny world's: "
        "its showroom rates, read by the deterministic checker) and put its results in the logs and the card"))

    def validate(self) -> None:
        super().validate()
        if self.num_class_images < 1 or self.sample_batch_size < 1 or self.class_inference_steps < 1:
            raise ConfigError("num_class_images, sample_batch_size and class_inference_steps must be >= 1")
        if not self.class_guidance_scale >= 1:
            raise ConfigError(f"class_guidance_scale must be >= 1 (1: no guidance), got {self.class_guidance_scale!r}")
        if self.prior_loss_weight < 0:
            raise ConfigError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight!r}")
        if self.mask_loss_weight < 0:
            raise ConfigError(f"mask_loss_weight must be >= 0, got {self.mask_loss_weight!r}")
        if not 0 <= self.class_caption_dropout < 1:
            raise ConfigError(f"class_caption_dropout must be in [0, 1) (a share of the class samples), "
                              f"got {self.class_caption_dropout!r}")
        if self.text_encoder_r % 2:
            raise ConfigError(f"text_encoder_r={self.text_encoder_r} is odd: use an even r (e.g. {self.text_encoder_r + 1})")
        if self.train_text_encoder and self.adapter != "hra":
            raise ConfigError(f"train_text_encoder is supported with adapter 'hra' only, got adapter {self.adapter!r}; "
                              "set train_text_encoder: false to train the UNet's baseline adapter alone")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise ConfigError(f"text_encoder_lr must be > 0 (or null for learning_rate), got {self.text_encoder_lr!r}")
        self._check_needs()  # after the range checks: a bad value is named as such first

    def _check_needs(self) -> None:
        """One error naming every set option whose needs are off (NEEDS), each with what to turn on."""
        unmet = unmet_needs(type(self), dataclasses.asdict(self))
        if not unmet:
            return
        hints = {"with_prior_preservation": "with_prior_preservation: true",
                 "mask_loss_weight": "mask_loss_weight > 0 (e.g. 4)",
                 "class_data_dir": "class_data_dir: your own class images (class masks do not go with generated ones)",
                 "instance_caption_extension": "instance_caption_extension (per-image instance captions, e.g. .txt)",
                 "train_text_encoder": "train_text_encoder: true"}
        parts = [f"{k}={getattr(self, k)!r} needs " + " and ".join(hints[n] for n in off) for k, off in unmet.items()]
        raise ConfigError("; ".join(parts) + f" (off here): turn {'it' if len(unmet) == 1 else 'them'} on, or leave "
                          + ", ".join(unmet) + " unset")




@dataclass
class ControlConfig(TrainConfig):
    """Controllable-generation HRA settings (data source, condition, encoder, validation conditions)."""

    target_modules: list[str] = field(default_factory=lambda: list(CONTROL_TARGETS))
    train_data_dir: str | None = arg(None, help=(
        "data: a local folder, or a `datasets` name (hub id or save_to_disk folder)"))
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    cache_dir: str | None = None
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    proportion_empty_prompts: float = 0.0
    condition: str | None = arg(None, help=(
        "compute the condition from the image (no conditioning column): canny, lineart_standard, hed, "
        "..."))
    condition_model_path: str | None = None
    condition_cache_dir: str | None = arg(None, help="None: <output_dir>/condition_cache")
    canny_low_threshold: int = 100
    canny_high_threshold: int = 200
    encoder_learning_rate: float | None = arg(None, help=(
        "the condition encoder (fully trained); None: learning_rate"))
    validation_conditions: list[str] | None = arg(None, help=(
        "validation: explicit condition images (+ validation_prompts), or the first rows of a folder / "
        "the data"))
    validation_data_dir: str | None = None
    num_validation_conditions: int = 4
    validation_scheduler: str = "dpm++"
    showroom_f1: bool = arg(False, help=(
        "for edge-map conditions given in validation_data_dir: after training, the held-out Canny F1 of "
        "every pair there (pixel-wise and 1-px tolerant), and with another pair's condition (card, logs, "
        "summary)"))

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ConfigError(f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts!r}")
        if self.encoder_learning_rate is not None and not self.encoder_learning_rate > 0:
            raise ConfigError(f"encoder_learning_rate must be > 0 (or null for learning_rate), got {self.encoder_learning_rate!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be >= 1 (or null for all), got {self.max_train_samples!r}")
        if self.num_validation_conditions < 1:
            raise ConfigError(f"num_validation_conditions must be >= 1, got {self.num_validation_conditions!r}")
        if self.validation_scheduler not in VALIDATION_SCHEDULERS:
            raise ConfigError(f"validation_scheduler must be one of {list(VALIDATION_SCHEDULERS)}, got {self.validation_scheduler!r}")
        if self.condition is not None:
            from ..detectors import detector_key, supported_conditions

            if self.condition not in supported_conditions():
                detector_key(self.condition)  # raises ConditionError listing the supported types
        if not 0 <= self.canny_low_threshold <= self.canny_high_threshold:
            raise ConfigError(
                f"canny thresholds must satisfy 0 <= low <= high, got {self.canny_low_threshold}, {self.canny_high_threshold}"
            )
        if self.cache_latents:
            raise ConfigError("cache_latents is not supported by the control trainer (its data set is usually large); set it to false")

    def columns(self) -> ColumnNames:
        from .control_data import ColumnNames  # imports torch: only when the data is read

        return ColumnNames(self.image_column, self.conditioning_image_column, self.caption_column)
