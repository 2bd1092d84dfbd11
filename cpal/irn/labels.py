"""Inter-pixel relation labels from seeds (stage `ir_labels`; IRN section 3.2, "cam_to_ir_label").

Two label maps come from the seed maps (CAM or PACAM of the image-label classes, in [0, 1]): argmax
over a constant background plane and the class maps, once with a high plane (``fg_threshold``, IRN
0.30: only confident foreground) and once with a low plane (``bg_threshold``, IRN 0.05: only confident
background). Each goes through the dense CRF with unary from labels. IRN's combination rule, kept here:
a pixel takes the foreground class of the high-plane map; it is background where both maps say
background; everything else (background in the high-plane map, foreground in the low-plane map) is
255, the uncertain zone the relation labels ignore.

``irn.labels: ground_truth`` writes the pixel labels instead (their void band along object borders, 255, as the
unsure zone): an oracle for analysis. A boundary branch trained on them shows how much of its map's error is
the labels' and how much the network's; what it refines reads ground truth, so it is never a weakly supervised
result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from cpal.core.io import save_label_png
from cpal.data.voc import DatasetError, VOCDataset
from cpal.irn.thresholds import resolve_planes
from cpal.seeds.refinement import resumable_maps
from cpal.seeds.store import MAP_KEYS, SeedError, check_complete, load_seeds, seed_path

IGNORE = 255
# the irn keys this stage reads (dvc.yaml too)
LABEL_KEYS = ("map", "fg_threshold", "bg_threshold", "label_crf", "labels")
CRF_KEYS = ("iterations", "gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")


def label_crf(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float,
              cfg: dict[str, Any]) -> np.ndarray:
    """The project's label CRF (cpal.crf.dense), imported on use; tests replace this function."""
    from cpal.crf.dense import crf_from_labels

    return crf_from_labels(image, labels, n_labels, gt_prob, cfg)


