"""Train the tiny world's stand-in feature extractors (a CLIP and a DINO) and write them where the scorer finds them.

These are NOT the real DINO ViT-S/16 or CLIP ViT-L/14: they are small models trained here, in minutes, on the tiny
world's 32 px scenes, so that DINO / CLIP-I / CLIP-T give numbers offline that mean something *in the tiny world*.
They are built on the same libraries as the real ones, so the scorer runs its real code paths on them:

- CLIP: an ``open_clip.CLIP`` with a small custom config (a ViT image tower at 32 px; a text tower with CLIP's own
  BPE tokenizer, the tiny world's tokenizer), trained contrastively with ``open_clip.ClipLoss`` on captioned scenes
  (``extractor_data``). Written as ``open_clip_config.json`` + ``open_clip_model.safetensors``, which
  ``open_clip.create_model("local-dir:<folder>")`` loads.
- DINO: a ``transformers.ViTModel`` (32 px, patch 4) trained by DINO self-distillation (Caron et al. 2021): a
  student and an EMA teacher with a projection head, teacher outputs centred and sharpened, multi-crop (2 global
  crops at 32 px, local crops at 16 px). The teacher's backbone is shipped (``ViTModel.from_pretrained(folder)``,
  with a ``preprocessor_config.json``), as DINO ships its teacher.

``python -m hra_diffusion.tiny build-extractors`` is seeded and resumable (a safetensors + JSON state every
``checkpoint_every`` steps; ``--resume``), shows a progress bar and writes ``build_report.json`` with the figures of
``extractor_eval`` measured on the written files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..paths import TINY_EXTRACTORS_DIR
from ..utils import atomic_directory
from . import extractor_data as xd

__all__ = [
    "ExtractorConfig",
    "quick_config",
    "clip_model_cfg",
    "make_clip",
    "make_dino",
    "DINOHead",
    "dino_loss",
    "build_extractors",
    "BUILD_COMMAND",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

BUILD_COMMAND = "python -m hra_diffusion.tiny build-extractors"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ExtractorConfig:
    """Everything that determines the built extractors (``threads``, ``checkpoint_every`` only the speed)."""

    seed: int = 0
    # CLIP: image tower ViT 32 px / patch 8 (4x4 tokens), text tower 3 layers on CLIP's 49,408-token vocabulary
    clip_pool: int = 12000
    clip_steps: int = 3000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_wd: float = 0.1
    clip_embed_dim: int = 64
    clip_patch: int = 8
    clip_width: int = 128
    clip_layers: int = 4
    clip_text_width: int = 48
    clip_text_layers: int = 3
    context_length: int = 24
    pseudo_word_rate: float = 0.15  # captions with a made-up word before the noun ("a vop star"), as DreamBooth's
    clip_shape_groups: float = 0.5  # share of each batch in groups of four scenes that differ only in the shape
    # DINO: ViT 32 px / patch 4 (8x8 tokens), 64 wide; prototypes straight on the L2-normalised CLS token (head
    # layers 0). Measured on this world (issue 19 notes in docs/tiny-extractors.md): with DINO's 3-layer MLP head
    # the projector learned the invariances and the backbone's CLS kept the background (same object in another
    # scene: cosine 0.35, another object in the same scene: 0.76), and plain stars scored above the subject.
    dino_pool: int = 8000
    dino_steps: int = 1200
    dino_batch: int = 48
    dino_lr: float = 2e-3
    dino_wd: float = 0.04
    dino_width: int = 64
    dino_layers: int = 4
    dino_heads: int = 2
    dino_patch: int = 4
    dino_out_dim: int = 512
    dino_head_layers: int = 0
    dino_local_crops: int = 4
    dino_relocate: float = 1.0  # share of objects whose two global views come from two scenes (else one image)
    dino_general: float = 0.3  # share of the VAE's general pool in DINO's images
    dino_hue: float = 0.05  # colour jitter's hue range (of a full turn); colours are identity in this world
    dino_grey: float = 0.2  # share of views turned grey
    # a sharper teacher than DINO's 0.04 and a faster EMA than its 0.996: at 0.04 / 0.996 the teacher stayed near
    # uniform (entropy ~log K, loss near its maximum) for the whole of a budget of ~1,000 steps
    teacher_temp: float = 0.02
    student_temp: float = 0.1
    center_momentum: float = 0.9
    teacher_momentum: float = 0.98  # start of the cosine schedule to 1
    warmup_fraction: float = 0.1
    eval_scenes: int = 96  # rendered held-out scenes for the zero-shot figures (plus the 24 of assets/tiny-data)
    save_fp16: bool = True
    threads: int = 2
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("clip_steps", "dino_steps", "clip_batch", "dino_batch", "clip_pool", "dino_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


_SPEED_ONLY = {"threads", "checkpoint_every"}


def quick_config(**overrides: Any) -> ExtractorConfig:
    """A seconds-long build for tests: tiny pools, batches and step counts (its figures mean nothing)."""
    base = dict(clip_pool=256, clip_steps=6, clip_batch=16, dino_pool=128, dino_steps=6, dino_batch=8, dino_out_dim=64,
                dino_local_crops=2, eval_scenes=12, checkpoint_every=2, threads=1)
    return ExtractorConfig(**{**base, **overrides})


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- models ----------------------------------------------------------------------------------------------------

def clip_model_cfg(cfg: ExtractorConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of the tiny CLIP (what ``open_clip_config.json`` holds)."""
    return {
        "embed_dim": cfg.clip_embed_dim,
        "vision_cfg": {"image_size": 32, "patch_size": cfg.clip_patch, "width": cfg.clip_width,
                       "layers": cfg.clip_layers, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.clip_text_width,
                     "heads": 4, "layers": cfg.clip_text_layers},
    }


