"""Metric maths on constructed inputs, extractors on the real architectures with random weights, the
subject protocol (all pairs, CLIP-T, black images), the feature cache, and control metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_score import random_image, save_png, tiny_extractors, write_samples
from PIL import Image

from hra_diffusion.metrics import functional as M
from hra_diffusion.metrics.cache import FeatureCache, file_hash
from hra_diffusion.metrics.control_metrics import canny_edges, score_control
from hra_diffusion.metrics.extractors import WeightsUnavailableError, load_clip, load_dino
from hra_diffusion.metrics.subject import score_subject
from hra_diffusion.samples import load_image

# ---- pure metric maths -------------------------------------------------------------------------


def test_pair_average_matches_hand_computation():
    real = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    gen = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    by_hand = []
    for r in real.tolist():
        for g in gen.tolist():
            dot = r[0] * g[0] + r[1] * g[1]
            by_hand.append(dot / (np.hypot(*r) * np.hypot(*g)))
    assert M.mean_pairwise_cosine(real, gen) == pytest.approx(np.mean(by_hand), abs=1e-6)
    assert M.pairwise_cosine(real, gen).shape == (3, 2)
    # not the cosine of the mean features (a different, wrong protocol)
    wrong = float(torch.nn.functional.cosine_similarity(real.mean(0), gen.mean(0), dim=0))
    assert abs(M.mean_pairwise_cosine(real, gen) - wrong) > 1e-2
    with pytest.raises(ValueError, match="at least one"):
        M.mean_pairwise_cosine(real[:0], gen)


def test_edge_f1_iou_identical_disjoint_and_partial():
    a = torch.zeros(8, 8, dtype=torch.bool)
    a[2, 1:5] = True  # 4 edge pixels
    assert M.edge_f1_iou(a, a) == (1.0, 1.0)
    b = torch.zeros_like(a)
    b[6, 1:5] = True
    assert M.edge_f1_iou(a, b) == (0.0, 0.0)
    c = torch.zeros_like(a)
    c[2, 3:7] = True  # overlaps a in 2 pixels: tp 2, fp 2, fn 2
    f1, iou = M.edge_f1_iou(c, a)
    assert f1 == pytest.approx(2 * 2 / (2 * 2 + 2 + 2)) and iou == pytest.approx(2 / 6)
    assert M.edge_f1_iou(torch.zeros_like(a), torch.zeros_like(a)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="differ in size"):
        M.edge_f1_iou(a, a[:4])


def test_edge_f1_tolerant_forgives_a_one_pixel_shift_only():
    a = torch.zeros(12, 12, dtype=torch.bool)
    a[3, 2:9] = True
    shifted = torch.roll(a, 1, dims=0)  # the same edge one row lower
    far = torch.roll(a, 4, dims=0)
    assert M.edge_f1_tolerant(a, a, 1) == 1.0
    assert M.edge_f1_tolerant(shifted, a, 0) == 0.0 and M.edge_f1_tolerant(shifted, a, 1) == 1.0
    assert M.edge_f1_tolerant(far, a, 1) == 0.0 and M.edge_f1_tolerant(far, a, 4) == 1.0
    c = torch.zeros_like(a)
    c[3, 5:12] = True  # partial overlap: tolerance 0 is exactly the pixel-wise F1
    assert M.edge_f1_tolerant(c, a, 0) == pytest.approx(M.edge_f1_iou(c, a)[0])
    # precision and recall are counted separately: a prediction with extra edges loses precision only
    extra = a | far
    assert M.edge_f1_tolerant(extra, a, 1) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert M.edge_f1_tolerant(torch.zeros_like(a), torch.zeros_like(a), 1) == 1.0
    assert M.edge_f1_tolerant(torch.zeros_like(a), a, 1) == 0.0
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        M.edge_f1_tolerant(a, a, -1)


def test_black_ssim_rmse_segmentation_landmarks():
    x = torch.rand(3, 3, 16, 16)
    x[1] = 0
    assert M.is_all_black(x).tolist() == [False, True, False]
    assert M.ssim(x[:1], x[:1]).item() == pytest.approx(1.0, abs=1e-6)
    assert M.ssim(x[:1], 1 - x[:1]).item() < 0.5
    assert M.rmse(torch.zeros(1, 4), torch.full((1, 4), 3.0)).item() == pytest.approx(3.0)
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]])
    conf = M.confusion_matrix(pred, target, num_classes=3)
    scores = M.segmentation_scores(conf)
    # class 0: tp 4, union 5; class 1: tp 3, union 4; class 2 absent everywhere (skipped)
    assert scores["miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert scores["aacc"] == pytest.approx(7 / 8)
    pts = torch.zeros(1, 68, 2)
    assert M.landmark_error(pts + torch.tensor([3.0, 4.0]), pts).item() == pytest.approx(5.0)


# ---- extractors: real architectures, random weights, the same loaders as real weights ----------


@pytest.fixture(scope="module")
def dino():
    return tiny_extractors()[0]


@pytest.fixture(scope="module")
def clip():
    return tiny_extractors()[1]


def test_extractors_normalised_and_resize_inside(dino, clip):
    imgs = [torch.rand(3, 40, 56), torch.rand(3, 64, 64)]  # different sizes in one call
    for ext in (dino, clip):
        f = ext(imgs)
        assert f.shape == (2, 384)
        assert torch.allclose(f.norm(dim=1), torch.ones(2), atol=1e-5)
        same = ext([imgs[0], imgs[0]])
        assert M.mean_pairwise_cosine(same[:1], same[1:]) == pytest.approx(1.0, abs=1e-5)
    t = clip.encode_text(["a photo of qwe dog", "a cat"])
    assert t.shape == (2, 384) and torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)


def test_loaders_read_saved_weights_like_real_ones(tmp_path, dino, clip):
    """Save the random models and load them back by path: the code path real weights take."""
    from safetensors.torch import save_file

    dino.model.save_pretrained(tmp_path / "dino")
    imgs = torch.rand(1, 3, 32, 32)
    from_path = load_dino(str(tmp_path / "dino"))
    assert torch.allclose(from_path(imgs), dino(imgs), atol=1e-5)
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(ckpt))
    clip2 = load_clip("ViT-S-32", pretrained=str(ckpt))
    assert torch.allclose(clip2(imgs), clip(imgs), atol=1e-5)
    assert clip2.cache_key.startswith("clip|ViT-S-32|")


def test_loader_errors_name_the_model_and_the_fix(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"(?s)facebook/dino-vits16.*--dino-model"):
        load_dino("facebook/dino-vits16")
    with pytest.raises(WeightsUnavailableError, match=r"(?s)ViT-L-14 / openai.*--clip-pretrained"):
        load_clip("ViT-L-14", "openai")
    (tmp_path / "model.bin").write_bytes(b"\x80\x04not a real pickle")
    with pytest.raises(WeightsUnavailableError, match="does not unpickle"):
        load_clip("ViT-S-32", pretrained=str(tmp_path / "model.bin"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("ViT-Nope-99", "openai")


# ---- the subject protocol ---------------------------------------------------------------------


def _subject_set(tmp_path, black: bool = True):
    refs = [save_png(tmp_path / "ref" / f"r{i}.png", random_image(i)) for i in range(2)]
    gens = [random_image(10), random_image(11), random_image(0)]  # the last equals reference 0
    if black:
        gens.insert(1, np.zeros((48, 48, 3), np.uint8))
    prompts = [f"a photo of qwe toy number {i}" for i in range(len(gens))]
    samples = write_samples(tmp_path / "samples", gens, prompts, reference_dir=tmp_path / "ref")
    return refs, samples, prompts


def test_subject_scores_follow_the_protocol(tmp_path, dino, clip):
    refs, samples, prompts = _subject_set(tmp_path)
    result = score_subject(samples, metrics="dino,clip_i,clip_t", dino=dino, clip=clip, cache_dir=tmp_path / "c")
    assert result.counts["skipped_black"] == 1 and result.counts["scored"] == 3
    kept = [samples / f"img{i:03d}.png" for i in (0, 2, 3)]
    real = torch.stack([load_image(p) for p in refs])
    gen = torch.stack([load_image(p) for p in kept])
    for name, ext in (("dino", dino), ("clip_i", clip)):
        by_hand = M.pairwise_cosine(ext(real), ext(gen)).mean().item()  # all 2 x 3 pairs
        assert result.summary[name] == pytest.approx(by_hand, abs=1e-5)
    text = clip.encode_text([prompts[i] for i in (0, 2, 3)])  # the prompts WITH the identifier
    assert result.summary["clip_t"] == pytest.approx(M.matched_cosine(clip(gen), text).mean().item(), abs=1e-5)
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in result.per_image}
    assert rows["img001.png"]["skipped"] == "all-black" and "dino" not in rows["img001.png"]
    per_image = [rows[f"img{i:03d}.png"]["dino"] for i in (0, 2, 3)]  # each: mean over the same references
    assert np.mean(per_image) == pytest.approx(result.summary["dino"], abs=1e-6)


def test_identical_images_give_one(tmp_path, dino, clip):
    ref = save_png(tmp_path / "ref" / "a.png", random_image(5))
    samples = write_samples(tmp_path / "s", [random_image(5)] * 2, reference_dir=ref.parent)
    result = score_subject(samples, metrics=["dino", "clip_i"], dino=dino, clip=clip, cache_dir=tmp_path / "c")
    assert result.summary["dino"] == pytest.approx(1.0, abs=1e-5)
    assert result.summary["clip_i"] == pytest.approx(1.0, abs=1e-5)


class _CountingExtractor(torch.nn.Module):
    """Wraps an extractor, counting the images it really processes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cache_key, self.seen = inner, inner.cache_key, 0

    def forward(self, images):
        self.seen += len(images)
        return self.inner(images)


