from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.core.io import save_jpeg, save_label_png
from cpal.data.voc import DatasetError, VOCDataset

CLASSES = ["background", "cat", "dog"]


def make_dataset(root: Path, ids: list[str], labels_file: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for i in ids:
        save_jpeg(root / "JPEGImages" / f"{i}.jpg", rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        mask = np.zeros((12, 16), np.uint8)
        mask[2:6, 2:6] = 1
        mask[6, 2:6] = 255
        save_label_png(root / "SegmentationClass" / f"{i}.png", mask)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "dataset.json").write_text(json.dumps({"name": "t", "classes": CLASSES, "ignore_index": 255}))
    if labels_file:
        (root / "cls_labels.json").write_text(json.dumps({i: [1] for i in ids}))
    return root


def test_reads_images_masks_labels(tmp_path: Path) -> None:
    ds = VOCDataset(make_dataset(tmp_path, ["a", "b"]), "train")
    assert ds.ids == ["a", "b"] and len(ds) == 2
    assert ds.classes == CLASSES and ds.num_classes == 3
    assert ds.image("a").shape == (12, 16, 3) and ds.image("a").dtype == np.uint8
    m = ds.mask("a")
    assert m.shape == (12, 16) and m[3, 3] == 1 and m[6, 3] == 255
    assert ds.labels("a").tolist() == [1]
    assert ds.multi_hot("a").tolist() == [1.0, 0.0]
    assert ds.has_masks()


def test_labels_from_mask_and_xml(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a", "b"], labels_file=False)
    ds = VOCDataset(root, "train")
    assert ds.labels("a").tolist() == [1]  # from the mask, 255 and background excluded
    (root / "Annotations").mkdir()
    (root / "Annotations" / "b.xml").write_text(
        "<annotation><object><name>dog</name></object><object><name>cat</name></object></annotation>"
    )
    assert VOCDataset(root, "train").labels("b").tolist() == [1, 2]
    (root / "Annotations" / "b.xml").write_text("<annotation><object><name>horse</name></object></annotation>")
    with pytest.raises(DatasetError, match=r"b\.xml.*horse"):
        VOCDataset(root, "train").labels("b")


def test_missing_image_in_split_is_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nghost\n")
    with pytest.raises(DatasetError, match=r"ghost\.jpg"):
        VOCDataset(root, "train")


def test_missing_split_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        VOCDataset(tmp_path / "nowhere", "train")
    root = make_dataset(tmp_path, ["a"])
    with pytest.raises(DatasetError, match=r"val\.txt.*train"):
        VOCDataset(root, "val")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    (root / "JPEGImages" / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=r"a\.jpg"):
        VOCDataset(root, "train").image("a")


def test_mask_size_mismatch_is_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    save_label_png(root / "SegmentationClass" / "a.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"a\.png.*differs"):
        VOCDataset(root, "train").mask("a")


def test_label_out_of_range_is_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    save_label_png(root / "SegmentationClass" / "a.png", np.full((12, 16), 7, np.uint8))
    with pytest.raises(DatasetError, match=r"a\.png.*\[7\]"):
        VOCDataset(root, "train").mask("a")
    (root / "cls_labels.json").write_text(json.dumps({"a": [3]}))
    with pytest.raises(DatasetError, match="outside"):
        VOCDataset(root, "train").labels("a")


def test_truncated_png_is_named(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    path = root / "SegmentationClass" / "a.png"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"a\.png"):
        VOCDataset(root, "train").mask("a")


def test_rgb_mask_is_rejected(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    Image.new("RGB", (16, 12)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DatasetError, match="mode RGB"):
        VOCDataset(root, "train").mask("a")


def test_palette_png_round_trip(tmp_path: Path) -> None:
    label = np.random.default_rng(1).integers(0, 21, (31, 29)).astype(np.uint8)
    label[0] = 255
    save_label_png(tmp_path / "x.png", label)
    from cpal.core.io import load_label_png

    assert np.array_equal(load_label_png(tmp_path / "x.png"), label)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "P"
