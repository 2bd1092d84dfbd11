"""The boundary-map diagnostic (cpal/irn/boundary_quality.py): its AUC, its grid regions, and a run on a
trained-format checkpoint; a split without pixel labels is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rectangles import rectangles_dataset

from cpal.backbone import build_backbone
from cpal.core.training import save_checkpoint
from cpal.irn import boundary_quality as bq
from cpal.irn.model import BoundaryNet, irn_meta
from cpal.irn.oracle import ground_truth_boundary


def test_auc_is_the_chance_that_an_edge_scores_above_an_interior_cell() -> None:
    assert bq.auc(np.array([2.0, 3.0]), np.array([1.0])) == 1.0
    assert bq.auc(np.array([1.0]), np.array([2.0, 3.0])) == 0.0
    assert bq.auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count half
    assert bq.auc(np.zeros(0), np.ones(3)) is None
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert bq.auc(pos, neg) == pytest.approx(brute)


def test_cells_are_edges_object_or_background_interiors_or_neither() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 3
    regions = bq.cell_regions(mask)
    edges = ground_truth_boundary(mask).numpy().astype(bool)
    assert regions.shape == (8, 8) and ((regions == 0) == edges).all()
    assert (regions[3:5, 3:5] == 1).all()  # the object's middle, two cells from its edge
    assert regions[0, 0] == 2 and regions[7, 7] == 2  # background corners
    assert (regions[edges] == 0).all() and (regions == -1).any()  # cells next to an edge count as neither


def test_a_perfect_map_separates_edges_and_a_flat_one_does_not() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 2
    regions = bq.cell_regions(mask)
    perfect = ground_truth_boundary(mask).numpy()
    flat = np.full_like(perfect, 0.3)
    for b, want in ((perfect, 1.0), (flat, 0.5)):
        scores = {name: [b[regions == code]] for code, name in enumerate(bq.REGIONS)}
        assert bq.summarise(scores)["auc_edge_vs_interior"] == want


def test_a_run_on_a_checkpoint_reports_every_region(tmp_path: Path) -> None:
    rectangles_dataset(tmp_path / "data", "bq-test", (38, 42))
    torch.manual_seed(0)
    net = BoundaryNet(build_backbone("resnet18"))
    ckpt = tmp_path / "irn.pt"
    save_checkpoint(ckpt, {"meta": irn_meta(net.backbone, "classifier", 4), "model": net.state_dict()})
    out = tmp_path / "q.json"
    assert bq.main(["--irn", str(ckpt), "--data", str(tmp_path / "data"), "--images", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 6 and all(result["cells"][r] > 0 for r in bq.REGIONS)
    assert 0.0 <= result["auc_edge_vs_interior"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in result["mean_boundary"].values())
    for mask in (tmp_path / "data" / "SegmentationClass").glob("*.png"):
        mask.unlink()
    assert bq.main(["--irn", str(ckpt), "--data", str(tmp_path / "data")]) == 2


def test_relation_labels_are_scored_against_the_pixel_labels(tmp_path: Path) -> None:
    """--ir-labels: the masks themselves score 1 everywhere; a label that calls every pixel the first object's
    class is right only on that class's pixels; a missing label file or no option at all is refused."""
    from cpal.core.io import save_label_png
    from cpal.data.voc import VOCDataset

    truth = rectangles_dataset(tmp_path / "data", "lq-test", (38, 42))
    dataset = VOCDataset(tmp_path / "data", "train")
    perfect, flooded = tmp_path / "perfect", tmp_path / "flooded"
    perfect.mkdir(), flooded.mkdir()
    for image_id in dataset.ids:
        mask = dataset.mask(image_id)
        save_label_png(perfect / f"{image_id}.png", mask)
        save_label_png(flooded / f"{image_id}.png", np.full_like(mask, truth[image_id][1][0]))
    best = bq.label_quality(perfect, tmp_path / "data")
    assert best["images"] == len(dataset.ids) and best["unsure_fraction"] == 0.0
    assert all(best[k] == 1.0 for k in ("foreground_precision", "foreground_coverage", "background_precision",
                                        "background_coverage"))
    worst = bq.label_quality(flooded, tmp_path / "data")
    assert worst["background_precision"] is None and worst["background_coverage"] == 0.0
    assert 0.0 < worst["foreground_precision"] < 0.5
    out = tmp_path / "q.json"
    assert bq.main(["--ir-labels", str(perfect), "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["labels"]["foreground_precision"] == 1.0
    next(perfect.iterdir()).unlink()
    assert bq.main(["--ir-labels", str(perfect), "--data", str(tmp_path / "data")]) == 2
    with pytest.raises(SystemExit):
        bq.main(["--data", str(tmp_path / "data")])
