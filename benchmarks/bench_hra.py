"""Speed and memory of HRA (ours) vs PEFT's HRA, LoRA, OFT and BOFT, measured side by side in one run.

1. Per layer, forward + backward at SD-1.5 projection shapes: frozen base, ours, PEFT HRA, PEFT LoRA
   (same r). Time: median of interleaved repeats. Memory: bytes autograd keeps for backward (exact,
   deterministic; the frozen weight itself excluded).
2. One training step (forward + backward + AdamW) of the SD-1.5-shaped UNet (random weights, 32x32
   latent, batch 1): time interleaved in one process (the variants share the frozen base weights), and
   peak resident memory measured in a fresh subprocess per variant. Variants: ours and PEFT HRA (r),
   PEFT LoRA at the same rank r and at r/2 (the same parameter budget as HRA r), PEFT OFT (block 16) and
   BOFT (block 8, one butterfly factor), injected by hra_diffusion.adapters.peft_baselines exactly as the trainers do.

3. ``--sdxl``: the same per-layer comparison at SDXL's shapes (1280 x 1280 at 1024 and 4096 tokens, the
   cross-attention k/v 2048 -> 1280 over 77 tokens), written as the results section ``layers_sdxl``; with
   ``--sdxl-unet`` also the whole-step comparison on an SDXL-shaped UNet (meta-built from SDXL's config, random
   weights, 32x32 latent, batch 1, with its text/time added conditioning) as ``unet_sdxl``. The SDXL UNet is
   2.6 B parameters (10 GiB in fp32) per process: run that step on a machine with room for it.

Usage: python benchmarks/bench_hra.py [--repeats 7] [--unet-repeats 3] [--skip-unet] [--skip-layers] [--r 8]
       [--unet-variants ours,peft_lora_half,peft_oft,peft_boft] [--json benchmarks/results/bench_hra.json]
       python benchmarks/bench_hra.py --sdxl [--sdxl-unet] [...]
Prints markdown tables and the ratios the project's goals are stated in, and every whole-step ratio
against LoRA (both ranks) measured side by side. Every figure is also written to the results JSON (default
benchmarks/results/bench_hra.json; the sections this run measured replace the file's old ones, each with
the machine, torch version and date it was measured on); the tables in README.md and docs/benchmarks.md are rendered from it
by benchmarks/render_tables.py, never typed in.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from hra_diffusion import HRAConfig, inject_hra
from hra_diffusion.training.trainer import peak_rss_kib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render_tables import layers_table, whole_step_table  # noqa: E402

SHAPES = [(320, 320, 4096 * 2), (640, 640, 1024 * 2), (1280, 1280, 256 * 2), (1280, 1280, 64 * 2), (768, 320, 77 * 2)]
# (in, out, tokens x batch 2) as above: SDXL's 1280-wide projections at 1024 and 4096 tokens, cross-attention k/v
SDXL_SHAPES = [(1280, 1280, 1024 * 2), (1280, 1280, 4096 * 2), (2048, 1280, 77 * 2)]
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the shape-defining entries; the rest are defaults)
SDXL_UNET_CONFIG = {
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
    "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
    "sample_size": 32,
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VARIANTS = ["base", "ours", "peft_hra", "peft_lora"]
CLOCK = time.perf_counter  # --cpu-time: time.process_time (with one torch thread: robust on a shared machine)
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_hra.json"
UNET_VARIANTS = ["ours", "peft_hra", "peft_lora", "peft_lora_half", "peft_oft", "peft_boft"]


class Holder(nn.Module):
    """A one-layer model so every variant is injected through its library's normal path."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.to_q = layer

    def forward(self, x):
        return self.to_q(x)


