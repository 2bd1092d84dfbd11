"""AMN's network on the project's backbone factory, with the CPAL plug-in as an optional part.

backbone (stem frozen as AMN freezes ResNet-50's conv1 and bn1; BatchNorm statistics fixed with
``freeze_bn``, AMN's FixedBatchNorm) -> last stage times Linear(labels) channel by channel (label
conditioning: the image-level labels steer which classes the maps may show) -> dropout -> DeepLab-v2 ASPP,
four dilated 3x3 convs summed into N + 1 logits on the stride-16 (or 8) grid.

The ASPP dilations are scaled to the training grid (:func:`aspp_rates`): AMN's 6/12/18/24 were made for a
512 px crop at stride 16, a 32 x 32 grid; on the embedded default's 8 x 8 grid a dilation of 24 only ever
reads zero padding, so every branch would reduce to its centre tap.

With the plug-in's loss (``cpal_cfg`` given), a 1x1 projection of the last stage's features (detached,
before the label conditioning, L2-normalised per pixel) feeds :class:`cpal.plugin.ContextPrototypes`, with
AMN's foreground softmax as the class maps: L = L_pcl + lambda * L_self, the support bank a buffer of this
model (so saved in its checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpal.amn.loss import pcl_loss, resize_labels
from cpal.backbone import V2_RATES, ASPPv2, build_backbone
from cpal.plugin import ContextPrototypes, CPALConfig, PrototypeOutput

REFERENCE_GRID = 32  # AMN's grid: a 512 px crop at output stride 16
FEATURE_DIM = 256  # width of the projected features the plug-in pools prototypes from (CAMNet's stage-4 side)


def aspp_rates(crop_size: int, output_stride: int, rates: Sequence[int] = V2_RATES) -> tuple[int, ...]:
    """AMN's dilations times (training grid side / 32), rounded half up, at least 1.

    VOC's 512 px crop at stride 16 keeps 6/12/18/24; the embedded 128 px crop (8 x 8 grid) gives 2/3/5/6.
    """
    scale = crop_size / output_stride / REFERENCE_GRID
    return tuple(max(1, int(r * scale + 0.5)) for r in rates)


class AMNNet(nn.Module):
    """AMN for ``num_classes`` foreground classes; ``cpal_cfg`` (the params section of CPAL) adds L_self.

    ``keep_dropout_at_inference`` reproduces a quirk of AMN's code: its ``train()`` override never calls the
    parent, so ``eval()`` leaves the dropout active and its maps are drawn with dropout.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", pretrained: bool = False,
                 output_stride: int = 16, freeze_bn: bool = True, dropout: float = 0.1,
                 rates: Sequence[int] = V2_RATES, keep_dropout_at_inference: bool = False, eps: float = 0.4,
                 lambda_self: float = 0.0, cpal_cfg: CPALConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"AMNNet: num_classes (foreground classes) must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.rates = tuple(int(r) for r in rates)
        self.keep_dropout_at_inference = keep_dropout_at_inference
        self.eps, self.lambda_self = eps, lambda_self
        self.backbone = build_backbone(backbone, pretrained, output_stride).set_frozen(0, freeze_bn)
        for p in self.backbone.stages[0][0].parameters():  # the stem (AMN: conv1, bn1)
            p.requires_grad_(False)
        channels = self.backbone.channels[3]
        self.label_enc = nn.Linear(num_classes, channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = ASPPv2(channels, num_classes + 1, self.rates)
        self.project: nn.Conv2d | None = None
        self.cpal: ContextPrototypes | None = None
        if cpal_cfg is not None:
            self.project = nn.Conv2d(channels, FEATURE_DIM, 1, bias=False)
            nn.init.xavier_uniform_(self.project.weight)
            self.cpal = ContextPrototypes(num_classes, FEATURE_DIM, cpal_cfg)

    def train(self, mode: bool = True) -> AMNNet:
        super().train(mode)
        if self.keep_dropout_at_inference:
            self.dropout.train(True)
        return self

    def _check_inputs(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"AMNNet: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0], self.num_classes):
            raise ValueError(f"AMNNet: labels must be multi-hot (B, N) = ({images.shape[0]}, {self.num_classes}), "
                             f"got {tuple(labels.shape)}")

    def features_and_logits(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last stage's features (B, C, h, w), before conditioning, and the logits (B, N+1, h, w)."""
        self._check_inputs(images, labels)
        features = self.backbone(images)[3]
        scale = self.label_enc(labels.to(features.dtype))[:, :, None, None]
        return features, self.classifier(self.dropout(features * scale))

    def prototypes(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> PrototypeOutput:
        """The plug-in on AMN: projected, normalised features and the foreground softmax as class maps."""
        if self.cpal is None or self.project is None:
            raise RuntimeError("AMNNet was built without the CPAL plug-in (amn.plugin none | classifier)")
        feats = F.normalize(self.project(features.detach()), dim=1, eps=1e-5)
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        seed_features = features if self.cpal.cfg.seed_mode == "structure" else None
        # context=True: amn.plugin loss is CPAL's L_self whichever params.method made the IR labels
        return self.cpal(feats, probs, labels.to(probs.dtype), seed_features=seed_features, context=True)

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                ir_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``logits`` (B, N+1, h, w); with ``ir_labels`` (B, H, W) also ``loss_pcl``, ``loss_self`` (0 without
        the plug-in) and ``loss`` = loss_pcl + lambda_self * loss_self. In training mode the plug-in pushes the
        batch's instance prototypes into its bank."""
        features, logits = self.features_and_logits(images, labels)
        out = {"logits": logits}
        if ir_labels is None:
            return out
        loss_pcl = pcl_loss(logits, resize_labels(ir_labels, logits.shape[2:]), self.eps)
        loss_self = loss_pcl.new_zeros(())
        if self.cpal is not None:
            loss_self = self.prototypes(features, logits, labels).loss_self
        out.update(loss_pcl=loss_pcl, loss_self=loss_self, loss=loss_pcl + self.lambda_self * loss_self)
        return out
