"""IRN: path index, relation labels, boundary network, affinity loss, random walk, the three stages."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rectangles import rectangles_dataset

from cpal.backbone import build_backbone
from cpal.core.io import load_label_png
from cpal.core.training import load_checkpoint, save_checkpoint
from cpal.irn import labels as irn_labels
from cpal.irn.model import BoundaryNet, grid_size, irn_meta, load_boundary_net
from cpal.irn.path_index import PathIndex, boundary_to_affinity, pair_labels, path_cells, search_directions
from cpal.irn.random_walk import random_walk, walk_dense, walk_sparse
from cpal.irn.refine import labels_from_walk, to_grid
from cpal.irn.train import affinity_loss, train_irn
from cpal.seeds.store import save_seeds, seed_path

LOG = logging.getLogger("test_irn")


# -- fixtures ------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(**irn: object) -> dict:
    cfg = {
        "map": "cam", "fg_threshold": 0.30, "bg_threshold": 0.05,
        "label_crf": {"gt_prob": 0.7, "iterations": 5, "gaussian_sxy": 3, "gaussian_compat": 3,
                      "bilateral_sxy": 20, "bilateral_srgb": 5, "bilateral_compat": 10},
        "backbone_from": "classifier", "radius": 4, "crop": 32, "batch_size": 2, "epochs": 2, "lr": 0.1,
        "momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9, "amp": True, "walk_radius": 3, "beta": 10.0,
        "exp_times": 4, "sem_seg_bg_thres": 0.25, "power": 1.0, "flip": True, "walk": "sparse",
        "boundaries": "network", "labels": "seeds",
    }
    cfg.update(irn)
    return {"irn": cfg, "params": {"method": "cam"}, "seeds": {"split": "train"},
            "train_cls": {"backbone": "resnet18", "output_stride": 16},
            "run": {"device": "cpu", "seed": 0, "num_workers": 0}}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six 38x42 images with one or two coloured rectangles, masks, labels, and seeds (smoothed masks)."""
    root = tmp_path_factory.mktemp("irn")
    data, seeds = root / "data", root / "seeds"
    h = 38
    for image_id, (mask, present) in rectangles_dataset(data, "irn-test", (h, 42)).items():
        maps = np.stack([(mask == c).astype(np.float32) for c in present])
        maps[:, : h // 2] *= 0.6  # weaker upper half, as CAMs are uneven
        save_seeds(seed_path(seeds, image_id), np.array(present), mask.shape, {"cam": maps})
    torch.manual_seed(0)
    from cpal.cls.network import CAMNet

    net = CAMNet(2, backbone="resnet18")
    classifier = root / "classifier.pt"
    save_checkpoint(classifier, {"meta": {"format": 2, "method": "cam", "backbone": "resnet18", "output_stride": 16,
                                          "num_classes": 2},
                                 "model": net.state_dict()})
    return {"data": data, "seeds": seeds, "classifier": classifier, "root": root}


def _identity_crf(image, labels, n_labels, gt_prob, cfg):  # CRF stand-in
    return np.asarray(labels)


def _dying_crf(image, labels, n_labels, gt_prob, cfg):  # a worker killed mid-task
    os._exit(3)


def _run_stage(module, argv: list[str], params: dict, monkeypatch: pytest.MonkeyPatch) -> int:
    """Call a stage's main with params handed over directly (the schema gains `irn` separately)."""
    monkeypatch.setattr(module, "start", lambda args, name: (LOG, params))
    return module.main(["--params", "unused.yaml", "--no-progress", *argv])


# -- path index and relation labels --------------------------------------------------------------------

@pytest.mark.parametrize("radius", [2, 3, 5, 10])
def test_path_index_pairs_lie_within_the_radius_once(radius: int) -> None:
    dirs = search_directions(radius)
    assert len(set(dirs)) == len(dirs)
    for dy, dx in dirs:
        assert 0 < dy * dy + dx * dx < radius * radius
        assert dy > 0 or (dy == 0 and dx > 0)  # half-plane: each unordered pair once
    disc = sum(1 for y in range(-radius, radius + 1) for x in range(-radius, radius + 1)
               if 0 < y * y + x * x < radius * radius)
    assert len(dirs) == disc // 2
    if radius == 5:
        assert len(dirs) == 34  # IRN's count for its random-walk radius
    for (dy, dx), cells in zip(dirs, PathIndex.of(radius).paths, strict=True):
        assert (0, 0) in cells and (dy, dx) in cells
        assert all(min(0, dy) <= y <= max(0, dy) and min(0, dx) <= x <= max(0, dx) for y, x in cells)


def test_path_cells_follow_the_segment() -> None:
    assert path_cells(0, 3) == ((0, 0), (0, 1), (0, 2), (0, 3))
    # every cell of the bounding box within distance 1 of the line: a diagonal cannot slip between two
    # boundary cells that touch only at a corner
    assert set(path_cells(2, 2)) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)}
    assert set(path_cells(2, -4)) == {(0, 0), (0, -1), (0, -2), (1, 0), (1, -1), (1, -2), (1, -3), (1, -4),
                                     (2, -2), (2, -3), (2, -4)}
    boundary = torch.zeros(1, 3, 3)
    boundary[0, 0, 1] = boundary[0, 1, 0] = 1.0  # a staircase cutting off the top-left corner
    aff = boundary_to_affinity(boundary, PathIndex.of(2))
    assert float(aff[0, 3, 0, 0]) == 0.0  # (0, 0) -> (1, 1) crosses it
    with pytest.raises(ValueError, match="radius"):
        search_directions(1)


