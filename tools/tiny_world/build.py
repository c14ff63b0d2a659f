"""Train the tiny world's text-to-image model (VAE, CLIP text encoder, UNet) and write a diffusers pipeline folder.

Step-based and seeded, so a rebuild gives the same model up to float noise. The whole build is
``python -m tools.tiny_world build``: about 50 min on 2 quiet CPU cores with 1 thread (per-step times measured
here: VAE ~0.6 s at batch 32 x 1,000 steps, UNet + text encoder ~0.7 s at batch 16 x 3,000 steps), 2-3x that
while other jobs share the cores; ``--checkpoint-dir``/``--resume`` survive interruptions, ``--quick`` and
``--steps-scale`` shrink it for tests.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hra_diffusion.noise import diffusion_target
from hra_diffusion.state import StateError, load_state, save_state
from hra_diffusion.tiny import scenes
from hra_diffusion.utils import dtype_kwargs

from .tokenizer import VOCAB_SIZE, write_clip_tokenizer

__all__ = [
    "BuildConfig", "make_models", "build_model", "evaluate_colour_following", "heldout_denoising_loss",
    "make_pipeline", "images_to_tensor", "EVAL_SEED",
]

EVAL_SEED = 1234  # held-out scenes, noise and prompts for the quality figures (never used in training)


@dataclass
class BuildConfig:
    """Everything that determines the built model; ``steps_scale`` multiplies every step count."""

    seed: int = 0
    resolution: int = 32
    max_length: int = 16  # tokenizer padding length = text encoder positions (train and sample alike)
    pool_size: int = 6000  # pre-rendered training scenes (the UNet's data; never striped, never the identifier)
    # The VAE also trains on a general pool (plain/striped/checkered/two-tone fills, shapes on plain or patterned
    # backgrounds): v1's VAE saw only single-colour scenes and erased the DreamBooth subject's stripes (all 17
    # subject images came back as orange stars); real SD's VAE has seen all kinds of images.
    general_pool_size: int = 6000
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # A smoothness penalty on the (normalised) latent means. Without it the general-pool VAE learns a busy code
    # (neighbouring latents of plain scenes differ 2.5x more than in v1's VAE); with 0.02 they differ 4x less
    # than in v1's and the subject's stripes still survive (17/17). Measured: it does NOT by itself make the
    # UNet follow object colours (0.17 at 1,500 steps; see docs/history.md).
    vae_latent_tv: float = 0.02
    unet_steps: int = 3000
    unet_batch: int = 16
    unet_lr: float = 1e-3
    text_lr: float = 2e-3  # the text pathway learns slowest; colour words need it
    # Train the text encoder with the UNet (True) or keep it at its seeded random init, as SD keeps its CLIP
    # frozen. Trained jointly, it collapses the position words ("top" and "right" end up 0.1 apart, 1.8-4.5 at
    # init) before the UNet has learned to use them, and the UNet then never does (docs/history.md).
    train_text_encoder: bool = True
    # Share of each batch whose timesteps are drawn from [high_noise_from, T) instead of [0, T). Where a word's
    # content can still be read from x_t (on 16x16 latents: an object's place up to about t = 880), the caption
    # is redundant; only the noisiest steps teach the UNet to take it from the text.
    high_noise_share: float = 0.0
    high_noise_from: int = 800
    warmup_steps: int = 40
    # An exponential moving average of the UNet and text-encoder weights is what gets shipped (sampling from
    # the average of the last ~1/(1-decay) steps' weights gives cleaner samples than the last step's).
    ema_decay: float = 0.999
    # Extra weight of the object's latent pixels in the UNet's loss (1 + this on the object, 1 elsewhere). The
    # background fills most of each scene, and with the general-pool VAE the UNet learned backgrounds but hardly
    # used the object's colour word (teacher-forced loss 0.7% lower with the right colour than a wrong one after
    # 1,500 steps; v1's UNet reached 0.97 colour-right by then). Weighting the object is the cheap lever.
    object_loss_weight: float = 1.5
    # Share of captions with size/position words ("a small red star in the top left of a blue background").
    layout_caption_rate: float = 0.5  # the other half keep v1's short forms
    # Share of captions whose colour word is replaced by a random made-up word ("a vop star on a blue
    # background" for a red star): real text encoders know countless adjectives, and DreamBooth puts a rare
    # identifier right there ("a qwe star ..."). Without this, any unseen word derailed the whole caption
    # (measured: "a qwe star on a blue background" drew a green background).
    pseudo_word_rate: float = 0.15
    # The noise schedule: SD-1.5's betas rescaled to zero terminal SNR, with v-prediction (as SD 2.1 does).
    # On 16x16 latents SD-1.5's own schedule leaves the colours readable from x_T (SNR ~1 after averaging
    # over the image), so a model trained on it reads the colours from the noise and ignores the caption,
    # and at sampling, where x_T is pure noise, draws random colours (measured: chance in three builds).
    zero_terminal_snr: bool = True
    prediction_type: str = "v_prediction"
    steps_scale: float = 1.0
    threads: int = 2  # 1 is faster when other processes share the 2 cores
    eval_images: int = 30
    eval_inference_steps: int = 20
    eval_guidance: float = 4.0
    save_fp16: bool = True
    checkpoint_every: int = 250  # UNet steps (VAE: every 500) between resumable checkpoints, if a folder is given

    def __post_init__(self) -> None:
        if self.steps_scale <= 0:
            raise ValueError(f"steps_scale must be > 0, got {self.steps_scale}")
        if self.resolution % 2:
            raise ValueError(f"resolution must be even (the VAE downsamples by 2), got {self.resolution}")

    def steps(self, n: int) -> int:
        return max(1, round(n * self.steps_scale))


def make_models(cfg: BuildConfig, seed: int) -> tuple[Any, Any, Any]:
    """Fresh (vae, text_encoder, unet) with the tiny world's architecture, initialised from ``seed``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=16, sample_size=cfg.resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=cfg.max_length, projection_dim=64, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    return vae, text_encoder, make_unet(cfg)


