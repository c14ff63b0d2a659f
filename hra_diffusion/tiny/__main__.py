"""``python -m hra_diffusion.tiny rates --adapter DIR``: the DreamBooth showroom rates of an adapter on the tiny world
(striped subject in the asked context, the class prompt still plain). Rebuilding the world: ``python -m tools.tiny_world``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..paths import TINY_DATA_DIR, TINY_MODEL_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hra_diffusion.tiny", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rates", help="DreamBooth showroom rates of an adapter (striped subject in context, prior kept)")
    r.add_argument("--model", type=Path, default=TINY_MODEL_DIR)
    r.add_argument("--adapter", type=Path, default=None, help="a DreamBooth adapter folder (none: the base alone)")
    r.add_argument("--subject-file", type=Path, default=TINY_DATA_DIR / "subject" / "subject.json")
    r.add_argument("--guidance", type=float, default=2.0,
                   help="classifier-free guidance scale (default 2.0, the default recipe's validation_guidance_scale)")
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--grid", type=Path, default=None, help="also save the labelled samples as a PNG grid")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .showroom import format_rates, load_with_adapter, rates_figure, showroom_rates

    pipe = load_with_adapter(args.model, args.adapter)
    rates = showroom_rates(pipe, args.subject_file, steps=args.steps, guidance=args.guidance, return_images=bool(args.grid))
    if args.grid:
        rates_figure(rates.pop("images"), rates["rows"], args.grid, cols=rates.pop("row_length"))
    print(json.dumps({k: v for k, v in rates.items() if k != "rows"}, indent=2))
    print(format_rates(rates))


if __name__ == "__main__":
    main(parse_args())