def make_variant(kind: str, base: nn.Module, r: int, targets: list[str]) -> nn.Module:
    """Wrap ``base`` (its frozen weights shared, not copied) with one adapter kind."""
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "ours":
        inject_hra(model, HRAConfig(r=r, target_modules=targets, init_identity=False))
    elif kind in ("peft_lora_half", "peft_oft", "peft_boft"):
        from hra_diffusion.adapters.peft_baselines import BaselineSpec, inject_baseline

        spec = {"peft_lora_half": dict(kind="lora", r=max(1, r // 2)), "peft_oft": dict(kind="oft", block_size=16),
                "peft_boft": dict(kind="boft", block_size=8)}[kind]
        inject_baseline(model, BaselineSpec(target_modules=targets, seed=0, **spec))
    elif kind in ("peft_hra", "peft_lora"):
        from peft import HRAConfig as PeftHRAConfig
        from peft import LoraConfig, inject_adapter_in_model

        cfg = (
            PeftHRAConfig(r=r, target_modules=targets, init_weights=False)
            if kind == "peft_hra"
            else LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights="gaussian")
        )
        model = inject_adapter_in_model(cfg, model)
    return model


def layer_step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    model(x).backward(g)
    for p in params_of(model):
        p.grad = None
    x.grad = None


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct tensors autograd saves for backward in ``model(x)``, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def bench_layers(r: int, repeats: int, shapes: list[tuple[int, int, int]] | None = None) -> list[dict]:
    rows = []
    for d_in, d_out, n in shapes or SHAPES:
        torch.manual_seed(0)
        base = Holder(nn.Linear(d_in, d_out))
        models = {k: make_variant(k, base, r, ["to_q"]) for k in VARIANTS}
        x = torch.randn(n, d_in, requires_grad=True)
        g = torch.randn(n, d_out)

        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for k in VARIANTS:  # warm-up
            layer_step(models[k], x, g)
        for _ in range(repeats):
            for k in VARIANTS:  # interleaved
                t0 = CLOCK()
                layer_step(models[k], x, g)
                times[k].append(CLOCK() - t0)
        mem = {k: saved_bytes(models[k], x) for k in VARIANTS}
        row = {"shape": f"({d_in}, {d_out}, {n})"}
        for k in VARIANTS:
            row[f"{k}_ms"] = 1000 * statistics.median(times[k])
            row[f"{k}_mib"] = mem[k] / 2**20
        rows.append(row)
        print(f"  measured {row['shape']}", file=sys.stderr, flush=True)
    return rows


def sd15_unet(lean: bool = False, sdxl: bool = False):
    """SD-1.5-shaped UNet (``sdxl``: SDXL-shaped), random weights. ``lean``: built on the meta device and filled
    in place, so building it does not peak above its own size (random init through diffusers peaks at ~3x)."""
    from diffusers import UNet2DConditionModel

    config = SDXL_UNET_CONFIG if sdxl else {"cross_attention_dim": 768, "sample_size": 32}
    torch.manual_seed(0)
    if not lean:
        return UNet2DConditionModel(**config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02)
    return unet


def unet_batch(unet=None):
    """(latent, timestep, text states[, added conditioning]) for one step; SDXL's when ``unet`` is SDXL-shaped."""
    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim if unet is not None else 768
    batch = (torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 77, width, generator=g))
    if unet is None or unet.config.addition_embed_type != "text_time":
        return batch
    pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled, generator=g),
             "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])}
    return (*batch, added)


