"""It learns: the default DreamBooth recipe, run in full on the tiny world, draws the striped subject for
held-out prompts where the base never does, without the stripes taking over the class prompt.

What is measured is what a user sees: the trainer's showroom rates (the held-out subject prompts and the class
check prompts of subject.json, 3 seeds each, read by the deterministic checker hra_diffusion.tiny.checker), and
the base model's on the same prompts and seeds. Figures are printed (pytest -s) and reported in
docs/dreambooth.md.

The whole-image denoising loss with the bare prompts ("a qwe star" on the held-out photos, "a star" on fresh
class images) is not asserted: with this recipe it moves the wrong way (+1.0% subject, +11.5% class, measured)
while the samples show the subject, because the photos are mostly background, which those prompts do not
name. eval/compare.py still reports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "train"))
import dreambooth_hra  # noqa: E402
from conftest import has_tiny_world  # noqa: E402

RECIPE = dreambooth_hra.parse_args([])  # the default tiny recipe (configs/dreambooth/tiny.yaml), run in full here
# Floors under the default recipe's measured rates (80% striped; class prompt 77% plain of 48 samples, 0% striped;
# docs/tiny-world.md): a run that does not learn the stripes, or lets them take over the class prompt or empty it,
# fails. The base: 0% striped subject; class prompt 85% plain, 0% striped.
MIN_SUBJECT_RATE = 0.65
MIN_CLASS_PLAIN = 0.65
MAX_CLASS_STRIPED = 0.1


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.skipif(not has_tiny_world(), reason="needs the embedded tiny world (assets/tiny-sd, assets/tiny-data/subject): "
                    "a random-weight stand-in model has no class prior to preserve")
def test_learns_the_subject_and_keeps_the_class(tmp_path, tiny_sd_dir, tiny_subject_dir):
    from hra_diffusion.tiny.measure import load_with_adapter, showroom_rates

    out = tmp_path / "run"
    result = dreambooth_hra.main(dreambooth_hra.parse_args([
        "--pretrained_model", str(tiny_sd_dir), "--subject_file", str(tiny_subject_dir / "subject.json"),
        "--output_dir", str(out), "--checkpointing_steps", "1000", "--validation_prompts", "[]", "--report_to", "none",
    ]))
    assert result.global_step == RECIPE.max_train_steps
    tuned = result.stats["showroom_rates"]
    assert tuned["n_subject"] == 30 and tuned["n_class"] == 48 and tuned["guidance_scale"] == RECIPE.validation_guidance_scale
    base = showroom_rates(load_with_adapter(tiny_sd_dir, None), tiny_subject_dir / "subject.json",
                          guidance=tuned["guidance_scale"])
    print(f"\nshowroom: striped subject base {base['subject_rate']:.0%} -> tuned {tuned['subject_rate']:.0%} "
          f"(context right in {tuned['context_rate']:.0%} of those); class prompt striped base "
          f"{base['class_striped_rate']:.0%} -> tuned {tuned['class_striped_rate']:.0%}, plain "
          f"{base['class_plain_rate']:.0%} -> {tuned['class_plain_rate']:.0%}; "
          f"{RECIPE.max_train_steps} steps in {result.seconds:.0f} s")
    assert base["subject_rate"] == 0.0  # the base never draws the striped subject
    assert tuned["subject_rate"] >= MIN_SUBJECT_RATE  # it learned the subject (a no-op trainer gives the base's 0%)
    assert tuned["class_striped_rate"] <= MAX_CLASS_STRIPED  # and the class prompt did not become the subject
    assert tuned["class_plain_rate"] >= MIN_CLASS_PLAIN  # nor stop drawing a plain one-colour object
    # the same rates are in the run's logs and model card
    assert (out / "logs" / "showroom_rates.json").is_file() and (out / "validation" / "showroom.png").is_file()
    assert "tiny-world showroom rates" in (out / "README.md").read_text()
    # and the saved adapter, loaded as `python -m hra_diffusion.tiny rates --adapter` loads it, reads the same
    # (the trainer's sampler, the same samples)
    again = showroom_rates(load_with_adapter(tiny_sd_dir, out / "adapter"), tiny_subject_dir / "subject.json",
                           guidance=tuned["guidance_scale"])
    keys = ("subject_rate", "context_rate", "class_plain_rate", "class_striped_rate")
    assert {k: again[k] for k in keys} == {k: tuned[k] for k in keys}