def _crf_settings(crf_cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    missing = [k for k in ("gt_prob", *CRF_KEYS) if k not in crf_cfg]
    if missing:
        raise KeyError(f"irn.label_crf is missing key(s) {missing}")
    return float(crf_cfg["gt_prob"]), {k: crf_cfg[k] for k in CRF_KEYS}


def plane_argmax(maps: np.ndarray, threshold: float) -> np.ndarray:
    """Index over [background plane at `threshold`, maps...]: 0 = background, c + 1 = channel c."""
    h, w = maps.shape[1:]
    stacked = np.concatenate([np.full((1, h, w), threshold, dtype=np.float32), maps.astype(np.float32)])
    return stacked.argmax(axis=0)


def confident_labels(image: np.ndarray, maps: np.ndarray, keys: np.ndarray, fg_threshold: float,
                     bg_threshold: float, crf_cfg: dict[str, Any]) -> np.ndarray:
    """IR label (H, W) uint8: class ids of confident foreground, 0 confident background, 255 unsure."""
    if maps.ndim != 3 or maps.shape[1:] != image.shape[:2] or maps.shape[0] != len(keys):
        raise ValueError(f"maps {maps.shape} do not fit image {image.shape[:2]} and {len(keys)} keys")
    if not 0 <= bg_threshold <= fg_threshold <= 1:
        raise ValueError(f"need 0 <= irn.bg_threshold ({bg_threshold}) <= irn.fg_threshold ({fg_threshold}) <= 1")
    if len(keys) == 0:
        return np.zeros(image.shape[:2], dtype=np.uint8)
    gt_prob, cfg = _crf_settings(crf_cfg)
    lut = np.concatenate([[0], np.asarray(keys, dtype=np.int64)])
    n_labels = len(lut)
    fg = lut[label_crf(image, plane_argmax(maps, fg_threshold), n_labels, gt_prob, cfg)]
    bg = lut[label_crf(image, plane_argmax(maps, bg_threshold), n_labels, gt_prob, cfg)]
    out = np.where(fg > 0, fg, IGNORE)
    out[(fg == 0) & (bg == 0)] = 0
    return out.astype(np.uint8)


def _label_task(image: np.ndarray, maps: np.ndarray, keys: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    return confident_labels(image, maps, keys, cfg["fg_threshold"], cfg["bg_threshold"], cfg["label_crf"])


def read_maps(seed_dir: Path, image_id: str, size: tuple[int, int], which: str) -> tuple[np.ndarray, np.ndarray]:
    """(maps (C, H, W) float32, keys) of one image from its seed file; `which` is cam or pacam."""
    if which not in MAP_KEYS:
        raise ValueError(f"irn.map = {which!r}: expected one of {MAP_KEYS} (resolve 'auto' with seed_io.resolve_map)")
    path = seed_path(seed_dir, image_id)
    seeds = load_seeds(path, expected_size=size)
    if which not in seeds:
        raise SeedError(f"{path}: no {which!r} map (method cam writes only 'cam'; set irn.map = cam)")
    return seeds[which].astype(np.float32), seeds["keys"]


def make_ir_labels(dataset: VOCDataset, seed_dir: Path, out_dir: Path, cfg: dict[str, Any], workers: int,
                   log: logging.Logger, progress: bool = True) -> dict[str, Any]:
    """One palette PNG per id of `dataset` in `out_dir`, published only when all are written.

    `cfg` is params `irn`; `workers` > 0 runs the CRFs in that many processes (a process that dies
    stops the stage with an error; nothing is published).
    """
    check_complete(seed_dir, dataset.ids)
    oracle = cfg["labels"] == "ground_truth"
    if oracle:
        if not dataset.has_masks():
            raise DatasetError(f"irn.labels: ground_truth needs pixel labels, and split {dataset.split!r} of "
                               f"{dataset.root} has none; use irn.labels: seeds")
        log.warning("irn.labels: ground_truth: the boundary branch will train on the pixel labels (an oracle for "
                    "analysis; what it refines is not weakly supervised)")
        workers, derived = 0, None  # no CRF to spread over processes, no planes to derive
    else:
        cfg, derived = resolve_planes(cfg, seed_dir, dataset.ids)
    if derived:
        log.info("IRN planes from the seeds' own score histogram (Otsu, no ground truth): %s", derived)
    counts = np.zeros(3, dtype=np.int64)  # foreground, background, ignore pixels

    def load(image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = dataset.image(image_id)
        maps, k = read_maps(seed_dir, image_id, image.shape[:2], cfg["map"])
        return image, maps, k

    with resumable_maps(out_dir, seed_dir, dataset.ids, {k: cfg[k] for k in LABEL_KEYS}, log, "ir_labels", progress,
                        kind="labels") as (partial, todo, bar):
        t0 = time.perf_counter()

        def store(image_id: str, label: np.ndarray) -> None:
            save_label_png(partial / f"{image_id}.png", label)
            counts[:] += [int(((label > 0) & (label < IGNORE)).sum()), int((label == 0).sum()),
                          int((label == IGNORE).sum())]
            bar.update(1)

        if workers <= 0:
            for image_id in todo:
                store(image_id, dataset.mask(image_id) if oracle else _label_task(*load(image_id), cfg))
        else:
            _label_in_pool(todo, load, store, cfg, workers, out_dir, partial)
    seconds = time.perf_counter() - t0
    total = max(int(counts.sum()), 1)
    stats = {"images": len(dataset.ids), "labelled_now": len(todo), "seconds": seconds,
             "fraction_foreground": counts[0] / total, "fraction_background": counts[1] / total,
             "fraction_ignore": counts[2] / total, "fg_threshold": cfg["fg_threshold"],
             "bg_threshold": cfg["bg_threshold"], "derived": derived, "labels": cfg["labels"]}
    log.info("ir_labels: %d images in %.1f s (pixels labelled now: %.3f foreground, %.3f background, "
             "%.3f ignore)", len(todo), seconds, *(counts / total))
    return stats


def _label_in_pool(todo: list[str], load: Callable[[str], tuple[np.ndarray, ...]],
                   store: Callable[[str, np.ndarray], None], cfg: dict[str, Any], workers: int, out_dir: Path,
                   partial: Path) -> None:
    """The CRFs of ``todo`` in ``workers`` processes, two images queued per process at most (each travels
    with its maps); a process that dies stops the stage with an error, the labels so far kept in ``partial``."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: dict[Future, str] = {}
        queue = iter(todo)
        try:
            while True:
                while len(pending) < 2 * workers:
                    image_id = next(queue, None)
                    if image_id is None:
                        break
                    pending[pool.submit(_label_task, *load(image_id), cfg)] = image_id
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    store(pending.pop(fut), fut.result())
        except BrokenProcessPool as exc:
            raise RuntimeError(f"ir_labels: a worker process died (killed, or out of memory?) while labelling "
                               f"{sorted(pending.values())[:5]}; nothing was published to {out_dir}. Rerun to "
                               f"continue from {partial}") from exc