def test_pair_labels_from_a_hand_made_map() -> None:
    grid = np.array([[0, 0, 1, 1],
                     [0, 255, 1, 2],
                     [0, 0, 2, 2]])
    index = PathIndex.of(2)  # directions (0, 1), (1, -1), (1, 0), (1, 1)
    assert index.directions == ((0, 1), (1, -1), (1, 0), (1, 1))
    masks = pair_labels(torch.from_numpy(grid)[None], index)
    got = {k: v[0].numpy() for k, v in masks.items()}
    d_right, d_down = 0, 2
    assert got["bg_pos"][d_right, 0, 0] == 1           # 0 -> 0
    assert got["neg"][d_right, 0, 1] == 1              # 0 -> 1
    assert got["fg_pos"][d_right, 0, 2] == 1           # 1 -> 1
    assert got["neg"][d_down, 1, 2] == 1               # 1 -> 2
    assert got["fg_pos"][d_down, 1, 3] == 1            # 2 -> 2
    for k in got:                                      # 255 involved, or off the grid: no label
        assert got[k][d_down, 0, 1] == 0 and got[k][d_right, 1, 0] == 0 and got[k][d_right, 0, 3] == 0
    # brute force over every pair
    h, w = grid.shape
    for d, (dy, dx) in enumerate(index.directions):
        for y in range(h):
            for x in range(w):
                ty, tx = y + dy, x + dx
                a = grid[y, x]
                b = grid[ty, tx] if 0 <= ty < h and 0 <= tx < w else 255
                valid = a != 255 and b != 255
                assert got["bg_pos"][d, y, x] == (valid and a == b == 0)
                assert got["fg_pos"][d, y, x] == (valid and a == b != 0)
                assert got["neg"][d, y, x] == (valid and a != b)


def test_affinity_is_one_minus_the_path_maximum() -> None:
    rng = np.random.default_rng(1)
    boundary = rng.random((6, 7)).astype(np.float32)
    index = PathIndex.of(3)
    aff = boundary_to_affinity(torch.from_numpy(boundary)[None], index)[0].numpy()
    h, w = boundary.shape
    for d, ((dy, dx), cells) in enumerate(zip(index.directions, index.paths, strict=True)):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    expected = 1 - max(boundary[y + cy, x + cx] for cy, cx in cells)
                else:
                    expected = 0.0
                assert aff[d, y, x] == pytest.approx(expected, abs=1e-6)


