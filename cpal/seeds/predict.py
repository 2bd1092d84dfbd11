"""The classifier's CAMs on a user's own images with given tags (`cpal-predict --cams`): what to look at
first when a new dataset gives poor masks. The same multi-scale + flip maps as make_seeds (one code path),
drawn instead of stored: a CAM and a PACAM heatmap per tag, and the seed argmax mask.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpal.backbone import for_inference
from cpal.cls.network import CAMNet
from cpal.core.io import save_jpeg
from cpal.data.images import ImageBatches, ImageError, InputImage, LabelWriter, output_keys
from cpal.data.render import heatmap_overlay
from cpal.data.torch_data import image_batch
from cpal.seeds.make import multiscale_maps, seed_maps
from cpal.seeds.store import BACKGROUND_KEY, labels_from_maps, labels_with_background

TAG_SEPARATOR = ";"
DEFAULT_BG_THRESHOLD = 0.45  # the pseudo-mask default (params pseudo.bg_threshold) for CAM-only classifiers


def read_tags(csv_path: Path, classes: list[str]) -> list[InputImage]:
    """Images and their tags from a CSV with columns `image` (a path, relative to the CSV's folder or
    absolute) and `labels` (foreground class names joined by ';', empty for none). Outputs mirror the
    paths below the CSV's folder."""
    csv_path = Path(csv_path)
    index = {name: i for i, name in enumerate(classes) if i > 0}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
    except FileNotFoundError:
        raise ImageError(f"tag file not found: {csv_path}") from None
    if not {"image", "labels"} <= columns:
        raise ImageError(f"{csv_path}: needs the columns image,labels (got {sorted(c for c in columns if c)})")
    found, tags = [], []
    for line, row in enumerate(rows, start=2):
        names = [n.strip() for n in (row["labels"] or "").split(TAG_SEPARATOR) if n.strip()]
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ImageError(f"{csv_path}, line {line}: unknown class name(s) {unknown}; the checkpoint's "
                             f"foreground classes are {list(index)}")
        path = Path(row["image"] or "")
        path = path if path.is_absolute() else csv_path.parent / path
        if not path.is_file():
            raise ImageError(f"{csv_path}, line {line}: image not found: {path}")
        inside = path.resolve().is_relative_to(csv_path.parent.resolve())
        found.append((path, path.resolve().relative_to(csv_path.parent.resolve()) if inside else Path(path.name)))
        tags.append(tuple(sorted({index[n] for n in names})))
    return output_keys(found, tags)


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) scores at (C, *size), bilinear (maps predicted at a bounded size back onto the image)."""
    if maps.shape[-2:] == tuple(size):
        return maps
    if maps.shape[0] == 0:
        return np.zeros((0, *size), np.float32)
    t = torch.from_numpy(maps.astype(np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].clamp_(0, 1).numpy()


def seed_label(maps: dict[str, np.ndarray], keys: np.ndarray, bg_threshold: float | None) -> np.ndarray:
    """The seed argmax mask: PACAM against its own background prototype (SIPE's protocol, no threshold) when
    the classifier has one and no threshold is given; else the best map (PACAM, CAM) with a background plane."""
    if bg_threshold is None and "pacam" in maps:
        return labels_with_background(maps["pacam"], maps[BACKGROUND_KEY], keys)
    score = maps["pacam"] if "pacam" in maps else maps["cam"]
    return labels_from_maps(score, keys, DEFAULT_BG_THRESHOLD if bg_threshold is None else bg_threshold)


def predict_cams(model: CAMNet, classes: list[str], images: list[InputImage], out: Path, scales: list[float],
                 flip: bool, device: torch.device, max_side: int | None, batch_size: int,
                 bg_threshold: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Write per image `heatmaps/<rel>/cam_<tag>.jpg` (and `pacam_<tag>.jpg`), the seed mask in `masks/`, its
    overlay in `overlays/` and `areas.csv`; return counts and the skipped files."""
    out = Path(out)
    model = for_inference(model)
    writer = LabelWriter(out, classes)
    batches = ImageBatches(images, max_side, batch_size, progress, desc="cpal-predict --cams")
    for batch in batches:
        labels = np.zeros((len(batch), len(classes) - 1), np.float32)
        for b, loaded in enumerate(batch):
            labels[b, np.asarray(loaded.item.tags, dtype=np.int64) - 1] = 1.0
        x = image_batch([loaded.resized for loaded in batch], device)
        cam, pacam = multiscale_maps(model, x, torch.from_numpy(labels).to(device), scales, flip)
        for b, loaded in enumerate(batch):
            keys = np.asarray(loaded.item.tags, dtype=np.int64)
            size = loaded.image.shape[:2]
            small = seed_maps(cam[b], None if pacam is None else pacam[b], keys)
            maps = {k: resize_maps(v if v.ndim == 3 else v[None], size) for k, v in small.items()}
            if BACKGROUND_KEY in maps:
                maps[BACKGROUND_KEY] = maps[BACKGROUND_KEY][0]
            for kind in ("cam", "pacam"):
                for channel, key in enumerate(keys if kind in maps else []):
                    name = classes[key]
                    save_jpeg(out / "heatmaps" / loaded.item.rel / f"{kind}_{name}.jpg",
                              heatmap_overlay(loaded.image, maps[kind][channel], f"{kind.upper()} {name}"))
            writer.write(loaded, seed_label(maps, keys, bg_threshold))
    areas = writer.finish()
    return {"images": len(writer.rows), "skipped": batches.skipped, "areas": areas}