def make_clip(cfg: ExtractorConfig) -> nn.Module:
    import open_clip

    mc = clip_model_cfg(cfg)
    return open_clip.CLIP(mc["embed_dim"], mc["vision_cfg"], mc["text_cfg"])


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes (norm fixed to 1).

    ``layers`` 3 is DINO's default MLP; 1 a linear bottleneck (DINO's ``nlayers=1``); 0 no bottleneck: the
    prototypes act on the L2-normalised CLS token itself, so the invariances DINO teaches hold in the very
    features the scorer compares, not only after a projector."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 256, bottleneck: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers == 0:
            self.mlp, bottleneck = nn.Identity(), dim
        elif layers == 1:
            self.mlp = nn.Linear(dim, bottleneck)
        else:
            mods: list[nn.Module] = [nn.Linear(dim, hidden), nn.GELU()]
            for _ in range(layers - 2):
                mods += [nn.Linear(hidden, hidden), nn.GELU()]
            self.mlp = nn.Sequential(*mods, nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        g = self.last.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def make_dino(cfg: ExtractorConfig) -> tuple[nn.Module, DINOHead]:
    """(the ViT backbone, the DINO head) with fresh weights."""
    from transformers import ViTConfig, ViTModel

    vit_cfg = ViTConfig(image_size=32, patch_size=cfg.dino_patch, hidden_size=cfg.dino_width,
                        num_hidden_layers=cfg.dino_layers, num_attention_heads=cfg.dino_heads,
                        intermediate_size=4 * cfg.dino_width, layer_norm_eps=1e-6, qkv_bias=True)
    return ViTModel(vit_cfg, add_pooling_layer=False), DINOHead(cfg.dino_width, cfg.dino_out_dim,
                                                                 layers=cfg.dino_head_layers)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, n_views: int,
              teacher_temp: float, student_temp: float) -> torch.Tensor:
    """Cross-entropy of the centred, sharpened teacher (2 global views) against the student (all views), over the
    pairs of different views. ``student`` (n_views*B, K), ``teacher`` (2*B, K)."""
    s = (student / student_temp).chunk(n_views)
    t = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, pairs = student.new_zeros(()), 0
    for i, q in enumerate(t):
        for v, sv in enumerate(s):
            if v != i:
                total = total + torch.sum(-q * F.log_softmax(sv, dim=-1), dim=-1).mean()
                pairs += 1
    return total / pairs


# ---- resumable state (safetensors + JSON, never pickle) --------------------------------------------------------

def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.detach().clone() for i, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