def test_affinity_gradient_goes_to_each_path_maximum() -> None:
    """The training path (one scatter-add) matches autograd through stack + amax, and the
    no-gradient path (the random walk) gives the same values."""
    torch.manual_seed(0)
    index = PathIndex.of(4)
    boundary = torch.rand(3, 9, 11, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, len(index), 9, 11, dtype=torch.float64)
    (boundary_to_affinity(boundary, index) * weights).sum().backward()
    fast = boundary.grad.clone()
    boundary.grad = None
    padded = torch.nn.functional.pad(boundary, (index.pad, index.pad, 0, index.pad), value=1.0)
    reference = torch.stack([
        1.0 - torch.stack([padded[:, y:y + 9, index.pad + x:index.pad + x + 11] for y, x in cells]).amax(0)
        for cells in index.paths], dim=1)
    (reference * weights).sum().backward()
    assert torch.allclose(fast, boundary.grad, atol=1e-12)
    assert fast.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(boundary_to_affinity(boundary, index), reference.detach())
    assert torch.autograd.gradcheck(lambda b: boundary_to_affinity(b, PathIndex.of(3)),
                                    (torch.rand(2, 5, 6, dtype=torch.float64, requires_grad=True),))


# -- random walk ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_walk_spreads_inside_a_region_and_not_across_a_boundary(method: str) -> None:
    boundary = torch.zeros(12, 12)
    boundary[:, 6] = 1.0
    maps = torch.zeros(1, 12, 12)
    maps[0, 3, 2] = 1.0
    out = random_walk(maps, boundary, PathIndex.of(3), beta=10.0, exp_times=6, method=method)[0]
    left, right = out[:, :6], out[:, 7:]
    assert float(right.abs().max()) < 1e-12
    assert float(left.min()) > 0.2 * float(left.max())  # the seed has spread over its whole region
    assert float(out[3, 2]) < 0.5  # and left the seed pixel


def test_sparse_and_dense_walks_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    boundary = torch.rand(9, 11, generator=gen) ** 3
    maps = torch.rand(3, 9, 11, generator=gen)
    index = PathIndex.of(4)
    dense = walk_dense(maps, boundary, index, beta=5.0, exp_times=5)
    sparse = walk_sparse(maps, boundary, index, beta=5.0, exp_times=5)
    assert torch.allclose(dense, sparse, rtol=1e-3, atol=1e-5 * float(dense.abs().max()))
    with pytest.raises(ValueError, match="sparse | dense"):
        random_walk(maps, boundary, index, 5.0, 2, method="exact")


def test_walk_labels_use_the_background_plane() -> None:
    walked = torch.zeros(2, 3, 3)
    walked[0, 0, 0] = 2.0   # class 4: normalised to 1 at the top-left
    walked[1, 2, 2] = 0.4   # class 7: 0.2 after normalisation, under the 0.25 plane
    label = labels_from_walk(walked, np.array([4, 7]), (12, 12), 0.25)
    assert label.shape == (12, 12) and label.dtype == np.uint8
    assert label[0, 0] == 4 and label[11, 11] == 0 and set(np.unique(label)) <= {0, 4}


def test_seed_grid_matches_the_boundary_grid() -> None:
    net = BoundaryNet(build_backbone("resnet18")).eval()
    for h, w in [(37, 50), (32, 32), (41, 29)]:
        b = net.boundary(torch.zeros(1, 3, h, w))
        assert tuple(b.shape[1:]) == grid_size(h, w)
        maps = torch.ones(2, h, w)
        assert torch.allclose(to_grid(maps, grid_size(h, w)), torch.ones(2, *grid_size(h, w)))


# -- IR labels -----------------------------------------------------------------------------------------

