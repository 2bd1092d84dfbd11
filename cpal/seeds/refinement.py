"""What the refinements of the seed maps share (stages `ir_labels`, `refine_crf`, `refine_irn`), written once.

Each reads the split's seed files through the seed map its section names (`map`, or the stage's --map: AMN's
seed files hold only cam), and the two that resume a killed run (ir_labels, refine_irn) write their
<id>.png maps into one staged folder, kept only for unchanged settings and inputs and published when every
id is written (refine_crf starts over in cpal.crf.refine.staged_dir instead).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cpal.core.io import inputs_stamp, partial_folder, publish_folder
from cpal.data.voc import VOCDataset
from cpal.seeds.store import resolve_map, seed_path


def refinement_inputs(params: dict[str, Any], section: str, data_dir: str | Path,
                      map_key: str | None = None) -> tuple[VOCDataset, dict[str, Any]]:
    """(dataset of split `seeds.split`, params ``section`` with its seed map chosen): ``map_key`` (--map; None:
    the section's own) over `section.map`, `auto` resolved by params.method."""
    cfg = params[section] if map_key is None else {**params[section], "map": map_key}
    return VOCDataset(data_dir, params["seeds"]["split"]), resolve_map(cfg, params["params"]["method"])


@contextlib.contextmanager
def resumable_maps(out_dir: Path, seed_dir: Path, ids: list[str], settings: dict[str, Any], log: logging.Logger,
                   stage: str, progress: bool, inputs: tuple[Path, ...] = (), kind: str = "maps"
                   ) -> Iterator[tuple[Path, list[str], tqdm]]:
    """(staging folder, ids still to write there, progress bar over them) for `out_dir/<id>.png` of ``ids``.

    A killed run's folder is kept only if ``settings``, the ids and the input files (``inputs`` and the ids'
    seed files, by size and mtime) are unchanged, so a rerun does only the rest; the folder is published onto
    ``out_dir`` when the block ends without an error (an error leaves it for the rerun, ``out_dir`` as it was).
    """
    from cpal.core.training import config_fingerprint  # here: refine_crf, which needs none of this, loads no torch

    stamp = inputs_stamp([*inputs, *(seed_path(seed_dir, i) for i in ids)])
    partial = partial_folder(out_dir, config_fingerprint(settings, ids, stamp))
    todo = [i for i in ids if not (partial / f"{i}.png").is_file()]
    if len(todo) < len(ids):
        log.info("continuing %s: %d of %d %s already written", partial, len(ids) - len(todo), len(ids), kind)
    with tqdm(total=len(todo), desc=stage, disable=not progress) as bar:
        yield partial, todo, bar
    publish_folder(partial, out_dir)
