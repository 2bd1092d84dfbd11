"""The VOC-layout reader every stage shares (embedded, VOC 2012 and COCO 2014 all write this layout).

Errors name the file: a WSSS run touches thousands of files and "index out of range" helps nobody.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cpal.core.io import load_label_png

IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


class DatasetError(ValueError):
    """The dataset on disk is incomplete or inconsistent; the message names the file."""


def no_ground_truth(dataset: VOCDataset, **extra: Any) -> dict[str, Any]:
    """What an evaluation stage writes for a split without masks: nothing measured, and why (the report says so)."""
    return {"ground_truth": False, "split": dataset.split, "images": len(dataset), "miou": None,
            "reason": f"no ground-truth masks for split {dataset.split!r} ({dataset.root / 'SegmentationClass'})",
            **extra}


class VOCDataset:
    """Images, masks, split lists and image-level labels of one split of a VOC-layout dataset."""

    def __init__(self, root: str | os.PathLike[str], split: str) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder not found: {self.root} (run the data stage first)")
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_file.parent.glob("*.txt"))
            raise DatasetError(f"split list not found: {split_file} (available splits: {available})")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DatasetError(f"split list is empty: {split_file}")
        missing = [i for i in self.ids if not self.image_path(i).is_file()]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise DatasetError(
                f"{split_file}: {len(missing)} id(s) have no image on disk, e.g. "
                f"{', '.join(str(self.image_path(i)) for i in missing[:5])}{more}"
            )

    @cached_property
    def meta(self) -> dict:
        path = self.root / "dataset.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
        return {"name": "voc", "classes": list(VOC_CLASSES), "ignore_index": IGNORE_INDEX}

    @property
    def classes(self) -> list[str]:
        """Class names, background first."""
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def has_masks(self) -> bool:
        """Whether every id of the split has a ground-truth mask (needed for evaluation)."""
        return all(self.mask_path(i).is_file() for i in self.ids)

    def has_ground_truth(self) -> bool:
        """True when every id of the split has a mask, False when none has (your own data without masks).

        A split with only some masks is an error naming them: a dataset that lost files must not pass for
        one evaluated without ground truth.
        """
        missing = [i for i in self.ids if not self.mask_path(i).is_file()]
        if not missing:
            return True
        if len(missing) == len(self.ids):
            return False
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatasetError(f"split {self.split!r} of {self.root}: {len(missing)} of {len(self.ids)} id(s) have no "
                           f"ground-truth mask, e.g. {', '.join(str(self.mask_path(i)) for i in missing[:5])}{more}")

    def image(self, image_id: str) -> np.ndarray:
        """RGB uint8 array (H, W, 3)."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        except FileNotFoundError:
            raise DatasetError(f"image not found: {path}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"unreadable image: {path} ({exc})") from exc

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(height, width) read from the header only."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as img:
                w, h = img.size
        except FileNotFoundError:
            raise DatasetError(f"image not found: {path}") from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"unreadable image: {path} ({exc})") from exc
        return h, w

    def size_batches(self, batch_size: int, ids: list[str] | None = None) -> list[list[str]]:
        """`ids` (default: all) grouped by image size, so a batch needs no padding; split order within a size."""
        groups: dict[tuple[int, int], list[str]] = {}
        for image_id in self.ids if ids is None else ids:
            groups.setdefault(self.image_size(image_id), []).append(image_id)
        return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

    def mask(self, image_id: str) -> np.ndarray:
        """Ground-truth class indices (H, W) uint8, 255 = ignore; checked against the image and classes."""
        return self.label_map(self.mask_path(image_id), image_id)

    def label_map(self, path: str | os.PathLike[str], image_id: str) -> np.ndarray:
        """Any label PNG for `image_id` (ground truth, refined map, pseudo-mask), checked against its image
        size and the class range; every error names the file and the id."""
        path = Path(path)
        try:
            label = load_label_png(path)
        except FileNotFoundError:
            raise DatasetError(f"label map of {image_id!r} not found: {path}") from None
        except ValueError as exc:
            raise DatasetError(f"label map of {image_id!r}: {exc}") from exc
        size = self.image_size(image_id)
        if label.shape != size:
            raise DatasetError(
                f"{path}: label map of {image_id!r} is {label.shape[1]}x{label.shape[0]}, which differs from its "
                f"image {self.image_path(image_id)} ({size[1]}x{size[0]})"
            )
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = sorted(set(np.unique(label[bad]).tolist()))
            raise DatasetError(
                f"{path}: label value(s) {values} of {image_id!r} outside the class range "
                f"0..{self.num_classes - 1} (and {IGNORE_INDEX} = ignore)"
            )
        return label

    @cached_property
    def _label_table(self) -> dict[str, list[int]] | None:
        path = self.root / "cls_labels.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON ({exc})") from exc

    def labels(self, image_id: str) -> np.ndarray:
        """Foreground class indices (1..N-1) present in the image: the only supervision WSSS gets."""
        table = self._label_table
        if table is not None:
            if image_id not in table:
                raise DatasetError(f"{self.root / 'cls_labels.json'}: no labels for id {image_id!r}")
            labels = np.asarray(sorted(table[image_id]), dtype=np.int64)
            source = self.root / "cls_labels.json"
        else:
            xml = self.root / "Annotations" / f"{image_id}.xml"
            if xml.is_file():
                labels = self._labels_from_xml(xml)
                source = xml
            else:
                mask = self.mask(image_id)
                labels = np.asarray(sorted(set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}), dtype=np.int64)
                source = self.mask_path(image_id)
        if labels.size and (labels.min() < 1 or labels.max() >= self.num_classes):
            raise DatasetError(
                f"{source}: image-level label(s) {labels.tolist()} for {image_id!r} outside the foreground "
                f"range 1..{self.num_classes - 1}"
            )
        return labels

    def _labels_from_xml(self, path: Path) -> np.ndarray:
        try:
            tree = ET.parse(path)
        except ET.ParseError as exc:
            raise DatasetError(f"{path}: unreadable annotation ({exc})") from exc
        names = {obj.findtext("name", "").strip() for obj in tree.getroot().iter("object")}
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(n for n in names if n not in index)
        if unknown:
            raise DatasetError(f"{path}: unknown class name(s) {unknown}")
        return np.asarray(sorted(index[n] for n in names), dtype=np.int64)

    def multi_hot(self, image_id: str) -> np.ndarray:
        """Image labels as a float32 vector over the N-1 foreground classes (classifier targets)."""
        vec = np.zeros(self.num_classes - 1, dtype=np.float32)
        vec[self.labels(image_id) - 1] = 1.0
        return vec
