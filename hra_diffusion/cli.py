"""The ``hra-diffusion`` command: generate images from an adapter, score sample sets, export adapters.

One ``add_<name>_parser`` / ``run_<name>`` pair per subcommand; add a new one to SUBCOMMANDS.
Heavy imports (torch, diffusers, open_clip) happen inside the run functions, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import add_debug_flag, run_guarded
from .utils import cli_command, default_device

__all__ = ["build_parser", "main", "SUBCOMMANDS"]

EPILOG = """examples:
  hra-diffusion generate --adapter out/dog-hra --prompt "a photo of qwe dog on the beach" \\
      --num-images 4 --scheduler dpm-solver --steps 25 --reference-dir data/dog --out samples/dog
  hra-diffusion score subject --samples samples/dog
  hra-diffusion generate --adapter out/canny-hra --prompts-file data/heldout/metadata.jsonl \\
      --scheduler ddim --steps 50 --guidance 9 --out samples/canny
  hra-diffusion score control --samples samples/canny --metrics canny
  hra-diffusion export --adapter out/dog-hra --to kohya --out dog-hra.safetensors

errors print one line; --debug (or HRA_DIFFUSION_DEBUG=1) shows the traceback.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; a flag's default shown when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, True, [], argparse.SUPPRESS) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


# ---- generate ------------------------------------------------------------------------------------

