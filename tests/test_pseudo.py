"""Pseudo-masks (cpal.pseudo.labels): the seed threshold rule and uncertainty band, PNG sources, evaluation, stages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from cpal.core.io import load_label_png, save_jpeg, save_label_png
from cpal.data.voc import VOCDataset
from cpal.pseudo.labels import PseudoLabelError, evaluate_pseudo_labels, make_pseudo_labels, pseudo_from_seeds
from cpal.seeds.store import save_seeds

LOG = logging.getLogger("test_pseudo")
CFG = {"source": "seeds", "map": "cam", "bg_threshold": 0.5, "ignore_low": 0.0, "ignore_high": 0.0}


def hand_seeds() -> dict[str, np.ndarray]:
    # two foreground classes (ids 3 and 1) over a 2x4 image
    cam = np.array([[[0.9, 0.6, 0.45, 0.1], [0.2, 0.3, 0.0, 0.55]],
                    [[0.1, 0.7, 0.40, 0.2], [0.8, 0.35, 0.0, 0.1]]], np.float32)
    pacam = np.zeros_like(cam)
    pacam[1] = 1.0
    return {"cam": cam, "pacam": pacam, "keys": np.array([3, 1]), "size": np.array([2, 4])}


def test_seed_rule_follows_the_threshold() -> None:
    label = pseudo_from_seeds(hand_seeds(), CFG)
    np.testing.assert_array_equal(label, [[3, 1, 0, 0], [1, 0, 0, 3]])
    assert label.dtype == np.uint8
    label = pseudo_from_seeds(hand_seeds(), {**CFG, "bg_threshold": 0.3})
    np.testing.assert_array_equal(label, [[3, 1, 3, 0], [1, 1, 0, 3]])
    np.testing.assert_array_equal(pseudo_from_seeds(hand_seeds(), {**CFG, "map": "pacam"}), np.ones((2, 4)))


def test_uncertainty_band_sets_255() -> None:
    # top scores: [[.9, .7, .45, .2], [.8, .35, 0, .55]]; band [0.3, 0.6) -> .45, .35, .55 ignored
    label = pseudo_from_seeds(hand_seeds(), {**CFG, "ignore_low": 0.3, "ignore_high": 0.6})
    np.testing.assert_array_equal(label, [[3, 1, 255, 0], [1, 255, 0, 255]])
    # an empty band (high <= low) changes nothing
    label = pseudo_from_seeds(hand_seeds(), {**CFG, "ignore_low": 0.6, "ignore_high": 0.3})
    np.testing.assert_array_equal(label, [[3, 1, 0, 0], [1, 0, 0, 3]])


def test_missing_map_is_named() -> None:
    seeds = hand_seeds()
    del seeds["pacam"]
    with pytest.raises(PseudoLabelError, match="x.npz.*pacam"):
        pseudo_from_seeds(seeds, {**CFG, "map": "pacam"}, source="x.npz")


def make_dataset(root: Path) -> VOCDataset:
    """Three 8x8 images, classes background / a / b; ground truth with a 255 border on one image."""
    ids = ["a", "b", "c"]
    classes = ["background", "a", "b"]
    for i, image_id in enumerate(ids):
        gt = np.zeros((8, 8), np.uint8)
        gt[2:6, 2:6] = 1 + i % 2
        if image_id == "c":
            gt[0, :] = 255
        save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", np.full((8, 8, 3), 100, np.uint8))
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", gt)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "cls_labels.json").write_text(json.dumps({"a": [1], "b": [2], "c": [1]}))
    (root / "dataset.json").write_text(json.dumps({"name": "toy", "source": "test", "classes": classes,
                                                   "ignore_index": 255, "splits": {"train": 3}}))
    return VOCDataset(root, "train")


def test_pseudo_from_seeds_writes_the_rule_for_every_id(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data")
    for image_id in dataset.ids:
        gt = dataset.mask(image_id)
        cam = np.where(gt == dataset.labels(image_id)[0], 0.9, 0.2)[None].astype(np.float32)
        cam[0, 0, 0] = 0.5  # inside the band below
        save_seeds(tmp_path / "seeds" / f"{image_id}.npz", dataset.labels(image_id), (8, 8), {"cam": cam})
    cfg = {**CFG, "bg_threshold": 0.4, "ignore_low": 0.45, "ignore_high": 0.6}
    summary = make_pseudo_labels(dataset, "seeds", tmp_path / "seeds", tmp_path / "pseudo", cfg, LOG, progress=False)
    assert summary["ignored_fraction"] == pytest.approx(1 / 64)
    for image_id in dataset.ids:
        gt = dataset.mask(image_id)
        expected = np.where(gt == 255, 0, gt)
        expected[0, 0] = 255
        np.testing.assert_array_equal(load_label_png(tmp_path / "pseudo" / f"{image_id}.png"), expected)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pseudo_from_seeds_of_wrong_size_fails_without_output(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data")
    for image_id in dataset.ids:
        size = (4, 8) if image_id == "b" else (8, 8)
        save_seeds(tmp_path / "seeds" / f"{image_id}.npz", [1], size, {"cam": np.ones((1, *size), np.float32)})
    with pytest.raises(ValueError, match="b.npz"):
        make_pseudo_labels(dataset, "seeds", tmp_path / "seeds", tmp_path / "pseudo", CFG, LOG, progress=False)
    assert not (tmp_path / "pseudo").exists()


def test_pseudo_from_refined_pngs_and_their_checks(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data")
    refined = tmp_path / "crf"
    for image_id in dataset.ids:
        save_label_png(refined / f"{image_id}.png", dataset.mask(image_id))
    make_pseudo_labels(dataset, "crf", refined, tmp_path / "pseudo", CFG, LOG, progress=False)
    for image_id in dataset.ids:
        np.testing.assert_array_equal(load_label_png(tmp_path / "pseudo" / f"{image_id}.png"), dataset.mask(image_id))
    save_label_png(refined / "b.png", np.zeros((8, 7), np.uint8))
    with pytest.raises(PseudoLabelError, match="'b'"):
        make_pseudo_labels(dataset, "irn", refined, tmp_path / "pseudo", CFG, LOG, progress=False)
    assert not (tmp_path / "pseudo").exists()
    save_label_png(refined / "b.png", np.full((8, 8), 7, np.uint8))
    with pytest.raises(PseudoLabelError, match=r"b\.png.*\[7\]"):
        make_pseudo_labels(dataset, "irn", refined, tmp_path / "pseudo", CFG, LOG, progress=False)
    (refined / "b.png").unlink()
    with pytest.raises(PseudoLabelError, match="'b'"):
        make_pseudo_labels(dataset, "crf", refined, tmp_path / "pseudo", CFG, LOG, progress=False)
    with pytest.raises(ValueError, match="source"):
        make_pseudo_labels(dataset, "cams", refined, tmp_path / "pseudo", CFG, LOG, progress=False)


def test_eval_of_perfect_pseudo_set(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data")
    for image_id in dataset.ids:
        save_label_png(tmp_path / "pseudo" / f"{image_id}.png", dataset.mask(image_id))
    result = evaluate_pseudo_labels(dataset, tmp_path / "pseudo")
    assert result["miou"] == pytest.approx(1.0)
    assert result["miou_confident"] == pytest.approx(1.0)
    assert result["ignored_fraction"] == pytest.approx(8 / (3 * 64))  # the 255 row of image c
    assert result["ignored_fraction_labelled"] == 0.0
    assert result["per_class_iou"] == {"background": 1.0, "a": 1.0, "b": 1.0}


def test_eval_counts_abstention_as_a_miss(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data")
    for image_id in dataset.ids:
        label = dataset.mask(image_id).copy()
        if image_id == "a":
            label[2:6, 2:4] = 255  # half of the object abstains
        save_label_png(tmp_path / "pseudo" / f"{image_id}.png", label)
    result = evaluate_pseudo_labels(dataset, tmp_path / "pseudo")
    # class a: 16 + 16 pixels in a and c, 8 ignored -> IoU 24/32; background and b perfect
    assert result["per_class_iou"]["a"] == pytest.approx(24 / 32)
    assert result["miou"] == pytest.approx((1 + 0.75 + 1) / 3)
    assert result["miou_confident"] == pytest.approx(1.0)
    assert result["ignored_fraction"] == pytest.approx(16 / 192)
    assert result["ignored_fraction_labelled"] == pytest.approx(8 / (192 - 8))


def test_stage_entry_points(tmp_path: Path, tiny_params: dict) -> None:
    from cpal.core.config import merge
    from stages.eval_pseudo import main as eval_main
    from stages.pseudo_labels import main as pseudo_main

    dataset = make_dataset(tmp_path / "data")
    for image_id in dataset.ids:
        cam = (dataset.mask(image_id) == dataset.labels(image_id)[0])[None].astype(np.float32)
        save_seeds(tmp_path / "seeds" / f"{image_id}.npz", dataset.labels(image_id), (8, 8), {"cam": cam})
    params = merge(tiny_params, {"params": {"method": "cam"}, "seeds": {"split": "train"}, "pseudo": CFG})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    common = ["--params", str(tmp_path / "p.yaml"), "--data", str(tmp_path / "data"), "--log", str(tmp_path / "l")]
    assert pseudo_main([*common, "--source-dir", str(tmp_path / "seeds"), "--out", str(tmp_path / "pseudo"),
                        "--no-progress"]) == 0
    assert eval_main([*common, "--pseudo", str(tmp_path / "pseudo"), "--metrics", str(tmp_path / "m.json"),
                      "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["miou"] == pytest.approx(1.0) and metrics["source"] == "seeds"