class _State:
    """One stage's resumable state: ``<stage>.safetensors`` (weights, optimizer, RNG) and ``<stage>.json`` (step,
    settings, numpy RNG, timings, the tensors file's sha256), the JSON written last so it marks a complete state."""

    def __init__(self, folder: Path, stage: str, cfg: ExtractorConfig) -> None:
        self.folder, self.stage, self.cfg = Path(folder), stage, cfg
        self.tensors_path = self.folder / f"{stage}.safetensors"
        self.meta_path = self.folder / f"{stage}.json"

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.tensors_path.with_suffix(".safetensors.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.tensors_path)
        doc = {**meta, "stage": self.stage, "config": asdict(self.cfg),
               "sha256": hashlib.sha256(self.tensors_path.read_bytes()).hexdigest()}
        tmp_meta = self.meta_path.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(doc, indent=1) + "\n")
        tmp_meta.replace(self.meta_path)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        from safetensors.torch import load_file

        if not self.meta_path.is_file():
            return None
        meta = json.loads(self.meta_path.read_text())
        if not self.tensors_path.is_file() or hashlib.sha256(self.tensors_path.read_bytes()).hexdigest() != meta["sha256"]:
            raise ValueError(f"{self.tensors_path} is missing or does not match {self.meta_path} (a damaged state); "
                             f"remove {self.folder} and build again")
        mine = {k: v for k, v in asdict(self.cfg).items() if k not in _SPEED_ONLY}
        theirs = {k: v for k, v in meta["config"].items() if k not in _SPEED_ONLY}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{self.folder} holds a build with other settings ({', '.join(diff)}); resume with the "
                             f"same settings, or remove {self.folder} to start over")
        return load_file(str(self.tensors_path)), meta


def _rng_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state(), "rng.gen": g.get_state()}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], g: torch.Generator,
                 rng: np.random.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    g.set_state(tensors["rng.gen"])
    rng.bit_generator.state = meta["np_rng"]


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


@dataclass
class _Run:
    """What a training stage shares with the build: where to checkpoint, when to stop, how to report."""

    state_dir: Path
    verbose: bool
    stop_after: int | None  # total training steps (all stages) this invocation may run; None: no limit
    steps_done: int = 0

    def should_stop(self) -> bool:
        return self.stop_after is not None and self.steps_done >= self.stop_after

    def progress(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not self.verbose, mininterval=2,
                    dynamic_ncols=True, unit="step")


class BuildInterrupted(RuntimeError):
    """The build stopped before finishing (``stop_after``); its state is in the checkpoint folder."""


# ---- CLIP ------------------------------------------------------------------------------------------------------

def _pseudo_words(seed: int, n: int = 300) -> list[str]:
    """Made-up 3-5 letter words, none a word of the captions' language (positions, sizes, patterns included)."""
    from .build import pseudo_words

    return pseudo_words(seed, n, salt=23, also_taken=("and", "of", "the", "in", "top", "left", "right", "small",
                                                      "large", "striped", "checkered", "center", "bottom"))


def _clip_captions(items: list[xd.Item], rng: np.random.Generator, words: list[str], rate: float) -> list[str]:
    out = []
    for it in items:
        cap = xd.item_caption(it, rng)
        if rng.random() < rate:  # a rare word before the description, as a DreamBooth prompt's identifier
            cap = "a " + words[rng.integers(len(words))] + cap[1:]
        out.append(cap)
    return out


