"""Images that are not a dataset: a user's own files for `cpal-predict`, found in folders of any depth,
read in any mode as RGB, grouped by (bounded) size so that equal sizes share a forward pass.

Errors name the file: a folder of holiday photos holds a broken file or two more often than not.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from cpal.core.io import atomic_path, save_jpeg, save_label_png
from cpal.data.render import colour_overlay

# What PIL reads that people keep photos in (matched case-insensitively).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An input image is missing or unreadable; the message names it."""


@dataclass(frozen=True)
class InputImage:
    """One image to predict: where it is, where its outputs go (`rel`, a relative path without the image's
    suffix, see output_keys) and, for CAMs, its image-level tags (class ids, 1..N-1)."""

    path: Path
    rel: Path
    tags: tuple[int, ...] = ()

    def output(self, folder: Path, suffix: str) -> Path:
        """`folder`/rel + suffix: rel may hold dots (`img.v2`, `photo.jpg`), so the suffix is appended."""
        return folder / f"{self.rel}{suffix}"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(inputs: Iterable[str | os.PathLike[str]]) -> list[InputImage]:
    """Every image under the given folders (any depth, hidden entries skipped) and the given files.

    A folder's images keep their path below it (the output mirrors the sub-folders), a file given on
    its own keeps its name (output_keys).
    """
    found: list[tuple[Path, Path]] = []
    for given in map(Path, inputs):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and _is_image(p)
                           and not any(part.startswith(".") for part in p.relative_to(given).parts))
            found += [(p, p.relative_to(given)) for p in files]
        elif given.is_file():
            if given.suffix.lower() not in IMAGE_SUFFIXES:
                raise ImageError(f"{given}: not an image file name (suffixes read: {', '.join(IMAGE_SUFFIXES)})")
            found.append((given, Path(given.name)))
        else:
            raise ImageError(f"input not found: {given}")
    return output_keys(found)


