"""ImageNet-pretrained EfficientNet-Lite0 (offline, from its PyPI wheel) and the SIPE-faithful switches."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

from cpal.backbone import build_backbone, build_lite0_classifier, lite0_weights_path, load_lite0_imagenet
from cpal.cls.network import CAMNet
from cpal.data.torch_data import random_scale_flip_crop, to_tensor
from cpal.plugin import seeds_from_cam, structure_scores
from cpal.seg.model import build_segmenter


def _bare_lite0() -> torch.nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return build_lite0_classifier().eval()


def _imagenet_top1(model: torch.nn.Module, image: np.ndarray) -> tuple[int, float]:
    """timm's classifier on TF input scaling, (x - 0.5) / 0.5, at 224 px."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        p = model((x - 0.5) / 0.5).softmax(dim=1)[0]
    return int(p.argmax()), float(p.max())


def test_lite0_weights_ship_offline_and_classify(lite0: torch.nn.Module) -> None:
    assert lite0_weights_path().is_file()
    cls, p = _imagenet_top1(lite0, skdata.chelsea())
    assert 281 <= cls <= 285 and p > 0.5  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    cls, p = _imagenet_top1(lite0, skdata.coffee())
    assert cls in (967, 968) and p > 0.5  # espresso, cup


def test_pretrained_backbone_features_classify_through_the_pipeline_normalisation(lite0: torch.nn.Module) -> None:
    """The Backbone (ImageNet-normalised input, stride 16) carries the same weights: its last stage,
    pooled into the ImageNet head, still finds the cat."""
    net = build_backbone("efficientnet_lite0", pretrained=True, output_stride=16).eval()
    x = F.interpolate(to_tensor(skdata.chelsea())[None], size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        logits = lite0.classifier(net(x)[3].mean(dim=(2, 3)))
    assert 281 <= int(logits.argmax()) <= 285


def test_lite0_loader_refuses_other_architectures(tmp_path: Path) -> None:
    resnet = tmp_path / "resnet18.pth"
    torch.save(build_backbone("resnet18").state_dict(), resnet)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*another architecture"):
        load_lite0_imagenet(_bare_lite0(), resnet)
    # same tensor count, one shape changed: the message names the tensor
    state = torch.load(lite0_weights_path(), weights_only=True)
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[key] = torch.zeros(1, 1, 1, 1)
    bad = tmp_path / "lite0_bad_shape.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"lite0_bad_shape\.pth.*" + re.escape(key)):
        load_lite0_imagenet(_bare_lite0(), bad)


def test_lite0_loader_refuses_truncated_and_pickled_files(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(lite0_weights_path().read_bytes()[:100_000])
    with pytest.raises(ValueError, match=r"truncated\.pth.*weights_only"):
        load_lite0_imagenet(_bare_lite0(), truncated)

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("pickled code ran",))

    pickled = tmp_path / "pickled.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "extra": Payload()}, pickled)
    with pytest.raises(ValueError, match=r"pickled\.pth.*weights_only"):
        load_lite0_imagenet(_bare_lite0(), pickled)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_lite0_imagenet(_bare_lite0(), tmp_path / "missing.pth")


def test_segmenter_and_classifier_build_pretrained_lite0_on_cpu() -> None:
    cfg = {"backbone": "efficientnet_lite0", "head": "v2", "init": "imagenet", "dilated": True}
    seg = build_segmenter(cfg, 7).eval()
    with torch.no_grad():
        assert seg(torch.zeros(1, 3, 48, 48)).shape == (1, 7, 48, 48)
    net = CAMNet(3, "efficientnet_lite0", pretrained=True, method_cfg={"method": "sipe"}, output_stride=8,
                 freeze_stages=2, freeze_bn=True)
    out = net.train()(torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0], [0, 1, 1]]))
    assert out["cam"].shape == (2, 4, 8, 8)
    out["loss"].backward()
    assert all(p.grad is None for p in net.backbone.stages[:2].parameters())
    assert net.classifier.weight.grad.abs().sum() > 0


# -- SIPE-faithful seeds and masks ----------------------------------------------------------------------

def test_structure_scores_follow_feature_regions() -> None:
    """Two feature regions (left, right); the CAM fires on part of the left one only. Structure-aware
    scores give the whole left region to the class, where the plain argmax keeps only the CAM's peak."""
    h = w = 4
    feats = torch.zeros(1, 2, h, w)
    feats[0, 0, :, :2] = 1  # left half: feature e0
    feats[0, 1, :, 2:] = 1  # right half: feature e1
    fg = torch.zeros(1, 1, h, w)
    fg[0, 0, :2, :2] = 1.0  # CAM covers the top of the left region
    cam = torch.cat([1 - fg, fg], dim=1)
    present = torch.tensor([[True, True]])
    plain = seeds_from_cam(cam, present)
    structure = seeds_from_cam(cam, present, features=feats)
    assert int((plain == 1).sum()) == 4
    assert (structure[0, :, :2] == 1).all() and (structure[0, :, 2:] == 0).all()
    # IoU values by hand for a left pixel: corr row = 8 ones on the left; class map = 4 ones inside it
    scores = structure_scores(cam, feats)
    torch.testing.assert_close(scores[0, 1, 3, 0], torch.tensor(4 / (8 + 4 - 4)))


def test_background_scale_favours_foreground() -> None:
    cam = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
    present = torch.tensor([[True, True]])
    assert seeds_from_cam(cam, present).item() == 0
    assert seeds_from_cam(cam, present, bg_scale=0.5).item() == 1


def test_valid_mask_marks_padding_and_keeps_it_out_of_seeds() -> None:
    image = torch.ones(3, 20, 40)
    crop, valid = random_scale_flip_crop(image, np.random.default_rng(0), (1.0, 1.0), 40)
    assert crop.shape == (3, 40, 40) and valid.shape == (40, 40) and valid.dtype == torch.bool
    assert int(valid.sum()) == 20 * 40  # the padded half is invalid
    assert (crop[:, ~valid] == 0).all() and (crop[:, valid] == 1).all()
    torch.manual_seed(0)
    net = CAMNet(2, "resnet18", method_cfg={"method": "sipe", "seed_mode": "structure", "seed_bg_scale": 0.5})
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :, :32] = True
    out = net.train()(torch.randn(1, 3, 64, 64), torch.tensor([[1.0, 0.0]]), mask)
    assert (out["seeds"][0, :, 2:] == -1).all() and (out["seeds"][0, :, :2] >= 0).all()
    assert out["cam"][0, 1:, :, 2:].abs().max() == 0


def test_sipe_protocol_labels_take_the_own_background_channel() -> None:
    from cpal.seeds.store import labels_with_background

    maps = np.array([[[0.9, 0.2], [0.1, 0.6]], [[0.1, 0.7], [0.2, 0.5]]], dtype=np.float16)  # classes 2 and 5
    bg = np.array([[0.5, 0.5], [0.8, 0.4]], dtype=np.float16)
    labels = labels_with_background(maps, bg, np.array([2, 5]))
    assert labels.tolist() == [[2, 5], [0, 2]]
