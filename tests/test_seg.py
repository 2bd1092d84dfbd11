"""DeepLab stages (cpal.seg): model shapes, label checks, resumable training, evaluation, CRF, entry points."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cpal.core.io import load_label_png, save_jpeg, save_label_png, write_json
from cpal.core.training import CheckpointError, load_checkpoint
from cpal.data.torch_data import IMAGENET_MEAN, IMAGENET_STD
from cpal.data.voc import DatasetError, VOCDataset
from cpal.seg import model as seg_model
from cpal.seg.data import SegmentationData, class_balanced_weights
from cpal.seg.evaluate import evaluate_segmenter
from cpal.seg.model import ASPPv2, build_segmenter, param_groups
from cpal.seg.train import load_segmenter, train_segmenter

LOG = logging.getLogger("test_seg")
CLASSES = ["background", "red", "green"]
COLOURS = np.array([[20, 20, 20], [230, 30, 30], [30, 230, 30]], dtype=np.uint8)
BLOCK = 16  # class blocks aligned to JPEG's 16x16 units decode to (nearly) their exact colour
CPU = torch.device("cpu")


def make_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A VOC-layout dataset whose 16x16 blocks are background, red or green: colour = class."""
    rng = np.random.default_rng(seed)
    splits = {"train": [f"t{i:02d}" for i in range(n_train)], "val": [f"v{i:02d}" for i in range(n_val)]}
    labels = {}
    for ids in splits.values():
        for image_id in ids:
            blocks = rng.integers(0, len(CLASSES), size=(size // BLOCK, size // BLOCK))
            mask = np.kron(blocks, np.ones((BLOCK, BLOCK), dtype=np.int64)).astype(np.uint8)
            save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", COLOURS[mask])
            save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
            labels[image_id] = sorted(set(np.unique(mask).tolist()) - {0})
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    write_json(root / "cls_labels.json", labels)
    write_json(root / "dataset.json", {"name": "synthetic", "source": "test", "classes": CLASSES,
                                       "ignore_index": 255, "splits": {k: len(v) for k, v in splits.items()}})
    return root


def seg_params(**seg) -> dict:
    cfg = {
        "backbone": "resnet18", "head": "v3", "init": "none", "dilated": False, "epochs": 2, "iterations": None,
        "batch_size": 4,
        "optimizer": "sgd",
        "crop_size": 32, "scale_range": [0.75, 1.25], "lr": 0.01, "head_lr_mult": 10.0, "momentum": 0.9,
        "weight_decay": 1e-4, "poly_power": 0.9, "class_balanced": False, "amp": True, "cache_images": True,
        "train_split": "train", "val_split": "val", "scales": [1.0, 0.5], "flip": True, "crf": False,
        "crf_params": {"iterations": 10, "gaussian_sxy": 1, "gaussian_compat": 3, "bilateral_sxy": 67,
                       "bilateral_srgb": 3, "bilateral_compat": 4},
    }
    cfg.update(seg)
    return {"run": {"device": "cpu", "seed": 0, "num_workers": 0}, "data": {"source": "synthetic"}, "seg": cfg}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def pseudo(data: Path, tmp_path: Path) -> Path:
    """Pseudo-masks = ground truth with the right column blocks set to ignore."""
    out = tmp_path / "pseudo"
    for image_id in VOCDataset(data, "train").ids:
        mask = load_label_png(data / "SegmentationClass" / f"{image_id}.png").copy()
        mask[:, BLOCK:] = 255
        save_label_png(out / f"{image_id}.png", mask)
    return out


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("head", ["v3", "v2"])
def test_resnet18_logits_at_input_resolution(head: str) -> None:
    torch.manual_seed(0)
    model = build_segmenter({"backbone": "resnet18", "head": head, "init": "none", "dilated": False}, 7)
    out = model(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 7, 64, 48)
    assert model.output_stride == 16
    assert isinstance(model.head, ASPPv2) == (head == "v2")
    groups = param_groups(model, 0.01, 10.0)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("size", [5, 6, 7, 13, 30])
def test_v2_head_sums_four_dilated_branches(size: int) -> None:
    """Below a branch's rate the head takes the 1x1 shortcut: outputs and gradients stay those of the
    dilated 3x3 convolutions (maps of 5..30 cross every rate)."""
    torch.manual_seed(0)
    head = ASPPv2(8, 3)
    for conv in head.branches:  # all nine taps count: a wrong tap would show
        nn.init.normal_(conv.weight)
    assert [b.dilation for b in head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    x = torch.randn(2, 8, size, size, requires_grad=True)
    grad = torch.randn(2, 3, size, size)
    fast = head(x)
    fast_grads = torch.autograd.grad(fast, [x, *head.parameters()], grad)
    slow = sum(b(x) for b in head.branches)
    slow_grads = torch.autograd.grad(slow, [x, *head.parameters()], grad)
    assert torch.allclose(fast, slow, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("head", ["v3", "v2"])
def test_resnet50_builds_without_downloading(head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("weights download attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = build_segmenter({"backbone": "resnet50", "head": head, "init": "none", "dilated": True}, 21).eval()
    assert model.output_stride == 8
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 40)).shape == (1, 21, 33, 40)


def test_init_imagenet_asks_for_backbone_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision builds DeepLabV3 without any weights; ImageNet's go into the ResNet trunk alone, through
    cpal.backbone's checked loader (tests/test_offline_weights.py loads a real file that way)."""
    seen, loaded = {}, []
    real = seg_model.segmentation.deeplabv3_resnet50

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(seg_model.segmentation, "deeplabv3_resnet50", spy)
    monkeypatch.setattr(seg_model, "load_imagenet_weights", lambda model, weights, unused=(): loaded.append(
        (model, weights, unused)))
    model = build_segmenter({"backbone": "resnet50", "head": "v3", "init": "imagenet", "dilated": True}, 5)
    assert seen["weights"] is None and seen["weights_backbone"] is None
    assert [(m, str(w), u) for m, w, u in loaded] == [(model.backbone, "ResNet50_Weights.IMAGENET1K_V1", ("fc.",))]
    build_segmenter({"backbone": "resnet50", "head": "v3", "init": "none", "dilated": True}, 5)
    assert len(loaded) == 1


def test_bad_model_settings_are_named() -> None:
    with pytest.raises(ValueError, match="seg.head = 'v4'"):
        build_segmenter({"backbone": "resnet18", "head": "v4", "init": "none", "dilated": False}, 3)
    with pytest.raises(KeyError, match="seg.init"):
        build_segmenter({"backbone": "resnet18", "head": "v3"}, 3)
    with pytest.raises(KeyError, match="seg.dilated"):
        build_segmenter({"backbone": "resnet18", "head": "v3", "init": "none"}, 3)
    with pytest.raises(ValueError, match="seg.dilated = true is not available for seg.backbone resnet18"):
        build_segmenter({"backbone": "resnet18", "head": "v3", "init": "none", "dilated": True}, 3)
    with pytest.raises(ValueError, match="seg.dilated = false is not available for seg.backbone resnet50"):
        build_segmenter({"backbone": "resnet50", "head": "v3", "init": "none", "dilated": False}, 3)
    with pytest.raises(ValueError, match="must be true or false"):
        build_segmenter({"backbone": "efficientnet_lite0", "head": "v2", "init": "none", "dilated": "no"}, 3)


# ---------------------------------------------------------------- data


def test_pseudo_masks_read_counted_and_augmented(data: Path, pseudo: Path) -> None:
    ds = VOCDataset(data, "train")
    sd = SegmentationData(ds, pseudo, 32, (0.75, 1.25), seed=0)
    expected = np.zeros(3, dtype=np.int64)
    for image_id in ds.ids:
        label = load_label_png(pseudo / f"{image_id}.png")
        expected += np.bincount(label[label != 255], minlength=3)
    assert sd.class_pixels.tolist() == expected.tolist()
    assert sd.source == "pseudo:pseudo"
    x, y, i = sd[1]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64 and i == 1
    x2, y2, _ = sd[1]
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded by (seed, epoch, index)
    sd.set_epoch(1)
    draws = [sd[1] for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0])
    assert not all(torch.equal(sd[j][0], SegmentationData(ds, pseudo, 32, (0.75, 1.25), seed=0)[j][0])
                   for j in range(len(sd)))  # epoch 1 differs from epoch 0 somewhere


def test_downscaled_crop_pads_label_with_ignore(data: Path) -> None:
    sd = SegmentationData(VOCDataset(data, "train"), None, 32, (0.5, 0.5), seed=0)
    x, y, _ = sd[0]
    assert sd.source == "ground_truth"
    assert (y[16:, :] == 255).all() and (y[:, 16:] == 255).all() and (y[:16, :16] != 255).all()
    assert (x[:, 16:, :] == 0).all()  # image padding is 0 after normalisation (the mean colour)


def test_missing_pseudo_masks_are_named(data: Path, pseudo: Path) -> None:
    ds = VOCDataset(data, "train")
    (pseudo / f"{ds.ids[2]}.png").unlink()
    (pseudo / f"{ds.ids[5]}.png").unlink()
    with pytest.raises(DatasetError, match=f"2 id.*{ds.ids[2]}, {ds.ids[5]}"):
        SegmentationData(ds, pseudo, 32, (1.0, 1.0), seed=0)


def test_empty_or_all_ignore_pseudo_masks_are_refused(data: Path, tmp_path: Path) -> None:
    ds = VOCDataset(data, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no labelled pixels in .*empty"):
        SegmentationData(ds, empty, 32, (1.0, 1.0), seed=0)
    ignore = tmp_path / "ignore"
    for image_id in ds.ids:
        save_label_png(ignore / f"{image_id}.png", np.full((32, 32), 255, dtype=np.uint8))
    with pytest.raises(DatasetError, match="no labelled pixels in .*ignore"):
        SegmentationData(ds, ignore, 32, (1.0, 1.0), seed=0)
    with pytest.raises(DatasetError, match="not found"):
        SegmentationData(ds, tmp_path / "nowhere", 32, (1.0, 1.0), seed=0)


def test_mis_sized_or_out_of_range_pseudo_mask_names_its_id(data: Path, pseudo: Path) -> None:
    ds = VOCDataset(data, "train")
    save_label_png(pseudo / f"{ds.ids[3]}.png", np.zeros((16, 32), dtype=np.uint8))
    with pytest.raises(DatasetError, match=f"{ds.ids[3]}.*32x16.*32x32"):
        SegmentationData(ds, pseudo, 32, (1.0, 1.0), seed=0)
    save_label_png(pseudo / f"{ds.ids[3]}.png", np.full((32, 32), 7, dtype=np.uint8))
    with pytest.raises(DatasetError, match=f"{ds.ids[3]}.*\\[7\\]"):
        SegmentationData(ds, pseudo, 32, (1.0, 1.0), seed=0)


def test_class_balanced_weights_are_inverse_frequency() -> None:
    counts = np.array([600, 300, 0, 100])
    w = class_balanced_weights(counts)
    assert w[2] == 0
    present = counts > 0
    products = w[present] * counts[present]
    assert np.allclose(products, products[0])  # w_c proportional to 1 / n_c
    assert np.isclose((w * counts).sum(), counts.sum())  # mean weight per labelled pixel is 1
    assert w[3] > w[1] > w[0]
    with pytest.raises(ValueError):
        class_balanced_weights(np.zeros(3))


# ---------------------------------------------------------------- training


def test_killed_run_resumes_to_the_same_weights(data: Path, pseudo: Path, tmp_path: Path) -> None:
    params = seg_params(class_balanced=True)
    full = train_segmenter(params, data, pseudo, tmp_path / "full", LOG, progress=False)
    stopped = train_segmenter(params, data, pseudo, tmp_path / "resumed", LOG, progress=False, stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1}
    assert (tmp_path / "resumed" / "resume.pt").is_file() and not (tmp_path / "resumed" / "model.pt").exists()
    resumed = train_segmenter(params, data, pseudo, tmp_path / "resumed", LOG, progress=False)
    a = load_checkpoint(tmp_path / "full" / "model.pt")
    b = load_checkpoint(tmp_path / "resumed" / "model.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert full == resumed
    assert (tmp_path / "full" / "metrics.json").read_bytes() == (tmp_path / "resumed" / "metrics.json").read_bytes()
    assert not (tmp_path / "resumed" / "resume.pt").exists()
    assert a["meta"]["init"] == "none" and a["meta"]["labels"] == "pseudo:pseudo"
    assert full["init"] == "none" and full["steps"] == 4 and len(full["history"]) == 2
    weights = np.array([full["class_weights"][c] for c in CLASSES])
    counts = np.array([full["class_pixels"][c] for c in CLASSES])
    assert np.allclose(weights * counts, (weights * counts)[0], rtol=1e-5)
    timing = json.loads((tmp_path / "full" / "timing.json").read_text())
    assert timing["seconds_per_epoch"] > 0
    assert timing["amp"] is False and timing["cuda_peak_mib"] is None  # seg.amp on, ignored on CPU


def test_iterations_override_epochs_and_resume_ignores_other_settings(data: Path, tmp_path: Path) -> None:
    params = seg_params(iterations=3, epochs=50)
    train_segmenter(params, data, None, tmp_path, LOG, progress=False, stop_after_epoch=1)
    other = seg_params(iterations=3, epochs=50, lr=0.02)
    metrics = train_segmenter(other, data, None, tmp_path, LOG, progress=False)
    assert metrics["steps"] == 3 and metrics["epochs"] == 2 and metrics["labels"] == "ground_truth"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]  # trained from scratch, not resumed
    assert metrics["history"][-1]["lr"] == 0.0  # the poly schedule ends at the last iteration
    with pytest.raises(ValueError, match="seg.batch_size = 9"):
        train_segmenter(seg_params(batch_size=9), data, None, tmp_path / "big", LOG, progress=False)


# ---------------------------------------------------------------- evaluation


class ColourModel(nn.Module):
    """A perfect segmenter for make_dataset: one-hot logits of the nearest class colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        rgb = (x * std + mean) * 255.0
        colours = torch.from_numpy(COLOURS).float()
        dist = ((rgb[:, None] - colours[None, :, :, None, None]) ** 2).sum(dim=2)
        return nn.functional.one_hot(dist.argmin(dim=1), len(CLASSES)).permute(0, 3, 1, 2).float() * 10.0


class BackgroundModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], len(CLASSES), *x.shape[-2:])
        out[:, 0] = 1.0
        return out


def test_evaluation_of_an_untrained_model_is_a_valid_miou(data: Path) -> None:
    ds = VOCDataset(data, "val")
    torch.manual_seed(0)
    model = build_segmenter({"backbone": "resnet18", "head": "v2", "init": "none", "dilated": False}, ds.num_classes)
    result = evaluate_segmenter(model, ds, seg_params()["seg"], CPU, LOG, progress=False)
    assert 0.0 <= result["miou"] <= 1.0
    assert list(result["per_class"]) == CLASSES and result["crf"] is None
    assert result["scales"] == [1.0, 0.5] and result["flip"] is True and result["images"] == len(ds)
    assert result["pixels"] == len(ds) * 32 * 32


def test_perfect_prediction_scores_one(data: Path) -> None:
    ds = VOCDataset(data, "val")
    cfg = seg_params(scales=[1.0], flip=True)["seg"]
    result = evaluate_segmenter(ColourModel(), ds, cfg, CPU, LOG, progress=False)
    assert result["miou"] == 1.0 and result["pixel_acc"] == 1.0
    present = {c for c, v in result["per_class"].items() if v["iou"] is not None}
    assert present and all(result["per_class"][c]["iou"] == 1.0 for c in present)
    worse = evaluate_segmenter(BackgroundModel(), ds, cfg, CPU, LOG, progress=False)
    assert worse["miou"] < 1.0


@pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None, reason="pydensecrf is not installed")
def test_crf_post_processing_is_reported_separately(data: Path) -> None:
    ds = VOCDataset(data, "val")
    cfg = seg_params(scales=[1.0], flip=False, crf=True)["seg"]
    result = evaluate_segmenter(BackgroundModel(), ds, cfg, CPU, LOG, progress=False)
    assert result["crf"] is not None and 0.0 <= result["crf"]["miou"] <= 1.0
    assert result["crf"]["settings"] == cfg["crf_params"]
    assert result["miou"] == evaluate_segmenter(BackgroundModel(), ds, seg_params(scales=[1.0], flip=False)["seg"],
                                                CPU, LOG, progress=False)["miou"]
    perfect = evaluate_segmenter(ColourModel(), ds, cfg, CPU, LOG, progress=False)
    assert perfect["crf"]["miou"] > 0.9


def test_val_split_without_masks_is_named(data: Path) -> None:
    ds = VOCDataset(data, "val")
    (data / "SegmentationClass" / f"{ds.ids[1]}.png").unlink()
    with pytest.raises(DatasetError, match=f"split 'val'.*{ds.ids[1]}"):
        evaluate_segmenter(ColourModel(), ds, seg_params()["seg"], CPU, LOG, progress=False)


# ---------------------------------------------------------------- stages


def test_stages_train_and_evaluate_the_upper_bound(data: Path, tmp_path: Path, tiny_params: dict) -> None:
    from cpal.core.config import merge, validate_params
    from stages import eval_seg, train_seg

    params = validate_params(merge(tiny_params, {k: v for k, v in seg_params(epochs=1).items() if k != "data"}))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out = tmp_path / "upper"
    assert train_seg.main(["--params", str(params_file), "--data", str(data), "--ground-truth", "--out", str(out),
                           "--log", str(tmp_path / "train.log"), "--no-progress"]) == 0
    assert (out / "model.pt").is_file() and (out / "metrics.json").is_file() and (out / "timing.json").is_file()
    metrics_file = tmp_path / "eval" / "metrics.json"
    assert eval_seg.main(["--params", str(params_file), "--data", str(data), "--checkpoint", str(out / "model.pt"),
                          "--metrics", str(metrics_file), "--log", str(tmp_path / "eval.log"), "--no-progress"]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert 0.0 <= metrics["miou"] <= 1.0
    assert metrics["init"] == "none" and metrics["labels"] == "ground_truth" and metrics["head"] == "v3"
    with pytest.raises(SystemExit):
        train_seg.main(["--params", str(params_file), "--data", str(data), "--out", str(out)])  # no label source
    # a checkpoint of another head is refused with the reason
    other = copy.deepcopy(params["seg"])
    other["head"] = "v2"
    with pytest.raises(CheckpointError, match="head = 'v3'.*head = 'v2'"):
        load_segmenter(out / "model.pt", other, CLASSES, CPU)
    other.update(head="v3", dilated=True)  # the architecture's dilation is part of what a checkpoint records
    with pytest.raises(CheckpointError, match="dilated = False.*dilated = True"):
        load_segmenter(out / "model.pt", other, CLASSES, CPU)
