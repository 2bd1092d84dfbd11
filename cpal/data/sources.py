"""Dataset registry: `data.source` names a function that writes the VOC layout into `data.dir`.

A plain dict of callables (no eval, no string imports); each source imports its heavy dependencies
only when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _embedded(out_dir: Path, data_cfg: dict[str, Any], progress: bool, workers: int) -> dict[str, Any]:
    from cpal.data.embedded import generate_embedded

    return generate_embedded(out_dir, data_cfg["embedded"], seed=data_cfg["seed"], progress=progress,
                             workers=workers)


def _voc12(out_dir: Path, data_cfg: dict[str, Any], progress: bool, workers: int) -> dict[str, Any]:
    from cpal.data.voc12 import prepare_voc12

    return prepare_voc12(out_dir, data_cfg, progress=progress)


def _coco14(out_dir: Path, data_cfg: dict[str, Any], progress: bool, workers: int) -> dict[str, Any]:
    from cpal.data.coco14 import prepare_coco14

    return prepare_coco14(out_dir, data_cfg, progress=progress)


SOURCES: dict[str, Callable[[Path, dict[str, Any], bool, int], dict[str, Any]]] = {
    "embedded": _embedded,
    "voc12": _voc12,
    "coco14": _coco14,
}


def prepare_dataset(out_dir: Path, data_cfg: dict[str, Any], progress: bool = True, workers: int = 0
                    ) -> dict[str, Any]:
    """Write the dataset named by data_cfg['source'] into out_dir; return the source's summary. `workers`
    (run.num_workers) > 1 generates the embedded images in that many processes (same files)."""
    source = data_cfg["source"]
    if source not in SOURCES:
        raise ValueError(f"data.source = {source!r} is unknown; allowed: {', '.join(SOURCES)}")
    return SOURCES[source](Path(out_dir), data_cfg, progress, workers)
