"""Typed training configs: dataclass defaults < YAML recipe (only changes) < ``--key value`` overrides.

Every entry point has one dataclass (subclass of :class:`TrainConfig`). ``parse_config`` reads the
recipe named by ``--config`` (or the entry point's default recipe), then the command-line overrides;
unknown keys and values of the wrong type raise with a message naming the key. The resolved config
is written to the output directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from ..adapters.config import CONTROL_TARGETS, DEFAULT_TARGETS, TEXT_ENCODER_TARGETS
from ..errors import UserError

if TYPE_CHECKING:
    from .control_data import ColumnNames

__all__ = [
    "ConfigError",
    "TrainConfig",
    "DreamBoothConfig",
    "ControlConfig",
    "VALIDATION_SCHEDULERS",
    "parse_config",
    "config_help",
    "load_recipe",
    "apply_overrides",
    "config_to_dict",
    "save_resolved_config",
    "RESOLVED_CONFIG_NAME",
]

RESOLVED_CONFIG_NAME = "config.yaml"
C = TypeVar("C", bound="TrainConfig")


class ConfigError(UserError):
    """A bad recipe key/value or command-line override (the message names the key)."""


def _internal(default: Any) -> Any:
    """A field filled by the program, not settable from a recipe or the command line."""
    return field(default=default, metadata={"internal": True})


# Settings that belong to some adapter kinds only (TrainConfig._validate_adapter checks them): a recipe tuned for one
# kind may hold them; the command line may pick another kind.
_ADAPTER_ONLY = {"apply_gs": ("hra",), "orth_lambda": ("hra",), "train_text_encoder": ("hra",),
                 "r": ("hra", "lora"), "block_size": ("oft", "boft"), "lora_alpha": ("lora",)}


@dataclass
class TrainConfig:
    """Settings every HRA trainer shares (model, data transform, optimisation, checkpoints, logging)."""

    # base model: an SD 1.x/2.x or SDXL diffusers pipeline (folder or hub id; its model_index.json says which)
    pretrained_model: str = "runwayml/stable-diffusion-v1-5"
    revision: str | None = None
    variant: str | None = None
    # a separate VAE instead of the base's vae/ (an AutoencoderKL folder or hub id, e.g. SDXL's fp16-safe
    # madebyollin/sdxl-vae-fp16-fix); null: the base's own
    pretrained_vae_model: str | None = None
    # output
    output_dir: str = "outputs/run"
    seed: int = 0
    # data transform
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    dataloader_num_workers: int = 0
    cache_latents: bool = False
    # the adapter on the UNet: hra (this library's; the default), or a PEFT baseline lora | oft | boft
    adapter: str = "hra"
    r: int = 8  # HRA: reflections; LoRA: rank; unused by OFT/BOFT (their size is block_size)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    apply_gs: bool = False  # HRA only
    orth_lambda: float = 0.0  # HRA only
    block_size: int | None = None  # OFT/BOFT only; None: 16 (OFT) / 8 (BOFT), budgets near HRA r=8's
    lora_alpha: float | None = None  # LoRA only; None: r (scale 1)
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
    resume_allow_changes: bool = False  # resume although the run's data, prompts, base model or adapter changed
    overwrite_output_dir: bool = False  # replace a previous run in output_dir (says what it removes)
    # also save the adapter every N steps, as <output_dir>/snapshots/step-<N>/adapter (loadable as the final one);
    # null: the final adapter only
    adapter_snapshot_steps: int | None = None
    # validation
    # None: from the subject file, if any; []: no validation. On the command line: one prompt, or a YAML list
    validation_prompts: list[str] | None = field(default=None, metadata={"whole": True})
    num_validation_images: int = 4
    validation_steps: int = 200
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    validation_seed: int = 0
    # logging
    report_to: str = "tensorboard"
    logging_steps: int = 1
    # filled by the program
    command: str = _internal("")

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
        wrong = [k for k, kinds in _ADAPTER_ONLY.items()
                 if k != "train_text_encoder" and self.adapter not in kinds and getattr(self, k) != defaults[k]]
        if wrong:
            owners = {"apply_gs": "hra", "orth_lambda": "hra", "r": "hra, lora; oft and boft are sized by block_size", "block_size": "oft, boft",
                      "lora_alpha": "lora"}
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

    subject_file: str | None = None
    instance_data_dir: str | None = None
    instance_prompt: str | None = None
    # per-image captions: NAME.png trains with the text of NAME<ext> beside it when present (kohya's convention,
    # e.g. ".txt"); instance_prompt for images without one. None: instance_prompt for every image
    instance_caption_extension: str | None = None
    # masked loss: a folder of subject masks (NAME.png per instance image NAME.*, white = subject, same size as the
    # image); the instance loss then counts the subject's latent pixels 1 + mask_loss_weight times, the rest once.
    # For small subjects on plain backgrounds, whose photos are mostly background (kohya's masked loss, softened).
    instance_mask_dir: str | None = None
    mask_loss_weight: float = 0.0
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    # draw the class images from the instance captions with the identifier taken out ("a qwe star on a green
    # background" -> "a star on a green background"), each captioned with its prompt, instead of class_prompt
    # alone: the prior then covers the contexts the instance captions name, so those words keep their meaning
    # and only the identifier carries the subject. Needs instance_caption_extension.
    class_prompts_from_captions: bool = False
    # your own class images ("regularisation images", kohya's name): put them in class_data_dir (at least
    # num_class_images of them, or the base draws the rest) with a caption NAME<ext> beside each NAME.png; they then
    # train with their captions, class_prompt for those without one. Implied (.txt) by class_prompts_from_captions.
    class_caption_extension: str | None = None
    # masks for your own class images (NAME.png per class image NAME.*, white = object), used with mask_loss_weight:
    # the prior loss then weights the class object's pixels as the instance loss weights the subject's. Without
    # them a masked instance loss puts 1 + mask_loss_weight times more pull on the subject's pixels than the prior
    # puts on the class object's, which mostly sits on background. null: subject.json's class_mask_dir where it has
    # one for these class images; '' (empty): none
    class_mask_dir: str | None = None
    num_class_images: int = 100
    # share of the class-image samples trained with the empty prompt (a fixed, seeded choice per sample). The adapter
    # also changes the unconditional prediction, which classifier-free guidance subtracts: drifted towards the
    # subject, it makes guided class prompts come out empty. Anchoring it to the prior keeps them drawn.
    class_caption_dropout: float = 0.0
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4
    class_inference_steps: int = 25
    # CFG scale of the class images (diffusers' DreamBooth script uses the pipeline's 7.5); a model sampled at a
    # lower scale (the tiny world: 2) draws its prior better there
    class_guidance_scale: float = 7.5
    train_text_encoder: bool = False
    text_encoder_r: int = 8
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    text_encoder_lr: float | None = None
    # tiny world only (a subject.json listing heldout_prompts): after training, draw its held-out subject prompts
    # and class check prompts (3 seeds) and print the deterministic subject checker's rates (card, logs)
    showroom_rates: bool = True

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
        if self.instance_mask_dir and not self.mask_loss_weight:
            raise ConfigError(f"instance_mask_dir={self.instance_mask_dir!r} is set but mask_loss_weight is 0, so the "
                              "masks would be ignored: pass --mask_loss_weight (e.g. 4), or drop instance_mask_dir")
        if self.class_prompts_from_captions and not self.instance_caption_extension:
            raise ConfigError("class_prompts_from_captions needs per-image instance captions: set "
                              "instance_caption_extension (e.g. .txt), or set class_prompts_from_captions: false")
        if not 0 <= self.class_caption_dropout < 1:
            raise ConfigError(f"class_caption_dropout must be in [0, 1) (a share of the class samples), "
                              f"got {self.class_caption_dropout!r}")
        if self.class_caption_dropout and not self.with_prior_preservation:
            raise ConfigError(f"class_caption_dropout={self.class_caption_dropout!r} is set but with_prior_preservation "
                              "is false, so there is no class image to drop the caption of: set "
                              "with_prior_preservation: true, or drop class_caption_dropout")
        if self.class_caption_extension and not self.with_prior_preservation:
            raise ConfigError(f"class_caption_extension={self.class_caption_extension!r} is set but "
                              "with_prior_preservation is false, so no class image is used: set "
                              "with_prior_preservation: true, or drop class_caption_extension")
        if self.class_mask_dir and not (self.with_prior_preservation and self.mask_loss_weight):
            off = [what for what, on in (("with_prior_preservation is false", self.with_prior_preservation),
                                         ("mask_loss_weight is 0", self.mask_loss_weight)) if not on]
            raise ConfigError(f"class_mask_dir={self.class_mask_dir!r} is set but {' and '.join(off)}, so the class "
                              "masks would be ignored: set with_prior_preservation: true and mask_loss_weight (e.g. 4), "
                              "or drop class_mask_dir (--class_mask_dir null)")
        if self.class_mask_dir and not self.class_data_dir:
            raise ConfigError(f"class_mask_dir={self.class_mask_dir!r} needs your own class images (class masks "
                              "are not drawn with generated ones): set class_data_dir to the folder they mask")
        if self.text_encoder_r % 2:
            raise ConfigError(f"text_encoder_r={self.text_encoder_r} is odd: use an even r (e.g. {self.text_encoder_r + 1})")
        if self.train_text_encoder and self.adapter != "hra":
            raise ConfigError(f"train_text_encoder is supported with adapter 'hra' only, got adapter {self.adapter!r}; "
                              "set train_text_encoder: false to train the UNet's baseline adapter alone")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise ConfigError(f"text_encoder_lr must be > 0 (or null for learning_rate), got {self.text_encoder_lr!r}")


# the samplers validation can draw with (ControlConfig.validation_scheduler; DreamBooth always uses DPM-Solver++),
# each with its name in `hra-diffusion generate --scheduler` (hra_diffusion.generate.SCHEDULERS has the classes)
VALIDATION_SCHEDULERS = {"dpm++": "dpm-solver", "ddim": "ddim"}


@dataclass
class ControlConfig(TrainConfig):
    """Controllable-generation HRA settings (data source, condition, encoder, validation conditions)."""

    target_modules: list[str] = field(default_factory=lambda: list(CONTROL_TARGETS))
    # data: a local folder, or a `datasets` name (hub id or save_to_disk folder)
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    cache_dir: str | None = None
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    proportion_empty_prompts: float = 0.0
    # compute the condition from the image (no conditioning column): canny, lineart_standard, hed, ...
    condition: str | None = None
    condition_model_path: str | None = None
    condition_cache_dir: str | None = None  # None: <output_dir>/condition_cache
    canny_low_threshold: int = 100
    canny_high_threshold: int = 200
    # the condition encoder (fully trained); None: learning_rate
    encoder_learning_rate: float | None = None
    # validation: explicit condition images (+ validation_prompts), or the first rows of a folder / the data
    validation_conditions: list[str] | None = None
    validation_data_dir: str | None = None
    num_validation_conditions: int = 4
    validation_scheduler: str = "dpm++"
    # tiny world only (validation_data_dir is its held-out split): after training, the held-out Canny F1 of
    # every pair (pixel-wise and 1-px tolerant), and with another pair's condition (card, logs, summary)
    showroom_f1: bool = True

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
            from ..conditions import detector_key, supported_conditions

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


# ---- type checking / coercion ---------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _whole_strings(cls: type) -> set[str]:
    """List fields whose command-line value is one item (prompts hold commas), unless written [a, b]."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("whole")}


