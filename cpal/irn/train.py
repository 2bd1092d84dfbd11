"""Training of IRN's boundary branch from inter-pixel relation labels (stage `train_irn`).

The backbone is frozen (IRN): from the trained classifier (`irn.backbone_from: classifier`, the
embedded default, where no ImageNet weights exist) or torchvision's ImageNet weights (`imagenet`, of
the backbone named by train_cls.backbone). Each batch: random flip and crop (padding: image 0, label
255), the IR label sampled on the stride-4 grid (cell i takes pixel 4i + 2), pairs within
`irn.radius` labelled background-positive, foreground-positive or negative, and IRN's affinity loss

    L = ( (L_bg_pos + L_fg_pos) / 2 + L_neg ) / 2,   L_pos = mean -log(a), L_neg = mean -log(1 - a),

each mean over its own pairs (so the three kinds weigh the same however many pairs each has), with
a = 1 - max boundary on the pair's path. SGD with momentum and weight decay passed by name, poly
schedule; with `irn.amp` on CUDA the forward runs under autocast with a grad scaler, the loss in float32.
Resumable: a checkpoint after every epoch; a rerun with the same settings continues.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from cpal.backbone import build_backbone, fuse_batchnorm
from cpal.core.distributed import DistContext, GlobalBatchSampler
from cpal.core.io import inputs_stamp, load_label_png
from cpal.core.loop import ResumableTraining
from cpal.core.training import EpochMeans, channels_last, config_fingerprint, resolve_device
from cpal.data.torch_data import random_crop_pad, to_tensor
from cpal.data.voc import VOCDataset
from cpal.irn.model import STRIDE, BoundaryNet, classifier_backbone, irn_meta
from cpal.irn.path_index import PathIndex, boundary_to_affinity, pair_labels

IGNORE = 255
EPS = 1e-5
TRAIN_KEYS = ("backbone_from", "radius", "crop", "batch_size", "epochs", "lr", "momentum", "weight_decay",
              "poly_power", "amp")


class AffinityData(Dataset):
    """(image (3, crop, crop), label grid (crop/4, crop/4) long, index), seeded per (seed, epoch, index)."""

    def __init__(self, dataset: VOCDataset, label_dir: Path, crop: int, seed: int) -> None:
        if crop % STRIDE:
            raise ValueError(f"irn.crop = {crop} must be a multiple of {STRIDE} (the boundary grid stride)")
        missing = [i for i in dataset.ids if not (label_dir / f"{i}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{label_dir}: no IR label for {len(missing)} of {len(dataset)} images, "
                                    f"e.g. {missing[:5]}; rerun ir_labels")
        self.dataset, self.label_dir, self.crop, self.seed, self.epoch = dataset, label_dir, crop, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_id = self.dataset.ids[index]
        image = self.dataset.image(image_id)
        path = self.label_dir / f"{image_id}.png"
        label = load_label_png(path)
        if label.shape != image.shape[:2]:
            raise ValueError(f"{path}: IR label {label.shape} differs from its image {image.shape[:2]}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        x = to_tensor(image)
        y = torch.from_numpy(label.astype(np.int64))
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        out_x, out_y = random_crop_pad(x, rng, self.crop, y, IGNORE)
        return out_x, out_y[STRIDE // 2::STRIDE, STRIDE // 2::STRIDE].contiguous(), index


def affinity_loss(model: BoundaryNet, images: torch.Tensor, grid_labels: torch.Tensor,
                  index: PathIndex, amp: bool = False) -> dict[str, torch.Tensor]:
    """IRN's balanced affinity loss and its three terms for one batch (labels on the boundary grid).

    ``amp``: the network's forward under autocast (float16; CUDA only, ignored on CPU); the boundary map,
    affinities and logs are float32 whatever the forward ran in: in float16, 1 + EPS rounds to 1, so a
    saturated boundary (affinity exactly 1) would make -log(1 + EPS - a) infinite.
    """
    with torch.autocast(device_type=images.device.type, enabled=amp and images.device.type == "cuda"):
        logits = model(images)
    if logits.shape[2:] != grid_labels.shape[1:]:
        raise ValueError(f"label grid {tuple(grid_labels.shape[1:])} differs from the boundary grid "
                         f"{tuple(logits.shape[2:])}")
    aff = boundary_to_affinity(torch.sigmoid(logits[:, 0].float()), index)
    masks = pair_labels(grid_labels, index, IGNORE)
    pos = -torch.log(aff + EPS)
    neg = -torch.log(1.0 + EPS - aff)
    terms = {
        "bg_pos": (masks["bg_pos"] * pos).sum() / (masks["bg_pos"].sum() + EPS),
        "fg_pos": (masks["fg_pos"] * pos).sum() / (masks["fg_pos"].sum() + EPS),
        "neg": (masks["neg"] * neg).sum() / (masks["neg"].sum() + EPS),
    }
    terms["loss"] = ((terms["bg_pos"] + terms["fg_pos"]) / 2 + terms["neg"]) / 2
    return terms


def build_boundary_net(params: dict[str, Any], classifier: Path | None) -> tuple[BoundaryNet, str]:
    """The network to train and its backbone's name, per irn.backbone_from."""
    source = params["irn"]["backbone_from"]
    if source == "classifier":
        if classifier is None:
            raise ValueError("irn.backbone_from = 'classifier' needs the train_cls checkpoint (--classifier)")
        backbone, name = classifier_backbone(classifier)
    elif source == "imagenet":
        name = params["train_cls"]["backbone"]
        backbone = build_backbone(name, pretrained=True, output_stride=params["train_cls"]["output_stride"])
    else:
        raise ValueError(f"irn.backbone_from = {source!r} is not one of classifier | imagenet")
    return BoundaryNet(backbone), name


