"""IRN's oracles: the walk over ground-truth class edges (irn.boundaries: ground_truth), which tells the boundary
network's share of IRN's masks from the seeds' and the walk's, and the boundary branch trained on the pixel labels
(irn.labels: ground_truth), which tells the relation labels' share of the network's errors from its own."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from rectangles import rectangles_dataset

from cpal.core.io import load_label_png
from cpal.data.voc import DatasetError, VOCDataset
from cpal.irn.oracle import fill_ignored, ground_truth_boundary
from cpal.irn.path_index import PathIndex
from cpal.irn.refine import refine_image
from cpal.seeds.store import save_seeds, seed_path

LOG = logging.getLogger("test_irn_oracle")
WALK = {"power": 1.0, "beta": 10.0, "exp_times": 6, "walk": "sparse", "sem_seg_bg_thres": 0.25}


def test_the_ignore_band_takes_its_nearest_class_and_edges_are_cell_fractions() -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 5
    mask[:, 7:9] = 255  # a 2-px ignore band on the class edge, as VOC's
    filled = fill_ignored(mask)
    assert (filled[:, :8] == 0).all() and (filled[:, 8:] == 5).all()
    cells = ground_truth_boundary(mask)
    assert tuple(cells.shape) == (4, 4) and cells.dtype == torch.float32
    # the edge runs between pixel columns 7 and 8: drawn on the background side, in the second cell column
    assert torch.equal(cells, torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(4, 4))
    objects = np.zeros((8, 8), np.uint8)
    objects[:, 2:] = 4
    objects[:, 5:] = 2  # between two objects the lower class (2) holds the edge: pixel column 5, cell column 1
    assert torch.equal(ground_truth_boundary(objects), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert not ground_truth_boundary(np.full((9, 13), 3, np.uint8)).any()  # one class: no edge
    assert tuple(ground_truth_boundary(np.zeros((9, 13), np.uint8)).shape) == (3, 4)  # ceil(9/4), ceil(13/4)


def test_with_true_edges_a_partial_seed_fills_its_object_and_stops_at_its_border() -> None:
    mask = np.zeros((48, 48), np.uint8)
    mask[10:40, 10:33] = 1
    seed = np.zeros((1, 48, 48), np.float32)
    seed[0, 10:24, 10:20] = 1.0  # the seed covers a fifth of the object
    keys = np.array([1])

    def iou(boundary: torch.Tensor) -> float:
        label = refine_image(boundary, mask.shape, seed, keys, WALK, PathIndex.of(3), torch.device("cpu"))
        return float(((label == 1) & (mask == 1)).sum() / ((label == 1) | (mask == 1)).sum())

    seed_iou = float((seed[0] > 0).sum() / (mask == 1).sum())
    assert iou(ground_truth_boundary(mask)) > 0.85 > seed_iou + 0.5
    assert iou(torch.zeros(12, 12)) < iou(ground_truth_boundary(mask)) - 0.1  # no edges: it leaks or fades


def _stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boundaries: str) -> tuple[int, Path, dict]:
    from test_irn import _irn_checkpoint, _params

    from stages import refine_irn as stage

    data, seeds = tmp_path / "data", tmp_path / "seeds"
    truth = rectangles_dataset(data, "oracle-test", (38, 42))
    for image_id, (mask, present) in truth.items():
        maps = np.stack([(mask == c).astype(np.float32) for c in present])
        for m in maps:  # each seed covers the top 5 of its rectangle's 14 rows
            m[np.flatnonzero(m.any(axis=1))[5:]] = 0.0
        save_seeds(seed_path(seeds, image_id), np.array(present), mask.shape, {"cam": maps})
    out = tmp_path / "rw"
    params = _params(boundaries=boundaries)
    monkeypatch.setattr(stage, "start", lambda args, name: (LOG, params))
    code = stage.main(["--params", "unused.yaml", "--no-progress", "--data", str(data), "--seeds", str(seeds),
                       "--irn", str(_irn_checkpoint(tmp_path / "irn.pt")), "--out", str(out),
                       "--timing", str(tmp_path / "timing.json")])
    return code, out, truth


def test_the_stage_walks_to_the_true_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, truth = _stage(tmp_path, monkeypatch, "ground_truth")
    assert code == 0
    for image_id, (mask, _) in truth.items():
        label = load_label_png(out / f"{image_id}.png")
        hit = ((label == mask) & (mask > 0)).sum() / (mask > 0).sum()
        spill = ((label > 0) & (mask == 0)).sum() / (mask > 0).sum()
        # the seeds cover 5 of 14 rows (0.36); the cells the edges cut through are lost to the grid
        assert hit > 0.7 and spill < 0.1, f"{image_id}: {hit:.2f} of the objects labelled, {spill:.2f} spilled"


def test_the_oracle_without_pixel_labels_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VOCDataset, "has_masks", lambda self: False)
    with pytest.raises(DatasetError, match="irn.boundaries: ground_truth needs pixel labels"):
        _stage(tmp_path, monkeypatch, "ground_truth")


def test_relation_labels_from_the_pixel_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """irn.labels: ground_truth writes each image's mask (255 band and all) without reading a seed score; the
    setting is part of the folder's key, so switching it relabels; without pixel labels it is refused."""
    from test_irn import _params

    from cpal.irn import labels as irn_labels

    data, seeds = tmp_path / "data", tmp_path / "seeds"
    truth = rectangles_dataset(data, "labels-oracle", (38, 42))
    for image_id, (mask, present) in truth.items():  # seeds that miss every object: the oracle ignores them
        save_seeds(seed_path(seeds, image_id), np.array(present), mask.shape,
                   {"cam": np.zeros((len(present), *mask.shape), np.float32)})
    dataset = VOCDataset(data, "train")
    out = tmp_path / "ir"
    stats = irn_labels.make_ir_labels(dataset, seeds, out, _params(labels="ground_truth")["irn"], 2, LOG,
                                      progress=False)
    assert stats["labels"] == "ground_truth" and stats["images"] == len(dataset.ids)
    for image_id in dataset.ids:
        assert np.array_equal(load_label_png(out / f"{image_id}.png"), dataset.mask(image_id))
    irn_labels.make_ir_labels(dataset, seeds, out, _params()["irn"], 0, LOG, progress=False)
    assert all((load_label_png(out / f"{i}.png") != dataset.mask(i)).any() for i in dataset.ids)  # relabelled
    monkeypatch.setattr(VOCDataset, "has_masks", lambda self: False)
    with pytest.raises(DatasetError, match="irn.labels: ground_truth needs pixel labels"):
        irn_labels.make_ir_labels(dataset, seeds, tmp_path / "ir2", _params(labels="ground_truth")["irn"], 0, LOG,
                                  progress=False)
