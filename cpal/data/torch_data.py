"""Torch views of a VOCDataset for classifier training and CAM inference.

Augmentation draws from a generator seeded by (seed, epoch, index), so a sample's crop does not
depend on worker count, batch order or a resumed run: training is reproducible across restarts.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cpal.data.voc import VOCDataset
from cpal.core.training import channels_last

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float CxHxW normalised with ImageNet statistics (also for scratch backbones)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def image_batch(images: Iterable[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Same-sized uint8 images -> one normalised (B, 3, H, W) batch in channels_last, the layout every
    network stage runs in (cpal.core.training.channels_last)."""
    return channels_last(torch.stack([to_tensor(image) for image in images]).to(device))


def random_scale_flip_crop(
    image: torch.Tensor, rng: np.random.Generator, scale_range: tuple[float, float], crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale (factor of the long side to `crop`), horizontal flip, random crop / zero-pad.

    Returns the crop and its valid-pixel mask (crop, crop) bool, false on padding."""
    _, h, w = image.shape
    factor = rng.uniform(*scale_range) * crop / max(h, w)
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    if rng.random() < 0.5:
        image = image.flip(-1)
    ones = torch.ones(image.shape[-2:], dtype=torch.uint8)
    out, valid = random_crop_pad(image, rng, crop, label=ones, ignore_index=0)
    return out, valid.bool()


def random_crop_pad(image: torch.Tensor, rng: np.random.Generator, crop: int, label: torch.Tensor | None = None,
                    ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random crop x crop window; smaller sides are placed at a random offset on zeros (label: ignore)."""
    h, w = image.shape[-2:]
    top = int(rng.integers(0, h - crop + 1)) if h > crop else 0
    left = int(rng.integers(0, w - crop + 1)) if w > crop else 0
    dst_top = int(rng.integers(0, crop - h + 1)) if h < crop else 0
    dst_left = int(rng.integers(0, crop - w + 1)) if w < crop else 0
    ch, cw = min(crop, h), min(crop, w)
    out = image.new_zeros((image.shape[0], crop, crop))
    out[:, dst_top:dst_top + ch, dst_left:dst_left + cw] = image[:, top:top + ch, left:left + cw]
    if label is None:
        return out, None
    out_label = label.new_full((crop, crop), ignore_index)
    out_label[dst_top:dst_top + ch, dst_left:dst_left + cw] = label[top:top + ch, left:left + cw]
    return out, out_label


class ClassificationData(Dataset):
    """(image tensor, multi-hot labels, valid-pixel mask, index) with per-(epoch, index) seeded augmentation."""

    def __init__(
        self, dataset: VOCDataset, crop: int, scale_range: tuple[float, float], seed: int, cache: bool = True
    ) -> None:
        self.dataset = dataset
        self.crop = crop
        self.scale_range = scale_range
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image_id = self.dataset.ids[index]
        item = (to_tensor(self.dataset.image(image_id)), torch.from_numpy(self.dataset.multi_hot(image_id)))
        if self._cache is not None:
            self._cache[index] = item
        return item

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        image, target = self._load(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        crop, valid = random_scale_flip_crop(image, rng, self.scale_range, self.crop)
        return crop, target, valid, index
