"""Figures for the report and the docs. matplotlib is imported inside each function (Agg backend), so
importing this module costs nothing and needs no display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cpal.core.io import atomic_path, load_label_png, voc_palette


def _dataset_classes(root: Path) -> list[str]:
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            return list(json.loads(meta.read_text())["classes"])
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{meta}: cannot read the class list ({exc})") from exc
    from cpal.data.voc import VOC_CLASSES

    return list(VOC_CLASSES)


def plot_dataset_samples(root: Path, split: str, out_png: Path, n: int = 8, footer: str = "") -> None:
    """A grid of sample images with their ground-truth masks below, a class legend and a footer
    (the caller states machine, seed and command there), so a reader sees what the data look like.
    Without masks (your own data) the titles give the image-level labels and the mask panels say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"split list not found: {split_file}")
    ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split list is empty: {split_file}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    n = min(n, len(ids))
    # a fixed pseudo-random pick: evenly spaced ids can alias with any periodic order of the list
    chosen = [ids[int(i)] for i in sorted(np.random.default_rng(0).choice(len(ids), n, replace=False))]
    classes = _dataset_classes(root)
    palette = voc_palette()

    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(2.6 * cols, 2.6 * 2 * rows + 1.2), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for k, image_id in enumerate(chosen):
        r, col = divmod(k, cols)
        img_path = root / "JPEGImages" / f"{image_id}.jpg"
        mask_path = root / "SegmentationClass" / f"{image_id}.png"
        try:
            with Image.open(img_path) as im:
                image = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {img_path}") from None
        if not mask_path.is_file():
            tags = json.loads((root / "cls_labels.json").read_text()).get(image_id, [])
            names = [classes[c] for c in tags]
            axes[2 * r, col].imshow(image)
            axes[2 * r, col].set_title(f"{image_id}\n{', '.join(names) or '(no class)'}", fontsize=8)
            axes[2 * r + 1, col].text(0.5, 0.5, "no ground-truth mask", ha="center", va="center", fontsize=8)
            continue
        mask = load_label_png(mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask shape {mask.shape} != image shape {image.shape[:2]}")
        present = [int(c) for c in np.unique(mask) if c != 255]
        bad = [c for c in present if c >= len(classes)]
        if bad:
            raise ValueError(f"{mask_path}: class indices {bad} beyond the {len(classes)} classes of {root}")
        names = [classes[c] for c in present if c != 0]
        axes[2 * r, col].imshow(image)
        axes[2 * r, col].set_title(f"{image_id}\n{', '.join(names) or '(background)'}", fontsize=8)
        axes[2 * r + 1, col].imshow(palette[mask], interpolation="nearest")
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="black", label=name)
               for c, name in enumerate(classes)]
    handles.append(Patch(facecolor=palette[255] / 255.0, edgecolor="black", label="ignore (255)"))
    ncol = min(len(handles), 8)
    fig.legend(handles=handles, loc="outside upper center", ncol=ncol, fontsize=8, frameon=False)
    if footer:
        fig.supxlabel(footer, x=0.01, ha="left", fontsize=7, family="monospace")
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