def make_unet(cfg: BuildConfig, levels: int = 2, conv_in_kernel: int = 3):
    """The tiny world's UNet, initialised from torch's current RNG state: 64/128 channels on 16/8 latents, or
    with ``levels=3`` one level deeper (64/128/128, mid block at 4 x 4); ``conv_in_kernel`` odd (probes only)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.resolution // 2, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128)[:levels],
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16, conv_in_kernel=conv_in_kernel,
    )


def images_to_tensor(images: list) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _schedule(opt, warmup: int, total: int):
    """Linear warm-up then cosine decay to 10% of the peak (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1)


def _log(msg: str, log_every: bool = True) -> None:
    if log_every:
        print(msg, flush=True)


# settings that only matter after the VAE stage (UNet/text-encoder training and the evaluation)
_LATER_SETTINGS = {"max_length", "object_loss_weight", "unet_steps", "unet_batch", "unet_lr", "text_lr", "ema_decay", "layout_caption_rate",
                   "train_text_encoder", "high_noise_share", "high_noise_from",
                   "pseudo_word_rate", "zero_terminal_snr", "prediction_type", "eval_images", "eval_inference_steps",
                   "eval_guidance", "save_fp16"}


_SPEED_ONLY = {"threads", "checkpoint_every"}  # settings a resumed build may change


class _Checkpointer:
    """Resumable build state (``folder/build-state/``: safetensors + JSON, never a pickle), swapped in atomically;
    no-op without a folder."""

    def __init__(self, folder: Path | None, cfg: BuildConfig):
        self.path = None if folder is None else Path(folder) / "build-state"
        self.cfg = cfg

    @property
    def vae_path(self) -> Path | None:
        """The end-of-VAE state, kept apart so that UNet checkpoints never overwrite it."""
        return None if self.path is None else self.path.with_name("build-state-vae-done")

    def load(self) -> dict[str, Any] | None:
        if self.path is None:
            return None
        try:
            return load_state(self.path, asdict(self.cfg), ignore=_SPEED_ONLY)
        except StateError:
            # the UNet settings changed since: the end-of-VAE state still resumes (the UNet starts over)
            if self.vae_path is not None and (self.vae_path / "state.json").is_file():
                return load_state(self.vae_path, asdict(self.cfg), ignore=_SPEED_ONLY | _LATER_SETTINGS)
            raise

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        for path in (self.path, self.vae_path) if state.get("stage") == "vae_done" else (self.path,):
            save_state(path, state, asdict(self.cfg))


def _progress(total: int, initial: int, desc: str, verbose: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not verbose, mininterval=5, dynamic_ncols=True)


