"""Image-folder data: clear errors, RGB conversion, transforms, and a resumable, sharded order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hra_diffusion.conditioning import SizeCondition
from hra_diffusion.images import check_images, load_rgb
from hra_diffusion.training.data import (
    CachedLatent,
    DataError,
    ImageFolderDataset,
    ImageTransform,
    StreamSampler,
    list_images,
)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match=r"instance image folder .*nope.* does not exist"):
        list_images(tmp_path / "nope", "instance image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"empty.* has no images"):
        list_images(tmp_path / "empty")


def test_corrupt_and_unreadable_files_are_named(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "text.jpg").write_text("hello")
    good = Image.new("RGB", (64, 64), "blue")
    good.save(tmp_path / "truncated.png")
    data = (tmp_path / "truncated.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        check_images(list_images(tmp_path))
    msg = str(err.value)
    assert "3 unreadable" in msg
    for name in ("broken.png", "text.jpg", "truncated.png"):
        assert name in msg
    assert "good.png" not in msg
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(tmp_path, "p", ImageTransform(8), seed=0)


def test_greyscale_rgba_palette_become_rgb(tmp_path):
    Image.new("L", (10, 10), 128).save(tmp_path / "grey.png")
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red -> white background
    rgba.save(tmp_path / "rgba.png")
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.new("LA", (10, 10), (50, 255)).save(tmp_path / "la.png")
    grey, rgba_img, pal_img, la = (load_rgb(tmp_path / f) for f in ("grey.png", "rgba.png", "pal.png", "la.png"))
    for img in (grey, rgba_img, pal_img, la):
        assert img.mode == "RGB" and img.size == (10, 10)
    assert grey.getpixel((0, 0)) == (128, 128, 128)
    assert rgba_img.getpixel((0, 0)) == (255, 255, 255)
    assert pal_img.getpixel((0, 0)) == (0, 255, 0)
    assert la.getpixel((0, 0)) == (50, 50, 50)
    ds = ImageFolderDataset(tmp_path, "a photo", ImageTransform(8), seed=0)
    assert ds[0]["pixel_values"].shape == (3, 8, 8)


def test_transform_resize_crop_flip():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, right half black
    img = Image.fromarray(arr)
    center = ImageTransform(8, center_crop=True)(img)
    assert center.shape == (3, 8, 8) and center.min() >= -1 and center.max() <= 1
    assert center[:, :, 0].mean() > 0.9 and center[:, :, -1].mean() < -0.9  # centre spans the border
    flipped = ImageTransform(8, center_crop=True)(img, flip=True)
    assert torch.equal(flipped, center.flip(-1))
    rand = ImageTransform(8, center_crop=False, random_flip=True)
    crops = {tuple(rand.params(img.size, seed)) for seed in range(40)}
    assert len({c[0] for c in crops}) > 3 and {c[2] for c in crops} == {True, False}
    assert torch.equal(rand(img, seed=5), rand(img, seed=5))  # a pure function of the seed


def test_size_condition_is_the_crop_made_of_a_non_square_image():
    """SDXL's size condition: original (h, w), the crop's (top, left) in the resized image, target (R, R). A
    flipped crop's left is counted in the mirrored resized image: what diffusers' SDXL scripts record (they
    flip, then crop), for the very same pixels."""
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (40, 62, 3), dtype=np.uint8))  # w 62, h 40: resized to 25 x 16
    tall = Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8))  # w 40, h 70: resized to 16 x 28
    center = ImageTransform(16, center_crop=True)
    assert center.size_condition(wide.size, flip=False) == SizeCondition((40, 62), (0, 4), (16, 16))
    assert center.size_condition(wide.size, flip=True) == SizeCondition((40, 62), (0, 5), (16, 16))  # 25 - 16 - 4
    assert center.size_condition(tall.size) == SizeCondition((70, 40), (6, 0), (16, 16))
    assert center.size_condition(wide.size).as_list() == [40, 62, 0, 4, 16, 16]  # the UNet's time ids
    rand = ImageTransform(16, center_crop=False, random_flip=True)
    flips = set()
    for image in (wide, tall):
        resized = image.resize(rand.resized_size(image.size), Image.BICUBIC)
        for seed in range(16):
            size = rand.size_condition(image.size, seed)
            flip = rand.params(image.size, seed)[2]
            flips.add(flip)
            source = resized.transpose(Image.FLIP_LEFT_RIGHT) if flip else resized
            top, left = size.crop_top_left
            want = np.asarray(source.crop((left, top, left + 16, top + 16)), np.float32) / 127.5 - 1.0
            assert np.allclose(rand(image, seed).permute(1, 2, 0).numpy(), want), (image.size, seed)
            assert size.original_size == image.size[::-1] and size.target_size == (16, 16)
    assert flips == {True, False}


def test_dataset_items_carry_the_size_condition_cached_or_not(tmp_path):
    Image.new("RGB", (62, 40), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (30, 50), "blue").save(tmp_path / "tall.png")
    ds = ImageFolderDataset(tmp_path, "a photo", ImageTransform(16, center_crop=True, random_flip=True), seed=3)
    fresh = [ds[p]["size"] for p in range(16)]
    assert {s.original_size for s in fresh} == {(40, 62), (50, 30)}
    assert {s.crop_top_left for s in fresh if s.original_size == (40, 62)} == {(0, 4), (0, 5)}  # both flips
    ds.latent_cache = {key: CachedLatent(torch.zeros(1), torch.zeros(1), ds.cache_pixels(key)[1])
                       for key in ds.cache_keys()}
    cached = [ds[p] for p in range(16)]
    assert "pixel_values" not in cached[0] and [item["size"] for item in cached] == fresh


def test_stream_sampler_is_resumable_and_sharded():
    a = StreamSampler(5, batch_size=2, seed=3, rank=0, world_size=2)
    b = StreamSampler(5, batch_size=2, seed=3, rank=1, world_size=2)
    it_a, it_b = iter(a), iter(b)
    batches_a = [next(it_a) for _ in range(4)]
    batches_b = [next(it_b) for _ in range(4)]
    assert not set(sum(batches_a, [])) & set(sum(batches_b, []))  # ranks never share a position
    assert sorted(sum(batches_a, []) + sum(batches_b, [])) == list(range(16))
    epoch0 = [a.item(p)[0] for p in range(5)]
    assert sorted(epoch0) == list(range(5))  # each epoch is a permutation
    resumed = StreamSampler(5, batch_size=2, seed=3, rank=0, world_size=2, start_batch=2)
    assert next(iter(resumed)) == batches_a[2]
    assert [a.item(p) for p in range(12)] == [StreamSampler(5, 2, 3).item(p) for p in range(12)]


def test_per_image_captions_from_caption_files(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a qwe star on a  green\nbackground\n")
    (tmp_path / "b.caption").write_text("ignored: another extension")
    ds = ImageFolderDataset(tmp_path, "a qwe star", ImageTransform(8), seed=0, caption_extension=".txt")
    assert ds.prompts == ["a qwe star on a green background", "a qwe star", "a qwe star"]
    seen = {ds[p]["prompt"] for p in range(6)}  # every stream position reads its image's own caption
    assert seen == {"a qwe star on a green background", "a qwe star"}
    plain = ImageFolderDataset(tmp_path, "a qwe star", ImageTransform(8), seed=0)  # no extension: one prompt
    assert set(plain.prompts) == {"a qwe star"}
    (tmp_path / "c.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"c\.txt.* is empty"):
        ImageFolderDataset(tmp_path, "p", ImageTransform(8), seed=0, caption_extension="txt")
    (tmp_path / "c.txt").write_bytes("a qwe star on a gr\u00fcn background".encode("latin-1"))  # not UTF-8
    with pytest.raises(DataError, match=r"c\.txt.* is not UTF-8 text .*save it as UTF-8"):
        ImageFolderDataset(tmp_path, "p", ImageTransform(8), seed=0, caption_extension="txt")


def test_masks_are_cut_exactly_like_their_images(tmp_path):
    """A mask follows its image through resize, random crop and flip: the subject's red pixels stay under it."""
    from hra_diffusion.training.data import load_masks

    rng = np.random.default_rng(0)
    for name, size in (("wide", (48, 30)), ("tall", (30, 44))):
        subject = np.kron(rng.random((size[1] // 6 + 1, size[0] // 6 + 1)) < 0.4, np.ones((6, 6), bool))
        subject = subject[:size[1], :size[0]]  # 6 px blocks: bicubic (image) and bilinear (mask) agree off the edges
        rgb = np.zeros((size[1], size[0], 3), np.uint8)
        rgb[subject] = (255, 0, 0)
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(subject.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{name}.png")
    ds = ImageFolderDataset(tmp_path, "p", ImageTransform(24, center_crop=False, random_flip=True), seed=5,
                            mask_dir=tmp_path / "masks")
    for p in range(8):
        item = ds[p]
        red = (item["pixel_values"][0] + 1) / 2  # the red channel is the subject, resized the same way
        assert item["mask"].shape == (1, 24, 24)
        assert (item["mask"][0] - red).abs().mean() < 0.03, p  # a crop or flip off by one pixel: > 0.1
    ds.latent_cache = {key: CachedLatent(torch.zeros(1), torch.zeros(1), ds.cache_pixels(key)[1])
                       for key in ds.cache_keys()}
    for p in range(8):  # cached latents are centre crops with the drawn flip: so are their masks
        index, seed = ds.item_seed(p)
        flip = ds.transform.params((1, 1), seed)[2]
        red = (ds.cache_pixels((index, flip))[0][0] + 1) / 2
        assert (ds[p]["mask"][0] - red).abs().mean() < 0.03, p
    assert len(load_masks(ds.files, tmp_path / "masks")) == 2


def test_mask_problems_are_named(tmp_path):
    from hra_diffusion.training.data import load_masks

    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (8, 8), 255).save(masks / "a.png")
    Image.new("L", (4, 8), 255).save(masks / "b.jpg")  # any image extension; wrong size
    files = list_images(tmp_path, "image")
    with pytest.raises(DataError) as info:
        load_masks(files, masks)
    text = str(info.value)
    assert "2 problem(s)" in text and "b.jpg is 4x8 but b.png is 8x8" in text and "no mask for c.png" in text
    with pytest.raises(DataError, match="is not a folder"):
        load_masks(files, tmp_path / "nowhere")
    Image.new("LA", (8, 8)).save(masks / "c.png")  # an alpha channel is the mask
    Image.new("L", (8, 8), 0).save(masks / "b.jpg")
    assert [np.asarray(m).max() for m in load_masks(files, masks)] == [255, 0, 0]


def test_masked_loss_weights_the_subject_pixels():
    """pixel_weights: 1 + w·coverage at latent resolution; the instance loss becomes their weighted mean."""
    from hra_diffusion.training.loss import denoising_loss, pixel_weights

    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :4, :4] = 1.0  # top-left quarter is the subject
    masks[1, :, 4:6, 4:5] = 1.0  # half of one 2x2 latent pixel
    w = pixel_weights(masks, (4, 4), 3.0)
    assert w.shape == (2, 1, 4, 4) and w[0, 0, 0, 0] == 4.0 and w[0, 0, 3, 3] == 1.0 and w[1, 0, 2, 2] == 2.5
    target = torch.zeros(2, 4, 4, 4)
    on_subject = torch.zeros_like(target)
    on_subject[:, :, :2, :2] = 1.0  # an error only on the subject
    plain, _ = denoising_loss(on_subject, target)
    weighted, logs = denoising_loss(on_subject, target, instance_weights=w)
    assert weighted > 2 * plain and logs["loss_instance"] == pytest.approx(float(weighted))
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(denoising_loss(on_subject, target, instance_weights=ones)[0], plain)
    # with prior rows, only the instance rows are weighted
    both = torch.cat([on_subject, on_subject])
    loss, logs = denoising_loss(both, torch.zeros_like(both), num_prior=2, prior_loss_weight=1.0, instance_weights=w)
    assert logs["loss_instance"] == pytest.approx(float(weighted)) and logs["loss_prior"] == pytest.approx(float(plain))
    # class_mask_dir: the prior rows weighted by their own masks
    loss, logs = denoising_loss(both, torch.zeros_like(both), num_prior=2, prior_loss_weight=2.0, instance_weights=w,
                                prior_weights=w)
    assert logs["loss_prior"] == pytest.approx(float(weighted)) and float(loss) == pytest.approx(3 * float(weighted))
