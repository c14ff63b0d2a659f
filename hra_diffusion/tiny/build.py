"""Train the tiny world's text-to-image model (VAE, CLIP text encoder, UNet) and write a diffusers pipeline folder.

Step-based and seeded, so a rebuild gives the same model up to float noise. The whole build is
``python -m hra_diffusion.tiny build`` (25-35 min on 2 CPU cores); ``--steps-scale`` shrinks it for tests.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..training.loss import diffusion_target
from . import scenes
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
    pool_size: int = 6000  # pre-rendered training scenes
    vae_steps: int = 200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    text_lr: float = 2e-3  # the text pathway learns slowest; colour words need it
    warmup_steps: int = 40
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

    def __post_init__(self) -> None:
        if self.steps_scale <= 0:
            raise ValueError(f"steps_scale must be > 0, got {self.steps_scale}")
        if self.resolution % 2:
            raise ValueError(f"resolution must be even (the VAE downsamples by 2), got {self.resolution}")

    def steps(self, n: int) -> int:
        return max(1, round(n * self.steps_scale))


def make_models(cfg: BuildConfig, seed: int) -> tuple[Any, Any, Any]:
    """Fresh (vae, text_encoder, unet) with the tiny world's architecture, initialised from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
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
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2, in_channels=4, out_channels=4, block_out_channels=(64, 128),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16,
    )
    return vae, text_encoder, unet


def images_to_tensor(images: list) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 10% of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


def _log(msg: str, log_every: bool = True) -> None:
    if log_every:
        print(msg, flush=True)


def train_vae(vae, pixels: torch.Tensor, cfg: BuildConfig, rng: np.random.Generator, verbose: bool) -> float:
    """Train the autoencoder on the pool (L1 + MSE reconstruction, tiny KL); returns the final recon MSE."""
    steps = cfg.steps(cfg.vae_steps)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(cfg.warmup_steps, steps), steps))
    vae.train()
    mse = float("nan")
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(pixels), cfg.vae_batch))
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn_like(post.mean)
        rec = vae.decode(z).sample
        mse_t = F.mse_loss(rec, x)
        loss = mse_t + F.l1_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        mse = mse_t.item()
        if verbose and (step % 25 == 0 or step == steps - 1):
            _log(f"vae step {step + 1}/{steps} mse {mse:.4f} [{time.strftime('%H:%M:%S')}]")
    vae.eval()
    return mse


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


def pseudo_words(seed: int, n: int = 300) -> list[str]:
    """``n`` made-up lowercase words (3-5 letters), never a word of the tiny world's language or its identifier."""
    rng = np.random.default_rng([seed, 7])
    taken = {*scenes.COLOURS, *scenes.SHAPES, scenes.SUBJECT.identifier, "a", "on", "background"}
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