def _decay_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases, norms, embeddings of size 1 or the logit scale)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "logit_scale" not in n)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def train_clip(cfg: ExtractorConfig, run: _Run) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or resume, or load the finished) tiny CLIP; returns (model, stage summary)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(cfg.seed)
    model = make_clip(cfg)
    opt = torch.optim.AdamW(_decay_groups(model, cfg.clip_wd), lr=cfg.clip_lr, betas=(0.9, 0.98), eps=1e-6)
    rng, g = np.random.default_rng([cfg.seed, 31]), torch.Generator().manual_seed(cfg.seed + 31)
    state, step, meta0 = _State(run.state_dir, "clip", cfg), 0, {"history": [], "seconds": 0.0, "cpu_seconds": 0.0}
    loaded = state.load()
    if loaded is not None:
        tensors, meta0 = loaded
        model.load_state_dict(_unprefixed("model", tensors))
        step = meta0["step"]
        if meta0.get("done"):
            return model, meta0
        _load_optimizer(opt, tensors, meta0)
        _restore_rng(tensors, meta0, g, rng)
    items, n_grouped = xd.clip_pool(cfg.seed, cfg.clip_pool, cfg.clip_shape_groups)
    pixels = _normalise(xd.items_to_tensor(items), OPENAI_MEAN, OPENAI_STD)
    k = len(xd.scenes.SHAPES)
    per_batch = min(int(cfg.clip_batch * cfg.clip_shape_groups) // k, n_grouped // k)  # groups in each batch
    tokenizer, loss_fn = SimpleTokenizer(context_length=cfg.context_length), open_clip.ClipLoss()
    words, warmup = _pseudo_words(cfg.seed), max(1, int(cfg.warmup_fraction * cfg.clip_steps))
    history, t0, c0 = list(meta0["history"]), time.time(), time.process_time()

    def save(done: bool) -> dict[str, Any]:
        opt_t, opt_meta = _optimizer_tensors(opt)
        meta = {"step": step, "done": done, "np_rng": rng.bit_generator.state, "history": history,
                "seconds": meta0["seconds"] + time.time() - t0, "cpu_seconds": meta0["cpu_seconds"] + time.process_time() - c0,
                **opt_meta}
        state.save({**_prefixed("model", model), **opt_t, **_rng_tensors(g)}, meta)
        return meta

    bar = run.progress(cfg.clip_steps, step, "tiny CLIP")
    model.train()
    while step < cfg.clip_steps:
        if run.should_stop():
            save(False)
            raise BuildInterrupted(f"stopped at CLIP step {step}")
        for group in opt.param_groups:
            group["lr"] = cfg.clip_lr * _lr_factor(step, cfg.clip_steps, warmup)
        groups = rng.choice(n_grouped // k, per_batch, replace=False) if per_batch else np.zeros(0, dtype=np.int64)
        grouped = (groups[:, None] * k + np.arange(k)).ravel()
        idx = np.concatenate([grouped, n_grouped + rng.choice(len(items) - n_grouped, cfg.clip_batch - len(grouped),
                                                              replace=False)])
        tokens = tokenizer(_clip_captions([items[i] for i in idx], rng, words, cfg.pseudo_word_rate))
        img_f, txt_f, scale = model(pixels[torch.from_numpy(idx)], tokens)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step, run.steps_done = step + 1, run.steps_done + 1
        history.append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.3f}", refresh=False)
        if step % cfg.checkpoint_every == 0 and step < cfg.clip_steps:
            save(False)
    bar.close()
    model.eval()
    return model, save(True)


# ---- DINO ------------------------------------------------------------------------------------------------------

def _dino_step(models: dict[str, nn.Module], center: torch.Tensor, views: tuple[list, list],
               cfg: ExtractorConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(loss, the teacher's raw outputs, the teacher's mean per-image entropy) of one multi-crop batch."""
    glob, loc = views
    norm = [_normalise(v, IMAGENET_MEAN, IMAGENET_STD) for v in glob + loc]
    g_in, l_in = torch.cat(norm[:2]), torch.cat(norm[2:])
    with torch.no_grad():
        t_out = models["teacher_head"](models["teacher"](pixel_values=g_in).last_hidden_state[:, 0])
    s_glob = models["student"](pixel_values=g_in).last_hidden_state[:, 0]
    s_loc = models["student"](pixel_values=l_in, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    s_out = models["head"](torch.cat([s_glob, s_loc]))
    loss = dino_loss(s_out, t_out, center, 2 + len(loc), cfg.teacher_temp, cfg.student_temp)
    p = F.softmax((t_out - center) / cfg.teacher_temp, dim=-1)
    entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
    return loss, t_out, entropy


def _ema(models: dict[str, nn.Module], momentum: float) -> None:
    with torch.no_grad():
        for s_name, t_name in (("student", "teacher"), ("head", "teacher_head")):
            for ps, pt in zip(models[s_name].parameters(), models[t_name].parameters(), strict=True):
                pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def _dino_models(cfg: ExtractorConfig) -> dict[str, nn.Module]:
    torch.manual_seed(cfg.seed + 1)
    student, head = make_dino(cfg)
    teacher, teacher_head = copy.deepcopy(student), copy.deepcopy(head)
    for p in [*teacher.parameters(), *teacher_head.parameters()]:
        p.requires_grad_(False)
    return {"student": student, "head": head, "teacher": teacher, "teacher_head": teacher_head}


def train_dino(cfg: ExtractorConfig, run: _Run) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or resume, or load the finished) tiny DINO; returns (the teacher backbone, stage summary)."""
    models = _dino_models(cfg)
    params = nn.ModuleList([models["student"], models["head"]])
    opt = torch.optim.AdamW(_decay_groups(params, cfg.dino_wd), lr=cfg.dino_lr)
    rng, g = np.random.default_rng([cfg.seed, 41]), torch.Generator().manual_seed(cfg.seed + 41)
    center = torch.zeros(1, cfg.dino_out_dim)
    state, step, meta0 = _State(run.state_dir, "dino", cfg), 0, {"history": [], "entropy": [], "seconds": 0.0,
                                                                 "cpu_seconds": 0.0}
    loaded = state.load()
    if loaded is not None:
        tensors, meta0 = loaded
        for name, m in models.items():
            m.load_state_dict(_unprefixed(name, tensors))
        step, center = meta0["step"], tensors["center"].clone()
        if meta0.get("done"):
            return models["teacher"].eval(), meta0
        _load_optimizer(opt, tensors, meta0)
        _restore_rng(tensors, meta0, g, rng)
    pool = xd.dino_pool(cfg.seed, cfg.dino_pool, cfg.dino_general, cfg.dino_relocate)
    crops = xd.MultiCrop(n_local=cfg.dino_local_crops, hue=cfg.dino_hue, grey_p=cfg.dino_grey)
    warmup, freeze_last = max(1, int(cfg.warmup_fraction * cfg.dino_steps)), max(1, cfg.dino_steps // 20)
    history, entropy, t0, c0 = list(meta0["history"]), list(meta0["entropy"]), time.time(), time.process_time()

    def save(done: bool) -> dict[str, Any]:
        opt_t, opt_meta = _optimizer_tensors(opt)
        meta = {"step": step, "done": done, "np_rng": rng.bit_generator.state, "history": history, "entropy": entropy,
                "seconds": meta0["seconds"] + time.time() - t0, "cpu_seconds": meta0["cpu_seconds"] + time.process_time() - c0,
                **opt_meta}
        tensors = {k: v for name, m in models.items() for k, v in _prefixed(name, m).items()}
        state.save({**tensors, "center": center, **opt_t, **_rng_tensors(g)}, meta)
        return meta

    bar = run.progress(cfg.dino_steps, step, "tiny DINO")
    while step < cfg.dino_steps:
        if run.should_stop():
            save(False)
            raise BuildInterrupted(f"stopped at DINO step {step}")
        for group in opt.param_groups:
            group["lr"] = cfg.dino_lr * _lr_factor(step, cfg.dino_steps, warmup)
        idx = torch.from_numpy(rng.choice(len(pool), cfg.dino_batch, replace=False))
        loss, t_out, ent = _dino_step(models, center, crops(pool[idx], g), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < freeze_last:  # DINO keeps the prototypes still at first, which avoids an early collapse
            models["head"].last.parametrizations.weight.original1.grad = None
        torch.nn.utils.clip_grad_norm_(params.parameters(), 3.0)
        opt.step()
        momentum = 1 - (1 - cfg.teacher_momentum) * (math.cos(math.pi * step / cfg.dino_steps) + 1) / 2
        _ema(models, momentum)
        center = center * cfg.center_momentum + t_out.mean(0, keepdim=True) * (1 - cfg.center_momentum)
        step, run.steps_done = step + 1, run.steps_done + 1
        history.append(round(loss.item(), 4))
        entropy.append(round(ent, 4))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.3f}", refresh=False)
        if step % cfg.checkpoint_every == 0 and step < cfg.dino_steps:
            save(False)
    bar.close()
    return models["teacher"].eval(), save(True)


# ---- export and the build ----------------------------------------------------------------------------------------

DESCRIPTION = ("tiny-world stand-in, NOT the real {what}: trained by `" + BUILD_COMMAND + "` on the tiny world's 32 px "
               "scenes; its numbers mean something only for tiny-world images")


def export_clip(model: nn.Module, folder: Path, cfg: ExtractorConfig) -> Path:
    """``open_clip_config.json`` + ``open_clip_model.safetensors`` (open_clip's ``local-dir:`` layout)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"model_cfg": clip_model_cfg(cfg),
           "preprocess_cfg": {"size": 32, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                              "interpolation": "bicubic", "resize_mode": "shortest"},
           "description": DESCRIPTION.format(what="CLIP ViT-L/14"), "seed": cfg.seed}
    (folder / "open_clip_config.json").write_text(json.dumps(doc, indent=2) + "\n")
    dtype = torch.float16 if cfg.save_fp16 else torch.float32
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "open_clip_model.safetensors"), metadata={"format": "pt"})
    return folder


def export_dino(vit: nn.Module, folder: Path, cfg: ExtractorConfig) -> Path:
    """A transformers folder (config.json, model.safetensors, preprocessor_config.json) of the teacher backbone."""
    from transformers import ViTImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    out = copy.deepcopy(vit).to(torch.float16 if cfg.save_fp16 else torch.float32)
    out.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float32"  # stored in fp16 to halve the file; loads (and computes) in fp32
    config["description"] = DESCRIPTION.format(what="DINO ViT-S/16")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD)).save_pretrained(folder)
    return folder


def default_state_dir(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.build-state"


def build_extractors(out: Path = TINY_EXTRACTORS_DIR, cfg: ExtractorConfig | None = None, verbose: bool = True,
                     checkpoint_dir: Path | None = None, resume: bool = False,
                     stop_after: int | None = None) -> dict[str, Any]:
    """Train both extractors from ``cfg.seed``, write ``out/{clip,dino}`` and ``out/build_report.json``.

    The state goes to ``checkpoint_dir`` (default: a hidden sibling of ``out``) every ``cfg.checkpoint_every`` steps
    and at the end of each stage; ``resume`` continues from it (same settings), otherwise it is cleared first.
    ``stop_after`` ends this run after that many training steps (raising :class:`BuildInterrupted`), leaving the
    state to resume from: a long build can be split over several sessions. The state is removed on success."""
    cfg = cfg or ExtractorConfig()
    out = Path(out)
    state_dir = Path(checkpoint_dir) if checkpoint_dir is not None else default_state_dir(out)
    if not resume:
        if any(state_dir.glob("*.json")):
            print(f"starting over: removing the state of an unfinished earlier build in {state_dir} (--resume would "
                  "have continued it)", flush=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    elif not any(state_dir.glob("*.json")):
        print(f"--resume: no build state in {state_dir}; starting from the beginning", flush=True)
    torch.set_num_threads(cfg.threads)
    run = _Run(state_dir, verbose, stop_after)
    clip, clip_meta = train_clip(cfg, run)
    vit, dino_meta = train_dino(cfg, run)
    with atomic_directory(out) as tmp:  # a crash leaves any previous extractors in place
        report = _export_and_measure(clip, vit, tmp, cfg, clip_meta, dino_meta)
    shutil.rmtree(state_dir, ignore_errors=True)
    return report


def _export_and_measure(clip: nn.Module, vit: nn.Module, folder: Path, cfg: ExtractorConfig,
                        clip_meta: dict[str, Any], dino_meta: dict[str, Any]) -> dict[str, Any]:
    """Write both extractors into ``folder``, measure them as the scorer loads them, write the build report."""
    from .extractor_eval import evaluate_folder

    export_clip(clip, folder / "clip", cfg)
    export_dino(vit, folder / "dino", cfg)
    t_eval, c_eval = time.time(), time.process_time()
    figures = evaluate_folder(folder, cfg)
    timings = {"clip_seconds": round(clip_meta["seconds"], 1), "dino_seconds": round(dino_meta["seconds"], 1),
               "eval_seconds": round(time.time() - t_eval, 1),
               "clip_cpu_seconds": round(clip_meta["cpu_seconds"], 1),
               "dino_cpu_seconds": round(dino_meta["cpu_seconds"], 1),
               "eval_cpu_seconds": round(time.process_time() - c_eval, 1)}
    timings["total_seconds"] = round(timings["clip_seconds"] + timings["dino_seconds"] + timings["eval_seconds"], 1)
    timings["total_cpu_seconds"] = round(timings["clip_cpu_seconds"] + timings["dino_cpu_seconds"]
                                         + timings["eval_cpu_seconds"], 1)
    report = {
        "what": "tiny-world stand-in DINO and CLIP (not the real models); see docs/tiny-extractors.md",
        "command": BUILD_COMMAND, "config": asdict(cfg), **figures,
        "training": _training_summary(clip_meta, dino_meta), "timings": timings,
        "size_bytes": {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                       for p in (folder / "clip", folder / "dino")},
    }
    (folder / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _training_summary(clip_meta: dict[str, Any], dino_meta: dict[str, Any]) -> dict[str, Any]:
    def tail(xs: list[float], n: int = 20) -> float | None:
        return round(float(np.mean(xs[-n:])), 4) if xs else None

    def head(xs: list[float], n: int = 20) -> float | None:
        return round(float(np.mean(xs[:n])), 4) if xs else None

    return {"clip_loss_first": head(clip_meta["history"]), "clip_loss_last": tail(clip_meta["history"]),
            "dino_loss_first": head(dino_meta["history"]), "dino_loss_last": tail(dino_meta["history"]),
            "dino_teacher_entropy_last": tail(dino_meta["entropy"]),
            "clip_steps": clip_meta["step"], "dino_steps": dino_meta["step"]}


def config_from_report(report: dict[str, Any]) -> ExtractorConfig:
    known = {f.name for f in fields(ExtractorConfig)}
    return replace(ExtractorConfig(), **{k: v for k, v in report.get("config", {}).items() if k in known})
