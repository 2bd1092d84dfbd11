"""IRN's class-boundary branch on a frozen ResNet (Ahn et al., CVPR 2019, section 3.1).

Five 1x1 side branches (32 channels, GroupNorm, ReLU) read the stem (ResNet: after max-pooling, stride 4;
EfficientNet: stride 2) and the four stages of the backbone; all are resized bilinearly to the stride-4 grid; one 1x1
convolution fuses the 160 channels into a boundary logit. The backbone stays frozen (no gradients,
BatchNorm in eval mode), as in the paper. The stride-4 grid of an H x W input is ceil(H/4) x ceil(W/4).

IRN's displacement-field (instance) branch is not built: semantic pseudo-labels need only boundaries.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpal.backbone import Backbone, build_backbone
from cpal.core.training import CheckpointError, load_checkpoint

HEAD_CHANNELS = 32
HEAD_GROUPS = 4
CHECKPOINT_FORMAT = 2  # 2: backbone stages as `stages.*`, output_stride in meta
STRIDE = 4


def grid_size(height: int, width: int) -> tuple[int, int]:
    """The boundary grid of an image: the first stage's stride-4 output, ceil(x / 4) for every backbone."""
    return math.ceil(height / STRIDE), math.ceil(width / STRIDE)


class BoundaryNet(nn.Module):
    """Frozen backbone + IRN boundary head; ``forward`` gives boundary logits (B, 1, ceil(H/4), ceil(W/4))."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        widths = (backbone.stem_channels, *backbone.channels)
        self.side = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, HEAD_CHANNELS, 1, bias=False), nn.GroupNorm(HEAD_GROUPS, HEAD_CHANNELS))
            for c in widths)
        self.fuse = nn.Conv2d(HEAD_CHANNELS * len(widths), 1, 1, bias=True)

    def train(self, mode: bool = True) -> BoundaryNet:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its running statistics
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.side.parameters(), *self.fuse.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"BoundaryNet: images must be (B, 3, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            feats = self.backbone.forward_with_stem(images)
        size = feats[1].shape[2:]
        parts = []
        for branch, x in zip(self.side, feats, strict=True):
            y = branch(x)
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            parts.append(F.relu(y))
        return self.fuse(torch.cat(parts, dim=1))

    @torch.no_grad()
    def boundary(self, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
        """Boundary probabilities (B, h, w): sigmoid of the logit, averaged with the flipped image's (IRN)."""
        logits = self(images)
        if flip:
            logits = (logits + self(images.flip(-1)).flip(-1)) / 2
        return torch.sigmoid(logits[:, 0])


def classifier_backbone(path: str | Path) -> tuple[Backbone, str]:
    """The backbone (weights and name) of a train_cls checkpoint ({"meta", "model"})."""
    ckpt = load_checkpoint(path)
    meta, state = ckpt.get("meta", {}), ckpt.get("model")
    name = meta.get("backbone")
    if not isinstance(state, dict) or not isinstance(name, str):
        raise CheckpointError(f"{path}: not a train_cls checkpoint (needs meta.backbone and model)")
    backbone = build_backbone(name, pretrained=False, output_stride=meta.get("output_stride", 16))
    prefix = "backbone."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(sub)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: backbone weights do not fit a {name} ({exc})") from exc
    return backbone, name


def irn_meta(backbone: Backbone, backbone_from: str, radius: int) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "kind": "irn_boundary", "backbone": backbone.name,
            "output_stride": backbone.output_stride, "backbone_from": backbone_from, "train_radius": radius,
            "stride": STRIDE}


def load_boundary_net(path: str | Path, device: torch.device, backbone: str | None = None,
                      output_stride: int | None = None) -> BoundaryNet:
    """An IRN checkpoint written by train_irn ({"meta", "model"}), in eval mode on `device`.

    With `backbone` / `output_stride` (params train_cls), a checkpoint trained on another network is
    refused: its boundaries would not belong to the classifier whose seeds they refine.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    meta = ckpt.get("meta", {})
    if meta.get("kind") != "irn_boundary" or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an IRN boundary checkpoint of format {CHECKPOINT_FORMAT} "
                              f"(meta {meta!r}); rerun train_irn")
    for key, want in (("backbone", backbone), ("output_stride", output_stride)):
        if want is not None and meta.get(key) != want:
            raise CheckpointError(f"{path}: IRN checkpoint trained on {meta.get('backbone')} at output stride "
                                  f"{meta.get('output_stride')}, but train_cls.{key} is {want!r}; rerun train_irn")
    model = BoundaryNet(build_backbone(meta["backbone"], pretrained=False, output_stride=meta["output_stride"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
