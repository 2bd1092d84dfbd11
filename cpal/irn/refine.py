"""Seeds refined by IRN's random walk into semantic label maps (stage `refine_irn`).

Per image: the boundary map B from the trained network (stride 4, averaged with the flipped image's),
the seed maps (CAM or PACAM of the image-label classes) averaged onto the same grid and optionally
raised to `irn.power` (SIPE uses 1.5; IRN 1), the walk of maps x (1 - B) with affinities
(1 - max B on the path) ** beta within `irn.walk_radius`, 2^exp_times steps; the result upsampled 4x
(bilinear), divided by its maximum over all classes, a background plane at `irn.sem_seg_bg_thres`
(IRN 0.25) put in front, argmax to class ids. The walk is sparse by default (see random_walk.py): a
VOC-sized image never builds the 550 MB dense transition matrix. With `irn.boundaries: ground_truth` the
walk reads the pixel labels' class edges instead of the network's map (cpal/irn/oracle.py): an oracle that
shows what the seeds and the walk can reach, never a weakly supervised result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpal.backbone import for_inference
from cpal.core.io import save_label_png
from cpal.core.runtime import peak_rss_mib
from cpal.core.training import resolve_device
from cpal.data.torch_data import image_batch
from cpal.data.voc import DatasetError
from cpal.irn.labels import read_maps
from cpal.irn.model import STRIDE, BoundaryNet, grid_size, load_boundary_net
from cpal.irn.oracle import ground_truth_boundary
from cpal.irn.path_index import PathIndex
from cpal.irn.random_walk import random_walk
from cpal.irn.thresholds import resolve_planes
from cpal.seeds.refinement import refinement_inputs, resumable_maps
from cpal.seeds.store import check_complete

BOUNDARY_BATCH = 16  # images per boundary forward (same size only)
REFINE_KEYS = ("map", "walk_radius", "beta", "exp_times", "sem_seg_bg_thres", "power", "flip", "walk", "boundaries")


def to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Full-resolution maps (C, H, W) averaged over the 4x4 cells of the boundary grid (C, gh, gw)."""
    out = F.avg_pool2d(maps[None].float(), STRIDE, STRIDE, ceil_mode=True)[0]
    if out.shape[1:] != grid:
        raise ValueError(f"maps of size {tuple(maps.shape[1:])} give a {tuple(out.shape[1:])} grid, "
                         f"the boundary map is {grid}")
    return out


def labels_from_walk(walked: torch.Tensor, keys: np.ndarray, size: tuple[int, int], bg_threshold: float
                     ) -> np.ndarray:
    """(H, W) uint8 class ids: upsample 4x, divide by the global max, background plane, argmax."""
    up = F.interpolate(walked[None], scale_factor=STRIDE, mode="bilinear", align_corners=False)[0]
    up = up[:, :size[0], :size[1]]
    up = up / up.max().clamp_min(1e-5)
    scores = torch.cat([up.new_full((1, *size), bg_threshold), up])
    lut = np.concatenate([[0], np.asarray(keys, dtype=np.int64)]).astype(np.uint8)
    return lut[scores.argmax(dim=0).cpu().numpy()]


def boundaries(model: BoundaryNet, images: list[np.ndarray], flip: bool, device: torch.device) -> torch.Tensor:
    """Boundary maps (B, h, w) of same-sized images in one forward (per image: 2.5x slower on 2 cores)."""
    return model.boundary(image_batch(images, device), flip=flip)


