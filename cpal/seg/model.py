"""DeepLab segmenters: torchvision DeepLabV3 (ResNet-50/101) with a v3 or v2 head, or a small ResNet-18 /
EfficientNet-Lite0 from the project's backbone factory (the CPU default).

The initialisation is a recorded choice (`init: none | imagenet`): deeplab-pytorch's default starts
from weights trained on COCO segmentation, which is not weak supervision, so every result says what it
started from. Weights are never downloaded unless `init: imagenet` asks for them; every ResNet's come
through cpal.backbone's checked loader (a file placed in torch's cache is used offline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from cpal.backbone import IMAGENET_WEIGHTS, ASPPv2, build_backbone, load_imagenet_weights

SEG_BACKBONES = ("resnet18", "efficientnet_lite0", "resnet50", "resnet101")
SEG_HEADS = ("v3", "v2")
SEG_INITS = ("none", "imagenet")


class Segmenter(nn.Module):
    """backbone -> head -> bilinear upsampling: logits (N, C, H, W) at the input resolution.

    Parameters named `backbone.*` belong to the (possibly pretrained) backbone, everything else to the
    new head (which trains at `head_lr_mult` times the learning rate).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, output_stride: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        if isinstance(feats, dict):  # torchvision's IntermediateLayerGetter
            feats = feats["out"]
        elif isinstance(feats, tuple):  # cpal.backbone.Backbone: the four stages
            feats = feats[-1]
        logits = self.head(feats)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _check(cfg: dict[str, Any], key: str, allowed: Sequence[str]) -> str:
    if key not in cfg:
        raise KeyError(f"seg.{key}: missing required key (one of {' | '.join(allowed)})")
    value = cfg[key]
    if value not in allowed:
        raise ValueError(f"seg.{key} = {value!r} is not one of {' | '.join(allowed)}")
    return value


def _dilation(cfg: dict[str, Any], backbone: str) -> bool:
    """seg.dilated, refused where the backbone has only one form (torchvision's DeepLabV3 ResNets are
    dilated, the factory's ResNet-18 is not)."""
    if "dilated" not in cfg:
        raise KeyError("seg.dilated: missing required key (true | false)")
    dilated = cfg["dilated"]
    if not isinstance(dilated, bool):
        raise ValueError(f"seg.dilated = {dilated!r} must be true or false")
    fixed = {"resnet18": False, "resnet50": True, "resnet101": True}
    if backbone in fixed and dilated != fixed[backbone]:
        raise ValueError(f"seg.dilated = {str(dilated).lower()} is not available for seg.backbone {backbone} "
                         f"(built {'with' if fixed[backbone] else 'without'} dilation); set it to "
                         f"{str(fixed[backbone]).lower()}")
    return dilated


def build_segmenter(cfg: dict[str, Any], num_classes: int) -> Segmenter:
    """The DeepLab of params `seg` (backbone, head, init) for `num_classes` classes (background included).

    `dilated` (required): EfficientNet-Lite0 with or without dilated kernels in its last stage.
    ResNet-50/101: torchvision DeepLabV3 at output stride 8 (its head uses rates 12/24/36; v2 uses
    6/12/18/24 as deeplab-pytorch does). ResNet-18 and EfficientNet-Lite0: output stride 16, head rates
    6/12/18 (v3) or 6/12/18/24 (v2): small enough to train on a CPU in a minute.
    """
    backbone_name = _check(cfg, "backbone", SEG_BACKBONES)
    head_name = _check(cfg, "head", SEG_HEADS)
    init = _check(cfg, "init", SEG_INITS)
    if num_classes < 2:
        raise ValueError(f"a segmenter needs at least 2 classes (background + 1), got {num_classes}")
    imagenet = init == "imagenet"
    dilated = _dilation(cfg, backbone_name)
    if backbone_name in ("resnet18", "efficientnet_lite0"):
        backbone = build_backbone(backbone_name, pretrained=imagenet, dilated=dilated)
        channels, stride, v3_rates = backbone.channels[-1], backbone.output_stride, (6, 12, 18)
    else:
        builder = segmentation.deeplabv3_resnet50 if backbone_name == "resnet50" else segmentation.deeplabv3_resnet101
        # built without weights, then loaded through the factory's checked loader (the same file, the same
        # offline error): torchvision's own weights_backbone would fail offline with a bare URLError
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        if imagenet:
            load_imagenet_weights(net.backbone, IMAGENET_WEIGHTS[backbone_name], unused=("fc.",))
        backbone, channels, stride, v3_rates = net.backbone, 2048, 8, (12, 24, 36)
    head = DeepLabHead(channels, num_classes, v3_rates) if head_name == "v3" else ASPPv2(channels, num_classes)
    return Segmenter(backbone, head, stride)


def param_groups(model: Segmenter, lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """Backbone at lr, head at lr * head_lr_mult (DeepLab practice: 10x on the new layers)."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else head).append(p)
    return [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]
