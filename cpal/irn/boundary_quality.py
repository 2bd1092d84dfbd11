"""How well IRN's boundary map separates class edges from the rest, against the pixel labels: a diagnostic.

Why: IRN's walk is damped wherever the boundary map is high. On true class edges (cpal/irn/oracle.py) the walk
can reach far better masks than on the network's map, so the map itself is the suspect; this says how: the
mean boundary probability on ground-truth edge cells, inside objects and on the background away from edges
(cells not adjacent to an edge cell), and the AUC of telling edge cells from interior cells (the chance that a
random edge cell scores above a random interior cell; 0.5 is no better than chance). It reads pixel labels:
an analysis of a trained network, never something a weakly supervised run may use.

What the network learned from is scored too (`--ir-labels`, ir_labels' folder): of the pixels the relation
labels call confident foreground, the share whose class is right (precision), and of the true object pixels the
share they label with the right class (coverage); the same for background; the share left unsure (255).

    python -m cpal.irn.boundary_quality --irn outputs/irn/model.pt --data data/embedded --images 200
    python -m cpal.irn.boundary_quality --ir-labels outputs/irn/ir_labels --data data/embedded --images 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpal.backbone import for_inference
from cpal.core.training import CheckpointError, resolve_device
from cpal.data.voc import IGNORE_INDEX, DatasetError, VOCDataset
from cpal.irn.model import STRIDE, load_boundary_net
from cpal.irn.oracle import fill_ignored, ground_truth_boundary
from cpal.irn.refine import BOUNDARY_BATCH, boundaries

REGIONS = ("edge", "object", "background")


def cell_regions(mask: np.ndarray) -> np.ndarray:
    """(ceil(H/4), ceil(W/4)) int8 per grid cell: 0 edge, 1 object interior, 2 background interior, -1 neither
    (next to an edge cell, or mostly ignored pixels)."""
    edges = ground_truth_boundary(mask)
    near = F.max_pool2d(edges[None, None], 3, 1, 1)[0, 0].bool()
    filled = torch.from_numpy(fill_ignored(mask).astype(np.float32))[None, None]
    fg = F.avg_pool2d((filled > 0).float(), STRIDE, STRIDE, ceil_mode=True)[0, 0] > 0.5
    ignored = torch.from_numpy((mask == IGNORE_INDEX).astype(np.float32))[None, None]
    mostly_ignored = F.avg_pool2d(ignored, STRIDE, STRIDE, ceil_mode=True)[0, 0] > 0.5
    out = torch.where(fg, 1, 2).to(torch.int8)
    out[near] = -1
    out[edges.bool()] = 0
    out[mostly_ignored & ~edges.bool()] = -1
    return out.numpy()


def auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (n_pos n_neg))."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    tie_sum = np.bincount(inverse, weights=ranks)  # average rank within each group of equal scores
    ranks = (tie_sum / counts)[inverse]
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def summarise(scores: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Mean boundary per region and the AUCs of edges against each interior, from per-image score arrays."""
    pooled = {r: np.concatenate(scores[r]) if scores[r] else np.zeros(0) for r in REGIONS}
    interior = np.concatenate([pooled["object"], pooled["background"]])
    return {
        "cells": {r: int(len(pooled[r])) for r in REGIONS},
        "mean_boundary": {r: float(pooled[r].mean()) if len(pooled[r]) else None for r in REGIONS},
        "auc_edge_vs_interior": auc(pooled["edge"], interior),
        "auc_edge_vs_object": auc(pooled["edge"], pooled["object"]),
        "auc_edge_vs_background": auc(pooled["edge"], pooled["background"]),
    }


@torch.no_grad()
def labelled_ids(data_dir: Path, split: str, images: int) -> tuple[VOCDataset, list[str]]:
    """The split and its first `images` ids (0: all); refused without pixel labels, which every score reads."""
    dataset = VOCDataset(data_dir, split)
    if not dataset.has_masks():
        raise DatasetError(f"{data_dir} split {split!r} has no pixel labels: the scores need them")
    return dataset, dataset.ids[:images] if images > 0 else dataset.ids


def boundary_quality(irn_path: Path, data_dir: Path, split: str = "train", images: int = 200,
                     device: str = "cpu", flip: bool = True) -> dict[str, Any]:
    """summarise() over the first `images` images of `split` (0: all), as refine_irn computes the map."""
    dataset, ids = labelled_ids(data_dir, split, images)
    torch_device = resolve_device(device)
    model = for_inference(load_boundary_net(irn_path, torch_device))
    scores: dict[str, list[np.ndarray]] = {r: [] for r in REGIONS}
    for batch in dataset.size_batches(BOUNDARY_BATCH, ids):
        maps = boundaries(model, [dataset.image(i) for i in batch], flip, torch_device).cpu().numpy()
        for image_id, b in zip(batch, maps, strict=True):
            regions = cell_regions(dataset.mask(image_id))
            if regions.shape != b.shape:
                raise ValueError(f"{image_id}: label grid {regions.shape} differs from the boundary map's {b.shape}")
            for code, name in enumerate(REGIONS):
                scores[name].append(b[regions == code])
    return {"irn": str(irn_path), "data": str(data_dir), "split": split, "images": len(ids), "flip": flip,
            **summarise(scores)}


def label_quality(label_dir: Path, data_dir: Path, split: str = "train", images: int = 0) -> dict[str, Any]:
    """The relation labels of ir_labels against the pixel labels (their void pixels left out)."""
    dataset, ids = labelled_ids(data_dir, split, images)
    n = dict.fromkeys(("fg", "fg_right", "bg", "bg_right", "unsure", "true_fg", "true_bg", "pixels"), 0)
    for image_id in ids:
        label = dataset.label_map(label_dir / f"{image_id}.png", image_id)  # size and class range checked
        truth = dataset.mask(image_id)
        valid = truth != IGNORE_INDEX
        label, truth = label[valid], truth[valid]
        fg, bg = (label > 0) & (label != IGNORE_INDEX), label == 0
        for key, count in (("fg", fg), ("fg_right", fg & (label == truth)), ("bg", bg),
                           ("bg_right", bg & (truth == 0)), ("unsure", label == IGNORE_INDEX),
                           ("true_fg", truth > 0), ("true_bg", truth == 0)):
            n[key] += int(count.sum())
        n["pixels"] += int(valid.sum())

    def share(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"ir_labels": str(label_dir), "images": len(ids),
            "foreground_precision": share(n["fg_right"], n["fg"]),
            "foreground_coverage": share(n["fg_right"], n["true_fg"]),
            "background_precision": share(n["bg_right"], n["bg"]),
            "background_coverage": share(n["bg_right"], n["true_bg"]),
            "unsure_fraction": share(n["unsure"], n["pixels"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--irn", type=Path, default=None, help="IRN checkpoint (train_irn's model.pt)")
    p.add_argument("--ir-labels", type=Path, default=None, help="ir_labels' folder of relation labels")
    p.add_argument("--data", type=Path, required=True, help="dataset folder with pixel labels")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=200, help="first N images of the split (0: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here as well")
    args = p.parse_args(argv)
    if args.irn is None and args.ir_labels is None:
        p.error("give --irn (the boundary map), --ir-labels (what it trained on), or both")
    result: dict[str, Any] = {}
    try:
        if args.irn is not None:
            result = boundary_quality(args.irn, args.data, args.split, args.images, args.device)
        if args.ir_labels is not None:
            result["labels"] = label_quality(args.ir_labels, args.data, args.split, args.images)
    except (CheckpointError, DatasetError, FileNotFoundError) as error:
        print(f"boundary_quality: {error}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