def test_ir_label_thresholds_with_identity_crf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(irn_labels, "label_crf", _identity_crf)
    maps = np.zeros((2, 2, 3), np.float32)
    maps[0] = [[0.9, 0.2, 0.01], [0.4, 0.0, 0.06]]
    maps[1] = [[0.1, 0.1, 0.02], [0.5, 0.0, 0.04]]
    image = np.zeros((2, 3, 3), np.uint8)
    out = irn_labels.confident_labels(image, maps, np.array([3, 5]), 0.30, 0.05, _params()["irn"]["label_crf"])
    np.testing.assert_array_equal(out, [[3, 255, 0], [5, 0, 255]])
    empty = irn_labels.confident_labels(image, np.zeros((0, 2, 3), np.float32), np.array([], np.int64),
                                        0.3, 0.05, _params()["irn"]["label_crf"])
    assert (empty == 0).all()
    with pytest.raises(ValueError, match="bg_threshold"):
        irn_labels.confident_labels(image, maps, np.array([3, 5]), 0.05, 0.3, _params()["irn"]["label_crf"])


def test_ir_labels_stage_with_the_real_crf_and_workers(synthetic: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import ir_labels

    params = _params()
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"ir_{workers}"
        assert _run_stage(ir_labels, ["--data", str(synthetic["data"]), "--seeds", str(synthetic["seeds"]),
                                      "--out", str(out), "--workers", str(workers)], params, monkeypatch) == 0
        outs[workers] = out
        assert sorted(p.name for p in out.iterdir()) == [f"img_{n}.png" for n in range(6)]
        assert not (tmp_path / f".ir_{workers}.partial").exists()
    table = json.loads((synthetic["data"] / "cls_labels.json").read_text())
    for n in range(6):
        a = load_label_png(outs[0] / f"img_{n}.png")
        assert np.array_equal(a, load_label_png(outs[2] / f"img_{n}.png"))
        assert set(np.unique(a)) <= {0, 255, *table[f"img_{n}"]}
        assert (a == 0).any() and ((a > 0) & (a < 255)).any()


def test_a_dying_worker_fails_the_stage(synthetic: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from cpal.data.voc import VOCDataset

    monkeypatch.setattr(irn_labels, "label_crf", _dying_crf)
    out = tmp_path / "ir"
    with pytest.raises(RuntimeError, match="worker process died"):
        irn_labels.make_ir_labels(VOCDataset(synthetic["data"], "train"), synthetic["seeds"], out,
                                  _params()["irn"], workers=1, log=LOG, progress=False)
    assert not out.exists()


def test_map_auto_follows_the_method(synthetic: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from cpal.seeds.store import SeedError
    from stages import ir_labels

    monkeypatch.setattr(irn_labels, "label_crf", _identity_crf)
    argv = ["--data", str(synthetic["data"]), "--seeds", str(synthetic["seeds"]), "--out", str(tmp_path / "o")]
    params = _params(map="auto")
    assert _run_stage(ir_labels, argv, params, monkeypatch) == 0  # method cam: the cam map
    params["params"]["method"] = "cpal"  # these seeds hold no PACAM
    with pytest.raises(SeedError, match="no 'pacam' map"):
        _run_stage(ir_labels, argv, params, monkeypatch)


# -- training ------------------------------------------------------------------------------------------

def test_affinity_loss_goes_down_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    net = BoundaryNet(build_backbone("resnet18")).train()
    images = torch.randn(2, 3, 32, 32) * 0.3
    images[:, :, 8:24, 8:24] += 2  # an object on the 8x8 grid's cells 2..5
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, 2:6, 2:6] = 1
    labels[1, 0, :] = 255
    index = PathIndex.of(3)
    opt = torch.optim.SGD(net.head_parameters(), lr=0.03, momentum=0.9)
    losses = []
    for _ in range(10):
        terms = affinity_loss(net, images, labels, index)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]
    assert all(p.grad is None for p in net.backbone.parameters())  # frozen


def test_affinity_loss_amp_is_ignored_on_the_cpu() -> None:
    """amp=True on CPU must not fall into CPU autocast (bfloat16): the loss is the float32 one, bit for bit."""
    torch.manual_seed(0)
    net = BoundaryNet(build_backbone("resnet18")).train()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, 2:6, 2:6] = 1
    index = PathIndex.of(3)
    full, amp = affinity_loss(net, images, labels, index), affinity_loss(net, images, labels, index, amp=True)
    for key in full:
        assert torch.equal(full[key], amp[key]) and amp[key].dtype == torch.float32, key