def refine_image(boundary: torch.Tensor, size: tuple[int, int], maps: np.ndarray, keys: np.ndarray,
                 cfg: dict[str, Any], index: PathIndex, device: torch.device) -> np.ndarray:
    """One image's label map from its boundary map (h, w) and seed maps."""
    if len(keys) == 0:
        return np.zeros(size, dtype=np.uint8)
    grid = to_grid(torch.from_numpy(maps).to(device), grid_size(*size))
    if boundary.shape != grid.shape[1:]:
        raise ValueError(f"boundary grid {tuple(boundary.shape)} differs from the seed grid {tuple(grid.shape[1:])}")
    grid = grid.clamp_min(0).pow(cfg["power"])
    walked = random_walk(grid, boundary, index, cfg["beta"], cfg["exp_times"], cfg["walk"])
    return labels_from_walk(walked, keys, size, cfg["sem_seg_bg_thres"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def refine_irn(params: dict[str, Any], data_dir: Path, seed_dir: Path, irn_path: Path, out_dir: Path,
               log: logging.Logger, progress: bool = True, map_key: str | None = None) -> dict[str, Any]:
    """One palette PNG per seed id in `out_dir` (published only when complete); return timings.

    ``map_key`` (the stage's --map) names the seed map to walk instead of `irn.map`."""
    dataset, cfg = refinement_inputs(params, "irn", data_dir, map_key)
    oracle = cfg["boundaries"] == "ground_truth"
    if oracle and not dataset.has_masks():
        raise DatasetError(f"irn.boundaries: ground_truth needs pixel labels, and split {dataset.split!r} of "
                           f"{data_dir} has none; use irn.boundaries: network")
    device = resolve_device(params["run"]["device"])
    check_complete(seed_dir, dataset.ids)
    cfg, derived = resolve_planes(cfg, seed_dir, dataset.ids)
    if derived:
        log.info("walk background plane %.4f from the seeds' own score histogram (Otsu, no ground truth): %s",
                 cfg["sem_seg_bg_thres"], derived)
    if oracle:
        log.warning("irn.boundaries: ground_truth: the walk reads the pixel labels' class edges (an oracle for "
                    "analysis; these masks are not weakly supervised)")
    model = load_boundary_net(irn_path, device, params["train_cls"]["backbone"], params["train_cls"]["output_stride"])
    index = PathIndex.of(cfg["walk_radius"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {"boundary": [], "walk": []}
    model = for_inference(model)
    with resumable_maps(out_dir, seed_dir, dataset.ids, {k: cfg[k] for k in REFINE_KEYS}, log, "refine_irn",
                        progress, inputs=(irn_path,)) as (partial, todo, bar):
        t0 = time.perf_counter()
        for ids in dataset.size_batches(BOUNDARY_BATCH, todo):
            images = [dataset.image(i) for i in ids]
            t1 = time.perf_counter()
            if oracle:
                edges = [ground_truth_boundary(dataset.mask(i)).to(device) for i in ids]
            else:
                edges = boundaries(model, images, cfg["flip"], device)
            _sync(device)
            times["boundary"] += [(time.perf_counter() - t1) / len(ids)] * len(ids)
            for image_id, image, boundary in zip(ids, images, edges, strict=True):
                maps, keys = read_maps(seed_dir, image_id, image.shape[:2], cfg["map"])
                t1 = time.perf_counter()
                label = refine_image(boundary, image.shape[:2], maps, keys, cfg, index, device)
                _sync(device)
                times["walk"].append(time.perf_counter() - t1)
                save_label_png(partial / f"{image_id}.png", label)
                bar.update()
        seconds = time.perf_counter() - t0
    n = max(len(todo), 1)
    timing = {
        "device": str(device),
        "images": len(todo),
        "seconds": seconds,
        "seconds_per_image": seconds / n,
        "boundary_seconds_per_image": float(np.mean(times["boundary"])) if todo else None,
        "walk_seconds_per_image": float(np.mean(times["walk"])) if todo else None,
        "walk_seconds_max": float(np.max(times["walk"])) if todo else None,
        "torch_threads": torch.get_num_threads(),
        "walk": cfg["walk"],
        "boundaries": cfg["boundaries"],  # ground_truth: an oracle's masks
        "sem_seg_bg_thres": cfg["sem_seg_bg_thres"],
        "derived_planes": derived,
    }
    if device.type == "cuda":
        timing["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    log.info("refine_irn: %d images in %.1f s (walk %.3f s/image), peak RSS %.0f MB", len(todo), seconds,
             timing["walk_seconds_per_image"] or 0.0, peak_rss_mib())
    return timing
