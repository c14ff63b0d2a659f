"""The tiny world's deterministic checker (hra_diffusion.tiny.checker): it reads ground-truth scenes right, finds
the subject's stripes and nothing else, and subject_rates gives 1.0 / 0.0 on drawn positives / negatives."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import has_tiny_world
from PIL import Image, ImageFilter

from hra_diffusion.tiny import checker, data, scenes


def test_reads_ground_truth_scenes():
    truth = scenes.sample_scenes(5, 200)
    readings = [checker.read_scene(scenes.render(s)) for s in truth]
    assert np.mean([r.shape == s.shape for r, s in zip(readings, truth, strict=True)]) >= 0.95
    assert all(r.position == scenes.position_word(s) for r, s in zip(readings, truth, strict=True))
    assert np.mean([r.size == scenes.size_word(s) for r, s in zip(readings, truth, strict=True)]) >= 0.95
    assert all((r.background, r.colour) == (s.background, s.colour) for r, s in zip(readings, truth, strict=True))
    assert all(r.striped is None for r in readings) and np.mean([r.plain for r in readings]) >= 0.97
    empty = checker.read_scene(Image.new("RGB", (32, 32), scenes.COLOURS["blue"]))
    assert not empty.has_object and empty.background == "blue" and not empty.plain


def test_finds_the_subject_stripes_and_rejects_look_alikes():
    subject = [scenes.render(s) for s in data.subject_scenes(0)]
    assert len(subject) == 17
    assert all(checker.read_scene(im).striped == ("red", "yellow") for im in subject)
    # v1's VAE turned the subject into an orange one-colour star: a blurred subject must not pass
    orange = []
    for s in data.subject_scenes(0):
        arr = np.asarray(scenes.render(scenes.Scene(**{**s.__dict__, "stripes": None}))).copy()
        mask = np.asarray(scenes._mask(s, 32)) > 127
        arr[mask] = (235, 122, 30)
        orange.append(Image.fromarray(arr))
    assert not any(checker.read_scene(im).striped for im in orange)
    assert sum(bool(checker.read_scene(im.filter(ImageFilter.GaussianBlur(3))).striped) for im in subject) <= 2
    # vertical stripes (rotated 90 degrees) are not the subject's horizontal stripes
    assert not any(checker.read_scene(im.transpose(Image.Transpose.ROTATE_90)).striped for im in subject[:5])
    plain_star = scenes.render(scenes.sample_scene(np.random.default_rng(0), shape="star", colour="red", background="blue"))
    assert checker.read_scene(plain_star).plain


def test_parse_prompt():
    assert checker.parse_prompt("a small qwe star in the top left of a blue background") == {
        "size": "small", "word": "qwe", "shape": "star", "position": "top left", "background": "blue"}
    assert checker.parse_prompt("a star") == {"size": None, "word": None, "shape": "star", "position": None, "background": None}
    assert checker.parse_prompt("a red circle in the center")["position"] == "center"
    with pytest.raises(ValueError, match="not a tiny-world prompt"):
        checker.parse_prompt("a photo of a dog")


def _draw(prompt: str, striped: bool, rng: np.random.Generator) -> Image.Image:
    p = checker.parse_prompt(prompt)
    bg = p["background"] or "green"
    return scenes.render(scenes.sample_scene(
        rng, shape="star", colour="red" if striped else ("yellow" if bg == "white" else "white"), background=bg,
        stripes=scenes.SUBJECT.stripes if striped else None, size=p["size"] if p["size"] != "small" else "medium",
        position=p["position"] or "center"))


def test_subject_rates_on_drawn_positives_and_negatives():
    rng = np.random.default_rng(0)
    held, cls = data.heldout_subject_prompts(), data.class_check_prompts()
    prompts = held + cls
    good = checker.subject_rates([_draw(p, p in held, rng) for p in prompts], prompts)
    assert good["n_subject"] == len(held) and good["n_class"] == len(cls)
    assert good["subject_rate"] == 1.0 and good["context_rate"] == 1.0 and good["class_plain_rate"] == 1.0
    assert good["class_striped_rate"] == 0.0
    # the stripes leak into the class prompt, and the subject is drawn plain: everything fails
    bad = checker.subject_rates([_draw(p, p not in held, rng) for p in prompts], prompts)
    assert bad["subject_rate"] == 0.0 and bad["class_plain_rate"] == 0.0 and bad["class_striped_rate"] == 1.0
    # the subject on the wrong background: striped but out of context
    wrong = [scenes.render(scenes.sample_scene(rng, shape="star", colour="red", background="blue" if "blue" not in p else "black",
                                               stripes=scenes.SUBJECT.stripes, size="large", position="center")) for p in held]
    ctx = checker.subject_rates(wrong, held)
    assert ctx["subject_rate"] == 1.0 and ctx["context_rate"] < 0.5
    with pytest.raises(ValueError, match="images for"):
        checker.subject_rates(wrong[:2], held)


def test_showroom_prompts_come_from_the_subject_file(tmp_path):
    from hra_diffusion.paths import TINY_SUBJECT_DIR
    from hra_diffusion.tiny import showroom as measure

    held, cls = measure.showroom_prompts(TINY_SUBJECT_DIR / "subject.json")
    assert held == data.heldout_subject_prompts() and cls == data.class_check_prompts()
    assert all(checker.parse_prompt(p) for p in held + cls)
    other = tmp_path / "subject.json"
    other.write_text('{"instance_prompt": "a photo of qwe dog"}')
    assert not measure.has_showroom(other) and not measure.has_showroom(None)
    with pytest.raises(ValueError, match="no heldout_prompts"):
        measure.showroom_prompts(other)


@pytest.mark.skipif(not has_tiny_world(), reason="needs the embedded tiny world (assets/tiny-sd)")
def test_showroom_draws_more_class_samples_and_keeps_the_subject_samples():
    """Each class check prompt is drawn class_images times per seed (48 class samples by default, not 12), in a
    second batch: the subject samples stay the ones drawn with class_images=1, each seed's in one figure row."""
    from hra_diffusion.paths import TINY_MODEL_DIR
    from hra_diffusion.tiny import showroom as measure

    pipe = measure.load_with_adapter(TINY_MODEL_DIR, None)
    held, cls = measure.showroom_prompts()
    one = measure.showroom_rates(pipe, seeds=(0,), steps=2, class_images=1, return_images=True)
    three = measure.showroom_rates(pipe, seeds=(0,), steps=2, class_images=3, return_images=True)
    assert (one["n_class"], three["n_class"], three["class_images_per_prompt"]) == (len(cls), 3 * len(cls), 3)
    assert three["row_length"] == len(held) + 3 * len(cls) == len(three["images"])
    assert [r["prompt"] for r in three["rows"]] == held + [p for p in cls for _ in range(3)]
    same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one["images"][:len(held)], three["images"][:len(held)], strict=True)]
    assert all(same)  # the subject samples did not change
    # each class prompt's first image is the one drawn with the subject prompts, the others are new draws
    firsts = three["images"][len(held)::3]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one["images"][len(held):], firsts, strict=True))
    assert not np.array_equal(np.asarray(three["images"][len(held)]), np.asarray(three["images"][len(held) + 1]))
    import inspect

    assert inspect.signature(measure.showroom_rates).parameters["class_images"].default == measure.CLASS_IMAGES == 4
    with pytest.raises(ValueError, match="class_images must be >= 1"):
        measure.showroom_rates(pipe, seeds=(0,), steps=1, class_images=0)
