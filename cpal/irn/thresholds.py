"""IRN's three background planes derived from the seed maps themselves, without pixel ground truth.

IRN's published values (confident foreground 0.30, confident background 0.05, after the walk 0.25)
suit its VOC CAMs; on other maps they are far off (the embedded pretrained CAMs, whose scores are
spread higher: 0.61 precision of the confident labels at IRN's planes against 0.93 at the planes
below). `auto` reads the histogram of every training pixel's top score (max over the image-label
classes' maps, each in [0, 1]) and splits it in two by Otsu's method: threshold t, lower-class mean
mu0 (mostly background), upper-class mean mu1 (mostly object). Then

- confident foreground: the plane halfway between t and mu1 (only pixels well inside the object mode);
- confident background: halfway between mu0 and t (only pixels well inside the background mode);
- after the walk: the confident-foreground plane again (IRN's own 0.25 sits close to its 0.30; the walk's
  output is divided by its maximum, so it lives on the same [0, 1] scale).

Nothing here looks at masks; docs/method.md gives what the derived planes measure against the
ground-truth-tuned ones they replace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cpal.seeds.thresholds import AUTO, BINS, otsu_split, top_score_histogram

PLANES = ("fg_threshold", "bg_threshold", "sem_seg_bg_thres")
__all__ = ["AUTO", "BINS", "PLANES", "derive_planes", "otsu_split", "resolve_planes", "top_score_histogram"]


def derive_planes(hist: np.ndarray) -> dict[str, float]:
    """The three planes (see the module docstring) and the Otsu statistics they come from."""
    t, mu0, mu1 = otsu_split(hist)
    fg = round((t + mu1) / 2, 4)
    return {"fg_threshold": fg, "bg_threshold": round((mu0 + t) / 2, 4), "sem_seg_bg_thres": fg,
            "otsu_threshold": t, "lower_mean": round(mu0, 4), "upper_mean": round(mu1, 4)}


def resolve_planes(cfg: dict[str, Any], seed_dir: Path,
                   ids: list[str]) -> tuple[dict[str, Any], dict[str, float] | None]:
    """`cfg` (params irn, map resolved) with every `auto` plane replaced by its derived value.

    Returns the resolved section and the derivation (None when every plane is given as a number).
    """
    if not any(cfg[key] == AUTO for key in PLANES):
        return cfg, None
    derived = derive_planes(top_score_histogram(seed_dir, ids, cfg["map"]))
    resolved = {**cfg, **{key: derived[key] for key in PLANES if cfg[key] == AUTO}}
    if resolved["bg_threshold"] > resolved["fg_threshold"]:
        raise ValueError(f"irn.bg_threshold ({resolved['bg_threshold']}) exceeds irn.fg_threshold "
                         f"({resolved['fg_threshold']}) after resolving 'auto'; set both or neither")
    return resolved, derived
