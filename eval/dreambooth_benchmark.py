"""DreamBooth benchmark for HRA: train -> generate -> score over a (subject, prompt) grid, at a fixed step.

    python eval/dreambooth_benchmark.py --dataset_dir dreambooth/dataset --base_model /models/sd15 \
        [--subjects dog,cat] [--prompts 0,1,2] [--max_train_steps 2005] [--all_checkpoints]

Protocol (eval/dreambooth_protocol.json): 30 subjects x 25 prompts, 4 images per prompt, DINO / CLIP-I over
all real x generated pairs, CLIP-T against the prompt with the identifier. The trainer runs once per
subject (the prompts do not change training; the official code's one run per prompt only served its
per-prompt checkpoint choice). The headline is the fixed step; ``--all_checkpoints`` adds a
best-over-checkpoints figure, labelled as selected on the test metrics (an optimistic oracle).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METRIC_ORDER = ("dino", "clip_i", "clip_t", "lpips")


@dataclass
class BenchmarkConfig:
    """Settings of one benchmark run (the command-line flags map one-to-one onto these fields)."""

    dataset_dir: str
    output_dir: str = "outputs/dreambooth-benchmark"
    protocol: str = str(REPO / "eval" / "dreambooth_protocol.json")
    subjects: list[str] = field(default_factory=list)  # empty: all 30
    prompts: list[int] = field(default_factory=list)  # prompt indices; empty: all 25
    recipe: str = str(REPO / "configs" / "dreambooth" / "sd15.yaml")
    base_model: str | None = None  # overrides the recipe's pretrained_model (e.g. a local SD 1.5 folder)
    max_train_steps: int = 2005  # the fixed step every number is reported at
    launcher: str = "accelerate launch"
    train_args: list[str] = field(default_factory=list)  # extra trainer overrides, e.g. --resolution 512
    num_images: int | None = None
    steps: int | None = None
    scheduler: str | None = None
    guidance: float | None = None
    seed: int | None = None
    metrics: str = "dino,clip_i,clip_t"
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    device: str | None = None
    all_checkpoints: bool = False
    dry_run: bool = False


def parse_args(argv: list[str] | None = None) -> BenchmarkConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="the DreamBooth dataset folder: <dir>/<subject>/*.jpg")
    p.add_argument("--output_dir", default=BenchmarkConfig.output_dir)
    p.add_argument("--protocol", default=BenchmarkConfig.protocol)
    p.add_argument("--subjects", default="", help="comma-separated subject names (default: all)")
    p.add_argument("--prompts", default="", help="comma-separated prompt indices 0-24 (default: all)")
    p.add_argument("--recipe", default=BenchmarkConfig.recipe, help="trainer YAML recipe")
    p.add_argument("--base_model", help="base model folder or hub id (default: the recipe's)")
    p.add_argument("--max_train_steps", type=int, default=BenchmarkConfig.max_train_steps)
    p.add_argument("--launcher", default=BenchmarkConfig.launcher, help="how to start the trainer")
    p.add_argument("--train_args", default="", help="extra trainer overrides, as one quoted string")
    for name, typ in (("num_images", int), ("steps", int), ("scheduler", str), ("guidance", float), ("seed", int)):
        p.add_argument(f"--{name}", type=typ, help="override the protocol's generation setting")
    for name in ("metrics", "dino_model", "clip_model", "clip_pretrained"):
        p.add_argument(f"--{name}", default=getattr(BenchmarkConfig, name))
    p.add_argument("--device")
    p.add_argument("--all_checkpoints", action="store_true", help="also score every saved checkpoint and report "
                   "the best one per run (selected on the test metrics: an optimistic oracle)")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the trainer commands only")
    a = p.parse_args(argv)
    return BenchmarkConfig(
        **{**vars(a), "subjects": [s for s in a.subjects.split(",") if s],
           "prompts": [int(i) for i in a.prompts.split(",") if i.strip()], "train_args": shlex.split(a.train_args)})


def load_protocol(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    for key in ("subjects", "prompts", "identifier", "instance_prompt", "class_prompt", "generation"):
        if key not in doc:
            raise ValueError(f"protocol {path} has no {key!r} entry")
    return doc


def plan(cfg: BenchmarkConfig, protocol: dict) -> list[dict]:
    """One entry per subject: its data folder, prompts (formatted with identifier and class), output folders."""
    known = {s["name"]: s for s in protocol["subjects"]}
    names = cfg.subjects or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown subject(s) {unknown}; the protocol has: {', '.join(known)}")
    out = []
    for name in names:
        subj = known[name]
        templates = protocol["prompts"][subj["kind"]]
        indices = cfg.prompts or list(range(len(templates)))
        bad = [i for i in indices if not 0 <= i < len(templates)]
        if bad:
            raise ValueError(f"prompt indices {bad} out of range 0-{len(templates) - 1}")
        fmt = {"identifier": protocol["identifier"], "class": subj["class"]}
        data = Path(cfg.dataset_dir) / name
        if not cfg.dry_run and not data.is_dir():
            raise FileNotFoundError(f"subject folder {str(data)!r} does not exist (is --dataset_dir the DreamBooth "
                                    "dataset folder, holding one folder per subject?)")
        run = Path(cfg.output_dir) / name
        out.append({
            "subject": name, "class": subj["class"], "kind": subj["kind"], "data": str(data),
            "instance_prompt": protocol["instance_prompt"].format(**fmt),
            "class_prompt": protocol["class_prompt"].format(**fmt),
            "prompts": [(i, templates[i].format(**fmt)) for i in indices],
            "train_dir": str(run / "train"),
            "class_dir": str(Path(cfg.output_dir) / "class_images" / subj["class"].replace(" ", "_")),
        })
    return out


def train_command(cfg: BenchmarkConfig, item: dict) -> list[str]:
    cmd = [*shlex.split(cfg.launcher), str(REPO / "train" / "dreambooth_hra.py"), "--config", cfg.recipe,
           "--instance_data_dir", item["data"], "--instance_prompt", item["instance_prompt"],
           "--class_prompt", item["class_prompt"], "--class_data_dir", item["class_dir"],
           "--output_dir", item["train_dir"], "--max_train_steps", str(cfg.max_train_steps),
           "--validation_prompts", "[]", "--resume_from_checkpoint", "latest"]  # continues a crashed run
    if cfg.base_model:
        cmd += ["--pretrained_model", cfg.base_model]
    return cmd + list(cfg.train_args)


def checkpoint_adapters(train_dir: Path) -> list[tuple[int, Path]]:
    """Adapter folders for every saved checkpoint (built from the checkpoint's unet.safetensors and the
    final adapter's config), so each can be sampled like the final one."""
    from safetensors.torch import load_file, save_file

    final = train_dir / "adapter"
    found = []
    for ckpt in sorted((train_dir / "checkpoints").glob("checkpoint-*")):
        if not (ckpt / "checkpoint.json").is_file() or not (ckpt / "unet.safetensors").is_file():
            continue
        step = int(ckpt.name.split("-")[1])
        out = train_dir / "checkpoint_adapters" / f"step-{step}"
        if not (out / "adapter_config.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            tensors = {k: v for k, v in load_file(str(ckpt / "unet.safetensors")).items() if k.endswith(".hra_u")}
            save_file(tensors, str(out / "adapter_model.safetensors"))
            doc = json.loads((final / "adapter_config.json").read_text())
            (out / "adapter_config.json").write_text(json.dumps({**doc, "checkpoint_step": step}, indent=2))
        found.append((step, out))
    return found


def run_subject(cfg: BenchmarkConfig, protocol: dict, item: dict, adapter: Path, tag: str, extractors: dict) -> list[dict]:
    """Generate the subject's prompts from ``adapter`` and score them; one row per (subject, prompt)."""
    from hra_diffusion.generate import GenerateConfig, generate
    from hra_diffusion.metrics.subject import score_subject
    from hra_diffusion.samples import MANIFEST

    gen = protocol["generation"]
    samples = Path(cfg.output_dir) / item["subject"] / f"samples-{tag}"
    if not (samples / MANIFEST).is_file():
        base = cfg.base_model or json.loads((adapter / "adapter_config.json").read_text()).get("base_model")
        generate(GenerateConfig(
            output_dir=str(samples), adapter=str(adapter), base_model=base,
            prompts=[p for _, p in item["prompts"]], reference_dir=item["data"],
            num_images_per_prompt=cfg.num_images or gen["num_images_per_prompt"], seed=gen["seed"] if cfg.seed is None else cfg.seed,
            steps=cfg.steps or gen["steps"], scheduler=cfg.scheduler or gen["scheduler"],
            guidance_scale=gen["guidance_scale"] if cfg.guidance is None else cfg.guidance, device=cfg.device,
            overwrite=True))
    result = score_subject(samples, metrics=cfg.metrics, device=extractors["device"], **extractors["models"])
    from hra_diffusion.metrics.report import write_outputs

    write_outputs(result, samples)
    rows = []
    for index, prompt in item["prompts"]:
        mine = [r for r in result.per_image if r["prompt"] == prompt and not r.get("skipped")]
        row = {"subject": item["subject"], "kind": item["kind"], "prompt_index": index, "prompt": prompt,
               "checkpoint": tag, "images": len(mine)}
        for m in result.summary:
            vals = [r[m] for r in mine if m in r]
            row[m] = sum(vals) / len(vals) if vals else float("nan")
        rows.append(row)
    return rows


def aggregate(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean over runs (subject, prompt): all, objects, live, and per subject."""
    groups: dict[str, list[dict]] = {"all": rows, "objects": [r for r in rows if r["kind"] == "object"],
                                     "live": [r for r in rows if r["kind"] == "live"]}
    for r in rows:
        groups.setdefault(r["subject"], []).append(r)
    table = []
    for name, members in groups.items():
        if not members:
            continue
        entry = {"group": name, "runs": len(members)}
        for m in metrics:
            vals = [r[m] for r in members if r.get(m) == r.get(m)]  # drop NaN
            entry[m] = sum(vals) / len(vals) if vals else float("nan")
        table.append(entry)
    return table


def best_over_checkpoints(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Per (subject, prompt), the checkpoint with the best sum of metrics each divided by its max over the
    run's checkpoints (the official code's choice). Uses the test metrics themselves: an oracle."""
    by_run: dict[tuple, list[dict]] = {}
    for r in rows:
        by_run.setdefault((r["subject"], r["prompt_index"]), []).append(r)

    def score(r: dict, candidates: list[dict]) -> float:
        total = 0.0
        for m in metrics:
            top = max(c[m] for c in candidates)
            sign = -1.0 if m == "lpips" else 1.0  # lower LPIPS is better
            total += sign * r[m] / top if top else 0.0
        return total

    return [max(c, key=lambda r, c=c: score(r, c)) for c in by_run.values()]


def format_table(table: list[dict], metrics: list[str], title: str) -> str:
    head = f"| {'group':<20} | runs | " + " | ".join(f"{m:>7}" for m in metrics) + " |"
    lines = [f"### {title}", "", head, "|" + "-" * 22 + "|------|" + "|".join("-" * 9 for _ in metrics) + "|"]
    for e in table:
        lines.append(f"| {e['group']:<20} | {e['runs']:>4} | " + " | ".join(f"{e[m]:7.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def main(cfg: BenchmarkConfig) -> dict:
    protocol = load_protocol(cfg.protocol)
    items = plan(cfg, protocol)
    if cfg.dry_run:
        for item in items:
            print(shlex.join(train_command(cfg, item)))
            print(f"  then generate {len(item['prompts'])} prompts x {cfg.num_images or protocol['generation']['num_images_per_prompt']} "
                  f"images, score against {item['data']}")
        return {"plan": items}
    from hra_diffusion.metrics.extractors import load_clip, load_dino
    from hra_diffusion.metrics.result import parse_metric_names
    from hra_diffusion.metrics.subject import SUBJECT_METRICS, default_subject_metrics
    from hra_diffusion.utils import default_device

    metrics = parse_metric_names(cfg.metrics, SUBJECT_METRICS, default_subject_metrics())
    device = default_device(cfg.device)
    models: dict = {}
    if "dino" in metrics:  # load once, reuse for every subject
        models["dino"] = load_dino(cfg.dino_model, device=device)
    if "clip_i" in metrics or "clip_t" in metrics:
        models["clip"] = load_clip(cfg.clip_model, cfg.clip_pretrained, device=device)
    extractors = {"device": device, "models": models}

    fixed_rows: list[dict] = []
    ckpt_rows: list[dict] = []
    for item in items:
        train_dir = Path(item["train_dir"])
        adapter = train_dir / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            cmd = train_command(cfg, item)
            print("+ " + shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
        fixed_rows += run_subject(cfg, protocol, item, adapter, f"step{cfg.max_train_steps}", extractors)
        if cfg.all_checkpoints:
            ckpt_rows += [dict(r) for r in fixed_rows if r["subject"] == item["subject"]]
            for step, ckpt in checkpoint_adapters(train_dir):
                if step != cfg.max_train_steps:
                    ckpt_rows += run_subject(cfg, protocol, item, ckpt, f"step{step}", extractors)

    out = Path(cfg.output_dir)
    fixed = aggregate(fixed_rows, metrics)
    text = [format_table(fixed, metrics, f"Fixed step {cfg.max_train_steps} (the headline)")]
    result = {"config": asdict(cfg), "metrics": metrics, "fixed_step": fixed, "runs": fixed_rows}
    if cfg.all_checkpoints:
        best = aggregate(best_over_checkpoints(ckpt_rows, metrics), metrics)
        text.append(format_table(best, metrics, "Best over checkpoints - SELECTED ON THE TEST METRICS (oracle, "
                                                "optimistic; not comparable with a fixed step)"))
        result["best_over_checkpoints_selected_on_test_metrics"] = best
        result["checkpoint_runs"] = ckpt_rows
    report = "\n\n".join(text) + "\n"
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "results.md").write_text(report)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fixed_rows[0]))
        writer.writeheader()
        writer.writerows(fixed_rows)
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as err:
        print(f"dreambooth_benchmark: error: {err}", file=sys.stderr)
        sys.exit(2)