def _coerce(key: str, value: Any, tp: Any, from_cli: bool, whole: bool = False) -> Any:
    """Check (YAML) or convert (command-line string) ``value`` to the field type ``tp``."""
    base, optional = _strip_optional(tp)
    where = "command-line override" if from_cli else "recipe"
    if from_cli and isinstance(value, str) and optional and value.lower() in ("none", "null", "~"):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed ({where}); expected {getattr(base, '__name__', base)}")
    if typing.get_origin(base) is list:
        if from_cli and isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as err:
                    raise ConfigError(f"{key}: {value!r} is not a valid YAML list ({err})") from None
            else:
                value = [value] if whole else [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings ({where}), got {value!r}")
        return list(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} must be true or false ({where}), got {value!r}")
    if base in (int, float):  # a bool is an int to Python, never to a config
        what, allowed = ("an integer", (int,)) if base is int else ("a number", (int, float))
        if from_cli and isinstance(value, str):
            try:
                return base(value)
            except ValueError:
                raise ConfigError(f"{key} must be {what} ({where}), got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ConfigError(f"{key} must be {what} ({where}), got {value!r}")
        return base(value)
    if base is str:
        if not isinstance(value, str):
            if from_cli or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key} must be a string ({where}), got {value!r}")
            value = str(value)
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - a programming error


def _unknown(cls: type, key: str) -> ConfigError:
    import difflib

    known = sorted(_field_types(cls))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r} for {cls.__name__}.{hint}")


