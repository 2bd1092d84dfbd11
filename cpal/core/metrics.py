"""The one metrics module: streaming confusion-matrix mIoU for seeds, pseudo-masks and DeepLab alike.

Protocol (docs/results.md, "Evaluation protocol"): pixels labelled 255 in the ground truth are ignored;
a class absent from both prediction and ground truth over the whole set is excluded from the mean (nanmean).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        # Labelled pixels whose prediction is "ignore" (255 in a pseudo-mask) or out of range: they count
        # as misses of the true class, never as a hit, so abstaining cannot raise the score.
        self.missed = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        valid = gt != self.ignore_index
        gt_v = gt[valid].astype(np.int64)
        pred_v = pred[valid].astype(np.int64)
        n = self.num_classes
        if gt_v.size and (gt_v.min() < 0 or gt_v.max() >= n):
            raise ValueError(f"ground-truth values must lie in 0..{n - 1} or be {self.ignore_index}")
        bad_pred = (pred_v < 0) | (pred_v >= n)
        if bad_pred.any():
            self.missed += np.bincount(gt_v[bad_pred], minlength=n)
            gt_v, pred_v = gt_v[~bad_pred], pred_v[~bad_pred]
        self.matrix += np.bincount(n * gt_v + pred_v, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices of different class counts")
        self.matrix += other.matrix
        self.missed += other.missed

    def scores(self, class_names: Sequence[str] | None = None) -> dict:
        """mIoU, pixel accuracy, per-class IoU / precision / recall (None where undefined)."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        gt_total = m.sum(axis=1) + self.missed
        pred_total = m.sum(axis=0)
        union = gt_total + pred_total - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            precision = np.where(pred_total > 0, tp / pred_total, np.nan)
            recall = np.where(gt_total > 0, tp / gt_total, np.nan)
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        total = gt_total.sum()

        def clean(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return {
            "miou": clean(np.nanmean(iou)) if np.any(~np.isnan(iou)) else None,
            "pixel_acc": float(tp.sum() / total) if total > 0 else None,
            "per_class": {
                name: {"iou": clean(iou[i]), "precision": clean(precision[i]), "recall": clean(recall[i])}
                for i, name in enumerate(names)
            },
            "pixels": int(total),
        }


def miou(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float | None:
    """mIoU of a single prediction (convenience for tests and quick checks)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, gt)
    return cm.scores()["miou"]
