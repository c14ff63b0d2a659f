"""Shared pytest fixtures: a tiny Stable Diffusion pipeline folder and a tiny subject, offline, on CPU.

When the embedded tiny world (assets/tiny-sd, assets/tiny-data/subject) exists it is used; otherwise a
random-weight pipeline of diffusers' test sizes and a few generated images stand in.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

ASSET_SD = REPO / "assets" / "tiny-sd"
ASSET_SUBJECT = REPO / "assets" / "tiny-data" / "subject"


# The default DreamBooth recipe (configs/dreambooth/tiny.yaml) is tuned for the tiny world's subject: HRA r 16 on
# convs too, text-encoder HRA, a masked loss over the subject's masks. Tests that train a generated subject on a
# random tiny pipeline for a few steps pin the plain settings first (their own flags come after and win).
# class images drawn by the base into <output_dir>/class_images, as diffusers' script does
GENERATED_CLASS_ARGS = ["--class_data_dir", "null", "--class_caption_extension", "null", "--class_caption_dropout", "0"]
PLAIN_DREAMBOOTH_ARGS = ["--r", "8", "--target_modules", '["to_q", "to_k", "to_v", "to_out.0"]',
                         "--train_text_encoder", "false", "--mask_loss_weight", "0", *GENERATED_CLASS_ARGS]


def has_tiny_world() -> bool:
    """True when the embedded tiny world (pipeline + subject) is in assets/."""
    return (ASSET_SD / "model_index.json").is_file() and (ASSET_SUBJECT / "subject.json").is_file()


def run_card_snippet(card: str, monkeypatch, replacements: dict[str, str] | None = None) -> dict:
    """Run a model card's ```python usage snippet as written (after ``replacements`` of placeholder text), from
    the repository root, where the recipes' relative paths start; returns the names it defined (pipe, image...)."""
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in (replacements or {}).items():
        assert old in snippet, f"{old!r} is not in the card's snippet"
        snippet = snippet.replace(old, new)
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(compile(snippet, "model card snippet", "exec"), scope)
    return scope


def _shape_image(size: int, colour: tuple[int, int, int], bg: tuple[int, int, int], shift: int) -> Image.Image:
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = bg
    lo, hi = size // 4 + shift, 3 * size // 4 + shift
    arr[lo:hi, lo:hi] = colour
    return Image.fromarray(arr)


def make_subject_dir(root: Path, size: int = 32, n_train: int = 4, n_heldout: int = 2) -> Path:
    """A subject folder in the tiny world's layout: train/, heldout/ and subject.json (a red square)."""
    backgrounds = [(20, 20, 160), (20, 140, 20), (200, 200, 30), (90, 90, 90), (150, 40, 150), (30, 160, 160)]
    for split, n, offset in (("train", n_train, 0), ("heldout", n_heldout, n_train)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            bg = backgrounds[(i + offset) % len(backgrounds)]
            _shape_image(size, (220, 30, 30), bg, shift=(i % 3) - 1).save(root / split / f"{i:02d}.png")
    (root / "subject.json").write_text(json.dumps({
        "class_noun": "square",
        "identifier": "qwe",
        "instance_prompt": "a photo of qwe square",
        "class_prompt": "a photo of square",
        "validation_prompts": ["a photo of qwe square", "a photo of qwe square on a green background"],
    }))
    return root


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline folder: the embedded tiny-sd, or a random one of diffusers' test sizes."""
    if (ASSET_SD / "model_index.json").is_file():
        return ASSET_SD
    from tiny_models import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_random_sd_dir(tmp_path_factory) -> Path:
    """Always the random-weight diffusers-test-size pipeline (fastest; for plumbing tests)."""
    from tiny_models import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-random-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A random-weight SDXL-shaped StableDiffusionXLPipeline folder (two text encoders, text/time conditioning)."""
    from tiny_models import tiny_sdxl_pipeline_dir

    return tiny_sdxl_pipeline_dir(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_subject_dir(tmp_path_factory) -> Path:
    """A subject folder (train/, heldout/, subject.json): the embedded one, or generated squares."""
    if (ASSET_SUBJECT / "subject.json").is_file():
        return ASSET_SUBJECT
    return make_subject_dir(tmp_path_factory.mktemp("subject"))


@pytest.fixture(scope="session")
def generated_subject_dir(tmp_path_factory) -> Path:
    """Always the small generated subject (4 train, 2 held-out 32 px images)."""
    return make_subject_dir(tmp_path_factory.mktemp("gen-subject"))
