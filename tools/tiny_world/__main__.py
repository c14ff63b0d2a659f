"""``python -m tools.tiny_world build|data|measure|figure|build-extractors|probe``: rebuild the tiny world's model
and/or synthetic data, re-measure a built model's quality figures, draw its labelled sample grid, train its stand-in
DINO and CLIP feature extractors, or probe a UNet-training lever (which caption words a fresh UNet learns to use)."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from hra_diffusion.paths import TINY_DATA_DIR, TINY_EXTRACTORS_DIR, TINY_MODEL_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.tiny_world", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the tiny pipeline (VAE, CLIP text encoder, UNet) and write the data")
    b.add_argument("--out", type=Path, default=TINY_MODEL_DIR, help="pipeline folder to write (default assets/tiny-sd)")
    b.add_argument("--data-out", type=Path, default=TINY_DATA_DIR, help="data folder (default assets/tiny-data)")
    b.add_argument("--skip-data", action="store_true", help="only train and write the model")
    b.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training step count (tests: 0.02)")
    b.add_argument("--quick", action="store_true", help="a seconds-long smoke build (tiny pool, batches, eval)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="write a resumable build state here every few hundred steps (e.g. /tmp/tiny-build)")
    b.add_argument("--resume", action="store_true", help="continue from the state in --checkpoint-dir")
    d = sub.add_parser("data", help="only regenerate the synthetic data (subject + control sets)")
    d.add_argument("--data-out", type=Path, default=TINY_DATA_DIR)
    d.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="re-measure a built model's quality figures and update its build_report.json")
    m.add_argument("--model", type=Path, default=TINY_MODEL_DIR)
    f = sub.add_parser("figure", help="a labelled grid of the base model's samples (docs figure)")
    f.add_argument("--model", type=Path, default=TINY_MODEL_DIR)
    f.add_argument("--out", type=Path, default=TINY_MODEL_DIR.parent / "figures" / "tiny-world-samples.png")
    x = sub.add_parser("build-extractors", help="train the tiny world's stand-in DINO and CLIP (what `hra-diffusion "
                       "score subject` uses for tiny-world samples) and write them with a build report")
    x.add_argument("--out", type=Path, default=TINY_EXTRACTORS_DIR, help="folder to write (default assets/tiny-extractors)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    x.add_argument("--quick", action="store_true", help="a seconds-long smoke build (tiny pools and step counts)")
    x.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="where the resumable state goes (default: .<out name>.build-state beside --out)")
    x.add_argument("--resume", action="store_true", help="continue the build whose state is in the checkpoint folder")
    x.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="stop after this many training steps in this run, leaving a state to --resume from")
    x.add_argument("--quiet", action="store_true")
    q = sub.add_parser("probe", help="train a fresh UNet + text encoder on a built world's latents and print which "
                       "caption words it uses every few hundred steps (compare build levers cheaply)")
    q.add_argument("--steps", type=int, default=1500)
    q.add_argument("--every", type=int, default=250, help="read word use every this many steps (and at the end)")
    q.add_argument("--out", type=Path, default=None, help="folder for results.json and the final EMA weights")
    q.add_argument("--model", type=Path, default=TINY_MODEL_DIR, help="whose VAE and tokenizer to use")
    q.add_argument("--unet", choices=("default", "three-level"), default="default")
    q.add_argument("--conv-in-kernel", type=int, default=3)
    q.add_argument("--freeze-text-encoder", action="store_true", help="keep the text encoder at its random init")
    q.add_argument("--init", type=Path, default=None, help="start from a probe's --out weights instead of scratch")
    q.add_argument("--layout-caption-rate", type=float, default=None, help="share of captions with size/position words")
    q.add_argument("--text-lr", type=float, default=None)
    q.add_argument("--high-noise-share", type=float, default=None,
                   help="share of timesteps drawn from [--high-noise-from, T) (default: the build's)")
    q.add_argument("--high-noise-from", type=int, default=None)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--n-probe", type=int, default=180, help="held-out scenes per word-use reading")
    q.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def build_extractors_command(args: argparse.Namespace) -> None:
    import json

    from .extractor_models import ExtractorConfig, quick_config
    from .train_extractors import BuildInterrupted, build_extractors, default_state_dir

    cfg = quick_config(seed=args.seed, threads=args.threads) if args.quick else ExtractorConfig(seed=args.seed,
                                                                                             threads=args.threads)
    try:
        report = build_extractors(args.out, cfg, verbose=not args.quiet, checkpoint_dir=args.checkpoint_dir,
                                  resume=args.resume, stop_after=args.stop_after)
    except (BuildInterrupted, KeyboardInterrupt) as err:
        state = args.checkpoint_dir or default_state_dir(args.out)
        again = " ".join(["python -m tools.tiny_world build-extractors", *(["--quick"] if args.quick else []),
                          *([f"--out {args.out}"] if args.out != TINY_EXTRACTORS_DIR else []),
                          *([f"--seed {args.seed}"] if args.seed else []),
                          *([f"--checkpoint-dir {args.checkpoint_dir}"] if args.checkpoint_dir else []), "--resume"])
        raise SystemExit(f"{err or 'interrupted'}; the build state is in {state} (the last checkpoint). Continue with: "
                         f"{again}") from None
    shown = {k: report[k] for k in ("zero_shot", "dino", "clip_i", "clip_t", "timings") if k in report}
    print(json.dumps(shown, indent=2))
    print(f"wrote {args.out} (clip/, dino/, build_report.json)")


def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "build-extractors":
        build_extractors_command(args)
        return
    if args.command == "probe":
        from .build import BuildConfig
        from .probe import run_probe

        over = {k: v for k, v in (("layout_caption_rate", args.layout_caption_rate), ("text_lr", args.text_lr),
                                  ("high_noise_share", args.high_noise_share), ("high_noise_from", args.high_noise_from))
                if v is not None}
        run_probe(args.steps, args.every, args.out, args.model, args.unet, args.conv_in_kernel,
                  args.freeze_text_encoder, args.init, args.n_probe, BuildConfig(threads=args.threads, **over),
                  verbose=not args.quiet)
        return
    if args.command == "figure":
        from hra_diffusion.paths import require_tiny

        from .build import load_pipeline
        from .figures import samples_figure

        path = samples_figure(load_pipeline(require_tiny(args.model) if args.model == TINY_MODEL_DIR else args.model), args.out)
        print(f"wrote {path}")
        return
    if args.command == "measure":
        import json

        from hra_diffusion.paths import require_tiny

        from .build import BuildConfig, measure_quality

        path = require_tiny(args.model) if args.model == TINY_MODEL_DIR else args.model
        report_path = path / "build_report.json"
        if not report_path.is_file():
            raise SystemExit(f"{report_path} not found: `measure` needs a folder written by `python -m tools.tiny_world build`")
        report = json.loads(report_path.read_text())
        known = {f.name for f in fields(BuildConfig)}
        cfg = BuildConfig(**{k: v for k, v in report["config"].items() if k in known})
        report.update(measure_quality(path, cfg))
        tmp = report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(report_path)
        print(json.dumps({k: v for k, v in report.items() if k not in ("colour_following", "config")}, indent=2))
        return
    if args.command == "build":
        from .build import BuildConfig, build_model, quick_config

        base = quick_config() if args.quick else BuildConfig()
        kw = {f.name: getattr(base, f.name) for f in fields(BuildConfig)}
        kw.update(seed=args.seed, threads=args.threads, steps_scale=args.steps_scale * base.steps_scale)
        if args.resume and args.checkpoint_dir is None:
            raise SystemExit("--resume needs --checkpoint-dir (the folder the interrupted build wrote its state to)")
        build_model(args.out, BuildConfig(**kw), verbose=not args.quiet, checkpoint_dir=args.checkpoint_dir,
                    resume=args.resume)
        if args.skip_data:
            return
    from .write_data import write_all

    write_all(args.data_out, seed=args.seed)
    print(f"wrote the tiny-world data to {args.data_out}")


if __name__ == "__main__":
    main(parse_args())
