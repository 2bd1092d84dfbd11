"""AMN as a CPAL host (cpal/amn/): network, L_pcl, training on IR labels with and without the plug-in's loss,
checkpoints, AMN's seed protocol, the params section, and the stages on the tiny preset."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rectangles import CLASSES, rectangles_dataset

from cpal.amn.loss import pcl_loss, resize_labels, smoothed_targets
from cpal.amn.network import AMNNet, aspp_rates
from cpal.amn.seeds import amn_seed_maps
from cpal.amn.train import build_amn, check_label_source, load_amn, train_amn
from cpal.core.config import ParamsError, validate_params
from cpal.core.io import load_label_png, save_label_png
from cpal.core.runtime import seed_everything
from cpal.core.training import CheckpointError, load_checkpoint
from cpal.data.voc import DatasetError
from cpal.seeds.store import labels_from_maps, load_seeds, seed_path

LOG = logging.getLogger("test_amn")
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(tiny_params: dict, method: str = "cpal", **amn: object) -> dict:
    """The tiny preset with a small ResNet-18 AMN that needs no download."""
    p = copy.deepcopy(tiny_params)
    p["params"].update(method=method, bank_size=4, K=2)
    p["amn"].update(backbone="resnet18", pretrained=False, crop_size=32, batch_size=2, epochs=1)
    p["amn"].update(amn)
    p["run"]["device"] = "cpu"
    return validate_params(p)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six 36x44 images with one or two coloured rectangles; IR labels = masks with an unsure (255) band."""
    root = tmp_path_factory.mktemp("amn")
    data, ir = root / "data", root / "ir_labels"
    for image_id, (mask, _) in rectangles_dataset(data, "amn-test", (36, 44), step=(14, 18)).items():
        label = mask.copy()
        label[:, -4:] = 255
        save_label_png(ir / f"{image_id}.png", label)
    return {"data": data, "ir": ir, "root": root}


@pytest.fixture(scope="module")
def trained(synthetic: dict[str, Path], tiny_params: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of AMN with the plug-in's loss (plugin both) on the synthetic IR labels."""
    out = tmp_path_factory.mktemp("amn_trained")
    train_amn(_params(tiny_params), synthetic["data"], synthetic["ir"], out, LOG, progress=False)
    return out


# -- network ------------------------------------------------------------------------------------------

def test_aspp_dilations_scale_with_the_training_grid() -> None:
    assert aspp_rates(512, 16) == (6, 12, 18, 24)  # AMN's own grid, 32 x 32
    assert aspp_rates(128, 16) == (2, 3, 5, 6)  # the embedded default's 8 x 8 grid
    assert aspp_rates(64, 16) == (1, 2, 2, 3)
    assert aspp_rates(16, 16) == (1, 1, 1, 1)  # never below 1
    net = AMNNet(2, "resnet18", rates=aspp_rates(128, 16))
    assert [b.dilation for b in net.classifier.branches] == [(2, 2), (3, 3), (5, 5), (6, 6)]


def test_shapes_label_conditioning_frozen_parts_and_the_dropout_switch() -> None:
    torch.manual_seed(0)
    net = AMNNet(2, "resnet18", dropout=0.5).eval()
    x = torch.randn(2, 3, 64, 48)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    logits = net(x, labels)["logits"]
    assert logits.shape == (2, 3, 4, 3)  # N + 1 channels on the stride-16 grid
    assert torch.equal(logits, net(x, labels)["logits"])  # eval: dropout off, deterministic
    assert not torch.allclose(net(x, torch.zeros_like(labels))["logits"], logits)  # the labels steer the maps
    assert not torch.allclose(net(x, labels.flip(0))["logits"][0], logits[0])
    assert all(not p.requires_grad for p in net.backbone.stages[0][0].parameters())  # AMN's frozen stem
    net.train()
    batchnorms = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms) and net.dropout.training  # frozen BN
    with pytest.raises(ValueError, match=r"labels must be multi-hot \(B, N\) = \(2, 2\)"):
        net(x, torch.ones(2, 3))

    torch.manual_seed(0)
    quirk = AMNNet(2, "resnet18", dropout=0.5, keep_dropout_at_inference=True).eval()
    assert quirk.dropout.training and not quirk.training  # AMN's code: eval() leaves dropout on
    assert not torch.equal(quirk(x, labels)["logits"], quirk(x, labels)["logits"])


