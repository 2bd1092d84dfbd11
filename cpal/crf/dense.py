"""Dense CRF (Krähenbühl & Koltun) around pydensecrf, shared by refine_crf, IRN labels and DeepLab post-processing.

Two entry points, as in the IRN code: `dense_crf` refines per-class probabilities and returns the CRF's
marginals; `crf_from_labels` takes a hard label map (unary from labels with confidence `gt_prob`) and
returns the refined label indices. The pairwise settings come from a config dict so that one params
section drives every caller:

    iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat
    (IRN defaults: 10, 3, 3, 50, 5, 10) and optionally prob_clip (default 1e-5).

The unary is -log(clip(p)); a per-pixel constant factor on all channels adds the same energy to every label
of that pixel and leaves mean-field inference unchanged, so the probabilities need not sum to one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CRF_KEYS = ("iterations", "gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")
DEFAULT_PROB_CLIP = 1e-5


def _check_cfg(cfg: dict[str, Any]) -> None:
    missing = [k for k in CRF_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"CRF config lacks key(s) {missing}; needs {list(CRF_KEYS)}")
    if int(cfg["iterations"]) < 0:
        raise ValueError(f"CRF iterations must be >= 0, got {cfg['iterations']}")


def _check_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"CRF image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if image.shape[:2] != tuple(hw):
        raise ValueError(f"CRF image is {image.shape[1]}x{image.shape[0]} but the scores are {hw[1]}x{hw[0]}")
    return np.ascontiguousarray(image)


def _infer(image: np.ndarray, unary: np.ndarray, n_labels: int, cfg: dict[str, Any]) -> np.ndarray:
    import pydensecrf.densecrf as dcrf  # compiled extension: imported only when a CRF is run

    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=float(cfg["gaussian_sxy"]), compat=float(cfg["gaussian_compat"]))
    crf.addPairwiseBilateral(sxy=float(cfg["bilateral_sxy"]), srgb=float(cfg["bilateral_srgb"]), rgbim=image,
                             compat=float(cfg["bilateral_compat"]))
    q = crf.inference(int(cfg["iterations"]))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """Refine (C, H, W) class scores on an (H, W, 3) uint8 image; returns (C, H, W) float32 marginals."""
    _check_cfg(cfg)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"CRF probabilities must be (C, H, W) with C >= 1, got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("CRF probabilities contain NaN or inf")
    n, h, w = probs.shape
    image = _check_image(image, (h, w))
    if n == 1:
        return np.ones((1, h, w), dtype=np.float32)
    clip = float(cfg.get("prob_clip", DEFAULT_PROB_CLIP))
    unary = -np.log(np.clip(probs, clip, 1.0)).reshape(n, h * w)
    return _infer(image, unary, n, cfg)


def crf_from_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float,
                    cfg: dict[str, Any]) -> np.ndarray:
    """IRN's label CRF: each pixel trusts its label with `gt_prob`; returns (H, W) int64 label indices."""
    _check_cfg(cfg)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"CRF labels must be (H, W), got shape {labels.shape}")
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must lie in (0, 1), got {gt_prob}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"CRF labels must lie in 0..{n_labels - 1}, got {labels.min()}..{labels.max()}")
    image = _check_image(image, labels.shape)
    if n_labels == 1:
        return np.zeros(labels.shape, dtype=np.int64)
    from pydensecrf.utils import unary_from_labels

    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    q = _infer(image, unary, n_labels, cfg)
    return q.argmax(axis=0).astype(np.int64)
