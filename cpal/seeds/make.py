"""Seed generation (stage `make_seeds`): multi-scale + flip CAM and PACAM for every image of a split.

Images of equal size are batched; each scale's raw maps are upsampled to full resolution, flipped
back, summed over scales and flips, then each image-label class is divided by its maximum (IRN and
SIPE practice). PACAM uses the support bank stored in the checkpoint. Alignment (docs/method.md) is off
at seed time by default: with one instance of a class in a batch, the aligned anchor equals the bank
mean and retrieval would ignore the image. `seeds.amp` runs the forwards under float16 autocast on
CUDA (ignored on CPU).

Kill-safe and resumable like the IRN stages (cpal/irn/__init__.py): files go to a hidden sibling
`.<out>.partial` that replaces `out_dir` only when every id is written, so a killed run never leaves a
folder that looks complete. The partial folder carries a fingerprint of the weights, the settings and
the image files; a rerun with the same fingerprint keeps the batches already written (every file was
written atomically) and recomputes the others with the same batch composition, so a resumed run writes
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cpal.backbone import for_inference
from cpal.cls.network import CAMNet
from cpal.core.io import inputs_stamp, partial_folder, publish_folder
from cpal.core.runtime import cuda_peak_mib
from cpal.core.training import config_fingerprint
from cpal.data.torch_data import image_batch
from cpal.data.voc import VOCDataset
from cpal.seeds.store import BACKGROUND_KEY, save_seeds, seed_path


def seed_views(x: torch.Tensor, flip: bool) -> list[torch.Tensor]:
    """The batches one scale's forward sees: the images, then their mirror images. Batching the two into
    one forward was measured slower on 2 CPU cores (5.6 against 9.1 images/s: the larger batch at 256 px
    falls out of cache), so they stay two forwards."""
    return [x, x.flip(-1)] if flip else [x]


@torch.inference_mode()
def multiscale_maps(model: CAMNet, images: torch.Tensor, labels: torch.Tensor, scales: list[float],
                    flip: bool, align: bool = False, context: bool | None = None, amp: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed raw CAM (B, N, H, W) and PACAM (B, N+1, H, W; background first) at the input resolution.

    `context` None: the method's own choice (the bank for cpal); False: instance prototypes only.
    `amp`: the forwards under autocast (float16) on CUDA, ignored on CPU; upsampling and sums stay float32.
    """
    use_amp = amp and images.device.type == "cuda"
    size = images.shape[2:]
    cam_sum, pacam_sum = None, None
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                      align_corners=False, recompute_scale_factor=False)
        for v, view in enumerate(seed_views(x, flip)):
            with torch.autocast(device_type=images.device.type, enabled=use_amp):
                cam, pacam = model.infer(view, labels, align=align, context=context)
            maps = [cam] if pacam is None else [cam, pacam]
            maps = [F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps]
            if v == 1:
                maps = [m.flip(-1) for m in maps]
            cam_sum = maps[0] if cam_sum is None else cam_sum + maps[0]
            if len(maps) > 1:
                pacam_sum = maps[1] if pacam_sum is None else pacam_sum + maps[1]
    return cam_sum, pacam_sum


def _normalise_present(maps: torch.Tensor, keys: np.ndarray) -> np.ndarray:
    """Channels of the image-label classes, each divided by its maximum: (C, H, W) in [0, 1]."""
    sel = maps[torch.as_tensor(keys - 1, dtype=torch.long)]
    peak = sel.flatten(1).amax(dim=1).clamp_min(1e-5)[:, None, None]
    return (sel / peak).clamp_(0, 1).cpu().numpy()


def seed_maps(cam: torch.Tensor, pacam: torch.Tensor | None, keys: np.ndarray) -> dict[str, np.ndarray]:
    """One image's seed-file maps from its summed multiscale_maps: `cam`, and for prototype methods `pacam`
    and the background prototype's map, each in [0, 1] (make_seeds stores them; cpal-predict draws them)."""
    maps = {"cam": _normalise_present(cam, keys)}
    if pacam is not None:
        maps["pacam"] = _normalise_present(pacam[1:], keys)
        bg = pacam[0]
        maps[BACKGROUND_KEY] = (bg / bg.max().clamp_min(1e-5)).clamp_(0, 1).cpu().numpy()
    return maps


def seeds_fingerprint(model: torch.nn.Module, dataset: VOCDataset, cfg: dict[str, Any], device: torch.device,
                      context: bool | None) -> str:
    """What a partial seed folder was started with: weights (support bank included), settings, images.

    A rerun continues a killed run only when all of it is unchanged; otherwise it starts over.
    """
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    images = inputs_stamp([dataset.image_path(i) for i in dataset.ids])
    return config_fingerprint(weights.hexdigest(), cfg, str(context), device.type, str(dataset.root),
                              dataset.split, images)


def make_seeds(model: CAMNet, dataset: VOCDataset, out_dir: Path, cfg: dict[str, Any], device: torch.device,
               log: logging.Logger, progress: bool = True, context: bool | None = None) -> dict[str, Any]:
    """Write one seed .npz per image (each atomically, published as a folder); return counts and timing."""
    out_dir = Path(out_dir)
    batches = dataset.size_batches(cfg["batch_size"])
    partial = partial_folder(out_dir, seeds_fingerprint(model, dataset, cfg, device, context))
    todo = [ids for ids in batches if not all(seed_path(partial, i).is_file() for i in ids)]
    kept = len(dataset) - sum(len(ids) for ids in todo)
    if kept:
        log.info("continuing %s: seeds of %d of %d images already written", partial, kept, len(dataset))
    done = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(dataset), initial=kept, desc="make_seeds", disable=not progress)
    model = for_inference(model)
    for ids in todo:
        images = image_batch((dataset.image(i) for i in ids), device)
        labels = torch.from_numpy(np.stack([dataset.multi_hot(i) for i in ids])).to(device)
        cam, pacam = multiscale_maps(model, images, labels, cfg["scales"], cfg["flip"], context=context,
                                     amp=cfg["amp"])
        for b, image_id in enumerate(ids):
            keys = dataset.labels(image_id)
            maps = seed_maps(cam[b], None if pacam is None else pacam[b], keys)
            save_seeds(seed_path(partial, image_id), keys, tuple(images.shape[2:]), maps)
            done += 1
        bar.update(len(ids))
    bar.close()
    publish_folder(partial, out_dir)
    seconds = time.perf_counter() - t0
    log.info("wrote seeds for %d images in %.1f s (%.1f images/s)%s", done, seconds, done / max(seconds, 1e-9),
             f"; {kept} kept from a killed run" if kept else "")
    return {"images": done, "resumed_images": kept, "seconds": seconds,
            "images_per_s": done / max(seconds, 1e-9), "amp": bool(cfg["amp"]) and device.type == "cuda",
            "cuda_peak_mib": cuda_peak_mib() if device.type == "cuda" else None}