# -- L_pcl --------------------------------------------------------------------------------------------

def _ce(logits: list[float], target: int, eps: float) -> float:
    """Cross-entropy of one pixel against the smoothed one-hot target, by hand."""
    z = math.log(sum(math.exp(v) for v in logits))
    c = len(logits)
    return -sum(((1 - eps) if k == target else eps / (c - 1)) * (v - z) for k, v in enumerate(logits))


def test_pcl_loss_against_a_hand_computed_example() -> None:
    # five pixels in a row, three channels: background, background, background, class 2, unsure
    pixels = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [1.0, -1.0, 3.0], [0.2, 0.1, 1.5], [9.0, -9.0, 0.0]]
    logits = torch.tensor(pixels).T.reshape(1, 3, 1, 5)
    labels = torch.tensor([[[0, 0, 0, 2, 255]]])
    eps = 0.4
    background = sum(_ce(p, 0, eps) for p in pixels[:3]) / 3
    foreground = _ce(pixels[3], 2, eps)
    assert float(pcl_loss(logits, labels, eps)) == pytest.approx((background + foreground) / 2, rel=1e-5)
    # not the plain mean over the four labelled pixels: background and foreground weigh the same
    assert float(pcl_loss(logits, labels, eps)) != pytest.approx((3 * background + foreground) / 4, rel=1e-3)
    # the unsure pixel counts nowhere
    moved = logits.clone()
    moved[..., 4] = torch.tensor([-5.0, 5.0, 2.0])[:, None]
    assert float(pcl_loss(moved, labels, eps)) == pytest.approx(float(pcl_loss(logits, labels, eps)), rel=1e-6)
    # eps 0: the balanced plain cross-entropy; a batch without foreground averages the background alone
    assert float(pcl_loss(logits, labels, 0.0)) == pytest.approx(
        (sum(_ce(p, 0, 0.0) for p in pixels[:3]) / 3 + _ce(pixels[3], 2, 0.0)) / 2, rel=1e-5)
    only_bg = torch.tensor([[[0, 0, 0, 255, 255]]])
    assert float(pcl_loss(logits, only_bg, eps)) == pytest.approx(background, rel=1e-5)
    assert float(pcl_loss(logits, torch.full_like(labels, 255), eps)) == 0.0


def test_smoothed_targets_and_label_resizing() -> None:
    target = smoothed_targets(torch.tensor([[[0, 2, 255]]]), 4, 0.4)
    assert target[0, :, 0, 1].tolist() == pytest.approx([0.4 / 3, 0.4 / 3, 0.6, 0.4 / 3])
    assert target.sum(dim=1).flatten().tolist() == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="label 5 outside the 4 logit channels"):
        smoothed_targets(torch.tensor([[[5]]]), 4, 0.4)
    labels = torch.arange(16).reshape(1, 4, 4)
    assert resize_labels(labels, (2, 2)).tolist() == [[[5, 7], [13, 15]]]  # pixel centres, as PIL's NEAREST


# -- training -----------------------------------------------------------------------------------------

def test_training_moves_weights_fills_the_bank_and_checkpoints_it(trained: Path, tiny_params: dict) -> None:
    ckpt = load_checkpoint(trained / "model.pt")
    meta, state = ckpt["meta"], ckpt["model"]
    assert meta["plugin"] == "both" and meta["backbone"] == "resnet18" and meta["num_classes"] == 2
    assert meta["aspp_rates"] == [1, 1, 1, 2] and meta["cpal"]["bank_size"] == 4
    assert int(state["cpal.bank.count"].sum()) > 0  # the plug-in's bank, saved with AMN's weights
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 3 and np.isfinite(metrics["final_loss"]) and metrics["history"][0]["loss_self"] > 0
    assert sum(metrics["bank_filled"].values()) == int(state["cpal.bank.count"].sum())
    seed_everything(0)  # what train_amn does before building the network: the same initial weights
    start = build_amn(_params(tiny_params), 2).state_dict()
    assert not torch.equal(state["classifier.branches.0.weight"], start["classifier.branches.0.weight"])
    assert not torch.equal(state["label_enc.weight"], start["label_enc.weight"])
    assert not torch.equal(state["project.weight"], start["project.weight"])
    for key in ("backbone.stages.0.0.0.weight", "backbone.stages.1.0.bn1.running_mean"):  # stem, BN statistics
        assert torch.equal(state[key], start[key]), key


