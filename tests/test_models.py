"""Tests of the backbone and the CAM / SIPE / CPAL network (CPU, small inputs, no downloads)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from torchvision.models import WeightsEnum

from cpal.backbone import build_backbone, undilate
from cpal.cls.network import CAMNet

N = 4  # foreground classes
LABELS = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.float32)


def make_net(method: str, **cfg: object) -> CAMNet:
    torch.manual_seed(0)
    cfg = {"method": method, "bank_size": 6, "K": 3, **cfg}
    return CAMNet(N, "resnet18", pretrained=False, method_cfg=cfg)


def images(batch: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- backbone ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "channels"), [("resnet18", (64, 128, 256, 512)),
                                                ("resnet50", (256, 512, 1024, 2048)),
                                                ("resnet101", (256, 512, 1024, 2048))])
def test_backbone_output_stride_16(name: str, channels: tuple[int, ...]) -> None:
    net = build_backbone(name, pretrained=False).eval()
    assert net.channels == channels
    with torch.no_grad():
        outs = net(torch.zeros(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == list(channels)
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (4, 4)]


def test_backbone_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="backbone.*resnet18"):
        build_backbone("vgg16", pretrained=False)


def test_backbone_downloads_weights_only_when_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_get_state_dict(self: WeightsEnum, *args: object, **kwargs: object) -> None:
        calls.append(self.url)
        raise RuntimeError("download attempted")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    build_backbone("resnet18", pretrained=False)
    assert calls == []
    # offline: the error names the file to fetch and where torch looks for it
    with pytest.raises(FileNotFoundError, match=r"resnet18-.*\.pth.*put\s+it at .*checkpoints"):
        build_backbone("resnet18", pretrained=True)
    assert len(calls) == 1 and "resnet18" in calls[0]


@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize(("name", "channels", "stem"), [("resnet18", (64, 128, 256, 512), 16),
                                                        ("efficientnet_lite0", (24, 40, 112, 1280), 32)])
def test_backbone_output_strides(name: str, channels: tuple[int, ...], stem: int, stride: int) -> None:
    net = build_backbone(name, pretrained=False, output_stride=stride).eval()
    with torch.no_grad():
        outs = net.forward_with_stem(torch.zeros(1, 3, 64, 64))
    last = 64 // stride
    assert [o.shape[1] for o in outs[1:]] == list(channels) == list(net.channels)
    assert outs[0].shape[1] == net.stem_channels
    assert [tuple(o.shape[2:]) for o in outs[1:]] == [(16, 16), (8, 8), (last, last), (last, last)]
    assert outs[0].shape[-1] == stem  # ResNet's stem ends at stride 4 (max-pool), Lite0's at 2


@pytest.mark.parametrize("stride", [8, 16])
def test_undilated_lite0_keeps_stride_and_weights_but_not_the_dilation(stride: int) -> None:
    """dilated=False: same output stride and state dict (ImageNet weights load alike), no dilated kernel
    left, a different network (the kernels read other neighbours), and the same as undilating by hand."""
    torch.manual_seed(0)
    dilated = build_backbone("efficientnet_lite0", output_stride=stride).eval()
    plain = build_backbone("efficientnet_lite0", output_stride=stride, dilated=False).eval()
    plain.load_state_dict(dilated.state_dict())
    assert any(m.dilation != (1, 1) for m in dilated.modules() if isinstance(m, nn.Conv2d))
    assert all(m.dilation == (1, 1) for m in plain.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = dilated(x)[-1], plain(x)[-1]
    assert a.shape == b.shape == (1, 1280, 64 // stride, 64 // stride)
    assert not torch.allclose(a, b, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(undilate(copy.deepcopy(dilated))(x)[-1], b)


def test_backbone_refuses_a_dilated_resnet() -> None:
    with pytest.raises(ValueError, match="without dilation"):
        build_backbone("resnet18", dilated=True)
    assert build_backbone("resnet18", dilated=False).output_stride == 16


def test_backbone_refuses_other_output_strides() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet18", output_stride=32)


def test_freezing_stops_gradients_and_fixes_batchnorm() -> None:
    torch.manual_seed(0)
    net = build_backbone("resnet18").set_frozen(freeze_stages=2, freeze_bn=True).train()
    bn = net.stages[3][0].bn1
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))[3].sum().backward()
    torch.testing.assert_close(bn.running_mean, before)  # statistics never updated in train()
    assert not bn.training
    assert all(p.grad is None and not p.requires_grad for p in net.stages[:2].parameters())
    assert all(p.grad is not None for p in net.stages[2:].parameters())
    with pytest.raises(ValueError, match="freeze_stages"):
        net.set_frozen(4)


# -- CAMNet ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["cam", "sipe", "cpal"])
def test_forward_shapes_and_losses_per_method(method: str) -> None:
    net = make_net(method, lambda_self=0.5).train()
    out = net(images(), LABELS)
    h = w = 4
    assert out["logits"].shape == (4, N)
    assert out["cam"].shape == (4, N + 1, h, w)
    assert out["loss_cls"].item() > 0
    # absent classes are zeroed; background is 1 - max over the present ones
    absent = ~LABELS.bool()
    assert out["cam"][:, 1:][absent].abs().max() == 0
    torch.testing.assert_close(out["cam"][:, 0], 1 - out["cam"][:, 1:].amax(1))
    if method == "cam":
        assert out["pacam"] is None and out["seeds"] is None
        assert out["loss_self"].item() == 0
        assert out["loss"].item() == out["loss_cls"].item()
    else:
        assert out["pacam"].shape == (4, N + 1, h, w)
        assert out["pacam"].min() >= 0 and out["pacam"].max() <= 1
        assert out["pacam"][:, 1:][absent].abs().max() == 0
        assert out["seeds"].shape == (4, h, w)
        assert out["loss_self"].item() > 0
        torch.testing.assert_close(out["loss"], out["loss_cls"] + 0.5 * out["loss_self"])


@pytest.mark.parametrize("method", ["cam", "sipe", "cpal"])
def test_gradients_reach_backbone_and_heads(method: str) -> None:
    net = make_net(method).train()
    net(images(seed=1), LABELS)  # fills the bank (sipe, cpal) so that cpal retrieves context below
    net.zero_grad(set_to_none=True)
    out = net(images(seed=2), LABELS)
    out["loss"].backward()
    stem, layer3, layer4 = net.backbone.stages[0][0], net.backbone.stages[2], net.backbone.stages[3]
    for param in (stem[0].weight, layer4[-1].conv2.weight, net.classifier.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    if method != "cam":
        assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in net.side)
        # L_self alone also trains the classifier and backbone (through the CAM)
        net.zero_grad(set_to_none=True)
        net(images(seed=3), LABELS)["loss_self"].backward()
        assert net.classifier.weight.grad.abs().sum() > 0
        assert layer3[0].conv1.weight.grad.abs().sum() > 0


def test_bank_is_filled_after_pacam_and_only_in_training() -> None:
    cpal, sipe = make_net("cpal").train(), make_net("sipe").train()
    sipe.load_state_dict(cpal.state_dict())
    x = images()
    out_cpal, out_sipe = cpal(x, LABELS), sipe(x, LABELS)
    # the bank was empty when this batch's PACAM was computed: no context, same as SIPE
    torch.testing.assert_close(out_cpal["pacam"], out_sipe["pacam"])
    n_valid = int((out_cpal["seeds"].flatten(1).unsqueeze(2) == torch.arange(1, N + 1)).any(1)
                  .logical_and(LABELS.bool()).sum())
    assert int(cpal.bank.count.sum()) == n_valid > 0
    # evaluation forward and infer never write the bank
    before = {k: v.clone() for k, v in cpal.bank.state_dict().items()}
    cpal.eval()
    cpal(x, LABELS)
    cpal.infer(x, LABELS)
    for key, value in cpal.bank.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cpal_reads_the_bank_and_sipe_does_not() -> None:
    cpal, sipe = make_net("cpal").eval(), make_net("sipe").eval()
    sipe.load_state_dict(cpal.state_dict())
    x = images()
    gen = torch.Generator().manual_seed(5)
    for net in (cpal, sipe):
        net.bank.push(torch.arange(N).repeat(3), torch.randn(3 * N, net.feature_dim, generator=gen))
    with torch.no_grad():
        p_cpal, p_sipe = cpal(x, LABELS)["pacam"], sipe(x, LABELS)["pacam"]
        sipe.bank.reset()
        p_sipe_empty = sipe(x, LABELS)["pacam"]
    assert (p_cpal - p_sipe).abs().max() > 1e-3
    torch.testing.assert_close(p_sipe, p_sipe_empty)
    # infer's context switch: cpal without context equals sipe
    torch.testing.assert_close(cpal.infer(x, LABELS, context=False)[1], sipe.infer(x, LABELS)[1])


def test_state_dict_round_trip_keeps_the_bank(tmp_path) -> None:
    net = make_net("cpal").train()
    for seed in range(4):  # more pushes than the bank holds for some classes: pointers wrap
        net(images(seed=seed), LABELS)
    assert int(net.bank.count.max()) == 6
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    fresh = make_net("cpal")
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for name in ("prototypes", "count", "ptr"):
        assert torch.equal(getattr(fresh.bank, name), getattr(net.bank, name)), name
    net.eval()
    fresh.eval()
    x = images(seed=9)
    for a, b in zip(net.infer(x, LABELS), fresh.infer(x, LABELS), strict=True):
        torch.testing.assert_close(a, b)


def test_infer_outputs() -> None:
    net = make_net("cpal").train()
    net(images(seed=1), LABELS)
    net.eval()
    cam_fg, pacam = net.infer(images(seed=2), LABELS)
    assert cam_fg.shape == (4, N, 4, 4) and pacam.shape == (4, N + 1, 4, 4)
    absent = ~LABELS.bool()
    assert cam_fg[absent].abs().max() == 0 and pacam[:, 1:][absent].abs().max() == 0
    assert cam_fg.min() >= 0 and pacam.min() >= 0 and pacam.max() <= 1 + 1e-5
    cam_n, pacam_n = net.infer(images(seed=2), LABELS, normalize=True)
    peaks = torch.cat([cam_n.amax((2, 3)), pacam_n.amax((2, 3))], dim=1)
    assert ((peaks - 1).abs() < 1e-3).logical_or(peaks == 0).all()  # each map peaks at 1 (or is empty)
    assert ((pacam_n.amax((2, 3)) - 1).abs() < 1e-3).any()
    assert not cam_fg.requires_grad
    cam_only = make_net("cam").eval()
    c, p = cam_only.infer(images(), LABELS)
    assert c.shape == (4, N, 4, 4) and p is None


def test_valid_mask_excludes_padding() -> None:
    net = make_net("sipe").eval()
    valid = torch.ones(4, 64, 64, dtype=torch.bool)
    valid[:, :, 32:] = False  # right half is padding
    out = net(images(), LABELS, valid=valid)
    assert out["cam"][..., 2:].abs().max() == 0 and out["pacam"][..., 2:].abs().max() == 0
    assert (out["seeds"][..., 2:] == -1).all() and (out["seeds"][..., :2] >= 0).all()


def test_bad_inputs_are_named() -> None:
    net = make_net("cam")
    with pytest.raises(ValueError, match="labels"):
        net(images(), LABELS[:, :2])
    with pytest.raises(ValueError, match="params.metric"):
        make_net("cpal", metric="hamming")


def test_cpal_step_is_fast_on_cpu() -> None:
    """The prototype branch must not dominate a training step: compared with the plain CAM step on the same
    input (best of 3 each), so that a loaded machine slows both and the test stays meaningful."""
    x = images()

    def best_step(method: str) -> float:
        net = make_net(method).train()
        net(x, LABELS)["loss"].backward()  # warm-up, fills the bank
        times = []
        for _ in range(3):
            start = time.perf_counter()
            net(x, LABELS)["loss"].backward()
            times.append(time.perf_counter() - start)
        return min(times)

    cam, cpal = best_step("cam"), best_step("cpal")
    assert cpal < 2.0 * cam + 0.05, f"CPAL step {cpal:.3f} s vs CAM step {cam:.3f} s"


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial statistics and affine terms, so folding them is checked for real."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("kind", ["efficientnet_lite0", "resnet18", "seg_efficientnet_lite0", "seg_resnet50"])
def test_batchnorm_folded_into_convolutions_gives_the_same_outputs(kind: str) -> None:
    """Inference stages run with every conv + BatchNorm pair folded (fuse_batchnorm): same numbers,
    no BatchNorm left, and a model still training is refused."""
    import copy

    from cpal.backbone import fuse_batchnorm
    from cpal.seg.model import build_segmenter

    if kind.startswith("seg_"):
        head = "v3" if kind == "seg_resnet50" else "v2"
        cfg = {"backbone": kind[4:], "head": head, "init": "none", "dilated": kind[4:] != "resnet18"}
        model = build_segmenter(cfg, 5)
    else:
        model = build_backbone(kind, pretrained=False, output_stride=16)
    _randomise_batchnorm(model)
    with pytest.raises(ValueError, match="eval mode"):
        fuse_batchnorm(model.train())
    model.eval()
    fused = fuse_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = images(2, 64)
    with torch.no_grad():
        want = model.forward_with_stem(x) if hasattr(model, "forward_with_stem") else [model(x)]
        got = fused.forward_with_stem(x) if hasattr(fused, "forward_with_stem") else [fused(x)]
    for a, b in zip(want, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())
