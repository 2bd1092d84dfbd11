"""ResNet backbones at output stride 16, exposing the four stages (DESIGN section 5.1)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

BACKBONES = ("resnet18", "resnet50", "resnet101")


class Backbone(nn.Module):
    """The stem and layer1..layer4 of a torchvision ResNet; layer4 runs at stride 1 (output stride 16).

    ``forward`` returns the four stage outputs, strides 4, 8, 16, 16; ``channels`` their widths.
    """

    output_stride = 16

    def __init__(self, net: models.ResNet, name: str) -> None:
        super().__init__()
        self.name = name
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = type(net.layer1[0]).expansion
        self.channels: tuple[int, int, int, int] = (64 * expansion, 128 * expansion, 256 * expansion,
                                                    512 * expansion)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x1 = self.layer1(self.stem(x))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return x1, x2, x3, x4


def build_backbone(name: str, pretrained: bool = False) -> Backbone:
    """A ResNet at output stride 16; ImageNet weights (downloaded by torchvision) only if ``pretrained``.

    ResNet-50/101 dilate layer4 (as IRN and SIPE do). torchvision's BasicBlock refuses dilation, so
    ResNet-18 instead gets stride 1 in layer4's first block (conv1 and the downsample projection).
    """
    if name == "resnet18":
        weights = models.ResNet18_Weights.IMAGENET1K_V1 if pretrained else None
        net = models.resnet18(weights=weights)
        block = net.layer4[0]
        block.conv1.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    elif name == "resnet50":
        weights = models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
        net = models.resnet50(weights=weights, replace_stride_with_dilation=[False, False, True])
    elif name == "resnet101":
        weights = models.ResNet101_Weights.IMAGENET1K_V1 if pretrained else None
        net = models.resnet101(weights=weights, replace_stride_with_dilation=[False, False, True])
    else:
        raise ValueError(f"backbone: {name!r} is not one of {' | '.join(BACKBONES)}")
    return Backbone(net, name)
