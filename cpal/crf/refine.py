"""Stage `refine_crf`: seeds + image -> dense-CRF label maps (VOC palette PNGs), in parallel worker processes.

Probabilities per image: the chosen seed map (`cfg['map']`: cam | pacam; foreground channels, image-label
classes only) plus a background plane built by one of two rules (`cfg['bg_mode']`):

- `threshold`: a constant plane `bg_threshold`. Without the CRF the argmax is exactly the seed rule of
  eval_seeds (background where every map is below the threshold), so the CRF result is directly
  comparable with the best seed threshold. `auto`: Otsu's split of the seeds' own top-score histogram
  (cpal/seeds/thresholds.py; no ground truth), resolved once for the split and recorded in the timing JSON;
- `power`: `(1 - max_c fg_c) ** bg_power` (PSA / old IRN style; low powers give more background).

The CRF marginals' argmax is mapped back to dataset class ids (channel 0 -> background 0, channel i ->
`keys[i - 1]`). The output folder appears only when every id is done: work goes to a hidden sibling
folder that is renamed onto `out_dir` at the end, so a crash (a worker raising or dying) leaves no set
that looks complete; the error names the image id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cpal.core.io import save_label_png, staged_folder
from cpal.core.runtime import process_pool_context
from cpal.crf.dense import dense_crf
from cpal.data.voc import VOCDataset
from cpal.seeds.store import MAP_KEYS, check_complete, load_seeds, seed_path
from cpal.seeds.thresholds import resolve_threshold

BG_MODES = ("threshold", "power")


class RefineError(RuntimeError):
    """Refinement of one image (named in the message) failed, or a worker process died."""


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike[str], log: logging.Logger | None = None) -> Iterator[Path]:
    """cpal.core.io.staged_folder for a folder of label PNGs, with the previous output removed up front.

    Removed first because it belongs to an older run, and a failed rerun must not leave it looking like
    the new result. It must hold only PNG files, so a mistyped path cannot delete data.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise RefineError(f"output path {out_dir} exists and is not a folder")
        foreign = [p.name for p in out_dir.iterdir() if not (p.is_file() and p.suffix == ".png")]
        if foreign:
            raise RefineError(f"refusing to replace {out_dir}: it holds non-PNG entries such as {foreign[:3]}")
        if log is not None:
            log.info("removing the previous output %s", out_dir)
        shutil.rmtree(out_dir)
    with staged_folder(out_dir) as tmp:
        yield tmp


def probabilities(maps: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """(C, H, W) foreground maps in [0, 1] -> (C + 1, H, W) float32 with the background plane first."""
    maps = np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)
    mode = cfg.get("bg_mode", "threshold")
    peak = maps.max(axis=0) if maps.shape[0] else np.zeros(maps.shape[1:], np.float32)
    if mode == "threshold":
        bg = np.full(maps.shape[1:], float(cfg["bg_threshold"]), dtype=np.float32)
    elif mode == "power":
        bg = np.power(1.0 - peak, float(cfg["bg_power"])).astype(np.float32)
    else:
        raise ValueError(f"crf.bg_mode = {mode!r} is invalid; allowed: {BG_MODES}")
    return np.concatenate([bg[None], maps], axis=0)


def refine_image(image: np.ndarray, seeds: dict[str, np.ndarray], cfg: dict[str, Any], source: str = "") -> np.ndarray:
    """One image's CRF label map (H, W) uint8 in dataset class ids; `source` names the seed file in errors."""
    kind = cfg["map"]
    if kind not in MAP_KEYS:
        raise ValueError(f"crf.map = {kind!r} is invalid; allowed: {MAP_KEYS}")
    if kind not in seeds:
        raise RefineError(f"{source}: seed file has no {kind!r} map (has {[k for k in MAP_KEYS if k in seeds]})")
    maps, keys = seeds[kind], np.asarray(seeds["keys"], dtype=np.int64)
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], dtype=np.uint8)
    q = dense_crf(image, probabilities(maps, cfg), cfg)
    ids = np.concatenate([[0], keys]).astype(np.uint8)
    return ids[q.argmax(axis=0)]


def _refine_chunk(dataset: VOCDataset, seed_dir: Path, out_dir: Path, cfg: dict[str, Any],
                  ids: list[str]) -> list[tuple[str, float, float]]:
    """Worker body: refine and write `ids`; returns (id, total seconds, CRF seconds) per image."""
    times = []
    for image_id in ids:
        try:
            t0 = time.perf_counter()
            image = dataset.image(image_id)
            path = seed_path(seed_dir, image_id)
            seeds = load_seeds(path, expected_size=image.shape[:2])
            t1 = time.perf_counter()
            label = refine_image(image, seeds, cfg, source=str(path))
            t2 = time.perf_counter()
            save_label_png(out_dir / f"{image_id}.png", label)
            times.append((image_id, time.perf_counter() - t0, t2 - t1))
        except Exception as exc:
            raise RefineError(f"refine_crf failed on image {image_id!r}: {type(exc).__name__}: {exc}") from exc
    return times