def runnable(model: BoundaryNet) -> tuple[BoundaryNet, nn.Module]:
    """The net as training runs it, and its backbone as it came (what the checkpoint saves).

    The backbone is frozen, so a copy with its BatchNorm folded does its forward (cpal.backbone),
    everything in channels_last.
    """
    backbone = model.backbone
    model.backbone = fuse_batchnorm(copy.deepcopy(backbone).eval())
    return channels_last(model), backbone


def train_irn(params: dict[str, Any], data_dir: Path, label_dir: Path, classifier: Path | None, out_dir: Path,
              log: logging.Logger, progress: bool = True, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train the boundary branch; write model.pt ({"meta", "model"}), metrics.json and timing.json.

    One process (no DDP) and no dvclive record; otherwise resumable like train_cls (ResumableTraining).
    """
    cfg, run = params["irn"], params["run"]
    loop = ResumableTraining("train_irn", DistContext(device=resolve_device(run["device"])), out_dir, log,
                             run["seed"], dvclive=False)
    device = loop.device

    dataset = VOCDataset(data_dir, params["seeds"]["split"])
    data = AffinityData(dataset, label_dir, cfg["crop"], run["seed"])
    batch = cfg["batch_size"]
    steps_per_epoch = len(data) // batch
    if steps_per_epoch == 0:
        raise ValueError(f"irn.batch_size = {batch} exceeds the {len(data)} training images")
    total_steps = steps_per_epoch * cfg["epochs"]
    index = PathIndex.of(cfg["radius"])

    model, _ = build_boundary_net(params, classifier)
    model, trained_backbone = runnable(model.to(device))
    loop.optimise(model, [{"params": model.head_parameters()}], {**cfg, "optimizer": "sgd"}, total_steps)
    sources = [label_dir / f"{i}.png" for i in dataset.ids] + ([classifier] if classifier else [])
    fingerprint = config_fingerprint({k: cfg[k] for k in TRAIN_KEYS}, run["seed"], dataset.ids,
                                     inputs_stamp(sources), params["train_cls"]["backbone"],
                                     params["train_cls"]["output_stride"])
    meta = irn_meta(model.backbone, cfg["backbone_from"], cfg["radius"])
    state = loop.resume(fingerprint)
    start_epoch, history = (state["epoch"], list(state["history"])) if state else (0, [])

    model.train()
    for epoch in range(start_epoch, cfg["epochs"]):
        data.set_epoch(epoch)
        # the batches DataLoader(shuffle=True, drop_last=True, generator seeded seed * 1000 + epoch) drew
        batches = GlobalBatchSampler(len(data), batch, run["seed"] * 1000 + epoch, True, key="irn.batch_size")
        loader = loop.loader(data, batches, run["num_workers"], epoch)
        sums, t0 = EpochMeans(("loss", "bg_pos", "fg_pos", "neg")), time.perf_counter()
        bar = tqdm(loader, desc=f"train_irn epoch {epoch + 1}/{cfg['epochs']}", disable=not progress, leave=False)
        for images, labels, _ in bar:
            images, labels = channels_last(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            terms = affinity_loss(model, images, labels, index, amp=loop.use_amp)
            loop.step(terms["loss"])
            n = images.shape[0]
            sums.add(terms, n)
            bar.set_postfix(loss=f"{sums.loss:.4f}")
        record = loop.epoch_record(epoch, sums, t0)
        if loop.end_epoch(epoch, cfg["epochs"], record, history, meta, stop_after_epoch):
            return {"stopped_after_epoch": epoch + 1}

    model.backbone = trained_backbone.to(device)
    return loop.finish(model, meta, {"epochs": cfg["epochs"], "steps": total_steps}, history)
