"""Class-balanced loss weights for DeepLab; its (image, label) data lives in cpal.data.labelled (AMN reads
IR labels through the same class)."""

from __future__ import annotations

import numpy as np

from cpal.data.labelled import SegmentationData, scale_flip_crop

__all__ = ["SegmentationData", "class_balanced_weights", "scale_flip_crop"]


def class_balanced_weights(class_pixels: np.ndarray) -> np.ndarray:
    """Inverse-frequency loss weights, scaled so the mean weight over all labelled pixels is 1.

    w_c = N / (K * n_c) for the K classes with n_c > 0 pixels (N labelled pixels in all); a class with
    no pixel gets weight 0 (it never appears as a target, so its weight is irrelevant).
    """
    counts = np.asarray(class_pixels, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class-balanced weights need at least one labelled pixel")
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)