def train_unet(
    unet, text_encoder, tokenizer, noise_scheduler, latents: tuple[torch.Tensor, torch.Tensor],
    pool: list[scenes.Scene], scaling: float, cfg: BuildConfig, rng: np.random.Generator, verbose: bool,
) -> float:
    """Train UNet + text encoder jointly on caption variants (the scheduler's target); returns the loss EMA."""
    steps = cfg.steps(cfg.unet_steps)
    opt = torch.optim.AdamW(
        [{"params": unet.parameters(), "lr": cfg.unet_lr}, {"params": text_encoder.parameters(), "lr": cfg.text_lr}],
        weight_decay=1e-2,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(cfg.warmup_steps, steps), steps))
    unet.train()
    text_encoder.train()
    mean, std = latents
    words = pseudo_words(cfg.seed)
    cache: dict[str, torch.Tensor] = {}
    ema, loss_f = None, float("nan")
    for step in range(steps):
        idx = rng.integers(0, len(pool), cfg.unet_batch)
        us = rng.random(cfg.unet_batch)
        captions = [scenes.caption_variant(pool[i], u) for i, u in zip(idx, us, strict=True)]
        for k in np.flatnonzero(rng.random(cfg.unet_batch) < cfg.pseudo_word_rate):
            captions[k] = pseudo_word_caption(pool[idx[k]], words[rng.integers(len(words))], rng.random())
        for c in set(captions) - cache.keys():
            cache[c] = _tokenize(tokenizer, [c], cfg.max_length)[0]
        ids = torch.stack([cache[c] for c in captions])
        it = torch.from_numpy(idx)
        z0 = (mean[it] + std[it] * torch.randn_like(mean[it])) * scaling
        noise = torch.randn_like(z0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(z0),))
        zt = noise_scheduler.add_noise(z0, noise, t)
        pred = unet(zt, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, diffusion_target(noise_scheduler, z0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        sched.step()
        loss_f = loss.item()
        ema = loss_f if ema is None else 0.95 * ema + 0.05 * loss_f
        if verbose and (step % 25 == 0 or step == steps - 1):
            _log(f"unet step {step + 1}/{steps} loss {loss_f:.4f} (ema {ema:.4f}) [{time.strftime('%H:%M:%S')}]")
    unet.eval()
    text_encoder.eval()
    return float(ema)


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


def build_model(out_dir: Path, cfg: BuildConfig | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train all parts from ``cfg.seed`` and write a complete pipeline folder to ``out_dir`` with build_report.json."""
    from transformers import CLIPTokenizer

    cfg = cfg or BuildConfig()
    out_dir = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    tmp = out_dir.parent / (out_dir.name + ".tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    write_clip_tokenizer(tmp / "_tokenizer", cfg.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "_tokenizer")

    pool = scenes.sample_scenes(cfg.seed, cfg.pool_size)
    pixels = images_to_tensor([scenes.render(s, cfg.resolution) for s in pool])
    _log(f"rendered {len(pool)} scenes in {time.time() - t0:.1f}s", verbose)

    vae, text_encoder, unet = make_models(cfg, cfg.seed)
    t_vae = time.time()
    vae_mse = train_vae(vae, pixels, cfg, rng, verbose)
    mean, std = _encode(vae, pixels)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    _log(f"vae trained in {time.time() - t_vae:.0f}s; latent std {1 / scaling:.3f} -> scaling_factor {scaling:.4f}", verbose)

    t_unet = time.time()
    noise_scheduler = make_scheduler(cfg)
    train_loss = train_unet(unet, text_encoder, tokenizer, noise_scheduler, (mean, std), pool, scaling, cfg, rng, verbose)
    _log(f"unet + text encoder trained in {time.time() - t_unet:.0f}s", verbose)
    train_seconds = time.time() - t0

    pipe = make_pipeline(vae, text_encoder, tokenizer, unet, cfg)
    if cfg.save_fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    if cfg.save_fp16:
        _load_text_encoder_as_fp32(tmp / "pipeline" / "text_encoder" / "config.json")

    report = {"config": asdict(cfg), "vae_recon_mse": vae_mse, "unet_train_loss_ema": train_loss,
              "scaling_factor": scaling, "train_seconds": round(train_seconds, 1)}
    report.update(measure_quality(tmp / "pipeline", cfg))
    report["total_seconds"] = round(time.time() - t0, 1)
    report["size_bytes"] = sum(p.stat().st_size for p in (tmp / "pipeline").rglob("*") if p.is_file())
    (tmp / "pipeline" / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "pipeline").rename(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    _log(json.dumps({k: v for k, v in report.items() if k != "colour_following"}, indent=2), verbose)
    return report


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

    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_quality(path: Path, cfg: BuildConfig) -> dict[str, Any]:
    """The quality figures of a saved folder: colour following and held-out loss vs an untrained model."""
    pipe = load_pipeline(path)
    colour = evaluate_colour_following(pipe, cfg.eval_images, cfg.eval_inference_steps, cfg.eval_guidance)
    ident = evaluate_colour_following(pipe, cfg.eval_images, cfg.eval_inference_steps, cfg.eval_guidance,
                                      word=scenes.SUBJECT.identifier)
    sched = pipe.scheduler
    loss = heldout_denoising_loss(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, sched)
    loss_shuffled = heldout_denoising_loss(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, sched, shuffle_captions=True)
    _, te0, unet0 = make_models(replace(cfg), seed=cfg.seed + 999)
    loss0 = heldout_denoising_loss(pipe.vae, te0.eval(), pipe.tokenizer, unet0.eval(), sched)
    return {
        "colour_following": colour, "heldout_loss": loss, "heldout_loss_shuffled_captions": loss_shuffled,
        "untrained_heldout_loss": loss0,
        "background_rate": colour["background_rate"], "shape_colour_rate": colour["shape_colour_rate"],
        "both_rate": colour["both_rate"],
        # "a qwe star on a blue background": an unseen word in the colour slot must not derail the rest
        "identifier_background_rate": ident["background_rate"],
    }


def quick_config(**overrides: Any) -> BuildConfig:
    """A seconds-long smoke build (used by the rebuild-determinism test): same code path, tiny everything."""
    kw: dict[str, Any] = dict(
        pool_size=64, vae_steps=4, vae_batch=8, unet_steps=6, unet_batch=8, warmup_steps=2, eval_images=4,
        eval_inference_steps=3, threads=1,
    )
    kw.update(overrides)
    return BuildConfig(**kw)