def _chunks(ids: list[str], workers: int) -> list[list[str]]:
    # Several chunks per worker keep the load balanced; the dataset object travels once per chunk.
    size = max(1, min(32, len(ids) // max(1, workers * 8)))
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def refine_with_crf(dataset: VOCDataset, seed_dir: Path, out_dir: Path, cfg: dict[str, Any], workers: int,
                    log: logging.Logger, progress: bool = True) -> dict[str, Any]:
    """Refine every id of the split into `out_dir/<id>.png`; returns timing (seconds per image, wall time)."""
    seed_dir, out_dir = Path(seed_dir), Path(out_dir)
    if cfg.get("map") not in MAP_KEYS:
        raise ValueError(f"crf.map = {cfg.get('map')!r} is invalid; allowed: {MAP_KEYS}")
    if cfg.get("bg_mode", "threshold") not in BG_MODES:
        raise ValueError(f"crf.bg_mode = {cfg.get('bg_mode')!r} is invalid; allowed: {BG_MODES}")
    if not seed_dir.is_dir():
        raise RefineError(f"seed folder not found: {seed_dir} (run make_seeds first)")
    workers = max(1, int(workers))
    ids = list(dataset.ids)
    derived = None
    if cfg.get("bg_mode", "threshold") == "threshold" and cfg["bg_threshold"] == "auto":
        check_complete(seed_dir, ids)
        cfg, derived = resolve_threshold(cfg, "bg_threshold", seed_dir, ids, cfg["map"])
        if derived:
            log.info("crf background plane %.4f from the seeds' own score histogram (Otsu, no ground truth): %s",
                     cfg["bg_threshold"], derived)
    times: list[tuple[str, float, float]] = []
    start = time.perf_counter()
    with staged_dir(out_dir, log) as tmp, tqdm(total=len(ids), desc="refine_crf", disable=not progress) as bar:
        if workers == 1:
            for chunk in _chunks(ids, 1):
                times += _refine_chunk(dataset, seed_dir, tmp, cfg, chunk)
                bar.update(len(chunk))
        else:
            times += _run_parallel(dataset, seed_dir, tmp, cfg, ids, workers, bar)
        done = {t[0] for t in times}
        if len(done) != len(ids):
            raise RefineError(f"refine_crf produced {len(done)} of {len(ids)} label maps")
    wall = time.perf_counter() - start
    per_image = [t[1] for t in times]
    crf_only = [t[2] for t in times]
    timing = {
        "images": len(ids),
        "workers": workers,
        "wall_seconds": wall,
        "wall_seconds_per_image": wall / len(ids),
        "seconds_per_image_mean": statistics.fmean(per_image),
        "seconds_per_image_median": statistics.median(per_image),
        "crf_seconds_per_image_mean": statistics.fmean(crf_only),
        "map": cfg["map"],
        "bg_mode": cfg.get("bg_mode", "threshold"),
        "bg_threshold": cfg["bg_threshold"],
        "bg_threshold_derived": derived,
    }
    log.info("refine_crf: %d images with %d worker(s) in %.1f s (%.4f s per image per worker, CRF %.4f s)",
             len(ids), workers, wall, timing["seconds_per_image_mean"], timing["crf_seconds_per_image_mean"])
    return timing


def _run_parallel(dataset: VOCDataset, seed_dir: Path, tmp: Path, cfg: dict[str, Any], ids: list[str],
                  workers: int, bar: tqdm) -> list[tuple[str, float, float]]:
    times: list[tuple[str, float, float]] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=process_pool_context()) as pool:
        pending: dict[Future, list[str]] = {
            pool.submit(_refine_chunk, dataset, seed_dir, tmp, cfg, chunk): chunk for chunk in _chunks(ids, workers)
        }
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    try:
                        times += fut.result()
                    except BrokenProcessPool as exc:
                        # every unfinished future breaks at once: name all images not done, the culprit among them
                        left = [i for c in pending.values() for i in c]
                        more = f" (and {len(left) - 10} more)" if len(left) > 10 else ""
                        raise RefineError(f"a refine_crf worker process died (killed, out of memory or crashed); "
                                          f"images not done: {', '.join(left[:10])}{more}") from exc
                    bar.update(len(pending.pop(fut)))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return times