def test_features_are_cached_by_file_hash(tmp_path, dino, monkeypatch):
    from hra_diffusion.metrics import subject as subject_mod

    _, samples, _ = _subject_set(tmp_path, black=False)
    counting = _CountingExtractor(dino)
    monkeypatch.setattr(subject_mod, "DINOExtractor", _CountingExtractor)  # accept the wrapper as an extractor
    first = score_subject(samples, metrics="dino", dino=counting, cache_dir=tmp_path / "cache")
    assert counting.seen == 4  # 2 references + 3 samples, one a byte-identical copy of a reference
    cache_files = list((tmp_path / "cache").glob("features-*.safetensors"))
    assert len(cache_files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    second = score_subject(samples, metrics="dino", dino=counting, cache_dir=tmp_path / "cache")
    assert counting.seen == 4 and second.summary == first.summary
    (samples / "img000.png").rename(samples / "moved.png")  # same bytes, new name: still a hit
    manifest = (samples / "manifest.jsonl").read_text().replace("img000.png", "moved.png")
    (samples / "manifest.jsonl").write_text(manifest)
    score_subject(samples, metrics="dino", dino=counting, cache_dir=tmp_path / "cache")
    assert counting.seen == 4
    cache = FeatureCache(tmp_path / "cache", dino.cache_key)
    assert file_hash(samples / "moved.png") in cache.entries


def test_lpips_is_optional_and_says_how_to_get_it(tmp_path, monkeypatch):
    from hra_diffusion.metrics import subject as subject_mod

    _, samples, _ = _subject_set(tmp_path, black=False)
    monkeypatch.setattr(subject_mod, "lpips_available", lambda: False)
    assert "lpips" not in subject_mod.default_subject_metrics()
    with pytest.raises(WeightsUnavailableError, match="pip install lpips"):
        score_subject(samples, metrics="lpips", cache_dir=tmp_path / "c")


def test_lpips_over_all_pairs(tmp_path):
    lpips = pytest.importorskip("lpips", reason="LPIPS is optional: pip install lpips")
    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()  # random VGG, real heads
    refs, samples, _ = _subject_set(tmp_path)
    result = score_subject(samples, metrics="lpips", lpips_model=model)
    kept = [load_image(samples / f"img{i:03d}.png") for i in (0, 2, 3)]
    reals = [load_image(p) for p in refs]
    with torch.no_grad():
        by_hand = [model(r[None] * 2 - 1, g[None] * 2 - 1).item() for r in reals for g in kept]  # same sizes here
    assert result.summary["lpips"] == pytest.approx(np.mean(by_hand), abs=1e-5)
    assert result.counts["skipped_black"] == 1
    # image 3 is a byte copy of reference 0: that pair has distance 0
    assert by_hand[0 * 3 + 2] == pytest.approx(0.0, abs=1e-6)


def test_subject_bad_input(tmp_path, dino):
    with pytest.raises(FileNotFoundError, match="samples folder .* does not exist"):
        score_subject(tmp_path / "nope", metrics="dino", dino=dino)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        score_subject(tmp_path / "empty", metrics="dino", dino=dino)
    samples = write_samples(tmp_path / "s", [random_image(1)])
    with pytest.raises(ValueError, match="--reference"):
        score_subject(samples, metrics="dino", dino=dino)
    with pytest.raises(FileNotFoundError, match="reference folder .* does not exist"):
        score_subject(samples, reference_dir=tmp_path / "noref", metrics="dino", dino=dino)
    with pytest.raises(ValueError, match="unknown metric 'fid'.*dino"):
        score_subject(samples, metrics="dino,fid", dino=dino)
    lines = (samples / "manifest.jsonl").read_text().replace("img000.png", "gone.png")
    (samples / "manifest.jsonl").write_text(lines)
    with pytest.raises(FileNotFoundError, match=r"manifest.jsonl:1: file .*gone.png.* does not exist"):
        score_subject(samples, reference_dir=tmp_path, metrics="dino", dino=dino)


# ---- control metrics ---------------------------------------------------------------------------


def _edges_image(rows: slice, cols: slice, size: int = 64) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[rows, cols] = 255  # a white rectangle: Canny edges on its border
    return img


def test_canny_f1_identical_and_disjoint(tmp_path):
    left = _edges_image(slice(8, 56), slice(4, 28))
    right = _edges_image(slice(8, 56), slice(36, 60))
    edges = canny_edges(left)
    assert edges.any() and edges.shape == (64, 64)
    assert canny_edges(left[:48, :40]).shape == (48, 40)  # other sizes: same cv2.Canny, no resampling
    src = save_png(tmp_path / "src.png", left)
    cond_map = save_png(tmp_path / "cond.png", np.repeat(edges.numpy()[..., None] * 255, 3, axis=2))
    samples = write_samples(
        tmp_path / "s", [left, right, left],
        extra=[{"condition_source": str(src)}, {"condition_source": str(src)}, {"condition": str(cond_map)}])
    result = score_control(samples, metrics="canny")
    f1 = [r["canny_f1"] for r in result.per_image]
    assert f1[0] == pytest.approx(1.0) and f1[1] == pytest.approx(0.0) and f1[2] == pytest.approx(1.0)
    assert result.per_image[1]["canny_iou"] == pytest.approx(0.0)
    assert result.summary["canny_f1"] == pytest.approx(2 / 3)


def test_canny_detector_matches_direct_call_at_64():
    import cv2

    img = random_image(3, size=64)
    assert torch.equal(canny_edges(img), torch.from_numpy(cv2.Canny(img, 100, 200) > 127))


def test_weight_metrics_with_random_models(tmp_path):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
    from transformers import (
        DPTConfig,
        DPTForDepthEstimation,
        SegformerConfig,
        SegformerForSemanticSegmentation,
    )

    torch.manual_seed(0)
    seg = SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=5, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16)).eval()
    depth = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=64,
        patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        head_hidden_size=8)).eval()
    hed = HEDdetector(ControlNetHED_Apache2())
    a, b = random_image(1, 64), random_image(2, 64)
    src = save_png(tmp_path / "src.png", a)
    samples = write_samples(tmp_path / "s", [a, b], extra=[{"condition_source": str(src)}] * 2)
    result = score_control(samples, metrics="canny,seg,depth,hed", models={"seg": seg, "depth": depth, "hed": hed},
                           annotator_resolution=64)
    same, other = result.per_image
    assert same["seg_miou"] == pytest.approx(1.0) and same["depth_rmse"] == pytest.approx(0.0, abs=1e-3)
    assert same["hed_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert other["depth_rmse"] > 1.0 and other["hed_ssim"] < 0.999
    assert {"seg_miou", "seg_macc", "seg_aacc", "seg_miou_mean_per_image", "depth_rmse", "hed_ssim"} <= set(result.summary)


def test_control_missing_weights_message_or_skip(tmp_path):
    a = random_image(1, 64)
    samples = write_samples(tmp_path / "s", [a], extra=[{"condition_source": str(save_png(tmp_path / "src.png", a))}])
    with pytest.raises(WeightsUnavailableError, match=r"(?s)nvidia/segformer-b4-finetuned-ade-512-512.*--seg-model"):
        score_control(samples, metrics="canny,seg")
    result = score_control(samples, metrics="canny,seg", skip_unavailable=True)
    assert "seg" in result.info["unavailable"] and result.summary["canny_f1"] == pytest.approx(1.0)
    assert json.dumps(result.info)  # serialisable for metrics.json
    with pytest.raises(ValueError, match="unknown metric 'edges'"):
        score_control(samples, metrics="edges")
    plain = write_samples(tmp_path / "plain", [a])
    with pytest.raises(ValueError, match="neither 'condition' nor 'condition_source'"):
        score_control(plain, metrics="canny")


def test_conditions_and_the_canny_metric_share_one_edge_detector():
    from hra_diffusion.detectors import make_detector

    detect = make_detector("canny")
    for size in (64, 48):  # a multiple of 64 (controlnet-aux's CannyDetector) and not (cv2.Canny at that size)
        img = _edges_image(slice(8, 40), slice(4, 28), size=size) // 2 + random_image(size, size=size) // 2
        condition = np.asarray(detect(Image.fromarray(img)))
        assert condition.shape == (size, size, 3) and (condition[..., 0] > 127).any()
        assert torch.equal(torch.from_numpy(condition[..., 0] > 127), canny_edges(img))


def test_a_registered_map_extractor_is_scored(tmp_path, monkeypatch):
    from hra_diffusion.metrics import control_metrics as cm

    for name in ("CONTROL_REGISTRY", "CONTROL_METRICS", "DEFAULT_WEIGHTS"):  # register into copies
        monkeypatch.setattr(cm, name, dict(getattr(cm, name)))

    class Brightness(cm.MapExtractor):
        name = "brightness"

        def extract(self, image):
            return float(image.mean())

        def from_condition(self, condition, size):
            return float(condition.mean())

        def compare(self, pred, ref, size):
            return {"brightness_diff": abs(pred - ref)}

    seen = []
    cm.register_control_metric(cm.ControlMetric(
        "brightness", "mean grey-level difference", lambda weights, device, opt: seen.append((weights, opt)) or Brightness()))
    flat = [np.full((32, 32, 3), v, np.uint8) for v in (100, 60, 10)]
    src, cond = save_png(tmp_path / "src.png", flat[1]), save_png(tmp_path / "cond.png", flat[2])
    samples = write_samples(tmp_path / "s", [flat[0], flat[0]], extra=[{"condition_source": str(src)},
                                                                      {"condition": str(cond)}])
    result = score_control(samples, metrics="brightness,canny", canny_thresholds=(50, 150))
    assert [r["brightness_diff"] for r in result.per_image] == [40.0, 90.0]
    assert result.summary["brightness_diff"] == pytest.approx(65.0) and "canny_f1" in result.summary
    assert seen == [(None, cm.ControlOptions((50, 150), 512))] and result.info["metrics"] == ["brightness", "canny"]
    with pytest.raises(ValueError, match=r"unknown metric 'glow'.*brightness \(mean grey-level difference\)"):
        score_control(samples, metrics="glow")
