"""The CAM classifier trained by CAM, SIPE or CPAL (DESIGN section 5): one network, three methods."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpal.backbone import build_backbone
from cpal.plugin import (
    CPALConfig,
    SupportBank,
    batch_class_means,
    cam_with_background,
    instance_prototypes,
    mix_prototypes,
    normalize_maps,
    prototype_cam,
    seeds_from_cam,
    self_loss,
)

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
        self.bank = SupportBank(num_classes, self.cfg.bank_size, self.feature_dim)

    def distribute(self, group: Any) -> None:
        """Train under DDP with the ranks of ``group`` (None: a single process again).

        The support bank then receives every rank's instance prototypes (gathered in rank order) and
        the alignment shift uses the mean over the global batch, so each rank computes what a single
        process would on the same global batch. Training forwards become collectives: every rank of
        ``group`` must run them in step (DDP does).
        """
        self.bank.group = group

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

    def _prototype_maps(self, cam: torch.Tensor, stages: tuple[torch.Tensor, ...], present_all: torch.Tensor,
                        valid: torch.Tensor | None, use_context: bool, align: bool | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Raw PACAM (B, N+1, h, w), seeds, instance prototypes, their validity (B, N+1) and, in DDP
        training, the global batch's per-class prototype means (else None).

        Structure-aware seeds correlate the last stage's features (SIPE does so in training; its
        inference uses the side features instead, a mismatch we do not copy)."""
        feats = self.hierarchical_features(stages)
        sem = stages[3] if self.cfg.seed_mode == "structure" else None
        if sem is not None and sem.shape[2:] != cam.shape[2:]:
            sem = F.interpolate(sem, size=cam.shape[2:], mode="bilinear", align_corners=False)
        seeds = seeds_from_cam(cam, present_all, valid, features=sem, bg_scale=self.cfg.seed_bg_scale)
        inst, counts = instance_prototypes(feats, seeds, cam.shape[1])
        ok = present_all & (counts > 0)
        means = None
        align = self.cfg.use_alignment if align is None else align
        if use_context and align and self.cfg.context_weight != 0 and self.training and self.bank.group is not None:
            means = batch_class_means(inst, ok, self.bank.group)
        protos = mix_prototypes(inst, ok, self.bank, self.cfg, align, class_means=means) if use_context else inst
        raw = prototype_cam(feats, protos, ok, center=self.cfg.center_features, valid=valid)
        return raw, seeds, inst, ok, means

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

        present_all = F.pad(present, (1, 0), value=True)
        raw, seeds, inst, ok, means = self._prototype_maps(cam, stages, present_all, grid_valid,
                                                           use_context=self.cfg.method == "cpal", align=None)
        pacam = normalize_maps(raw)
        loss_self = self_loss(cam, pacam, present_all, grid_valid)
        if means is not None:  # keeps the all-reduce in every rank's graph, so every rank runs its backward
            loss_self = loss_self + 0.0 * means.sum()
        if self.training:
            rows, cols = ok[:, 1:].nonzero(as_tuple=True)  # batch order, then class order
            self.bank.push(cols, inst[rows, cols + 1].detach())
        out.update(pacam=pacam, seeds=seeds, loss_self=loss_self,
                   loss=loss_cls + self.cfg.lambda_self * loss_self)
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
        cam = cam_with_background(raw_cam, present)
        present_all = F.pad(present, (1, 0), value=True)
        use_context = self.cfg.method == "cpal" if context is None else context
        raw = self._prototype_maps(cam, stages, present_all, None, use_context=use_context, align=align)[0]
        if normalize:
            return normalize_maps(cam_fg), normalize_maps(raw)
        return cam_fg, raw
