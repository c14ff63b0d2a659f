"""Control data: layouts and column flags, same crop/flip for image and condition, empty prompts,
computed (cached) conditions, datasets input, and the bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hra_diffusion.detectors import ConditionCache, ConditionError, make_detector, supported_conditions
from hra_diffusion.images import ImageTransform
from hra_diffusion.training.control_data import (
    ColumnNames,
    ControlDataset,
    attach_computed_conditions,
    check_rows,
    rows_from_dataset,
    rows_from_folder,
)
from hra_diffusion.training.data import DataError
from hra_diffusion.utils import stream_seed

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50)}


def make_control_dir(root: Path, n: int = 8, size: int = 32, seed: int = 0, columns: ColumnNames | None = None) -> Path:
    """Tiny-world-like pairs: a filled rectangle (image) and its white outline on black (condition)."""
    columns = columns or ColumnNames()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        x0, y0 = rng.integers(2, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        img = Image.new("RGB", (size, size), (15, 15, 15))
        ImageDraw.Draw(img).rectangle(box, fill=COLOURS[name])
        cond = Image.new("RGB", (size, size))
        ImageDraw.Draw(cond).rectangle(box, outline=(255, 255, 255))
        img.save(root / f"img_{i}.png")
        cond.save(root / f"cond_{i}.png")
        rows.append({columns.image: f"img_{i}.png", columns.condition: f"cond_{i}.png", columns.caption: f"a {name} square"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_metadata_rows_and_column_flags(tmp_path):
    rows = rows_from_folder(make_control_dir(tmp_path / "a", n=5), ColumnNames(), need_condition=True)
    assert len(rows) == 5 and rows[0].caption == "a red square"
    assert rows[1].image.name == "img_1.png" and rows[1].condition.name == "cond_1.png"
    # diffusers-style naming, read through the column flags
    cols = ColumnNames("file_name", "control_file", "prompt")
    rows = rows_from_folder(make_control_dir(tmp_path / "b", n=3, columns=cols), cols, need_condition=True)
    assert [r.caption for r in rows] == ["a red square", "a blue square", "a green square"]
    with pytest.raises(DataError) as err:  # the default names do not fit that folder
        rows_from_folder(tmp_path / "b", ColumnNames(), need_condition=True)
    msg = str(err.value)
    assert "'image'" in msg and "columns found: 'file_name', 'control_file', 'prompt'" in msg and "--image_column" in msg


def test_csv_and_subfolder_layouts(tmp_path):
    src = make_control_dir(tmp_path / "src", n=4)
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    lines = ["image,conditioning_image,text"]
    for i in range(4):
        for kind in ("img", "cond"):
            (csv_dir / f"{kind}_{i}.png").write_bytes((src / f"{kind}_{i}.png").read_bytes())
        lines.append(f"img_{i}.png,cond_{i}.png,shape {i}")
    (csv_dir / "metadata.csv").write_text("\n".join(lines) + "\n")
    assert [r.caption for r in rows_from_folder(csv_dir, ColumnNames(), True)] == [f"shape {i}" for i in range(4)]
    # images/ + conditions/ sub-folders paired by name, captions in <stem>.txt
    sub = tmp_path / "sub"
    (sub / "images").mkdir(parents=True)
    (sub / "conditions").mkdir()
    for i in range(3):
        (sub / "images" / f"{i}.png").write_bytes((src / f"img_{i}.png").read_bytes())
        (sub / "conditions" / f"{i}.png").write_bytes((src / f"cond_{i}.png").read_bytes())
        (sub / "images" / f"{i}.txt").write_text(f"caption {i}\n")
    cols = ColumnNames("images", "conditions", "text")
    rows = rows_from_folder(sub, cols, True)
    assert [r.caption for r in rows] == ["caption 0", "caption 1", "caption 2"]
    assert rows[2].condition == sub / "conditions" / "2.png"
    (sub / "conditions" / "2.png").unlink()  # count mismatch: 3 images, 2 conditions
    with pytest.raises(DataError, match=r"3 images .* but 2 condition images .*images without a condition: \['2'\]"):
        rows_from_folder(sub, cols, True)


def test_bad_input_messages(tmp_path):
    root = make_control_dir(tmp_path / "d", n=4)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    doc = json.loads(lines[2])
    del doc["conditioning_image"]
    (root / "metadata.jsonl").write_text("\n".join(lines[:2] + [json.dumps(doc)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=r"4 rows have an image .* but 3 have a condition image .*rows without one: \[3\]"):
        rows_from_folder(root, ColumnNames(), True)
    # a condition column nobody has: the message lists what is there and suggests --condition
    with pytest.raises(DataError, match=r"no column 'hint'.*columns found: 'image', 'conditioning_image', 'text'.*--condition canny"):
        rows_from_folder(make_control_dir(tmp_path / "e", n=2), ColumnNames(condition="hint"), True)
    # unreadable files are named
    root = make_control_dir(tmp_path / "f", n=3)
    (root / "cond_1.png").write_bytes(b"not a png")
    rows = rows_from_folder(root, ColumnNames(), True)
    with pytest.raises(DataError, match=r"1 unreadable file\(s\): condition image '.*cond_1.png' is not an image file.*row 2 of"):
        check_rows(rows)
    # missing folder / no layout
    with pytest.raises(DataError, match="does not exist"):
        rows_from_folder(tmp_path / "nope", ColumnNames(), True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a metadata file"):
        rows_from_folder(tmp_path / "empty", ColumnNames(), True)


def test_unknown_condition_type_lists_the_supported_ones(tmp_path):
    with pytest.raises(ConditionError) as err:
        make_detector("sobel")
    for name in supported_conditions():
        assert name in str(err.value)
    assert "canny" in supported_conditions() and "hed" in supported_conditions()
    with pytest.raises(ConditionError, match=r"'hed' needs the annotator weights ControlNetHED.pth.*lacks ControlNetHED.pth"):
        make_detector("hed", tmp_path)  # weight-based, files not there
    with pytest.raises(ConditionError, match="no --condition_model_path"):
        make_detector("depth")


def test_image_and_condition_get_the_same_crop_and_flip(tmp_path):
    """Condition file == image file: after the transform they must still be equal (any crop, any flip)."""
    root = tmp_path / "same"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "conditioning_image": f"{i}.png", "text": "x"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ControlDataset(rows_from_folder(root, ColumnNames(), True), ImageTransform(32, center_crop=False, random_flip=True), seed=3)
    flips, crops = set(), set()
    for pos in range(24):
        item = data[pos]
        assert torch.allclose(item["condition"] * 2 - 1, item["pixel_values"], atol=1e-6)
        assert 0.0 <= item["condition"].min() and item["condition"].max() <= 1.0
        index, epoch = data.sampler_view.item(pos)
        left, _, flip = data.transform.params((56, 40), stream_seed(3, "aug", epoch, index))
        flips.add(flip)
        crops.add(left)
    assert flips == {True, False} and len(crops) > 1  # the check above covered real random crops and flips


def test_proportion_empty_prompts_is_seeded(tmp_path):
    rows = rows_from_folder(make_control_dir(tmp_path / "p", n=8), ColumnNames(), True)
    t = ImageTransform(32)
    data = ControlDataset(rows, t, seed=0, proportion_empty_prompts=0.3)
    prompts = [data[p]["prompt"] for p in range(200)]
    share = sum(p == "" for p in prompts) / len(prompts)
    assert 0.2 < share < 0.4
    assert prompts == [ControlDataset(rows, t, 0, 0.3)[p]["prompt"] for p in range(200)]  # a pure function of position
    assert all(data_p for data_p in (ControlDataset(rows, t, 0, 0.0)[p]["prompt"] for p in range(50)))


def test_canny_conditions_are_computed_once_and_cached(tmp_path):
    import cv2

    rows = rows_from_folder(make_control_dir(tmp_path / "c", n=4), ColumnNames(), need_condition=False)
    assert all(r.condition is None for r in rows)
    detect = make_detector("canny", low_threshold=100, high_threshold=200)
    calls = []
    cache = ConditionCache(tmp_path / "cache", "canny-100-200", lambda im: calls.append(1) or detect(im))
    attach_computed_conditions(rows, cache)
    assert len(calls) == 4 and len(list((tmp_path / "cache" / "canny-100-200").glob("*.png"))) == 4
    img = np.asarray(rows[0].load_image())
    expected = cv2.Canny(img, 100, 200)
    got = np.asarray(rows[0].load_condition())
    assert got.shape == (32, 32, 3) and np.array_equal(got[..., 0], expected) and expected.any()
    rows2 = rows_from_folder(tmp_path / "c", ColumnNames(), need_condition=False)
    attach_computed_conditions(rows2, cache)
    assert len(calls) == 4  # all from the cache
    assert [r.condition for r in rows2] == [r.condition for r in rows]
    # 64-px multiples go through controlnet-aux's CannyDetector itself
    big = Image.fromarray(np.kron(img, np.ones((2, 2, 1), np.uint8)))
    assert np.array_equal(np.asarray(detect(big))[..., 0], cv2.Canny(np.asarray(big), 100, 200))


def test_datasets_input_with_column_flags_and_computed_condition(tmp_path):
    import datasets

    src = make_control_dir(tmp_path / "src", n=3)
    ds = datasets.Dataset.from_dict({
        "photo": [Image.open(src / f"img_{i}.png").convert("RGB") for i in range(3)],
        "caption": ["one", "two", "three"],
    }, features=datasets.Features({"photo": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"no column 'image', 'text'.*columns found: 'photo', 'caption'"):
        rows_from_dataset(str(tmp_path / "ds"), ColumnNames(), need_condition=False)
    with pytest.raises(DataError, match=r"no column 'conditioning_image'.*--condition canny"):
        rows_from_dataset(str(tmp_path / "ds"), ColumnNames("photo", caption="caption"), need_condition=True)
    rows = rows_from_dataset(str(tmp_path / "ds"), ColumnNames("photo", caption="caption"), need_condition=False)
    attach_computed_conditions(rows, ConditionCache(tmp_path / "cache", "canny-100-200", make_detector("canny")))
    assert [r.caption for r in rows] == ["one", "two", "three"]
    item = ControlDataset(rows, ImageTransform(32), 0)[0]
    assert item["pixel_values"].shape == item["condition"].shape == (3, 32, 32)
    assert set(item["condition"].unique().tolist()) <= {0.0, 1.0} and item["condition"].max() == 1.0
