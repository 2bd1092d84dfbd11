"""Background thresholds derived from the seed maps themselves, without pixel ground truth.

Every training pixel's top class score (max over the image-label classes' maps, each in [0, 1]) is
counted in a histogram, and Otsu's method splits it in two: threshold t, lower-class mean mu0 (mostly
background), upper-class mean mu1 (mostly object). `auto` for the CRF's background plane
(`crf.bg_threshold`) and the seed pseudo-masks' threshold (`pseudo.bg_threshold`) is t itself: the
score that best separates the background mode from the object mode. IRN's three planes
(cpal/irn/thresholds.py) are built from the same split. Nothing here reads masks, so these are the
thresholds a dataset without ground truth uses (docs/method.md says what they measure where masks exist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cpal.seeds.store import load_seeds, seed_path

AUTO = "auto"
BINS = 200


def top_score_histogram(seed_dir: Path, ids: list[str], which: str, bins: int = BINS) -> np.ndarray:
    """Counts of each pixel's top class score over `bins` equal bins of [0, 1] (images without classes skipped)."""
    hist = np.zeros(bins, dtype=np.int64)
    for image_id in ids:
        seeds = load_seeds(seed_path(seed_dir, image_id))
        maps = seeds[which]
        if maps.shape[0] == 0:
            continue
        top = np.clip(maps.astype(np.float32).max(axis=0), 0.0, 1.0)
        hist += np.bincount(np.minimum((top * bins).astype(np.int64), bins - 1).ravel(), minlength=bins)
    return hist


def otsu_split(hist: np.ndarray) -> tuple[float, float, float]:
    """(threshold, lower-class mean, upper-class mean) of a histogram over [0, 1] by Otsu's method."""
    hist = np.asarray(hist, dtype=np.float64)
    if hist.sum() <= 0:
        raise ValueError("no seed pixels to derive a threshold from (every image has an empty class set?)")
    bins = len(hist)
    centres = (np.arange(bins) + 0.5) / bins
    p = hist / hist.sum()
    w0 = np.cumsum(p)[:-1]
    m0 = np.cumsum(p * centres)[:-1]
    total = float((p * centres).sum())
    between = np.where((w0 > 0) & (w0 < 1), (total * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12), -1.0)
    k = int(between.argmax())
    if between[k] <= 0:
        raise ValueError("the seed scores take a single value; Otsu's split is undefined (set the threshold by hand)")
    return (k + 1) / bins, float(m0[k] / w0[k]), float((total - m0[k]) / (1 - w0[k]))


def resolve_threshold(cfg: dict[str, Any], key: str, seed_dir: Path, ids: list[str],
                      which: str) -> tuple[dict[str, Any], dict[str, float] | None]:
    """`cfg` with `cfg[key] == 'auto'` replaced by Otsu's split of the `which` seed maps of `ids`.

    Returns the resolved section and the derivation (None when the key holds a number).
    """
    if cfg[key] != AUTO:
        return cfg, None
    t, mu0, mu1 = otsu_split(top_score_histogram(seed_dir, ids, which))
    derived = {key: t, "otsu_threshold": t, "lower_mean": round(mu0, 4), "upper_mean": round(mu1, 4)}
    return {**cfg, key: t}, derived
