"""Pictures for people: a label map over its image with a legend of class names, and a heatmap over its
image, as RGB arrays (cpal-predict writes them; nothing here needs a display or matplotlib's figures).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cpal.core.io import voc_palette
from cpal.data.voc import IGNORE_INDEX


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_size(image: np.ndarray) -> int:
    """Legend text height in pixels: readable beside a 64 px thumbnail and a 4000 px photo alike."""
    return int(np.clip(round(max(image.shape[:2]) / 36), 12, 48))


def legend_entries(label: np.ndarray, classes: Sequence[str]) -> list[tuple[int, str, float]]:
    """(class id, name, fraction of the image) of every class present, largest area first."""
    counts = np.bincount(label.ravel(), minlength=256)
    total = max(1, label.size)
    names = {i: name for i, name in enumerate(classes)}
    names[IGNORE_INDEX] = "ignore"
    present = [int(c) for c in np.flatnonzero(counts)]
    unknown = [c for c in present if c not in names]
    if unknown:
        raise ValueError(f"label values {unknown} beyond the {len(classes)} classes {list(classes)}")
    return sorted(((c, names[c], counts[c] / total) for c in present), key=lambda e: (-e[2], e[0]))


def colour_overlay(image: np.ndarray, label: np.ndarray, classes: Sequence[str], alpha: float = 0.55) -> np.ndarray:
    """The image with each pixel tinted in its class's VOC colour (background left untinted), and a legend
    panel on the right naming each class present with its colour and share of the image."""
    if label.shape != image.shape[:2]:
        raise ValueError(f"label map {label.shape} and image {image.shape[:2]} differ in size")
    palette = voc_palette()
    tint = (label != 0)[:, :, None]
    mixed = image.astype(np.float32) * (1 - alpha) + palette[label].astype(np.float32) * alpha
    blended = np.where(tint, mixed, image.astype(np.float32)).round().astype(np.uint8)
    entries = legend_entries(label, classes)
    size = _text_size(image)
    line = round(size * 1.5)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textlength(f"{name} {100 * frac:.1f}%", font=font) for _, name, frac in entries)
    panel_w = int(size * 2 + text_w + size)
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w + panel_w, max(h, line * len(entries) + size)), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (c, name, frac) in enumerate(entries):
        top = size // 2 + row * line
        draw.rectangle([w + size // 2, top, w + size // 2 + size, top + size], fill=tuple(palette[c].tolist()),
                       outline="black")
        draw.text((w + 2 * size, top), f"{name} {100 * frac:.1f}%", fill="black", font=font)
    return np.asarray(canvas)


def jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] scores -> RGB uint8 in the jet colour map (blue low, red high), as CAM papers draw them."""
    v = np.clip(values.astype(np.float32), 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0], np.float32)), 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def heatmap_overlay(image: np.ndarray, score: np.ndarray, caption: str, alpha: float = 0.5) -> np.ndarray:
    """The image blended with a [0, 1] score map in jet colours, the caption (e.g. "PACAM dog") on a strip above."""
    if score.shape != image.shape[:2]:
        raise ValueError(f"score map {score.shape} and image {image.shape[:2]} differ in size")
    blended = (image.astype(np.float32) * (1 - alpha) + jet(score).astype(np.float32) * alpha).round().astype(np.uint8)
    size, font = _text_size(image), _font(_text_size(image))
    h, w = image.shape[:2]
    strip = round(size * 1.6)
    text_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(caption, font=font)) + size
    canvas = Image.new("RGB", (max(w, text_w), h + strip), "white")
    canvas.paste(Image.fromarray(blended), (0, strip))
    ImageDraw.Draw(canvas).text((size // 3, size // 4), caption, fill="black", font=font)
    return np.asarray(canvas)
