"""A small VOC-layout dataset of coloured rectangles on noise (classes background, red, blue), shared by the
IRN and AMN tests; pytest puts tests/ on sys.path, so they import it as `rectangles`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cpal.core.io import save_jpeg, save_label_png

CLASSES = ["background", "red", "blue"]


def rectangles_dataset(data: Path, name: str, size: tuple[int, int], n: int = 6,
                       step: tuple[int, int] = (14, 16)) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write ``n`` images of ``size`` (h, w) into ``data`` (split `train`): image k shows red (k % 3 == 0),
    blue (1) or both (2) as 14 x 16 rectangles, the second offset by ``step``. Returns id -> (mask, classes)."""
    rng = np.random.default_rng(0)
    h, w = size
    out: dict[str, tuple[np.ndarray, list[int]]] = {}
    for k in range(n):
        image_id = f"img_{k}"
        image = rng.integers(90, 140, size=(h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        present = [1] if k % 3 == 0 else [2] if k % 3 == 1 else [1, 2]
        for j, cls in enumerate(present):
            top, left = 4 + step[0] * j, 5 + step[1] * j
            mask[top:top + 14, left:left + 16] = cls
            image[top:top + 14, left:left + 16] = (220, 30, 30) if cls == 1 else (30, 30, 220)
        save_jpeg(data / "JPEGImages" / f"{image_id}.jpg", image)
        save_label_png(data / "SegmentationClass" / f"{image_id}.png", mask)
        out[image_id] = (mask, present)
    (data / "ImageSets" / "Segmentation").mkdir(parents=True)
    (data / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(out) + "\n")
    (data / "cls_labels.json").write_text(json.dumps({i: p for i, (_, p) in out.items()}))
    (data / "dataset.json").write_text(json.dumps({"name": name, "source": "test", "classes": CLASSES,
                                                   "ignore_index": 255, "splits": {"train": n}}))
    return out
