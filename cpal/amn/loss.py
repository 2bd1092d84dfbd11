"""AMN's only loss, L_pcl: per-pixel cross-entropy against label-smoothed IR labels, balanced between
background and foreground pixels (AMN, step/train_amn.py).

The smoothing keeps AMN's maps from saturating at 0 or 1: the IR label's class gets 1 - eps, every other
channel (absent classes included) eps / (C - 1), C = N + 1 channels. The pixel means over background
(label 0) and over foreground (labels 1..N) are averaged, so the usually larger background does not
dominate; 255 (unsure) pixels count in neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpal.data.voc import IGNORE_INDEX


def resize_labels(labels: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Label maps (B, H, W) to the logit grid by nearest neighbour at pixel centres (PIL's NEAREST, which AMN
    uses; torch's plain ``nearest`` samples corners and shifts the map)."""
    if tuple(labels.shape[1:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()


def smoothed_targets(labels: torch.Tensor, num_channels: int, eps: float) -> torch.Tensor:
    """(B, C, h, w) targets: 1 - eps at each pixel's label, eps / (C - 1) elsewhere; 255 pixels get the
    background's row (they are excluded from the loss anyway)."""
    if num_channels < 2:
        raise ValueError(f"L_pcl needs at least 2 channels (background + 1 class), got {num_channels}")
    index = labels.masked_fill(labels == IGNORE_INDEX, 0)
    if index.numel() and int(index.max()) >= num_channels:
        raise ValueError(f"label {int(index.max())} outside the {num_channels} logit channels")
    target = torch.full((labels.shape[0], num_channels, *labels.shape[1:]), eps / (num_channels - 1),
                        dtype=torch.float32, device=labels.device)
    return target.scatter_(1, index[:, None], 1.0 - eps)


def pcl_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """L_pcl of logits (B, N+1, h, w) against IR labels (B, h, w) on the same grid (0 background, 1..N,
    255 ignored): (mean over background pixels + mean over foreground pixels) / 2 of the cross-entropy with
    :func:`smoothed_targets`. A batch with no pixel of one kind averages the other alone (AMN's code divides
    by zero there); with no labelled pixel at all the loss is 0, still attached to the graph.
    """
    if logits.shape[2:] != labels.shape[1:] or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share batch and grid")
    log_p = F.log_softmax(logits.float(), dim=1)
    ce = -(log_p * smoothed_targets(labels, logits.shape[1], eps)).sum(dim=1)
    background = labels == 0
    foreground = (labels != 0) & (labels != IGNORE_INDEX)
    means = [ce[mask].mean() for mask in (background, foreground) if bool(mask.any())]
    if not means:
        return logits.sum() * 0.0
    return torch.stack(means).mean()