def test_without_the_loss_plug_in_there_is_no_bank_and_a_killed_run_resumes(
        synthetic: dict[str, Path], tiny_params: dict, tmp_path: Path) -> None:
    params = _params(tiny_params, method="cam", plugin="none", epochs=2)
    full = train_amn(params, synthetic["data"], synthetic["ir"], tmp_path / "full", LOG, progress=False)
    assert full["bank_filled"] is None and all(h["loss_self"] == 0 for h in full["history"])
    state = load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    assert not any(k.startswith(("cpal.", "project.")) for k in state)
    stopped = train_amn(params, synthetic["data"], synthetic["ir"], tmp_path / "resumed", LOG, progress=False,
                        stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1}
    train_amn(params, synthetic["data"], synthetic["ir"], tmp_path / "resumed", LOG, progress=False)
    a = load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_ir_label_with_a_class_outside_the_dataset_is_refused_by_name(
        synthetic: dict[str, Path], tiny_params: dict, tmp_path: Path) -> None:
    bad = tmp_path / "ir"
    for path in synthetic["ir"].glob("*.png"):
        save_label_png(bad / path.name, load_label_png(path))
    label = load_label_png(bad / "img_4.png")
    label[0, 0] = 7
    save_label_png(bad / "img_4.png", label)
    with pytest.raises(DatasetError, match=r"ir/img_4\.png: label value\(s\) \[7\] of 'img_4' outside the class "
                                           r"range 0\.\.2"):
        train_amn(_params(tiny_params), synthetic["data"], bad, tmp_path / "out", LOG, progress=False)
    (bad / "img_2.png").unlink()
    with pytest.raises(DatasetError, match="no IR label: img_2"):
        train_amn(_params(tiny_params), synthetic["data"], bad, tmp_path / "out", LOG, progress=False)


def test_the_plugin_must_agree_with_the_classifier_that_made_the_ir_labels(tiny_params: dict) -> None:
    with pytest.raises(ValueError, match="amn.plugin = 'both' records IR labels from CPAL's classifier, but "
                                         "params.method = 'cam'.*amn.plugin: loss"):
        check_label_source(_params(tiny_params, method="cam", plugin="both"))
    with pytest.raises(ValueError, match="amn.plugin = 'none' .* params.method = 'cpal'.*amn.plugin: classifier"):
        check_label_source(_params(tiny_params, method="cpal", plugin="none"))
    check_label_source(_params(tiny_params, method="sipe", plugin="loss"))


def test_a_checkpoint_of_another_backbone_class_count_or_plugin_is_refused(trained: Path, tiny_params: dict) -> None:
    params = _params(tiny_params)
    model, meta = load_amn(trained / "model.pt", params, CLASSES, CPU)
    assert model.rates == (1, 1, 1, 2) and model.cpal is not None and int(model.cpal.bank.count.sum()) > 0
    other = _params(tiny_params, backbone="efficientnet_lite0")
    with pytest.raises(CheckpointError, match=r"model\.pt was trained with backbone = 'resnet18', but the current "
                                              r"settings need backbone = 'efficientnet_lite0'.*rerun train_amn"):
        load_amn(trained / "model.pt", other, CLASSES, CPU)
    with pytest.raises(CheckpointError, match="num_classes = 2, but the current settings need num_classes = 3"):
        load_amn(trained / "model.pt", params, [*CLASSES, "green"], CPU)
    with pytest.raises(CheckpointError, match="plugin = 'both'.*plugin = 'classifier'"):
        load_amn(trained / "model.pt", _params(tiny_params, plugin="classifier"), CLASSES, CPU)


