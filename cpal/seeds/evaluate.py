"""Seed evaluation (stage `eval_seeds`): mIoU of CAM and PACAM seeds over a background-threshold sweep.

Prototype maps peak high (docs/method.md: the best prototype threshold sat at 0.9), so the sweep
reaches 0.95 by default. The sweep picks its threshold with ground truth, which flatters every map; so
for prototype maps the protocol SIPE reports is also given, as `pacam_argmax`: the argmax over the
map's own background channel and the classes, no threshold. A host with a fixed threshold of its own (AMN:
0.25) gets it reported beside the sweep as `<map>_fixed`. Evaluation only, never model selection.
A split without masks (your own data) gets no score: the result says so and gives, per map, the
threshold derived without ground truth (Otsu's split, cpal/seeds/thresholds.py) instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cpal.core.metrics import ConfusionMatrix
from cpal.data.voc import VOCDataset, no_ground_truth
from cpal.seeds.store import BACKGROUND_KEY, MAP_KEYS, check_complete, labels_with_background, load_seeds, seed_path
from cpal.seeds.thresholds import otsu_split, top_score_histogram


def thresholds_from(cfg: dict[str, Any]) -> np.ndarray:
    lo, hi, step = cfg["bg_threshold_min"], cfg["bg_threshold_max"], cfg["bg_threshold_step"]
    return np.round(np.arange(lo, hi + step / 2, step), 6)


def evaluate_seeds(dataset: VOCDataset, seed_dir: Path, thresholds: np.ndarray, log: logging.Logger,
                   progress: bool = True, fixed_threshold: float | None = None) -> dict[str, Any]:
    """Per map kind: mIoU for each threshold, the best threshold and its per-class scores; for prototype
    maps with a background channel also `pacam_argmax` (SIPE's protocol, no threshold); with
    ``fixed_threshold`` also `<kind>_fixed`, the scores at that one threshold (a host's own protocol)."""
    check_complete(seed_dir, dataset.ids)
    if not dataset.has_ground_truth():
        return seeds_without_ground_truth(dataset, seed_dir, log)
    n = dataset.num_classes
    matrices: dict[str, list[ConfusionMatrix]] = {}
    fixed: dict[str, ConfusionMatrix] = {}
    argmax_cm: ConfusionMatrix | None = None
    for image_id in tqdm(dataset.ids, desc="eval_seeds", disable=not progress):
        gt = dataset.mask(image_id)
        seeds = load_seeds(seed_path(seed_dir, image_id), expected_size=gt.shape)
        keys = seeds["keys"]
        for kind in MAP_KEYS:
            if kind not in seeds:
                continue
            cms = matrices.setdefault(kind, [ConfusionMatrix(n) for _ in thresholds])
            maps = seeds[kind].astype(np.float32)
            if maps.shape[0]:
                peak, best = maps.max(axis=0), np.asarray(keys)[maps.argmax(axis=0)]
            else:
                peak, best = np.zeros(gt.shape, np.float32), np.zeros(gt.shape, np.int64)
            for cm, t in zip(cms, thresholds, strict=True):
                cm.update(np.where(peak >= t, best, 0), gt)
            if fixed_threshold is not None:
                fixed.setdefault(kind, ConfusionMatrix(n)).update(np.where(peak >= fixed_threshold, best, 0), gt)
        if "pacam" in seeds and BACKGROUND_KEY in seeds:
            argmax_cm = argmax_cm or ConfusionMatrix(n)
            argmax_cm.update(labels_with_background(seeds["pacam"], seeds[BACKGROUND_KEY], keys), gt)
    results: dict[str, Any] = {"thresholds": thresholds.tolist(), "split": dataset.split, "images": len(dataset),
                               "ground_truth": True}
    for kind, cms in matrices.items():
        curve = [cm.scores()["miou"] for cm in cms]
        best = int(np.nanargmax(np.array(curve, dtype=np.float64)))
        scores = cms[best].scores(dataset.classes)
        results[kind] = {
            "miou": scores["miou"],
            "best_threshold": float(thresholds[best]),
            "curve": curve,
            "per_class_iou": {k: v["iou"] for k, v in scores["per_class"].items()},
            "per_class_precision": {k: v["precision"] for k, v in scores["per_class"].items()},
            "per_class_recall": {k: v["recall"] for k, v in scores["per_class"].items()},
        }
        log.info("%s seeds: mIoU %.4f at background threshold %.2f", kind, scores["miou"], thresholds[best])
    for kind, cm in fixed.items():
        scores = cm.scores(dataset.classes)
        results[f"{kind}_fixed"] = {
            "miou": scores["miou"],
            "threshold": float(fixed_threshold),
            "protocol": "background where every class map is below one fixed threshold, not picked with ground truth",
            "per_class_iou": {k: v["iou"] for k, v in scores["per_class"].items()},
        }
        log.info("%s seeds at the fixed background threshold %.2f: mIoU %.4f", kind, fixed_threshold, scores["miou"])
    if argmax_cm is not None:
        scores = argmax_cm.scores(dataset.classes)
        results["pacam_argmax"] = {
            "miou": scores["miou"],
            "protocol": "argmax over the prototype map's own background channel and the classes (SIPE)",
            "per_class_iou": {k: v["iou"] for k, v in scores["per_class"].items()},
        }
        log.info("pacam seeds, SIPE protocol (own background, no threshold): mIoU %.4f", scores["miou"])
    return results


def seeds_without_ground_truth(dataset: VOCDataset, seed_dir: Path, log: logging.Logger) -> dict[str, Any]:
    """No masks: no sweep and no score; per map kind, the threshold derived from the seeds alone (Otsu)."""
    kinds = [k for k in MAP_KEYS if k in load_seeds(seed_path(seed_dir, dataset.ids[0]))]
    results = no_ground_truth(dataset, thresholds=[])
    for kind in kinds:
        t, mu0, mu1 = otsu_split(top_score_histogram(seed_dir, dataset.ids, kind))
        results[kind] = {"miou": None, "curve": [], "otsu_threshold": t, "lower_mean": round(mu0, 4),
                         "upper_mean": round(mu1, 4)}
        log.info("%s seeds: no ground truth; threshold without it (Otsu) %.3f", kind, t)
    return results


def write_curve_csv(results: dict[str, Any], path: Path) -> None:
    import pandas as pd

    from cpal.core.io import atomic_path

    table = {"threshold": results["thresholds"]}
    for kind in MAP_KEYS:
        if kind in results:
            table[f"{kind}_miou"] = results[kind]["curve"]
    with atomic_path(path) as tmp:
        pd.DataFrame(table).to_csv(tmp, index=False, float_format="%.6f")


def plot_threshold_curve(results: dict[str, Any], path: Path, command: str) -> None:
    """mIoU against background threshold for CAM and PACAM, best points marked; footer names machine and command."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpal.core.io import atomic_path
    from cpal.core.runtime import machine_description

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if results.get("ground_truth") is False:
        derived = ", ".join(f"{k.upper()} {results[k]['otsu_threshold']:.3f}" for k in MAP_KEYS if k in results)
        ax.text(0.5, 0.5, f"No ground-truth masks for split {results['split']!r}: no threshold sweep.\n"
                f"Thresholds derived without them (Otsu): {derived}", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, wrap=True)
    for kind in MAP_KEYS:
        if kind not in results or results.get("ground_truth") is False:
            continue
        curve = np.array([np.nan if v is None else v for v in results[kind]["curve"]], dtype=float)
        line, = ax.plot(results["thresholds"], curve, marker="o", ms=3, label=kind.upper())
        ax.plot(results[kind]["best_threshold"], results[kind]["miou"], "*", ms=12, color=line.get_color())
    ax.set_xlabel("background threshold")
    ax.set_ylabel(f"seed mIoU ({results['split']} split, {results['images']} images)")
    ax.set_title(f"Seeds of method '{results.get('method', '?')}'")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, f"{machine_description()}; one run.\nReproduce: {command}", fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
