from __future__ import annotations

import numpy as np
import pytest

from cpal.core.metrics import ConfusionMatrix, miou


def test_hand_computed_case() -> None:
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    # class 0: tp 3, fn 1, fp 1 -> 3/5; class 1: tp 3, fn 1, fp 1 -> 3/5
    s = cm.scores(["bg", "fg"])
    assert s["per_class"]["bg"]["iou"] == pytest.approx(0.6)
    assert s["per_class"]["fg"]["iou"] == pytest.approx(0.6)
    assert s["per_class"]["fg"]["precision"] == pytest.approx(0.75)
    assert s["per_class"]["fg"]["recall"] == pytest.approx(0.75)
    assert s["miou"] == pytest.approx(0.6)
    assert s["pixel_acc"] == pytest.approx(0.75)


def test_ignore_pixels_do_not_count() -> None:
    gt = np.array([0, 1, 255, 255])
    pred = np.array([0, 1, 1, 0])
    assert miou(pred, gt, 2) == pytest.approx(1.0)


def test_absent_class_excluded_from_mean() -> None:
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    s = cm.scores()
    assert s["per_class"]["2"]["iou"] is None
    # class 0: 2/3, class 1: 1/2
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_predicted_but_absent_class_counts_as_zero() -> None:
    gt = np.array([0, 0, 0, 0])
    pred = np.array([0, 0, 0, 2])
    s = ConfusionMatrix(3).scores()
    assert s["miou"] is None  # nothing seen yet
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    s = cm.scores()
    assert s["per_class"]["2"]["iou"] == 0.0
    assert s["miou"] == pytest.approx((0.75 + 0.0) / 2)


def test_all_ignore_image() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.zeros((4, 4), int), np.full((4, 4), 255))
    s = cm.scores()
    assert s["miou"] is None and s["pixel_acc"] is None and s["pixels"] == 0


def test_streaming_equals_batch() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, (13, 17)) for _ in range(5)]
    preds = [rng.integers(0, 4, (13, 17)) for _ in range(5)]
    streaming = ConfusionMatrix(4)
    for p, g in zip(preds, gts, strict=True):
        streaming.update(p, g)
    batch = ConfusionMatrix(4)
    batch.update(np.stack(preds), np.stack(gts))
    assert np.array_equal(streaming.matrix, batch.matrix)
    half = ConfusionMatrix(4)
    for p, g in zip(preds[:2], gts[:2], strict=True):
        half.update(p, g)
    rest = ConfusionMatrix(4)
    for p, g in zip(preds[2:], gts[2:], strict=True):
        rest.update(p, g)
    half.merge(rest)
    assert np.array_equal(half.matrix, streaming.matrix)


def test_ignore_prediction_counts_as_miss() -> None:
    gt = np.array([1, 1, 0, 0])
    pred = np.array([1, 255, 0, 0])
    s = ConfusionMatrix(2)
    s.update(pred, gt)
    r = s.scores()
    assert r["per_class"]["1"]["iou"] == pytest.approx(0.5)
    assert r["per_class"]["1"]["recall"] == pytest.approx(0.5)
    assert r["per_class"]["0"]["iou"] == pytest.approx(1.0)


def test_shape_and_range_errors() -> None:
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="ground-truth"):
        cm.update(np.zeros(2), np.array([0, 5]))
