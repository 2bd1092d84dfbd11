"""Stages `pseudo_labels` / `eval_pseudo`: the pseudo-masks DeepLab trains on, and their quality.

Sources (`cfg['source']`):
- `seeds`: the seed label map of `cfg['map']` (cam | pacam) with background where every foreground map
  is below `cfg['bg_threshold']` (the rule of eval_seeds, `cpal.seeds.store.labels_from_maps`); `auto`: Otsu's
  split of the seeds' own top-score histogram (cpal/seeds/thresholds.py, no ground truth). Optional
  uncertainty band: pixels whose top foreground score lies in [`ignore_low`, `ignore_high`) become 255
  (ignored by the segmentation loss); the band is off when `ignore_high <= ignore_low`. A band around
  `bg_threshold` drops the pixels whose background / foreground call is least sure.
- `crf` / `irn` / `amn_crf` / `amn_irn`: the refined label PNGs of that stage (`amn_*`: AMN's maps through the
  CRF or IRN, the AMN branch), checked (size, class range) and re-written.

Output: one VOC palette PNG per id (class ids, 255 = uncertain), written to a hidden sibling folder that
replaces `out_dir` only when every id is done.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cpal.core.io import save_label_png
from cpal.core.metrics import ConfusionMatrix
from cpal.crf.refine import staged_dir
from cpal.data.voc import IGNORE_INDEX, DatasetError, VOCDataset, no_ground_truth
from cpal.seeds.store import MAP_KEYS, check_complete, labels_from_maps, load_seeds, seed_path
from cpal.seeds.thresholds import resolve_threshold

SOURCES = ("seeds", "crf", "irn", "amn_crf", "amn_irn")


class PseudoLabelError(ValueError):
    """A pseudo-label input or output is missing or inconsistent; the message names the file or id."""


def pseudo_from_seeds(seeds: dict[str, np.ndarray], cfg: dict[str, Any], source: str = "") -> np.ndarray:
    """Seed label map with the optional uncertainty band set to 255; (H, W) uint8."""
    kind = cfg["map"]
    if kind not in MAP_KEYS:
        raise ValueError(f"pseudo.map = {kind!r} is invalid; allowed: {MAP_KEYS}")
    if kind not in seeds:
        raise PseudoLabelError(f"{source}: seed file has no {kind!r} map")
    maps = seeds[kind].astype(np.float32)
    label = labels_from_maps(maps, seeds["keys"], float(cfg["bg_threshold"]))
    low, high = float(cfg.get("ignore_low", 0.0)), float(cfg.get("ignore_high", 0.0))
    if high > low and maps.shape[0]:
        peak = maps.max(axis=0)
        label[(peak >= low) & (peak < high)] = IGNORE_INDEX
    return label


def _from_png(dataset: VOCDataset, folder: Path, image_id: str) -> np.ndarray:
    try:
        return dataset.label_map(folder / f"{image_id}.png", image_id)
    except DatasetError as exc:
        raise PseudoLabelError(str(exc)) from exc


def make_pseudo_labels(dataset: VOCDataset, source: str, inputs: Path, out_dir: Path, cfg: dict[str, Any],
                       log: logging.Logger, progress: bool = True) -> dict[str, Any]:
    """Write `out_dir/<id>.png` for every id of the split; returns a small summary (counts, ignored share)."""
    if source not in SOURCES:
        raise ValueError(f"pseudo.source = {source!r} is invalid; allowed: {SOURCES}")
    inputs = Path(inputs)
    if not inputs.is_dir():
        raise PseudoLabelError(f"pseudo-label input folder not found: {inputs} (source {source!r})")
    derived = None
    if source == "seeds":
        check_complete(inputs, dataset.ids)
        if cfg["map"] not in MAP_KEYS:
            raise ValueError(f"pseudo.map = {cfg['map']!r} is invalid; allowed: {MAP_KEYS}")
        cfg, derived = resolve_threshold(cfg, "bg_threshold", inputs, dataset.ids, cfg["map"])
        if derived:
            log.info("pseudo-mask background threshold %.4f from the seeds' own score histogram (Otsu, no ground "
                     "truth): %s", cfg["bg_threshold"], derived)
    ignored = total = 0
    with staged_dir(out_dir, log) as tmp:
        for image_id in tqdm(dataset.ids, desc=f"pseudo_labels ({source})", disable=not progress):
            if source == "seeds":
                path = seed_path(inputs, image_id)
                seeds = load_seeds(path, expected_size=dataset.image_size(image_id))
                label = pseudo_from_seeds(seeds, cfg, source=str(path))
            else:
                label = _from_png(dataset, inputs, image_id)
            ignored += int((label == IGNORE_INDEX).sum())
            total += label.size
            save_label_png(tmp / f"{image_id}.png", label)
    summary = {"source": source, "images": len(dataset), "ignored_fraction": ignored / total if total else 0.0,
               "bg_threshold": cfg["bg_threshold"] if source == "seeds" else None, "bg_threshold_derived": derived}
    log.info("pseudo_labels: %d masks from %s, %.2f%% of pixels ignored", len(dataset), source,
             100 * summary["ignored_fraction"])
    return summary


def evaluate_pseudo_labels(dataset: VOCDataset, folder: Path, progress: bool = False) -> dict[str, Any]:
    """mIoU of the pseudo-masks against ground truth (a 255 counts as a miss) and on confident pixels only.

    `miou` is the protocol number (docs/results.md, "Evaluation protocol": abstaining cannot raise it); `miou_confident`
    excludes pixels the pseudo-mask ignores, i.e. the precision side of the coverage trade-off;
    `ignored_fraction` is the share of all pixels set to 255, `ignored_fraction_labelled` the share
    of ground-truth-labelled pixels. A split without masks gets no score (`ground_truth: false`), only
    the ignored share.
    """
    folder = Path(folder)
    with_truth = dataset.has_ground_truth()
    n = dataset.num_classes
    cm, cm_confident = ConfusionMatrix(n), ConfusionMatrix(n)
    ignored = total = ignored_labelled = labelled = 0
    for image_id in tqdm(dataset.ids, desc="eval_pseudo", disable=not progress):
        gt = dataset.mask(image_id) if with_truth else None
        pred = _from_png(dataset, folder, image_id)
        unsure = pred == IGNORE_INDEX
        ignored += int(unsure.sum())
        total += pred.size
        if gt is None:
            continue
        cm.update(pred, gt)
        cm_confident.update(pred, np.where(unsure, IGNORE_INDEX, gt))
        valid = gt != IGNORE_INDEX
        ignored_labelled += int((unsure & valid).sum())
        labelled += int(valid.sum())
    if not with_truth:
        return no_ground_truth(dataset, miou_confident=None, ignored_fraction=ignored / total if total else 0.0)
    scores = cm.scores(dataset.classes)
    confident = cm_confident.scores(dataset.classes)
    return {
        "ground_truth": True,
        "split": dataset.split,
        "images": len(dataset),
        "miou": scores["miou"],
        "pixel_acc": scores["pixel_acc"],
        "per_class_iou": {k: v["iou"] for k, v in scores["per_class"].items()},
        "per_class_precision": {k: v["precision"] for k, v in scores["per_class"].items()},
        "per_class_recall": {k: v["recall"] for k, v in scores["per_class"].items()},
        "miou_confident": confident["miou"],
        "per_class_iou_confident": {k: v["iou"] for k, v in confident["per_class"].items()},
        "ignored_fraction": ignored / total if total else 0.0,
        "ignored_fraction_labelled": ignored_labelled / labelled if labelled else 0.0,
    }