# -- seeds --------------------------------------------------------------------------------------------

def test_amn_seed_protocol_on_a_tiny_example() -> None:
    # softmax of one image over background + 3 classes on a 2 x 3 grid; the image holds class 2 only
    probs = torch.tensor([
        [[0.70, 0.60, 0.50], [0.40, 0.30, 0.20]],  # background
        [[0.10, 0.10, 0.10], [0.10, 0.10, 0.10]],  # class 1 (absent)
        [[0.15, 0.22, 0.30], [0.40, 0.50, 0.60]],  # class 2
        [[0.05, 0.08, 0.10], [0.10, 0.10, 0.10]],  # class 3 (absent)
    ])
    ir_label = np.array([[0, 0, 255], [2, 2, 0]], dtype=np.uint8)  # classifier's IR label
    maps = amn_seed_maps(probs, np.array([2]), ir_label)
    assert maps.shape == (1, 2, 3)  # the background channel is dropped
    normalised = (np.array([[0.15, 0.22, 0.30], [0.40, 0.50, 0.60]]) - 0.15) / (0.60 - 0.15 + 1e-5)
    expected = np.where(ir_label != 0, normalised, [[0.15, 0.22, 0.30], [0.40, 0.50, 0.60]])
    np.testing.assert_allclose(maps[0], expected, rtol=1e-5)
    # AMN's fixed background threshold 0.25: raw 0.15 and 0.22 stay background where the IR label is
    assert labels_from_maps(maps, np.array([2]), 0.25).tolist() == [[0, 0, 2], [2, 2, 2]]


def test_maps_with_dropout_kept_reproduce_and_a_killed_run_resumes_to_the_same_files(
        synthetic: dict[str, Path], trained: Path, tiny_params: dict, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cpal.amn import seeds as amn_seeds
    from cpal.data.voc import VOCDataset

    ds = VOCDataset(synthetic["data"], "train")
    quirk = _params(tiny_params, keep_dropout_at_inference=True, scales=[1.0], flip=False)
    plain = _params(tiny_params, scales=[1.0], flip=False)

    def run(out: Path, params: dict = quirk) -> dict:
        model, _ = load_amn(trained / "model.pt", params, CLASSES, CPU)
        return amn_seeds.make_amn_seeds(model, ds, synthetic["ir"], out, params["amn"], 2, CPU, LOG, progress=False)

    run(tmp_path / "a")
    run(tmp_path / "b")
    run(tmp_path / "plain", plain)
    ids = ds.ids
    assert all(seed_path(tmp_path / "a", i).read_bytes() == seed_path(tmp_path / "b", i).read_bytes() for i in ids)
    assert any(not np.array_equal(load_seeds(seed_path(tmp_path / "a", i))["cam"],
                                  load_seeds(seed_path(tmp_path / "plain", i))["cam"]) for i in ids)  # dropout was on
    calls = {"n": 0}
    save = amn_seeds.save_seeds

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # in the second batch of two
            raise RuntimeError("killed")
        save(*args, **kwargs)

    monkeypatch.setattr(amn_seeds, "save_seeds", dying_save)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "killed")
    assert not (tmp_path / "killed").exists()
    monkeypatch.setattr(amn_seeds, "save_seeds", save)
    assert run(tmp_path / "killed")["resumed_images"] == 2
    assert all(seed_path(tmp_path / "killed", i).read_bytes() == seed_path(tmp_path / "a", i).read_bytes() for i in ids)


# -- params -------------------------------------------------------------------------------------------