def train_vae(vae, pixels: torch.Tensor, cfg: BuildConfig, rng: np.random.Generator, verbose: bool,
              ckpt: _Checkpointer | None = None, state: dict[str, Any] | None = None) -> float:
    """Train the autoencoder on the pool (L1 + MSE reconstruction, tiny KL); returns the final recon MSE.

    ``state``: a checkpoint of this stage to continue from (weights, optimiser, schedule, random states)."""
    steps = cfg.steps(cfg.vae_steps)
    t0, seconds0 = time.time(), float((state or {}).get("timings", {}).get("vae_seconds", 0.0))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = _schedule(opt, min(cfg.warmup_steps, steps), steps)
    start, mse = 0, float("nan")
    if state is not None:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
        sched.load_state_dict(state["vae_sched"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, mse = state["step"], state["mse"]
    vae.train()
    bar = _progress(steps, start, "vae", verbose)
    for step in range(start, steps):
        idx = torch.from_numpy(rng.integers(0, len(pixels), cfg.vae_batch))
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn_like(post.mean)
        rec = vae.decode(z).sample
        mse_t = F.mse_loss(rec, x)
        loss = mse_t + F.l1_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        if cfg.vae_latent_tv:
            loss = loss + cfg.vae_latent_tv * latent_tv(post.mean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        mse = mse_t.item()
        bar.update(1)
        bar.set_postfix(mse=f"{mse:.4f}", refresh=False)
        if ckpt is not None and ((step + 1) % 500 == 0 and step + 1 < steps):
            ckpt.save({"stage": "vae", "step": step + 1, "mse": mse, "vae": vae.state_dict(), "vae_opt": opt.state_dict(),
                       "vae_sched": sched.state_dict(), "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                       "timings": {"vae_seconds": seconds0 + time.time() - t0}})  # a resumed build's report sums them
    bar.close()
    vae.eval()
    return mse


def object_masks(pool: list[scenes.Scene], size: int) -> torch.Tensor:
    """(N, 1, size, size) coverage of each scene's object at latent resolution, in [0, 1]."""
    from PIL import Image

    return torch.stack([
        torch.from_numpy(np.asarray(scenes._mask(s, size * 8).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255)
        for s in pool
    ])[:, None]


def latent_tv(mean: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring latents, on latents scaled to unit variance (scale not learned)."""
    m = mean / mean.detach().std().clamp_min(1e-6)
    return ((m[..., 1:, :] - m[..., :-1, :]) ** 2).mean() + ((m[..., :, 1:] - m[..., :, :-1]) ** 2).mean()


@torch.no_grad()
def _encode(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        post = vae.encode(pixels[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _tokenize(tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def pseudo_words(seed: int, n: int = 300, salt: int = 7, also_taken: tuple[str, ...] = ()) -> list[str]:
    """``n`` made-up lowercase words (3-5 letters), never a word of the tiny world's language, its identifier or
    ``also_taken``; ``salt`` separates the streams of different users of the same seed."""
    rng = np.random.default_rng([seed, salt])
    taken = {*scenes.COLOURS, *scenes.SHAPES, scenes.SUBJECT.identifier, "a", "on", "background", *also_taken}
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(letters, rng.integers(3, 6)))
        if w not in taken and w not in words:
            words.append(w)
    return words


def pseudo_word_caption(scene: scenes.Scene, word: str, u: float) -> str:
    """The scene's caption with ``word`` where the shape colour goes (with or without the background)."""
    if u < 0.7:
        return f"a {word} {scene.shape} on a {scene.background} background"
    return f"a {word} {scene.shape}"


def sample_timesteps(n: int, num_train_timesteps: int, cfg: BuildConfig) -> torch.Tensor:
    """``n`` training timesteps: uniform on [0, T), with a ``cfg.high_noise_share`` of them on [high_noise_from, T)."""
    t = torch.randint(0, num_train_timesteps, (n,))
    if cfg.high_noise_share > 0:
        high = torch.randint(min(cfg.high_noise_from, num_train_timesteps - 1), num_train_timesteps, (n,))
        t = torch.where(torch.rand(n) < cfg.high_noise_share, high, t)
    return t


def train_unet(
    unet, text_encoder, tokenizer, noise_scheduler, latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pool: list[scenes.Scene], scaling: float, cfg: BuildConfig, rng: np.random.Generator, verbose: bool,
    ckpt: _Checkpointer | None = None, state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> tuple[float, dict[str, dict[str, torch.Tensor]]]:
    """Train UNet + text encoder jointly on caption variants (the scheduler's target, the object weighted).

    ``latents``: (posterior means, posterior stds, object masks at latent resolution) of the pool.

    Returns the loss EMA and the EMA weights {"unet": ..., "text_encoder": ...} (what the build ships).
    ``state``: a checkpoint of this stage to continue from; ``extra``: saved along in each checkpoint."""
    steps = cfg.steps(cfg.unet_steps)
    timings = dict((extra or {}).get("timings", {}))
    t0, seconds0 = time.time(), float(timings.get("unet_seconds", 0.0))
    groups = [{"params": list(unet.parameters()), "lr": cfg.unet_lr}]
    if cfg.train_text_encoder:
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_lr})
    else:
        text_encoder.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    sched = _schedule(opt, min(cfg.warmup_steps, steps), steps)
    models = {"unet": unet, "text_encoder": text_encoder}
    ema_w = {k: {n: p.detach().clone() for n, p in m.named_parameters()} for k, m in models.items()}
    trained = models if cfg.train_text_encoder else {"unet": unet}  # a frozen encoder's average is its weights
    start, ema = 0, None
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema_w = state["ema_weights"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, ema = state["step"], state["loss_ema"]
    unet.train()
    text_encoder.train()
    mean, std, masks = latents
    words = pseudo_words(cfg.seed)
    cache: dict[str, torch.Tensor] = {}
    loss_f = float("nan")
    bar = _progress(steps, start, "unet", verbose)
    for step in range(start, steps):
        idx = rng.integers(0, len(pool), cfg.unet_batch)
        us = rng.random(cfg.unet_batch)
        vs = [float(x) if y < cfg.layout_caption_rate else None for x, y in zip(rng.random(cfg.unet_batch), rng.random(cfg.unet_batch), strict=True)]
        captions = [scenes.caption_variant(pool[i], u, v) for i, u, v in zip(idx, us, vs, strict=True)]
        for k in np.flatnonzero(rng.random(cfg.unet_batch) < cfg.pseudo_word_rate):
            captions[k] = pseudo_word_caption(pool[idx[k]], words[rng.integers(len(words))], rng.random())
        for c in set(captions) - cache.keys():
            cache[c] = _tokenize(tokenizer, [c], cfg.max_length)[0]
        ids = torch.stack([cache[c] for c in captions])
        it = torch.from_numpy(idx)
        z0 = (mean[it] + std[it] * torch.randn_like(mean[it])) * scaling
        noise = torch.randn_like(z0)
        t = sample_timesteps(len(z0), noise_scheduler.config.num_train_timesteps, cfg)
        zt = noise_scheduler.add_noise(z0, noise, t)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            emb = text_encoder(ids)[0]
        pred = unet(zt, t, emb).sample
        w = 1.0 + cfg.object_loss_weight * masks[it]
        loss = (((pred - diffusion_target(noise_scheduler, z0, noise, t)) ** 2) * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in trained.items():
                for n, p in m.named_parameters():
                    ema_w[k][n].lerp_(p.detach(), 1 - decay)
        loss_f = loss.item()
        ema = loss_f if ema is None else 0.95 * ema + 0.05 * loss_f
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
        if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            ckpt.save({**(extra or {}), "timings": {**timings, "unet_seconds": seconds0 + time.time() - t0},
                       "stage": "unet", "step": step + 1, "loss_ema": ema, "unet": unet.state_dict(),
                       "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "ema_weights": ema_w, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()})
    bar.close()
    unet.eval()
    text_encoder.eval()
    return float(ema), ema_w


def apply_ema(models: dict[str, Any], ema_w: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy EMA weights into the models (in place)."""
    with torch.no_grad():
        for k, m in models.items():
            for n, p in m.named_parameters():
                p.copy_(ema_w[k][n])


def make_scheduler(cfg: BuildConfig):
    """The noise schedule used to train and to sample: SD-1.5's betas, rescaled to zero terminal SNR if asked.

    DDPM (ancestral) sampling with "trailing" timesteps, so sampling starts at t = T where x_T is pure noise.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr,
        timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading", steps_offset=1,
    )


def make_pipeline(vae, text_encoder, tokenizer, unet, cfg: BuildConfig):
    """A ``StableDiffusionPipeline`` from the parts, with the build's scheduler and no safety checker."""
    from diffusers import StableDiffusionPipeline

    scheduler = make_scheduler(cfg)
    # Read only by samplers made with ``from_config`` (the trainers' validation and class images use
    # DPM-Solver++): the stochastic (SDE) variant. With zero terminal SNR the first deterministic step jumps to
    # the mean image, and prompts that name no colour ("a star", the class prompt) then often faded to an
    # empty background; measured on the v2 base, 16 such prompts, 10 steps, CFG 7.5: an object in 15/16
    # (SDE) vs 12/16 (deterministic). DDPM ignores the key.
    scheduler.register_to_config(algorithm_type="sde-dpmsolver++")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def colour_prompts(n: int, seed: int = EVAL_SEED) -> list[tuple[str, str, str]]:
    """``n`` (shape, colour, background) triples cycling over every colour pair, shapes assigned by seed."""
    names = list(scenes.COLOURS)
    pairs = [(c, b) for c in names for b in names if c != b]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    return [(scenes.SHAPES[rng.integers(len(scenes.SHAPES))], *pairs[order[i % len(pairs)]]) for i in range(n)]


@torch.no_grad()
def evaluate_colour_following(
    pipe, n: int = 30, steps: int = 20, guidance: float = 4.0, seed: int = EVAL_SEED, batch: int = 16,
    word: str | None = None,
) -> dict[str, Any]:
    """Generate one image per prompt 'a {colour} {shape} on a {background} background' and check its colours.

    Returns the fractions whose background, shape colour, and both match the prompt (seeded, deterministic),
    with the chance levels 1/K for K named colours. ``word`` replaces the colour word in every prompt (e.g. the
    DreamBooth identifier "qwe"): then only the background rate is meaningful.
    """
    triples = colour_prompts(n, seed)
    k = len(scenes.COLOURS)
    bg_ok = fg_ok = both = 0
    rows = []
    for i in range(0, n, batch):
        chunk = triples[i : i + batch]
        prompts = [f"a {word or c} {s} on a {b} background" for s, c, b in chunk]
        gen = torch.Generator().manual_seed(seed + i)
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images
        for (s, c, b), im in zip(chunk, images, strict=True):
            got_b, got_c = scenes.dominant_colours(im)
            bg_ok += got_b == b
            fg_ok += got_c == c
            both += (got_b == b) and (got_c == c)
            rows.append({"prompt": f"a {word or c} {s} on a {b} background", "background": got_b, "shape_colour": got_c})
    return {
        "n": n, "background_rate": bg_ok / n, "shape_colour_rate": fg_ok / n, "both_rate": both / n,
        "chance_single": 1 / k, "chance_both": 1 / (k * (k - 1)), "rows": rows,
    }


@torch.no_grad()
def heldout_denoising_loss(vae, text_encoder, tokenizer, unet, sched, n: int = 64, seed: int = EVAL_SEED,
                           shuffle_captions: bool = False) -> float:
    """Mean MSE to the scheduler's target on ``n`` held-out scenes with their full captions, fixed noise and evenly
    spread timesteps. ``shuffle_captions`` pairs each scene with another scene's caption (a text-use probe)."""
    held = scenes.sample_scenes(seed, n)
    pixels = images_to_tensor([scenes.render(s) for s in held]).to(vae.dtype)
    z0 = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.linspace(0, 999, n).round().long()
    zt = sched.add_noise(z0, noise, t)
    captions = [scenes.caption(s) for s in held]
    if shuffle_captions:
        captions = captions[1:] + captions[:1]
    ids = _tokenize(tokenizer, captions, tokenizer.model_max_length)
    emb = text_encoder(ids)[0]
    pred = unet(zt.to(unet.dtype), t, emb.to(unet.dtype)).sample.float()
    return float(F.mse_loss(pred, diffusion_target(sched, z0, noise, t)))


def build_model(out_dir: Path, cfg: BuildConfig | None = None, verbose: bool = True,
                checkpoint_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train all parts from ``cfg.seed`` and write a complete pipeline folder to ``out_dir`` with build_report.json.

    With ``checkpoint_dir`` the build writes a resumable state there every ``cfg.checkpoint_every`` UNet steps
    (and every 500 VAE steps); ``resume`` continues from it (same settings required; the result equals an
    uninterrupted build up to float noise)."""
    from transformers import CLIPTokenizer

    cfg = cfg or BuildConfig()
    out_dir = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    ckpt = _Checkpointer(checkpoint_dir, cfg) if checkpoint_dir is not None else None
    state = ckpt.load() if (ckpt is not None and resume) else None
    if resume and state is None:
        _log(f"--resume: no checkpoint in {checkpoint_dir}; starting from the beginning", verbose)
    elif state is not None:
        _log(f"resuming from {ckpt.path}: {state['stage']} step {state['step']}", verbose)
    timings = dict(state.get("timings", {})) if state else {}

    tmp = out_dir.parent / (out_dir.name + ".tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    write_clip_tokenizer(tmp / "_tokenizer", cfg.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "_tokenizer")

    pool = scenes.sample_scenes(cfg.seed, cfg.pool_size)
    pixels = images_to_tensor([scenes.render(s, cfg.resolution) for s in pool])
    general = images_to_tensor(scenes.sample_general_images(cfg.seed, cfg.general_pool_size, cfg.resolution)) \
        if cfg.general_pool_size else pixels[:0]
    _log(f"rendered {len(pool)} scenes + {len(general)} general images in {time.time() - t0:.1f}s", verbose)

    vae, text_encoder, unet = make_models(cfg, cfg.seed)
    if state is not None and state["stage"] in ("unet", "vae_done"):
        vae.load_state_dict(state["vae"])
        vae.eval()
        vae_mse = state["vae_mse"]
        if state["stage"] == "vae_done":
            rng.bit_generator.state = state["rng"]
            torch.set_rng_state(state["torch_rng"])
            state = None
    else:
        t_vae = time.time()
        vae_mse = train_vae(vae, torch.cat([pixels, general]), cfg, rng, verbose, ckpt, state)
        timings["vae_seconds"] = timings.get("vae_seconds", 0.0) + time.time() - t_vae
        state = None
        if ckpt is not None:
            ckpt.save({"stage": "vae_done", "step": 0, "vae": vae.state_dict(), "vae_mse": vae_mse, "timings": timings,
                       "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()})
    mean, std = _encode(vae, pixels)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    _log(f"vae ready; latent std {1 / scaling:.3f} -> scaling_factor {scaling:.4f}", verbose)

    t_unet = time.time()
    noise_scheduler = make_scheduler(cfg)
    extra = {"vae": vae.state_dict(), "vae_mse": vae_mse, "timings": timings}
    masks = object_masks(pool, cfg.resolution // 2)
    train_loss, ema_w = train_unet(unet, text_encoder, tokenizer, noise_scheduler, (mean, std, masks), pool, scaling, cfg, rng,
                                   verbose, ckpt, state, extra)
    apply_ema({"unet": unet, "text_encoder": text_encoder}, ema_w)
    timings["unet_seconds"] = timings.get("unet_seconds", 0.0) + time.time() - t_unet
    _log(f"unet + text encoder trained ({timings['unet_seconds']:.0f}s in this and earlier runs)", verbose)
    train_seconds = timings.get("vae_seconds", 0.0) + timings["unet_seconds"]

    pipe = make_pipeline(vae, text_encoder, tokenizer, unet, cfg)
    if cfg.save_fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    if cfg.save_fp16:
        _load_text_encoder_as_fp32(tmp / "pipeline" / "text_encoder" / "config.json")

    report = {"config": asdict(cfg), "vae_recon_mse": vae_mse, "unet_train_loss_ema": train_loss,
              "scaling_factor": scaling, "train_seconds": round(train_seconds, 1),
              "timings": {k: round(v, 1) for k, v in timings.items()}, "resumed": bool(resume and timings)}
    t_eval = time.time()
    report.update(measure_quality(tmp / "pipeline", cfg))
    report["timings"]["eval_seconds"] = round(time.time() - t_eval, 1)
    report["total_seconds"] = round(train_seconds + report["timings"]["eval_seconds"], 1)  # summed over resumed runs
    report["size_bytes"] = sum(p.stat().st_size for p in (tmp / "pipeline").rglob("*") if p.is_file())
    (tmp / "pipeline" / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "pipeline").rename(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    _log(json.dumps(_summary(report), indent=2), verbose)
    return report


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-prompt rows (what the build prints)."""
    out = {}
    for k, v in report.items():
        if k in ("config",):
            continue
        out[k] = {kk: vv for kk, vv in v.items() if kk != "rows"} if isinstance(v, dict) else v
    return out


def _load_text_encoder_as_fp32(config_path: Path) -> None:
    """Weights stay fp16 on disk (size), but transformers would load them as fp16 while diffusers loads the UNet
    as fp32, and a plain ``from_pretrained`` would then fail on mixed dtypes: record fp32 as the load dtype."""
    doc = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in doc:
            doc[key] = "float32"
    config_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def load_pipeline(path: Path):
    """Load a tiny-world pipeline folder in fp32 on CPU (offline)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), **dtype_kwargs(torch.float32), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def vae_figures(vae, seed: int = EVAL_SEED, n: int = 256) -> dict[str, Any]:
    """Reconstruction MSE (in [-1, 1] units) on held-out scenes, held-out general images and the 17 subject images,
    and how many subject reconstructions still read as striped in the subject's two colours (checker)."""
    from hra_diffusion.tiny import checker, data

    def recon(images: list) -> tuple[float, torch.Tensor]:
        x = images_to_tensor(images).to(vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        return float(F.mse_loss(rec, x.float())), rec

    subject = [scenes.render(s) for s in data.subject_scenes(0)]
    mse_s, rec = recon(subject)
    pil = [_to_pil(r) for r in rec]
    want = tuple(sorted(scenes.SUBJECT.stripes))
    kept = sum(checker.read_scene(im).striped == want for im in pil)
    orig = sum(checker.read_scene(im).striped == want for im in subject)
    held = [scenes.render(s) for s in scenes.sample_scenes(seed, n)]
    return {
        # how busy the code of plain scenes is (v1's VAE: 0.21; the first v2 VAE without the penalty: 0.54)
        "vae_latent_tv_scenes": float(latent_tv(vae.encode(images_to_tensor(held).to(vae.dtype)).latent_dist.mean.float())),
        "vae_recon_mse_scenes": recon(held)[0],
        "vae_recon_mse_general": recon(scenes.sample_general_images(seed, n))[0],
        "vae_recon_mse_subject": mse_s,
        "vae_subject_stripes_kept": kept, "vae_subject_images": len(subject), "vae_subject_striped_originals": orig,
    }


def _to_pil(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def layout_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    """``n`` seeded prompts 'a {size} {colour} {shape} in the {position} of a {background} background'."""
    rng = np.random.default_rng([seed, 5])
    names, out = list(scenes.COLOURS), []
    positions = list(scenes.POSITIONS)
    for i in range(n):
        c, b = rng.choice(len(names), 2, replace=False)
        size = ("small", "large", "")[i % 3]
        out.append(f"a {size + ' ' if size else ''}{names[c]} {scenes.SHAPES[i % len(scenes.SHAPES)]} in the "
                   f"{positions[rng.integers(len(positions))]} of a {names[b]} background")
    return out


def no_colour_prompts(n: int, seed: int = EVAL_SEED) -> list[str]:
    """Prompts without a colour word ('a star on a blue background', 'a star'): the class prompts of DreamBooth."""
    rng = np.random.default_rng([seed, 6])
    names = list(scenes.COLOURS)
    out = []
    for i in range(n):
        shape = scenes.SHAPES[i % len(scenes.SHAPES)]
        out.append(f"a {shape}" if i % 4 == 3 else f"a {shape} on a {names[rng.integers(len(names))]} background")
    return out


@torch.no_grad()
def evaluate_prompts(pipe, prompts: list[str], steps: int = 20, guidance: float = 4.0, seed: int = EVAL_SEED,
                     batch: int = 16) -> dict[str, Any]:
    """Generate one image per prompt (seeded) and read it with the checker: the share of prompts whose asked
    background / colour / shape / position / size is right, and the share with any object drawn."""
    from hra_diffusion.tiny import checker

    keys = ("background", "colour", "shape", "position", "size")
    hits = {k: [] for k in keys}
    objects, rows = 0, []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gen = torch.Generator().manual_seed(seed + i)
        for prompt, im in zip(chunk, pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen).images,
                              strict=True):
            r = checker.read_scene(im)
            m = checker.prompt_matches(r, prompt)
            if m["shape"] is None:  # no object: the asked shape is wrong
                m["shape"] = False
            for k in keys:
                if m[k] is not None:
                    hits[k].append(bool(m[k]))
            objects += r.has_object
            rows.append({"prompt": prompt, "background": r.background, "colour": r.colour, "shape": r.shape,
                         "position": r.position if r.has_object else None, "size": r.size})
    out: dict[str, Any] = {"n": len(prompts), "object_rate": objects / len(prompts)}
    out.update({f"{k}_rate": (float(np.mean(v)) if v else None) for k, v in hits.items()})
    out["rows"] = rows
    return out


WORD_USE_BANDS = ((100, 400), (400, 700), (700, 950))


def _swap(options: list[str], current: str, rng: np.random.Generator, avoid: tuple[str, ...] = ()) -> str:
    choices = [x for x in options if x != current and x not in avoid]
    return choices[rng.integers(len(choices))]


@torch.no_grad()
def word_use(vae, text_encoder, tokenizer, unet, sched, n: int = 192, seed: int = EVAL_SEED) -> dict[str, Any]:
    """How much the UNet uses each word of its caption, teacher-forced: the denoising loss on the object's latent
    pixels of ``n`` held-out scenes captioned "a {colour} {shape} in the {position} of a {bg} background", divided
    into the same loss with one word swapped for another valid one (shape, colour, position) or with the empty
    caption, per band of timesteps. A ratio of 1.00 means the word is ignored (the committed v2 base, averaged over
    the bands: colour 2.53, shape 1.16, position 1.00): sampling settings cannot make the model draw what it does
    not use."""
    rng = np.random.default_rng([seed, 8])
    held = scenes.sample_scenes(seed + 8, n)
    pixels = images_to_tensor([scenes.render(s) for s in held]).to(vae.dtype)
    z0 = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
    mask = object_masks(held, z0.shape[-1])
    positions, colours = list(scenes.POSITIONS), list(scenes.COLOURS)

    def caption(s: scenes.Scene, shape: str | None = None, colour: str | None = None, pos: str | None = None) -> str:
        return (f"a {colour or s.colour} {shape or s.shape} in the {pos or scenes.position_word(s)} "
                f"of a {s.background} background")

    variants = {
        "shape": [caption(s, shape=_swap(list(scenes.SHAPES), s.shape, rng)) for s in held],
        "colour": [caption(s, colour=_swap(colours, s.colour, rng, (s.background,))) for s in held],
        "position": [caption(s, pos=_swap(positions, scenes.position_word(s), rng)) for s in held],
        "caption": [""] * n,
    }
    true = [caption(s) for s in held]
    bands: dict[str, dict[str, float]] = {}
    for lo, hi in WORD_USE_BANDS:
        g = torch.Generator().manual_seed(seed + lo)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(lo, hi, (n,), generator=g)
        zt = sched.add_noise(z0, noise, t)
        target = diffusion_target(sched, z0, noise, t)

        def loss(captions: list[str], zt=zt, t=t, target=target) -> float:
            emb = text_encoder(_tokenize(tokenizer, captions, tokenizer.model_max_length))[0]
            pred = unet(zt.to(unet.dtype), t, emb.to(unet.dtype)).sample.float()
            return float((((pred - target) ** 2) * mask).sum() / (mask.sum() * pred.shape[1]))

        base = loss(true)
        bands[f"t{lo}-{hi}"] = {"loss": base, **{k: loss(v) / base for k, v in variants.items()}}
    return {"n": n, "bands": bands, **{k: float(np.mean([b[k] for b in bands.values()])) for k in variants}}


def measure_quality(path: Path, cfg: BuildConfig) -> dict[str, Any]:
    """The quality figures of a saved folder: VAE reconstruction (pool, general images, subject stripes), colour,
    shape, position and size following on held-out prompts, prompts without a colour, held-out loss vs untrained."""
    pipe = load_pipeline(path)
    steps, g = cfg.eval_inference_steps, cfg.eval_guidance
    colour = evaluate_colour_following(pipe, cfg.eval_images, steps, g)
    ident = evaluate_colour_following(pipe, cfg.eval_images, steps, g, word=scenes.SUBJECT.identifier)
    n_layout = max(4, cfg.eval_images // 2 * 2)
    layout = evaluate_prompts(pipe, layout_prompts(n_layout), steps, g)
    plain = evaluate_prompts(pipe, [r["prompt"] for r in colour["rows"]], steps, g)
    no_colour = evaluate_prompts(pipe, no_colour_prompts(max(4, cfg.eval_images // 2)), steps, g)
    sched = pipe.scheduler
    loss = heldout_denoising_loss(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, sched)
    loss_shuffled = heldout_denoising_loss(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, sched, shuffle_captions=True)
    _, te0, unet0 = make_models(replace(cfg), seed=cfg.seed + 999)
    loss0 = heldout_denoising_loss(pipe.vae, te0.eval(), pipe.tokenizer, unet0.eval(), sched)
    return {
        **vae_figures(pipe.vae),
        "colour_following": colour, "heldout_loss": loss, "heldout_loss_shuffled_captions": loss_shuffled,
        "untrained_heldout_loss": loss0,
        "background_rate": colour["background_rate"], "shape_colour_rate": colour["shape_colour_rate"],
        "both_rate": colour["both_rate"],
        # "a qwe star on a blue background": an unseen word in the colour slot must not derail the rest
        "identifier_background_rate": ident["background_rate"],
        # the same colour prompts, read for the shape (template match; chance 1/4)
        "shape_rate": plain["shape_rate"],
        "layout_following": layout,
        "position_rate": layout["position_rate"], "size_rate": layout["size_rate"],
        "layout_shape_rate": layout["shape_rate"],
        "no_colour_prompts": no_colour, "no_colour_object_rate": no_colour["object_rate"],
        # teacher-forced loss ratio with one caption word swapped (1.0 = the word is ignored)
        "word_use": word_use(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, sched,
                             n=max(8, cfg.eval_images * 6)),
    }


def quick_config(**overrides: Any) -> BuildConfig:
    """A seconds-long smoke build (used by the rebuild-determinism test): same code path, tiny everything."""
    kw: dict[str, Any] = dict(
        pool_size=64, general_pool_size=64, vae_steps=4, vae_batch=8, unet_steps=6, unet_batch=8, warmup_steps=2,
        eval_images=4, eval_inference_steps=3, threads=1, checkpoint_every=3,
    )
    kw.update(overrides)
    return BuildConfig(**kw)