def test_train_irn_checkpoints_keeps_the_backbone_and_resumes(synthetic: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import train_irn as stage

    labels = synthetic["data"] / "SegmentationClass"  # ground truth stands in for IR labels here
    params = _params()
    full = tmp_path / "full"
    assert _run_stage(stage, ["--data", str(synthetic["data"]), "--ir-labels", str(labels),
                              "--classifier", str(synthetic["classifier"]), "--out", str(full)],
                      params, monkeypatch) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["steps"] == 6 and len(metrics["history"]) == 2 and np.isfinite(metrics["final_loss"])
    assert not (full / "resume.pt").exists() and (full / "timing.json").is_file()
    timing = json.loads((full / "timing.json").read_text())
    assert timing["amp"] is False and timing["cuda_peak_mib"] is None  # irn.amp on, ignored on CPU
    net = load_boundary_net(full / "model.pt", torch.device("cpu"))
    cls_state = load_checkpoint(synthetic["classifier"])["model"]
    for key, value in net.backbone.state_dict().items():  # frozen: weights and BatchNorm statistics
        assert torch.equal(value, cls_state[f"backbone.{key}"]), key

    resumed = tmp_path / "resumed"
    stopped = train_irn(params, synthetic["data"], labels, synthetic["classifier"], resumed, LOG, progress=False,
                        stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1} and (resumed / "resume.pt").is_file()
    train_irn(params, synthetic["data"], labels, synthetic["classifier"], resumed, LOG, progress=False)
    a, b = load_checkpoint(full / "model.pt")["model"], load_checkpoint(resumed / "model.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_irn_needs_the_classifier(synthetic: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--classifier"):
        train_irn(_params(), synthetic["data"], synthetic["data"] / "SegmentationClass", None, tmp_path, LOG,
                  progress=False)


# -- refinement ----------------------------------------------------------------------------------------

def _irn_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = BoundaryNet(build_backbone("resnet18"))
    save_checkpoint(path, {"meta": irn_meta(net.backbone, "classifier", 4), "model": net.state_dict()})
    return path


@pytest.mark.parametrize("walk", ["sparse", "dense"])
def test_refine_writes_one_valid_png_per_id(synthetic: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, walk: str) -> None:
    from stages import refine_irn as stage

    model = _irn_checkpoint(tmp_path / "irn.pt")
    out, timing = tmp_path / "rw", tmp_path / "timing.json"
    assert _run_stage(stage, ["--data", str(synthetic["data"]), "--seeds", str(synthetic["seeds"]),
                              "--irn", str(model), "--out", str(out), "--timing", str(timing)],
                      _params(walk=walk, power=1.5), monkeypatch) == 0
    table = json.loads((synthetic["data"] / "cls_labels.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [f"img_{n}.png" for n in range(6)]
    for n in range(6):
        label = load_label_png(out / f"img_{n}.png")
        assert label.shape == (38, 42)
        assert set(np.unique(label)) <= {0, *table[f"img_{n}"]} and (label > 0).any()
    t = json.loads(timing.read_text())
    assert t["images"] == 6 and t["walk_seconds_per_image"] > 0 and t["peak_rss_mib"] > 0


def test_a_killed_refine_publishes_nothing_and_resumes(synthetic: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cpal.irn import refine

    model = _irn_checkpoint(tmp_path / "irn.pt")
    out = tmp_path / "rw"
    real = refine.refine_image
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(refine, "refine_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        refine.refine_irn(_params(), synthetic["data"], synthetic["seeds"], model, out, LOG, progress=False)
    assert not out.exists() and len(list((tmp_path / ".rw.partial").glob("*.png"))) == 3
    timing = refine.refine_irn(_params(), synthetic["data"], synthetic["seeds"], model, out, LOG, progress=False)
    assert timing["images"] == 3 and len(list(out.glob("*.png"))) == 6
    assert not (tmp_path / ".rw.partial").exists()


# -- planes derived without ground truth ------------------------------------------------------------------

def test_otsu_splits_a_bimodal_histogram_between_its_modes() -> None:
    from cpal.irn.thresholds import BINS, derive_planes, otsu_split

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.1, 0.04, 8000), rng.normal(0.7, 0.08, 2000)]).clip(0, 1)
    hist = np.bincount(np.minimum((scores * BINS).astype(int), BINS - 1), minlength=BINS)
    t, mu0, mu1 = otsu_split(hist)
    assert 0.2 < t < 0.6 and abs(mu0 - 0.1) < 0.02 and abs(mu1 - 0.7) < 0.03
    planes = derive_planes(hist)
    assert mu0 < planes["bg_threshold"] < t < planes["fg_threshold"] < mu1
    assert planes["sem_seg_bg_thres"] == planes["fg_threshold"]
    with pytest.raises(ValueError, match="no seed pixels"):
        otsu_split(np.zeros(BINS))
    with pytest.raises(ValueError, match="single value"):
        otsu_split(np.eye(1, BINS, 30).ravel())


def test_auto_planes_come_from_the_seed_folder(synthetic: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The synthetic seeds score 0 off the objects and 0.6 / 1.0 on them: the planes fall in between,
    and what the stages used is what they report."""
    from cpal.data.voc import VOCDataset
    from cpal.irn.thresholds import resolve_planes

    ids = VOCDataset(synthetic["data"], "train").ids
    fixed = _params()["irn"]
    assert resolve_planes(fixed, synthetic["seeds"], ids) == (fixed, None)
    auto = _params(fg_threshold="auto", bg_threshold="auto", sem_seg_bg_thres="auto")
    resolved, derived = resolve_planes(auto["irn"], synthetic["seeds"], ids)
    assert 0 < resolved["bg_threshold"] < derived["otsu_threshold"] < resolved["fg_threshold"] <= 0.8
    assert resolved["sem_seg_bg_thres"] == resolved["fg_threshold"]
    stats = irn_labels.make_ir_labels(VOCDataset(synthetic["data"], "train"), synthetic["seeds"], tmp_path / "ir",
                                      auto["irn"], 0, LOG, progress=False)
    assert stats["fg_threshold"] == resolved["fg_threshold"] and stats["derived"] == derived
    from cpal.irn import refine

    timing = refine.refine_irn(auto, synthetic["data"], synthetic["seeds"], _irn_checkpoint(tmp_path / "irn.pt"),
                               tmp_path / "rw", LOG, progress=False)
    assert timing["sem_seg_bg_thres"] == resolved["sem_seg_bg_thres"] and timing["derived_planes"] == derived
    half = _params(fg_threshold=0.0, bg_threshold="auto")["irn"]
    with pytest.raises(ValueError, match="exceeds irn.fg_threshold"):
        resolve_planes(half, synthetic["seeds"], ids)


def test_an_irn_checkpoint_of_another_backbone_is_refused(synthetic: dict[str, Path], tmp_path: Path) -> None:
    from cpal.core.training import CheckpointError
    from cpal.irn import refine

    model = _irn_checkpoint(tmp_path / "irn.pt")  # resnet18, output stride 16
    other = _params()
    other["train_cls"] = {"backbone": "efficientnet_lite0", "output_stride": 16}
    with pytest.raises(CheckpointError, match=r"irn.pt: IRN checkpoint trained on resnet18 .*train_cls.backbone "
                                              r"is 'efficientnet_lite0'"):
        refine.refine_irn(other, synthetic["data"], synthetic["seeds"], model, tmp_path / "rw", LOG, progress=False)
    other["train_cls"] = {"backbone": "resnet18", "output_stride": 8}
    with pytest.raises(CheckpointError, match="train_cls.output_stride is 8"):
        refine.refine_irn(other, synthetic["data"], synthetic["seeds"], model, tmp_path / "rw", LOG, progress=False)
    assert not (tmp_path / "rw").exists()