def add_generate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .generate import DTYPES
    from .sampling import SCHEDULERS

    p = sub.add_parser(
        "generate", help="make images from a base model + HRA adapter (PNGs + manifest.jsonl)",
        description="Generate images from a Stable Diffusion base model with an adapter: HRA (ours from either "
                    "trainer, or a PEFT HRA adapter; <adapter>/text_encoder/ is loaded too when present), or a "
                    "PEFT LoRA/OFT/BOFT baseline in PEFT's format (a control baseline's condition_encoder."
                    "safetensors beside it is loaded too). "
                    "Writes PNGs and manifest.jsonl, which `hra-diffusion score` reads.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors); "
                                     "leave out to sample the base model alone")
    p.add_argument("--base", dest="base_model", help="base model: diffusers folder or hub id (default: the "
                   "base the adapter was trained on, as it recorded it; with no record, the tiny world)")
    p.add_argument("--vae", dest="vae_model", help="a separate VAE (AutoencoderKL folder or hub id, e.g. "
                   "madebyollin/sdxl-vae-fp16-fix; default: the one the adapter was trained with "
                   "(--pretrained_vae_model), else the base's)")
    p.add_argument("--out", "--output-dir", dest="output_dir", required=True, help="output folder: new or empty; "
                   "a folder an interrupted run of the same command left is completed (only the missing images "
                   "are made); must not overlap any input")
    g = p.add_argument_group("prompts and conditions")
    g.add_argument("--prompt", dest="prompts", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help=".txt with one prompt per line, or .jsonl with prompt/text, "
                   "condition/conditioning_image, condition_source/image, label, reference_dir")
    g.add_argument("--condition", dest="conditions", action="append", default=[], help="condition image for a "
                   "control adapter (repeatable: one per prompt, or one for all)")
    g.add_argument("--reference-dir", help="real subject images, recorded in the manifest for `score subject`")
    g.add_argument("--negative-prompt")
    s = p.add_argument_group("sampling")
    s.add_argument("--num-images", dest="num_images_per_prompt", type=int, default=4, help="images per prompt")
    s.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed + k")
    s.add_argument("--seeds", type=int, nargs="+", help="explicit seeds, one per image (overrides --num-images)")
    s.add_argument("--steps", type=int, help="denoising steps (default: what the adapter's run validated with, "
                   "else 25)")
    s.add_argument("--guidance", dest="guidance_scale", type=float, help="classifier-free guidance (default: the "
                   "adapter's validation scale, else 7.5)")
    s.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the adapter's validation "
                   "sampler, else the base model's own)")
    s.add_argument("--height", type=int, help="image height (default: the model's native size)")
    s.add_argument("--width", type=int, help="image width (default: the model's native size)")
    s.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    r = p.add_argument_group("runtime")
    r.add_argument("--merge", action="store_true", help="fold an HRA adapter into the weights (W <- W H) before "
                   "sampling instead of running it live; same images, faster (PEFT LoRA/OFT/BOFT: always folded)")
    r.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: cuda when available, else cpu)")
    r.add_argument("--dtype", choices=DTYPES, help="default: fp16 on cuda, fp32 on cpu")
    r.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                   help="do not load the base model's safety checker")
    r.add_argument("--overwrite", action="store_true", help="start again in a folder that holds other "
                   "images: removes only the files generate wrote there (other files are kept)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def run_generate(args: argparse.Namespace) -> int:
    from .generate import GenerateConfig, generate

    fields = GenerateConfig.__dataclass_fields__
    cfg = GenerateConfig(**{k: v for k, v in vars(args).items() if k in fields})
    out = generate(cfg, log=lambda msg: print(msg, file=sys.stderr))
    print(f"wrote {out}/ (images + manifest.jsonl); score it with: {score_hint(out)}")
    return 0


def score_hint(out: Path) -> str:
    """The score command for a samples folder, runnable as printed: control samples (the manifest says which
    adapter made them) are scored against their conditions; subject samples without reference photos get the
    one metric that needs none, and how to add the photos."""
    first: dict = {}
    try:
        with (Path(out) / "manifest.jsonl").open(encoding="utf-8") as fh:
            first = json.loads(fh.readline() or "{}")
    except (OSError, ValueError):
        pass

    def command(kind: str) -> str:
        return f"{cli_command()} score {kind} --samples {shlex.quote(str(out))}"

    if first.get("adapter_kind") == "control":
        return command("control")
    if first.get("reference_dir"):
        return command("subject")
    return (command("subject") + " --metrics clip_t (add --reference <the subject's photos> for DINO, "
            "CLIP-I and LPIPS)")


# ---- score ---------------------------------------------------------------------------------------

def _add_score_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="folder written by `generate` (images + manifest.jsonl)")
    p.add_argument("--out", help="where metrics.json, per_image.csv and report.html go (default: --samples)")
    p.add_argument("--metrics", help="comma-separated metric names (see above)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_score_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = sub.add_parser("score", help="score a sample set (subject fidelity or control consistency)",
                       formatter_class=HelpFormatter,
                       description="Score a folder written by `generate`; writes metrics.json, per_image.csv and "
                                   "a self-contained report.html.")
    kinds = p.add_subparsers(dest="score_kind", metavar="{subject,control}", required=True)
    subj = kinds.add_parser(
        "subject", formatter_class=fmt, help="DINO, CLIP-I, CLIP-T (and LPIPS) against real subject images",
        description="The DreamBooth/HRA protocol:\n"
                    "  dino    DINO ViT-S/16 CLS-token cosine, mean over ALL real x generated pairs\n"
                    "  clip_i  CLIP image-image cosine, mean over ALL real x generated pairs\n"
                    "  clip_t  CLIP image-text cosine with each image's prompt (identifier included)\n"
                    "  lpips   LPIPS distance over the same pairs (only when the lpips package is installed)\n"
                    "All-black (safety-filtered) images are skipped and counted. Default: all of the above.\n"
                    "Samples of the tiny world (base assets/tiny-sd, from the manifest) are scored with its stand-in\n"
                    "DINO and CLIP (assets/tiny-extractors), others with the real ones; the flags always win.")
    _add_score_common(subj)
    subj.add_argument("--reference", help="real subject images (default: reference_dir of the manifest)")
    subj.add_argument("--dino-model", default=None, help="hub id or local folder (default: facebook/dino-vits16; "
                      "for samples of the tiny world its stand-in, assets/tiny-extractors/dino)")
    subj.add_argument("--clip-model", default=None, help="open_clip model name, or local-dir:/path (default: "
                      "ViT-L-14; for samples of the tiny world its stand-in, assets/tiny-extractors/clip)")
    subj.add_argument("--clip-pretrained", default="openai", help="open_clip pretrained tag, or a local "
                      ".safetensors checkpoint")
    subj.add_argument("--lpips-net", default="vgg", help="LPIPS backbone (vgg, alex, squeeze)")
    subj.add_argument("--batch-size", type=int, default=16, help="images per feature-extraction batch")
    subj.add_argument("--cache-dir", help="feature cache (default: $HRA_DIFFUSION_CACHE or ~/.cache/hra-diffusion)")
    ctrl = kinds.add_parser(
        "control", formatter_class=fmt, help="Canny F1/IoU and (with weights) HED/lineart SSIM, depth RMSE, "
                                            "segmentation mIoU, landmark error",
        description="The ControlNet++/OFT protocol: the generated image's map against the condition's\n"
                    "(made from 'condition_source' when the manifest has it, else the condition image itself):\n"
                    "  canny      F1 and IoU of Canny(100, 200) edges (weight-free; the default)\n"
                    "  hed        SSIM of HED soft edges          lineart  SSIM of lineart maps\n"
                    "  depth      RMSE of DPT depth (0-255)       seg      SegFormer ADE20K mIoU\n"
                    "  landmarks  68-point face-landmark L2 error (face-alignment package)")
    _add_score_common(ctrl)
    for name, default in (("hed", "lllyasviel/Annotators"), ("lineart", "lllyasviel/Annotators"),
                          ("depth", "Intel/dpt-hybrid-midas"), ("seg", "nvidia/segformer-b4-finetuned-ade-512-512")):
        ctrl.add_argument(f"--{name}-model", default=default, help=f"{name} weights: hub id or local folder")
    ctrl.add_argument("--skip-unavailable", action="store_true", help="note metrics whose weights cannot be "
                      "loaded in the report instead of failing")
    return p