def output_keys(found: list[tuple[Path, Path]], tags: list[tuple[int, ...]] | None = None) -> list[InputImage]:
    """(file, path relative to its input) pairs -> InputImages whose outputs never collide.

    The output name drops the image's suffix unless two images differ only by it (`photo.jpg` and
    `photo.png` write `photo.jpg.png` and `photo.png.png`, not one `photo.png`); a clash that remains
    (the same relative path under two inputs) is an error naming both files.
    """
    stems: dict[Path, int] = {}
    for _, rel in found:
        stems[rel.with_suffix("")] = stems.get(rel.with_suffix(""), 0) + 1
    out: list[InputImage] = []
    taken: dict[Path, Path] = {}
    for k, (path, rel) in enumerate(found):
        key = rel.with_suffix("") if stems[rel.with_suffix("")] == 1 else rel
        if key in taken:
            raise ImageError(f"{taken[key]} and {path} would write the same outputs ({key}); give them separately "
                             "or rename one")
        taken[key] = path
        out.append(InputImage(path, key, tags[k] if tags else ()))
    return out


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Any image file as RGB uint8 (H, W, 3), turned upright as its EXIF orientation says (phone photos).

    Palette, grey, alpha and CMYK images convert as PIL does (alpha dropped); 16-bit and float grey
    images are scaled to 0..255 by their own range first, where a plain conversion would clip them white.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                values = np.asarray(img, dtype=np.float64)
                lo, hi = float(values.min()), float(values.max())
                grey = np.zeros(values.shape, np.uint8) if hi <= lo else np.round(
                    (values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image: {path} ({exc})") from exc


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) as read_rgb returns the image (EXIF rotation applied), from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap width and height
                w, h = h, w
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image: {path} ({exc})") from exc
    return h, w


def bounded_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(height, width) scaled down so that the long side is at most `max_side` (never scaled up)."""
    h, w = size
    if not max_side or max(h, w) <= max_side:
        return h, w
    factor = max_side / max(h, w)
    return max(1, round(h * factor)), max(1, round(w * factor))


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB image at (height, width); area-averaging when shrinking (no aliasing)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BOX
                                                    if size[0] < image.shape[0] else Image.Resampling.BILINEAR))


def size_groups(images: list[InputImage], max_side: int | None, batch_size: int
                ) -> tuple[list[list[InputImage]], list[tuple[InputImage, ImageError]]]:
    """Batches of images that share their bounded size (one forward each) and the unreadable ones."""
    groups: dict[tuple[int, int], list[InputImage]] = {}
    bad: list[tuple[InputImage, ImageError]] = []
    for item in images:
        try:
            groups.setdefault(bounded_size(image_size(item.path), max_side), []).append(item)
        except ImageError as exc:
            bad.append((item, exc))
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return batches, bad


@dataclass
class Loaded:
    """An input image read whole (`image`, its own size) and at the size the network sees (`resized`)."""

    item: InputImage
    image: np.ndarray
    resized: np.ndarray


class ImageBatches:
    """Iterate over batches of Loaded images that share their bounded size, with a progress bar.

    Unreadable files do not stop the run: they are collected in `skipped` (input, reason) for the caller
    to report, as a folder of photos with one broken file should still give the other results.
    """

    def __init__(self, images: list[InputImage], max_side: int | None, batch_size: int, progress: bool = True,
                 desc: str = "predict") -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if max_side is not None and max_side < 8:
            raise ValueError(f"max side must be at least 8 pixels, got {max_side}")
        self.total = len(images)
        self.max_side, self.progress, self.desc = max_side, progress, desc
        self.batches, bad = size_groups(images, max_side, batch_size)
        self.skipped: list[tuple[InputImage, str]] = [(item, str(exc)) for item, exc in bad]

    def __iter__(self) -> Iterator[list[Loaded]]:
        bar = tqdm(total=self.total, initial=len(self.skipped), desc=self.desc, unit="image", disable=not self.progress)
        for batch in self.batches:
            loaded = []
            for item in batch:
                try:
                    image = read_rgb(item.path)
                except ImageError as exc:  # the header read but the pixels did not (a truncated file)
                    self.skipped.append((item, str(exc)))
                    continue
                loaded.append(Loaded(item, image, resize_rgb(image, bounded_size(image.shape[:2], self.max_side))))
            if loaded:
                yield loaded
            bar.update(len(batch))
        bar.close()


def class_areas(label: np.ndarray, classes: list[str]) -> dict[str, int | float]:
    """Pixels and fraction of the image per class (every class, zeros included: one CSV column each)."""
    counts = np.bincount(label.ravel(), minlength=len(classes))[:len(classes)]
    total = label.size
    row: dict[str, int | float] = {f"pixels_{c}": int(n) for c, n in zip(classes, counts, strict=True)}
    row.update({f"fraction_{c}": round(float(n) / total, 6) for c, n in zip(classes, counts, strict=True)})
    return row


class LabelWriter:
    """Writes each image's label map (`masks/`, VOC palette PNG of class ids), its colour overlay with a legend
    (`overlays/`, JPEG) and one row of class areas; `finish` writes `areas.csv`. Sub-folders follow `rel`."""

    def __init__(self, out: Path, classes: list[str]) -> None:
        self.out, self.classes = Path(out), list(classes)
        self.rows: list[dict[str, object]] = []

    def write(self, loaded: Loaded, label: np.ndarray) -> None:
        item = loaded.item
        save_label_png(item.output(self.out / "masks", ".png"), label)
        save_jpeg(item.output(self.out / "overlays", ".jpg"), colour_overlay(loaded.image, label, self.classes))
        h, w = label.shape
        self.rows.append({"image": item.rel.as_posix(), "file": str(item.path), "width": w, "height": h,
                          **class_areas(label, self.classes)})

    def finish(self) -> Path:
        """areas.csv: one row per image, sorted by `image` (the output name below masks/; `file`: the input)."""
        path = self.out / "areas.csv"
        fields = ["image", "file", "width", "height", *(f"pixels_{c}" for c in self.classes),
                  *(f"fraction_{c}" for c in self.classes)]
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(sorted(self.rows, key=lambda r: str(r["image"])))
        return path
