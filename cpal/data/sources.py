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


def _folder(out_dir: Path, data_cfg: dict[str, Any], progress: bool, workers: int) -> dict[str, Any]:
    from cpal.data.folder import prepare_folder

    return prepare_folder(out_dir, data_cfg, progress=progress)


SOURCES: dict[str, Callable[[Path, dict[str, Any], bool, int], dict[str, Any]]] = {
    "embedded": _embedded,
    "voc12": _voc12,
    "coco14": _coco14,
    "folder": _folder,
}


def prepare_dataset(out_dir: Path, data_cfg: dict[str, Any], progress: bool = True, workers: int = 0
                    ) -> dict[str, Any]:
    """Write the dataset named by data_cfg['source'] into out_dir; return the source's summary. `workers`
    (run.num_workers) > 1 generates the embedded images in that many processes (same files)."""
    source = data_cfg["source"]
    if source not in SOURCES:
        raise ValueError(f"data.source = {source!r} is unknown; allowed: {', '.join(SOURCES)}")
    return SOURCES[source](Path(out_dir), data_cfg, progress, workers)


def check_source(data_cfg: dict[str, Any]) -> str:
    """What can be checked about the source before any stage runs (the Snakefile calls this at parse time).

    The folder source checks its photo folder, tags CSV and masks (raising FolderSourceError, with CSV
    line numbers) and returns a fingerprint of them, so that Snakemake reruns `data` when they change;
    the other sources are checked by their own stage and return ''.
    """
    if data_cfg.get("source") != "folder":
        return ""
    from cpal.data.folder import plan_folder

    return plan_folder(data_cfg).fingerprint
