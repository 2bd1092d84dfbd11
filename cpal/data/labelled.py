"""(image, label mask) pairs for training on pixel labels: DeepLab on pseudo-masks or ground truth, AMN on
IR labels (a subclass in cpal/amn/ names its own kind of label).

Labels are read and checked once, before training starts: a missing, mis-sized or out-of-range mask,
or a set with no labelled pixel at all, is an error that names the folder or the id, not a crash an
hour into the run. The scan also counts pixels per class (for class-balanced weights).
Augmentation (random scale, flip, crop) draws from a generator seeded by (seed, epoch, index), so a
resumed run sees exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cpal.data.torch_data import to_tensor
from cpal.data.voc import IGNORE_INDEX, DatasetError, VOCDataset


def _some(ids: list[str], n: int = 5) -> str:
    more = f" (and {len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def scale_flip_crop(
    image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator, scale_range: tuple[float, float], crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepLab augmentation: rescale by a random factor, flip, pad (image 0 = mean, label 255), random crop."""
    _, h, w = image.shape
    factor = rng.uniform(*scale_range)
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest-exact")[0, 0].long()
    if rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
    top = int(rng.integers(0, image.shape[1] - crop + 1))
    left = int(rng.integers(0, image.shape[2] - crop + 1))
    return (image[:, top:top + crop, left:left + crop].contiguous(),
            label[top:top + crop, left:left + crop].contiguous())


class SegmentationData(Dataset):
    """(image tensor, label tensor int64 with 255 = ignore, index) of one split.

    `labels_dir` None takes the dataset's ground-truth masks (the fully supervised upper bound);
    otherwise `<labels_dir>/<id>.png` label maps of kind ``KIND``, written by stage ``PRODUCER`` (a subclass
    sets both, and ``TAG``, which prefixes the folder's name in :attr:`source`).
    """

    KIND, PRODUCER, TAG = "pseudo-mask", "pseudo_labels", "pseudo"

    def __init__(
        self,
        dataset: VOCDataset,
        labels_dir: Path | None,
        crop_size: int,
        scale_range: tuple[float, float],
        seed: int,
        cache: bool = True,
    ) -> None:
        self.dataset = dataset
        self.labels_dir = Path(labels_dir) if labels_dir is not None else None
        self.crop = crop_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.seed = seed
        self.epoch = 0
        self._cache = cache
        self._images: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}
        self.class_pixels = self._scan()

    @property
    def source(self) -> str:
        """What the labels are, for metrics and checkpoint meta."""
        return "ground_truth" if self.labels_dir is None else f"{self.TAG}:{self.labels_dir.name}"

    def label_path(self, image_id: str) -> Path:
        return self.dataset.mask_path(image_id) if self.labels_dir is None else self.labels_dir / f"{image_id}.png"

    def _scan(self) -> np.ndarray:
        """Check every label map of the split; pixels per class (int64, length num_classes)."""
        ds = self.dataset
        if self.labels_dir is not None:
            where = self.labels_dir
            if not where.is_dir():
                raise DatasetError(f"{self.KIND} folder not found: {where} (run the {self.PRODUCER} stage first)")
            if not any(where.glob("*.png")):
                raise DatasetError(f"no labelled pixels in {where}: the folder holds no {self.KIND} PNGs")
            what = self.KIND
        else:
            where = ds.root / "SegmentationClass"
            what = "ground-truth mask"
        missing = [i for i in ds.ids if not self.label_path(i).is_file()]
        if missing:
            raise DatasetError(
                f"{where}: {len(missing)} id(s) of split {ds.split!r} have no {what}: {_some(missing)}"
            )
        counts = np.zeros(ds.num_classes + 1, dtype=np.int64)  # last bin: ignore
        for index, image_id in enumerate(ds.ids):
            label = self._read_label(image_id)
            counts += np.bincount(np.where(label == IGNORE_INDEX, ds.num_classes, label).ravel(),
                                  minlength=ds.num_classes + 1)
            if self._cache:
                self._labels[index] = label
        if counts[:-1].sum() == 0:
            raise DatasetError(f"no labelled pixels in {where}: every {what} of split {ds.split!r} is all "
                               f"ignore ({IGNORE_INDEX})")
        return counts[:-1]

    def _read_label(self, image_id: str) -> np.ndarray:
        ds = self.dataset
        if self.labels_dir is None:
            return ds.mask(image_id)  # checks size and class range, naming the file
        return ds.label_map(self.label_path(image_id), image_id)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_id = self.dataset.ids[index]
        image = self._images.get(index)
        if image is None:
            image = self.dataset.image(image_id)
            if self._cache:
                self._images[index] = image
        label = self._labels.get(index)
        if label is None:
            label = self._read_label(image_id)
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label = self._load(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        x, y = scale_flip_crop(to_tensor(image), torch.from_numpy(label.astype(np.int64)), rng, self.scale_range,
                               self.crop)
        return x, y, index
