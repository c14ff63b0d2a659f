"""Real photos in: EXIF orientation, 16-bit, CMYK, WebP, tiny and huge images, stray and broken files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hra_diffusion.errors import ImageFileError
from hra_diffusion.images import ImageTransform, open_image
from hra_diffusion.training.data import ImageFolderDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "train"))

import dreambooth_hra  # noqa: E402
from test_dreambooth import fast_args  # noqa: E402


def upright_photo() -> Image.Image:
    """32 wide x 48 tall: red top half, blue bottom half (which way is up is plain to see)."""
    a = np.zeros((48, 32, 3), np.uint8)
    a[:24] = (220, 30, 30)
    a[24:] = (30, 30, 220)
    return Image.fromarray(a)


def phone_jpeg(path: Path) -> None:
    """The upright photo stored as a phone stores it: landscape pixels and EXIF Orientation 6 (rotate 90° CW)."""
    stored = upright_photo().transpose(Image.ROTATE_90)  # 48 x 32
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif)


def real_photo_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    phone_jpeg(root / "a-phone.jpg")
    grey = np.tile(np.linspace(0, 255, 40), (40, 1))
    Image.fromarray(np.rint(grey * 257).astype(np.uint16)).save(root / "b-16bit.png")  # I;16
    Image.fromarray(np.rint(grey).astype(np.uint8)).save(root / "b-8bit.png")
    upright_photo().convert("CMYK").save(root / "c-cmyk.jpg", quality=95)
    upright_photo().save(root / "d-photo.webp", quality=95)
    upright_photo().resize((8, 8)).save(root / "e-tiny.png")
    upright_photo().resize((1500, 2250)).save(root / "f-huge.jpg", quality=80)
    (root / "notes.doc").write_text("not an image")
    return root


def test_phone_photo_loads_upright():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.jpg"
        phone_jpeg(path)
        with Image.open(path) as raw:
            assert raw.size == (48, 32)  # stored on its side
        img = np.asarray(open_image(path))
    assert img.shape == (48, 32, 3)
    assert img[:20, :, 0].mean() > 150 and img[:20, :, 2].mean() < 100  # red on top
    assert img[-20:, :, 2].mean() > 150 and img[-20:, :, 0].mean() < 100  # blue below


def test_16bit_cmyk_and_webp_read_as_their_8bit_pixels(tmp_path):
    folder = real_photo_folder(tmp_path / "photos")
    sixteen, eight = np.asarray(open_image(folder / "b-16bit.png"), float), np.asarray(open_image(folder / "b-8bit.png"), float)
    assert np.abs(sixteen - eight).max() <= 1  # not clipped to white
    assert np.asarray(open_image(folder / "b-16bit.png", mode="L"), float).mean() == pytest.approx(eight.mean(), abs=1)
    want = np.asarray(upright_photo(), float)
    for name in ("c-cmyk.jpg", "d-photo.webp"):
        got = np.asarray(open_image(folder / name), float)
        assert got.shape == want.shape and np.abs(got - want).mean() < 12, name


def test_folder_notes_upscaled_and_skipped_files_and_upright_pixels_reach_the_batch(tmp_path):
    folder = real_photo_folder(tmp_path / "photos")
    transform = ImageTransform(32, center_crop=True)
    ds = ImageFolderDataset(folder, "a photo of qwe thing", transform, seed=0, what="instance image")
    assert [f.name for f in ds.files] == ["a-phone.jpg", "b-16bit.png", "b-8bit.png", "c-cmyk.jpg", "d-photo.webp",
                                          "e-tiny.png", "f-huge.jpg"]
    notes = "\n".join(ds.notes)
    assert len(ds.notes) == 2
    assert "notes.doc" in notes and "skipped" in notes
    assert "e-tiny.png (8x8, x4.0)" in notes and "upscaled" in notes and "a-phone" not in notes
    phone = ds.files.index(folder / "a-phone.jpg")
    position = next(p for p in range(len(ds) * 3) if ds.sampler_view.item(p)[0] == phone)
    item = ds[position]
    seed = ds.item_seed(position)[1]
    upright, sideways = (transform(img, seed) for img in (upright_photo(), upright_photo().transpose(Image.ROTATE_90)))
    assert (item["pixel_values"] - upright).abs().mean() < 0.05 < (item["pixel_values"] - sideways).abs().mean()
    assert item["size"].original_size == (48, 32)  # (h, w) of the upright photo


def test_real_photo_folder_trains(tmp_path, capsys, tiny_random_sd_dir, generated_subject_dir):
    folder = real_photo_folder(tmp_path / "photos")
    out = tmp_path / "out"
    result = dreambooth_hra.main(dreambooth_hra.parse_args(fast_args(
        tiny_random_sd_dir, generated_subject_dir, out, "--instance_data_dir", str(folder),
        "--train_batch_size", "7", "--max_train_steps", "1")))
    assert result.global_step == 1 and (out / "adapter").is_dir()
    printed = capsys.readouterr().out
    assert "e-tiny.png" in printed and "notes.doc" in printed


def test_unreadable_files_are_one_error_naming_them_all_and_nothing_is_written(tmp_path, tiny_random_sd_dir,
                                                                               generated_subject_dir):
    folder = tmp_path / "photos"
    shutil.copytree(generated_subject_dir / "train", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (folder / "fake.jpg").write_text("a text file named like a photo")
    out = tmp_path / "out"
    with pytest.raises(ImageFileError) as info:
        dreambooth_hra.main(dreambooth_hra.parse_args(fast_args(
            tiny_random_sd_dir, generated_subject_dir, out, "--instance_data_dir", str(folder),
            "--report_to", "tensorboard")))
    message = str(info.value)
    assert "\n" not in message and "broken.png" in message and "fake.jpg" in message and message.startswith("2 ")
    assert not out.exists()
