"""The CAM classifier trained by CAM, SIPE or CPAL (docs/method.md): one network, three methods."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpal.backbone import build_backbone
from cpal.plugin import ContextPrototypes, CPALConfig, PrototypeOutput, cam_with_background, normalize_maps

SIDE_CHANNELS = (128, 128, 256, 256)  # SIPE's side-branch widths for layer1..layer4


class CAMNet(nn.Module):
    """Multi-label classifier with CAM, hierarchical features F and the CPAL support bank.

    ``method_cfg`` is the ``params`` section of params.yaml (see :class:`CPALConfig`). The bank
    exists for every method so checkpoints share their keys; it is filled in training by ``sipe``
    and ``cpal`` (as a record of instance prototypes) and read only by ``cpal``.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet18", pretrained: bool = False,
                 method_cfg: dict[str, Any] | None = None, output_stride: int = 16, freeze_stages: int = 0,
                 freeze_bn: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"CAMNet: num_classes (foreground classes) must be >= 1, got {num_classes}")
        self.cfg = CPALConfig.from_dict(method_cfg)
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, pretrained, output_stride).set_frozen(freeze_stages, freeze_bn)
        self.side = nn.ModuleList(nn.Conv2d(c, s, 1, bias=False)
                                  for c, s in zip(self.backbone.channels, SIDE_CHANNELS, strict=True))
        self.classifier = nn.Conv2d(self.backbone.channels[3], num_classes, 1, bias=False)
        for conv in [*self.side, self.classifier]:
            nn.init.xavier_uniform_(conv.weight)
        self.feature_dim = sum(SIDE_CHANNELS)
        self.cpal = ContextPrototypes(num_classes, self.feature_dim, self.cfg)

    @property
    def bank(self) -> nn.Module:
        """The support bank (kept by the plug-in, saved in this model's state as ``cpal.bank.*``)."""
        return self.cpal.bank

    def distribute(self, group: Any) -> None:
        """Train under DDP with the ranks of ``group`` (None: a single process again).

        The support bank then receives every rank's instance prototypes (gathered in rank order) and
        the alignment shift uses the mean over the global batch, so each rank computes what a single
        process would on the same global batch. Training forwards become collectives: every rank of
        ``group`` must run them in step (DDP does).
        """
        self.cpal.distribute(group)

    # -- building blocks ---------------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` (pretrained part) and ``new`` (side convs, classifier: the 10x-lr layers)."""
        new = [*self.side.parameters(), *self.classifier.parameters()]
        return {"backbone": list(self.backbone.parameters()), "new": new}

    def hierarchical_features(self, stages: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """F (B, sum(SIDE_CHANNELS), h, w): side convs on detached layer1..4, each L2-normalised per
        pixel, resized (bilinear) to the layer3 grid, concatenated."""
        size = stages[2].shape[2:]
        parts = []
        for conv, x in zip(self.side, stages, strict=True):
            y = F.normalize(conv(x.detach()), dim=1, eps=1e-5)
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            parts.append(y)
        return torch.cat(parts, dim=1)

    def _check_inputs(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CAMNet: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if labels.shape != (images.shape[0], self.num_classes):
            raise ValueError(f"CAMNet: labels must be multi-hot (B, N) = ({images.shape[0]}, "
                             f"{self.num_classes}), got {tuple(labels.shape)}")

    @staticmethod
    def _grid_valid(valid: torch.Tensor | None, size: torch.Size) -> torch.Tensor | None:
        if valid is None:
            return None
        v = valid if valid.dim() == 4 else valid.unsqueeze(1)
        return F.interpolate(v.float(), size=size, mode="nearest") > 0.5

    def _prototypes(self, raw_cam: torch.Tensor, stages: tuple[torch.Tensor, ...], labels: torch.Tensor,
                    valid: torch.Tensor | None, use_context: bool, align: bool | None) -> PrototypeOutput:
        """The plug-in on this network's hierarchical features.

        Structure-aware seeds correlate the last stage's features (SIPE does so in training; its
        inference uses the side features instead, a mismatch we do not copy)."""
        feats = self.hierarchical_features(stages)
        sem = stages[3] if self.cfg.seed_mode == "structure" else None
        if sem is not None and sem.shape[2:] != raw_cam.shape[2:]:
            sem = F.interpolate(sem, size=raw_cam.shape[2:], mode="bilinear", align_corners=False)
        return self.cpal(feats, raw_cam, labels, valid=valid, seed_features=sem, context=use_context, align=align)

    # -- training ----------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, labels: torch.Tensor,
                valid: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """One training (or validation) step's outputs and losses.

        images (B, 3, H, W); labels (B, N) multi-hot; valid optional (B, H, W) or (B, 1, H, W), true on
        real (not padded) pixels. Returns logits (B, N); cam M (B, N+1, h, w) normalised, background at
        0, absent classes zeroed; pacam M~ (B, N+1, h, w) normalised, or None for method cam; seeds
        (B, h, w) long (-1 invalid) or None; loss_cls, loss_self (0 for cam), loss = cls + lambda * self.
        In training mode (sipe, cpal) the batch's detached instance prototypes are pushed into the bank
        after its PACAM is computed, so a batch never retrieves itself.
        """
        self._check_inputs(images, labels)
        labels = labels.to(images.dtype)
        stages = self.backbone(images)
        raw_cam = self.classifier(stages[3])
        logits = raw_cam.mean(dim=(2, 3))
        loss_cls = F.multilabel_soft_margin_loss(logits, labels)

        present = labels > 0.5
        grid_valid = self._grid_valid(valid, raw_cam.shape[2:])
        cam = cam_with_background(raw_cam, present, grid_valid)
        out: dict[str, torch.Tensor | None] = {"logits": logits, "cam": cam, "pacam": None, "seeds": None,
                                               "loss_cls": loss_cls, "loss_self": loss_cls.new_zeros(())}
        if self.cfg.method == "cam":
            out["loss"] = loss_cls
            return out

        proto = self._prototypes(raw_cam, stages, labels, grid_valid, use_context=self.cfg.method == "cpal",
                                 align=None)
        out.update(pacam=proto.pacam, seeds=proto.seeds, loss_self=proto.loss_self,
                   loss=loss_cls + self.cfg.lambda_self * proto.loss_self)
        return out

    # -- inference ---------------------------------------------------------------------------------

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Image-level logits (B, N), without labels: for mAP on a validation split."""
        return self.classifier(self.backbone(images)[3]).mean(dim=(2, 3))

    @torch.no_grad()
    def infer(self, images: torch.Tensor, labels: torch.Tensor, *, context: bool | None = None,
              align: bool | None = None, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CAM and PACAM of one scale for a seed generator (multi-scale + flip: sum, then normalise).

        Returns cam_fg (B, N, h, w) = ReLU(raw CAM) with absent classes zeroed, and pacam (B, N+1, h, w)
        = ReLU(cos(F, prototype)) with background at 0 and absent classes zeroed, or None for method
        cam. Both are NOT divided by their max unless ``normalize`` (as IRN and SIPE sum raw maps over
        scales and normalise the sum). Seeds and instance prototypes come from this forward's own
        normalised CAM, exactly as in training. ``context`` (default: method is cpal) reads the bank
        saved in the model state; ``align`` defaults to params.use_alignment. Note: the alignment shift
        uses the batch's prototypes of a class, so with one image per class the aligned anchor equals
        the bank mean and retrieval no longer depends on the image; ``align=False`` avoids that.
        Never writes to the bank. Call ``model.eval()`` first.
        """
        self._check_inputs(images, labels)
        present = labels > 0.5
        stages = self.backbone(images)
        raw_cam = self.classifier(stages[3])
        cam_fg = F.relu(raw_cam) * present.to(raw_cam.dtype)[:, :, None, None]
        if self.cfg.method == "cam":
            return (normalize_maps(cam_fg) if normalize else cam_fg), None
        use_context = self.cfg.method == "cpal" if context is None else context
        raw = self._prototypes(raw_cam, stages, labels.to(raw_cam.dtype), None, use_context, align).raw_pacam
        if normalize:
            return normalize_maps(cam_fg), normalize_maps(raw)
        return cam_fg, raw
