"""AMN's maps as seeds (stage `make_amn_seeds`), written in the seed format every later stage reads
(cpal/seeds/store.py: key `cam`, one channel per image-level class, in [0, 1], full resolution).

AMN's protocol (step/make_amn_cam.py, step/eval_amn_cam.py): logits with the image's labels as
conditioning, averaged over scales and flips at full resolution, softmax over all N + 1 channels; the
background and the image's classes are kept, each min-max normalised over the image, the normalised value
used only where the classifier's IR label is not background (its foreground and its unsure pixels), the raw
probability elsewhere. So AMN's maps depend on the classifier's at inference too. The background channel is
then dropped: AMN evaluates with a fixed background threshold of 0.25 (``amn.seed_threshold``), which
eval_seeds reports beside its sweep (``--fixed-threshold``).

Kill-safe and resumable as make_seeds: files go to a partial folder published when complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cpal.amn.network import AMNNet
from cpal.backbone import for_inference
from cpal.core.io import inputs_stamp, partial_folder, publish_folder
from cpal.data.torch_data import image_batch
from cpal.data.voc import VOCDataset
from cpal.seeds.make import seed_views, seeds_fingerprint
from cpal.seeds.store import save_seeds, seed_path


@torch.inference_mode()
def multiscale_probabilities(model: AMNNet, images: torch.Tensor, labels: torch.Tensor, scales: list[float],
                             flip: bool) -> torch.Tensor:
    """Softmax (B, N+1, H, W) of AMN's logits averaged over scales and flips at the input resolution."""
    size = images.shape[2:]
    total, views = None, 0
    for scale in scales:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                      align_corners=False, recompute_scale_factor=False)
        for v, view in enumerate(seed_views(x, flip)):
            logits = F.interpolate(model(view, labels)["logits"].float(), size=size, mode="bilinear",
                                   align_corners=False)
            logits = logits.flip(-1) if v == 1 else logits
            total = logits if total is None else total + logits
            views += 1
    return torch.softmax(total / views, dim=1)


def amn_seed_maps(probs: torch.Tensor, keys: np.ndarray, ir_label: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """AMN's maps (C, H, W) of the image's classes ``keys`` (1..N) from one image's softmax (N+1, H, W).

    Each kept channel (background and the classes) is min-max normalised over the image; the normalised
    value replaces the probability where the classifier's IR label ``ir_label`` (H, W) is not 0
    (foreground or 255); the background channel is then dropped.
    """
    if tuple(ir_label.shape) != tuple(probs.shape[1:]):
        raise ValueError(f"IR label {ir_label.shape} differs from the map grid {tuple(probs.shape[1:])}")
    sel = probs[torch.as_tensor(np.concatenate([[0], keys]), dtype=torch.long, device=probs.device)].float()
    low = sel.amin(dim=(1, 2), keepdim=True)
    high = sel.amax(dim=(1, 2), keepdim=True)
    normalised = (sel - low) / (high - low + eps)
    not_background = torch.from_numpy(np.asarray(ir_label) != 0).to(sel.device)
    maps = torch.where(not_background, normalised, sel)[1:]
    return maps.clamp_(0, 1).cpu().numpy()


def make_amn_seeds(model: AMNNet, dataset: VOCDataset, ir_label_dir: Path, out_dir: Path, cfg: dict[str, Any],
                   batch_size: int, device: torch.device, log: logging.Logger, seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """One seed .npz per image of ``dataset`` (``cfg``: params `amn`), from the classifier's IR labels in
    ``ir_label_dir``; each file written atomically, the folder published when complete.

    With ``amn.keep_dropout_at_inference`` the dropout masks of a batch are drawn from a generator seeded by
    (``seed``, batch number), so a resumed run writes the same maps as an uninterrupted one.
    """
    out_dir, ir_label_dir = Path(out_dir), Path(ir_label_dir)
    label_paths = {i: ir_label_dir / f"{i}.png" for i in dataset.ids}
    missing = [i for i, p in label_paths.items() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{ir_label_dir}: no IR label for {len(missing)} of {len(dataset)} images, e.g. "
                                f"{missing[:5]}; rerun ir_labels (AMN normalises its maps where it is not background)")
    batches = dataset.size_batches(batch_size)
    keys_used = ("scales", "flip", "keep_dropout_at_inference")
    stamp = {"amn": {k: cfg[k] for k in keys_used}, "batch_size": batch_size, "seed": seed,
             "ir_labels": inputs_stamp(list(label_paths.values()))}
    partial = partial_folder(out_dir, seeds_fingerprint(model, dataset, stamp, device, None))
    todo = [(n, ids) for n, ids in enumerate(batches) if not all(seed_path(partial, i).is_file() for i in ids)]
    kept = len(dataset) - sum(len(ids) for _, ids in todo)
    if kept:
        log.info("continuing %s: seeds of %d of %d images already written", partial, kept, len(dataset))
    net = for_inference(model)
    done, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(dataset), initial=kept, desc="make_amn_seeds", disable=not progress)
    for number, ids in todo:
        images = image_batch((dataset.image(i) for i in ids), device)
        labels = torch.from_numpy(np.stack([dataset.multi_hot(i) for i in ids])).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + number)  # dropout, when kept at inference (AMN's quirk)
            probs = multiscale_probabilities(net, images, labels, cfg["scales"], cfg["flip"])
        for b, image_id in enumerate(ids):
            keys = dataset.labels(image_id)
            ir_label = dataset.label_map(label_paths[image_id], image_id)
            save_seeds(seed_path(partial, image_id), keys, tuple(images.shape[2:]),
                       {"cam": amn_seed_maps(probs[b], keys, ir_label)})
            done += 1
        bar.update(len(ids))
    bar.close()
    publish_folder(partial, out_dir)
    seconds = time.perf_counter() - t0
    log.info("wrote AMN seeds for %d images in %.1f s%s", done, seconds,
             f"; {kept} kept from a killed run" if kept else "")
    return {"images": done, "resumed_images": kept, "seconds": seconds,
            "images_per_s": done / max(seconds, 1e-9), "dropout_at_inference": cfg["keep_dropout_at_inference"]}