def test_schema_names_the_allowed_plugins_and_backbones(default_params: dict) -> None:
    assert default_params["amn"]["plugin"] == "both" and default_params["amn"]["seed_threshold"] == 0.25
    p = copy.deepcopy(default_params)
    p["amn"]["plugin"] = "lossy"
    with pytest.raises(ParamsError, match=r"amn\.plugin = 'lossy' is invalid: 'lossy' is not one of "
                                          r"\['none', 'classifier', 'loss', 'both'\]"):
        validate_params(p)
    p = copy.deepcopy(default_params)
    p["amn"]["backbone"] = "vit_b16"
    with pytest.raises(ParamsError, match=r"amn\.backbone = 'vit_b16'.*'resnet50'.*'efficientnet_lite0'"):
        validate_params(p)
    p = copy.deepcopy(default_params)
    p["amn"]["scale_range"] = [1.5, 0.5]
    with pytest.raises(ParamsError, match="amn.scale_range.*low must not exceed high"):
        validate_params(p)


# -- stages on the tiny preset ------------------------------------------------------------------------

def test_stages_train_amn_make_seeds_and_evaluate_on_the_tiny_preset(tiny_data: Path, tiny_params: dict,
                                                                     tmp_path: Path, repo_root: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """IR labels built in-test (ground truth with its 255 border band, foreground of every third image
    turned unsure); then the stage entry points, with configs/tiny.yaml as it ships (Lite0, ImageNet)."""
    from cpal.data.voc import VOCDataset
    from cpal.irn import labels as irn_labels
    from stages import eval_seeds, ir_labels, make_amn_seeds, train_amn

    params = str(repo_root / "configs" / "tiny.yaml")
    ds = VOCDataset(tiny_data, "train")
    ir = tmp_path / "ir_labels"
    for n, image_id in enumerate(ds.ids):
        mask = ds.mask(image_id)
        save_label_png(ir / f"{image_id}.png", np.where((n % 3 == 0) & (mask > 0), 255, mask).astype(np.uint8))
    out, seeds = tmp_path / "amn", tmp_path / "amn_seeds"
    common = ["--params", params, "--data", str(tiny_data), "--no-progress"]
    assert train_amn.main([*common, "--ir-labels", str(ir), "--out", str(out), "--log", str(tmp_path / "t.log")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["plugin"] == "both" and metrics["aspp_rates"] == [1, 2, 2, 3] and metrics["steps"] == 4
    assert make_amn_seeds.main([*common, "--checkpoint", str(out / "model.pt"), "--ir-labels", str(ir),
                                "--out", str(seeds), "--timing", str(tmp_path / "timing.json"),
                                "--log", str(tmp_path / "s.log")]) == 0
    first = load_seeds(seed_path(seeds, ds.ids[0]), expected_size=ds.image_size(ds.ids[0]))
    assert first["cam"].shape[0] == len(ds.labels(ds.ids[0])) and 0 <= first["cam"].min() <= first["cam"].max() <= 1
    evaluation = tmp_path / "eval.json"
    assert eval_seeds.main([*common, "--seeds", str(seeds), "--metrics", str(evaluation), "--curve",
                            str(tmp_path / "curve.csv"), "--plot", str(tmp_path / "curve.png"),
                            "--fixed-threshold", "0.25", "--host", "amn", "--log", str(tmp_path / "e.log")]) == 0
    result = json.loads(evaluation.read_text())
    assert result["cam_fixed"]["threshold"] == 0.25 and 0 <= result["cam_fixed"]["miou"] <= result["cam"]["miou"]
    assert result["method"] == "amn (cpal classifier)"
    # the next stage reads AMN's seeds as it reads the classifier's (its `cam` key; CRF replaced by identity)
    monkeypatch.setattr(irn_labels, "label_crf", lambda image, labels, n, gt_prob, cfg: np.asarray(labels))
    cam_params = tmp_path / "cam.yaml"
    cam_params.write_text(yaml.safe_dump({**tiny_params, "irn": {**tiny_params["irn"], "map": "cam"}}))
    assert ir_labels.main(["--params", str(cam_params), "--data", str(tiny_data), "--no-progress", "--seeds",
                           str(seeds), "--out", str(tmp_path / "ir2"), "--log", str(tmp_path / "i.log")]) == 0
    assert len(list((tmp_path / "ir2").glob("*.png"))) == len(ds)