def load_recipe(cls: type[C], path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe (a mapping holding only the changes) and type-check its keys for ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}")
    types_ = _field_types(cls)
    out = {}
    for key, value in data.items():
        if key not in types_:
            raise ConfigError(f"{path}: {_unknown(cls, str(key))}")
        try:
            out[key] = _coerce(key, value, types_[key], from_cli=False)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return out


def apply_overrides(cls: type[C], argv: list[str]) -> dict[str, Any]:
    """Parse ``--key value`` / ``--key=value`` pairs (``--flag`` alone means true for booleans)."""
    types_ = _field_types(cls)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_:
            raise _unknown(cls, key)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_bool = _strip_optional(types_[key])[0] is bool
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                if not is_bool:
                    raise ConfigError(f"--{key} needs a value")
                value = "true"
            else:
                value = nxt
                i += 1
        out[key] = _coerce(key, value, types_[key], from_cli=True, whole=key in _whole_strings(cls))
        i += 1
    return out


def _field_comments(cls: type) -> dict[str, tuple[list[str], str]]:
    """Each field's comments in the class source: (the comment lines just above it, its same-line comment)."""
    import inspect
    import re

    out: dict[str, tuple[list[str], str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (e.g. frozen): help without comments
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        above: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
            if m and m.group(1) in names:
                out[m.group(1)] = (above, m.group(2) or "")
            above = []
    return out


def config_help(cls: type, default_recipe: str | Path | None = None, program: str = "") -> str:
    """``--help`` text: usage, then every key with its type, default (and the recipe's value) and meaning."""
    recipe = load_recipe(cls, default_recipe) if default_recipe and Path(default_recipe).is_file() else {}
    comments = _field_comments(cls)
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    lines = [f"usage: {program or cls.__name__} [--config RECIPE.yaml] [--key value ...]", ""]
    if default_recipe:
        lines += [f"With no --config the recipe is {default_recipe}; a recipe holds only changes from the defaults.",
                  "Booleans: --flag alone means true; lists: --key a,b or --key '[a, b]'. Unknown keys are errors."]
    lines.append("Keys (type, default; 'recipe:' where the default recipe changes it):")
    for name, tp in _field_types(cls).items():
        above, inline = comments.get(name, ([], ""))
        if above:
            lines.append("")
            lines += [f"  # {c}" for c in above]
        base, optional = _strip_optional(tp)
        tname = "list" if typing.get_origin(base) is list else getattr(base, "__name__", str(base))
        shown = f"  --{name} {tname.upper()}{' | null' if optional else ''}  (default: {defaults[name]!r}"
        if name in recipe and recipe[name] != defaults[name]:
            shown += f"; recipe: {recipe[name]!r}"
        lines.append(shown + ")" + (f"  {inline}" if inline else ""))
    return "\n".join(lines)


def _drop_other_adapters_settings(cls: type[C], recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``--adapter X`` on the command line over a recipe written for another adapter: the recipe's settings that
    do not apply to X (its HRA reflections ``r`` for OFT, its text-encoder HRA for LoRA, ...) are not used, and
    a note says so. The same settings given on the command line are still errors (the user asked for them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kind = overrides.get("adapter")
    if kind is None or kind == recipe.get("adapter", defaults.get("adapter")):
        return recipe
    dropped = {k: v for k, v in recipe.items()
               if k in _ADAPTER_ONLY and k not in overrides and kind not in _ADAPTER_ONLY[k]}
    if dropped:
        print(f"note: adapter {kind!r} (command line): the recipe's "
              + ", ".join(f"{k}: {v!r}" for k, v in dropped.items())
              + f" {'does' if len(dropped) == 1 else 'do'} not apply to it and {'is' if len(dropped) == 1 else 'are'} "
              "not used", file=sys.stderr)
    return {k: v for k, v in recipe.items() if k not in dropped}


def parse_config(
    cls: type[C], argv: list[str], default_recipe: str | Path | None = None, program: str = ""
) -> C:
    """Build ``cls`` from ``[--config recipe.yaml] [--key value ...]`` (recipe: changes from defaults).

    ``-h``/``--help`` prints every key (config_help) and exits, as argparse does.
    """
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, default_recipe, program))
        raise SystemExit(0)
    recipe = default_recipe
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML recipe")
            recipe = argv[i + 1]
            i += 2
            continue
        if argv[i].startswith("--config="):
            recipe = argv[i].split("=", 1)[1]
            i += 1
            continue
        rest.append(argv[i])
        i += 1
    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(load_recipe(cls, recipe))
    overrides = apply_overrides(cls, rest)
    values = _drop_other_adapters_settings(cls, values, overrides)
    values.update(overrides)
    try:
        cfg = cls(**values)
    except TypeError as err:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(str(err)) from None
    cfg.command = " ".join(p for p in [program, shlex.join(argv)] if p)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_resolved_config(cfg: TrainConfig, output_dir: str | Path) -> Path:
    """Write every resolved value (defaults included) to ``<output_dir>/config.yaml``."""
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in config_to_dict(cfg).items() if k != "command"}
    header = f"# resolved {type(cfg).__name__}; produced by: {cfg.command}\n" if cfg.command else ""
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path