def _progress(enabled: bool) -> Callable | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc="score", unit="batch", leave=False)


def run_score(args: argparse.Namespace) -> int:
    from .metrics.report import write_outputs

    if args.score_kind == "subject":
        from .metrics.subject import score_subject

        result = score_subject(
            args.samples, reference_dir=args.reference, metrics=args.metrics, dino=args.dino_model,
            clip=args.clip_model, clip_pretrained=args.clip_pretrained, lpips_model=args.lpips_net,
            cache_dir=args.cache_dir, batch_size=args.batch_size, device=default_device(args.device),
            progress=_progress(args.progress),
        )
    else:
        from .metrics.control_metrics import score_control

        models = {k: getattr(args, f"{k}_model") for k in ("hed", "lineart", "depth", "seg")}
        result = score_control(args.samples, metrics=args.metrics, models=models,
                               skip_unavailable=args.skip_unavailable, device=default_device(args.device),
                               progress=_progress(args.progress))
    paths = write_outputs(result, args.out or args.samples)
    width = max(len(k) for k in result.summary)
    for key, value in result.summary.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(", ".join(f"{k}: {v}" for k, v in result.counts.items()))
    for name, what in (result.info.get("extractors") or {}).items():  # which DINO / CLIP gave the numbers
        print(f"{name}: {what}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---- export --------------------------------------------------------------------------------------

def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .adapters.export import EXPORT_DTYPES, EXPORT_FORMATS

    p = sub.add_parser(
        "export", help="an adapter as a LoRA file (diffusers or kohya/A1111/ComfyUI), PEFT, or a merged model",
        formatter_class=HelpFormatter,
        description="Export an adapter folder for tools that do not know HRA. An HRA adapter is an exact rank-r "
                    "LoRA of the base it was trained on (W H = W + B A, A = U^T, B = -W U T), so:\n"
                    "  lora    diffusers' pytorch_lora_weights.safetensors (pipe.load_lora_weights)\n"
                    "  kohya   one .safetensors with lora_unet_/lora_te_ keys (SDXL: LDM names, lora_te1_/lora_te2_;\n"
                    "          AUTOMATIC1111, ComfyUI, sd-scripts)\n"
                    "  peft    PEFT's HRA folder (PeftModel.from_pretrained; needs no base)\n"
                    "  merged  the base's UNet folder with the adapter folded in (+ text_encoder/)\n"
                    "lora/kohya/merged are exact for the base they are computed from (--base); at a LoRA strength "
                    "other than 1, or on another checkpoint, the result is no longer HRA. A PEFT LoRA baseline "
                    "converts exactly; OFT/BOFT have no LoRA form. See docs/export.md.",
    )
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors; "
                   "its text_encoder/ part is exported too)")
    p.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="output format")
    p.add_argument("--out", required=True, help="lora: a folder (or a .safetensors file); kohya: a .safetensors "
                   "file; peft, merged: a folder")
    p.add_argument("--base", help="base pipeline the adapter was trained on: diffusers folder or hub id "
                   "(default: the adapter's recorded base; not needed for peft)")
    p.add_argument("--dtype", default="fp32", choices=tuple(EXPORT_DTYPES), help="dtype of the written tensors "
                   "(computed in fp64/fp32, cast at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def run_export(args: argparse.Namespace) -> int:
    from .adapters.export import export_adapter

    written = export_adapter(args.adapter, args.to, args.out, base=args.base, dtype=args.dtype,
                             overwrite=args.overwrite)
    hints = {"lora": f"load it with pipe.load_lora_weights({str(written)!r})",
             "kohya": "copy it to ComfyUI/models/loras or stable-diffusion-webui/models/Lora",
             "peft": f"load it with {cli_command()} generate --adapter {shlex.quote(str(written))}, or PEFT",
             "merged": f"load it with UNet2DConditionModel.from_pretrained({str(written)!r})"}
    print(f"wrote {written} ({args.to}, {args.dtype}); {hints[args.to]}")
    return 0


SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {
    "generate": (add_generate_parser, run_generate),
    "score": (add_score_parser, run_score),
    "export": (add_export_parser, run_export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hra-diffusion", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Householder Reflection Adaptation (HRA) for Stable Diffusion: generate from adapters, "
                    "score sample sets, export adapters as LoRA / PEFT / merged models.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for add, run in SUBCOMMANDS.values():
        add(sub).set_defaults(func=run)
    add_debug_flag(parser)  # every subcommand takes --debug too
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the subcommand inside the error boundary: an
    expected error (bad input, unreadable file, weights not here, disk full) prints one line and returns
    2; ``--debug`` or $HRA_DIFFUSION_DEBUG=1 adds the traceback; a bug raises with its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(args.func, args, prog=f"hra-diffusion {args.command}", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