def train_step(model, opt, batch):
    sample, t, enc, *added = batch
    kwargs = {"added_cond_kwargs": added[0]} if added else {}
    loss = model(sample, t, enc, **kwargs).sample.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_unet_time(r: int, repeats: int, kinds: list[str], sdxl: bool = False) -> dict[str, float]:
    base = sd15_unet(lean=sdxl, sdxl=sdxl)  # SDXL: meta-built and filled in place (one copy of 2.6 B weights)
    models = {k: make_variant(k, base, r, TARGETS) for k in kinds}
    opts = {k: torch.optim.AdamW(params_of(m), lr=1e-4) for k, m in models.items()}
    batch = unet_batch(base)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for k in kinds:
        train_step(models[k], opts[k], batch)  # warm-up
    for i in range(repeats):
        for k in kinds:
            t0 = CLOCK()
            train_step(models[k], opts[k], batch)
            times[k].append(CLOCK() - t0)
        print(f"  unet step round {i + 1}/{repeats}", file=sys.stderr, flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def unet_peak_child(kind: str, r: int, sdxl: bool = False) -> None:
    """Run in a fresh process: peak RSS of building the UNet + 2 training steps of one variant."""
    base = sd15_unet(lean=True, sdxl=sdxl)
    model = make_variant(kind, base, r, TARGETS)
    batch = unet_batch(base)
    del base
    opt = torch.optim.AdamW(params_of(model), lr=1e-4)
    after_build = peak_rss_kib()
    for _ in range(2):
        train_step(model, opt, batch)
    peak = peak_rss_kib()
    n = sum(p.numel() for p in params_of(model))
    print(json.dumps({"peak_kib": peak, "after_build_kib": after_build, "trainable": n}))


def bench_unet_memory(r: int, kinds: list[str], sdxl: bool = False) -> dict[str, dict]:
    out = {}
    for kind in kinds:
        proc = subprocess.run(
            [sys.executable, __file__, "--peak-child", kind, "--r", str(r), *(["--sdxl"] if sdxl else [])],
            capture_output=True, text=True, check=True,
        )
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  peak memory measured for {kind}", file=sys.stderr, flush=True)
    return out


def whole_step_report(t: dict[str, float], mem: dict[str, dict]) -> str:
    """The whole-UNet table and every variant's ratios to LoRA (same rank r and same budget r/2)."""
    return whole_step_table(t, mem)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats per layer shape")
    ap.add_argument("--unet-repeats", type=int, default=3, help="interleaved whole-UNet training steps")
    ap.add_argument("--skip-unet", action="store_true", help="only the per-layer table")
    ap.add_argument("--skip-layers", action="store_true", help="only the whole-UNet step")
    ap.add_argument("--unet-variants", default=",".join(UNET_VARIANTS),
                    help=f"comma-separated whole-UNet variants, from {', '.join(UNET_VARIANTS)}")
    ap.add_argument("--json", default=str(DEFAULT_RESULTS),
                    help="results file to update with this run's sections ('' to skip writing)")
    ap.add_argument("--sdxl", action="store_true",
                    help="SDXL instead of SD 1.5: the per-layer table at SDXL shapes (section layers_sdxl); the "
                         "whole-UNet step only with --sdxl-unet")
    ap.add_argument("--sdxl-unet", action="store_true",
                    help="with --sdxl: also the whole SDXL-UNet training step (section unet_sdxl; ~10 GiB fp32 "
                         "per process, one process per variant for peak memory)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time each call by the process's CPU time with one torch thread, instead of wall time: "
                         "other jobs on a shared machine then barely move the figures (CPU only)")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK = time.process_time
    if args.peak_child:
        unet_peak_child(args.peak_child, args.r, sdxl=args.sdxl)
        return
    if args.sdxl_unet and not args.sdxl:
        ap.error("--sdxl-unet needs --sdxl")

    kinds = [k.strip() for k in args.unet_variants.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in UNET_VARIANTS]
    if unknown or not kinds:
        ap.error(f"unknown --unet-variants {unknown}; choose from {', '.join(UNET_VARIANTS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, r = {args.r}\n")
    env = environment(args.r)
    suffix, model_name = ("_sdxl", "SDXL") if args.sdxl else ("", "SD-1.5")
    def save(section: str, figures: dict) -> None:  # each section is written as soon as it is measured
        if args.json:
            path = update_results(Path(args.json), {section: figures})
            print(f"results: {section} -> {path}", file=sys.stderr, flush=True)

    if not args.skip_layers:
        rows = print_layers(args.r, args.repeats, SDXL_SHAPES if args.sdxl else SHAPES)
        save("layers" + suffix, {"env": env, "repeats": args.repeats, "rows": rows})
    if not args.skip_unet and (args.sdxl_unet or not args.sdxl):
        # peak memory first, in fresh children, while this process is still small (a parent holding every
        # variant's UNet plus a child at PEFT HRA's peak can exceed a small machine's memory)
        mem = bench_unet_memory(args.r, kinds, sdxl=args.sdxl)
        t = bench_unet_time(args.r, args.unet_repeats, kinds, sdxl=args.sdxl)
        save("unet" + suffix, {"env": env, "repeats": args.unet_repeats, "step_s": t, "memory": mem})
        print(f"\n### Whole {model_name}-shaped UNet training step (32x32 latent, batch 1, random weights)\n")
        print(whole_step_report(t, mem))
    print("\ngoals: ours <= 1.15x LoRA time at every shape and for the whole step; PEFT HRA >= 3x slower than "
          "ours at the 1280-wide shapes; whole-step peak memory <= 1.05x LoRA's")
    if args.json:
        print("\nrender the tables of README.md and docs/benchmarks.md with python benchmarks/render_tables.py --write")


def environment(r: int) -> dict:
    """Where and with what a section was measured (stored beside its figures)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
        "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "dtype": "fp32", "r": r,
        "clock": "process CPU time" if CLOCK is time.process_time else "wall time",
    }


def update_results(path: Path, sections: dict) -> Path:
    """Replace ``sections`` in the results JSON at ``path`` (other sections kept), written atomically."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_layers(r: int, repeats: int, shapes: list[tuple[int, int, int]] | None = None) -> list[dict]:
    rows = bench_layers(r, repeats, shapes)
    print("### Per layer, forward + backward (median ms; MiB kept for backward)\n")
    print(layers_table({"env": environment(r), "repeats": repeats, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
