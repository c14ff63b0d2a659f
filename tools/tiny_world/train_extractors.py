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

``python -m tools.tiny_world build-extractors`` is seeded and resumable (a safetensors + JSON state every
``checkpoint_every`` steps; ``--resume``), shows a progress bar and writes ``build_report.json`` with the figures of
``extractor_eval`` measured on the written files.
"""

from __future__ import annotations

import copy
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

from hra_diffusion.paths import TINY_EXTRACTORS_DIR
from hra_diffusion.state import load_state, save_state
from hra_diffusion.utils import atomic_directory

from . import extractor_data as xd
from .extractor_models import (
    _SPEED_ONLY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    ExtractorConfig,
    _normalise,
    clip_model_cfg,
    make_clip,
    make_dino,
)

__all__ = ["dino_loss", "build_extractors", "BUILD_COMMAND"]

BUILD_COMMAND = "python -m tools.tiny_world build-extractors"
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


def _schedule(opt: torch.optim.Optimizer, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 10% of the peak (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr_rate=0.1)


def _resume(store: Path, cfg: ExtractorConfig, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
    """A stage's saved state (its modules' weights loaded), or None; a state of other settings is an error."""
    state = load_state(store, asdict(cfg), ignore=_SPEED_ONLY)
    if state is not None:
        for name, m in modules.items():
            m.load_state_dict(state[name])
    return state


def _restore(state: dict[str, Any], opt, sched, g: torch.Generator, rng: np.random.Generator) -> None:
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng_torch"])
    g.set_state(state["rng_gen"])
    rng.bit_generator.state = state["meta"]["np_rng"]


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
    step, meta0 = 0, {"history": [], "seconds": 0.0, "cpu_seconds": 0.0}
    warmup = max(1, int(cfg.warmup_fraction * cfg.clip_steps))
    sched, store = _schedule(opt, cfg.clip_steps, warmup), run.state_dir / "clip"
    loaded = _resume(store, cfg, {"model": model})
    if loaded is not None:
        step, meta0 = loaded["meta"]["step"], loaded["meta"]
        if meta0.get("done"):
            return model, meta0
        _restore(loaded, opt, sched, g, rng)
    items, n_grouped = xd.clip_pool(cfg.seed, cfg.clip_pool, cfg.clip_shape_groups)
    pixels = _normalise(xd.items_to_tensor(items), OPENAI_MEAN, OPENAI_STD)
    k = len(xd.scenes.SHAPES)
    per_batch = min(int(cfg.clip_batch * cfg.clip_shape_groups) // k, n_grouped // k)  # groups in each batch
    tokenizer, loss_fn = SimpleTokenizer(context_length=cfg.context_length), open_clip.ClipLoss()
    words = _pseudo_words(cfg.seed)
    history, t0, c0 = list(meta0["history"]), time.time(), time.process_time()

    def save(done: bool) -> dict[str, Any]:
        meta = {"step": step, "done": done, "np_rng": rng.bit_generator.state, "history": history,
                "seconds": meta0["seconds"] + time.time() - t0, "cpu_seconds": meta0["cpu_seconds"] + time.process_time() - c0}
        save_state(store, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                           "rng_torch": torch.get_rng_state(), "rng_gen": g.get_state(), "meta": meta}, asdict(cfg))
        return meta

    bar = run.progress(cfg.clip_steps, step, "tiny CLIP")
    model.train()
    while step < cfg.clip_steps:
        if run.should_stop():
            save(False)
            raise BuildInterrupted(f"stopped at CLIP step {step}")
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
        sched.step()
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
    step, meta0 = 0, {"history": [], "entropy": [], "seconds": 0.0, "cpu_seconds": 0.0}
    warmup, freeze_last = max(1, int(cfg.warmup_fraction * cfg.dino_steps)), max(1, cfg.dino_steps // 20)
    sched, store = _schedule(opt, cfg.dino_steps, warmup), run.state_dir / "dino"
    loaded = _resume(store, cfg, models)
    if loaded is not None:
        step, meta0, center = loaded["meta"]["step"], loaded["meta"], loaded["center"].clone()
        if meta0.get("done"):
            return models["teacher"].eval(), meta0
        _restore(loaded, opt, sched, g, rng)
    pool = xd.dino_pool(cfg.seed, cfg.dino_pool, cfg.dino_general, cfg.dino_relocate)
    crops = xd.MultiCrop(n_local=cfg.dino_local_crops, hue=cfg.dino_hue, grey_p=cfg.dino_grey)
    history, entropy, t0, c0 = list(meta0["history"]), list(meta0["entropy"]), time.time(), time.process_time()

    def save(done: bool) -> dict[str, Any]:
        meta = {"step": step, "done": done, "np_rng": rng.bit_generator.state, "history": history, "entropy": entropy,
                "seconds": meta0["seconds"] + time.time() - t0, "cpu_seconds": meta0["cpu_seconds"] + time.process_time() - c0}
        save_state(store, {**{name: m.state_dict() for name, m in models.items()}, "center": center,
                           "opt": opt.state_dict(), "sched": sched.state_dict(), "rng_torch": torch.get_rng_state(),
                           "rng_gen": g.get_state(), "meta": meta}, asdict(cfg))
        return meta

    bar = run.progress(cfg.dino_steps, step, "tiny DINO")
    while step < cfg.dino_steps:
        if run.should_stop():
            save(False)
            raise BuildInterrupted(f"stopped at DINO step {step}")
        idx = torch.from_numpy(rng.choice(len(pool), cfg.dino_batch, replace=False))
        loss, t_out, ent = _dino_step(models, center, crops(pool[idx], g), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < freeze_last:  # DINO keeps the prototypes still at first, which avoids an early collapse
            models["head"].last.parametrizations.weight.original1.grad = None
        torch.nn.utils.clip_grad_norm_(params.parameters(), 3.0)
        opt.step()
        sched.step()
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
        if any(state_dir.glob("*/state.json")):
            print(f"starting over: removing the state of an unfinished earlier build in {state_dir} (--resume would "
                  "have continued it)", flush=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    elif not any(state_dir.glob("*/state.json")):
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
