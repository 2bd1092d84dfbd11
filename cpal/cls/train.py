"""Classifier training for the CAM / SIPE / CPAL methods (stage `train_cls`).

Resumable: a checkpoint after every epoch holds model (support bank included), optimizer, scheduler
and RNG states, tagged with a fingerprint of the settings; a rerun with the same settings continues
from it and ends with the same weights as an uninterrupted run (augmentation and batch order are
seeded per epoch, so they do not depend on where a run stopped).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cpal.cls.network import CAMNet
from cpal.core import distributed
from cpal.core.loop import ResumableTraining
from cpal.core.training import (
    CheckpointError,
    EpochMeans,
    channels_last,
    config_fingerprint,
    load_checkpoint,
    load_for_new_images,
)
from cpal.data.torch_data import ClassificationData, image_batch
from cpal.data.voc import VOCDataset

CHECKPOINT_FORMAT = 3  # 2: backbone stages as `stages.*`, output_stride in meta; 3: bank under `cpal.bank.*`


def build_model(params: dict[str, Any], num_classes: int, pretrained: bool | None = None) -> CAMNet:
    """The classifier of params `train_cls` for `num_classes` foreground classes (``pretrained`` None:
    as `train_cls.pretrained`; False when a checkpoint will overwrite the weights anyway)."""
    cfg = params["train_cls"]
    pretrained = cfg["pretrained"] if pretrained is None else pretrained
    return CAMNet(num_classes, backbone=cfg["backbone"], pretrained=pretrained, method_cfg=params["params"],
                  output_stride=cfg["output_stride"], freeze_stages=cfg["freeze_stages"], freeze_bn=cfg["freeze_bn"])


def model_meta(params: dict[str, Any], dataset: VOCDataset) -> dict[str, Any]:
    """What a checkpoint must agree with before anyone uses it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "method": params["params"]["method"],
        "backbone": params["train_cls"]["backbone"],
        "output_stride": params["train_cls"]["output_stride"],
        "num_classes": dataset.num_classes - 1,
        "classes": dataset.classes,
        "params": params["params"],
    }


def check_meta(meta: dict[str, Any], expected: dict[str, Any], path: Path) -> None:
    """A checkpoint made with another method, backbone or class count is refused with a reason."""
    if meta.get("format") != expected["format"]:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')!r}, this code reads format "
                              f"{expected['format']} (backbone layout changed); rerun train_cls")
    for key in ("method", "backbone", "output_stride", "num_classes"):
        if meta.get(key) != expected[key]:
            raise CheckpointError(
                f"{path} was trained with {key} = {meta.get(key)!r}, but the current settings need "
                f"{key} = {expected[key]!r}; retrain (rerun train_cls) or change params"
            )


def load_trained_model(path: Path, params: dict[str, Any], dataset: VOCDataset, device: torch.device) -> CAMNet:
    ckpt = load_checkpoint(path, map_location="cpu")
    check_meta(ckpt.get("meta", {}), model_meta(params, dataset), path)
    model = build_model(params, dataset.num_classes - 1, pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def load_classifier_as_trained(path: Path, classes: list[str] | None, device: torch.device,
                               source: str = "--classes") -> tuple[CAMNet, dict[str, Any]]:
    """(classifier in eval mode, meta) of a train_cls checkpoint built as its meta records (no params file:
    for new images); `classes` (None: the checkpoint's own, background first) must equal its class list."""
    ckpt, meta = load_for_new_images(path, CHECKPOINT_FORMAT, "train_cls", classes, source)
    model = CAMNet(meta["num_classes"], backbone=meta["backbone"], pretrained=False, method_cfg=meta["params"],
                   output_stride=meta["output_stride"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), meta


def param_groups(model: torch.nn.Module, lr: float, new_layer_mult: float) -> list[dict[str, Any]]:
    """Pretrained backbone at lr, newly added layers at lr * new_layer_mult (IRN / SIPE practice)."""
    backbone, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else new).append(p)
    return [{"params": backbone, "lr": lr}, {"params": new, "lr": lr * new_layer_mult}]


@torch.no_grad()
def evaluate_map(model: CAMNet, dataset: VOCDataset, device: torch.device, batch_size: int) -> float:
    """Mean average precision of the image-level classifier (labels only: no pixel supervision).

    Batches group images of one size (real data mixes sizes; the order does not change the mAP)."""
    model.eval()
    scores, targets = [], []
    for ids in dataset.size_batches(batch_size):
        images = image_batch((dataset.image(i) for i in ids), device)
        scores.append(model.classify(images).float().cpu())
        targets.append(torch.from_numpy(np.stack([dataset.multi_hot(i) for i in ids])))
    model.train()
    return mean_average_precision(torch.cat(scores).numpy(), torch.cat(targets).numpy())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    aps = []
    for c in range(targets.shape[1]):
        positives = targets[:, c].sum()
        if positives == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = targets[order, c]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / positives))
    return float(np.mean(aps)) if aps else float("nan")


def train_classifier(
    params: dict[str, Any],
    data_dir: Path,
    out_dir: Path,
    log: logging.Logger,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train, checkpoint every epoch, write `model.pt` and `metrics.json` into out_dir.

    Under torchrun (see cpal.core.distributed; with one process too) every process calls this: DDP over the ranks,
    `train_cls.batch_size` the global batch split evenly among them, the support bank gathered across
    ranks, BatchNorm synchronised if `train_cls.sync_bn`; rank 0 alone evaluates and writes files, and
    every rank returns the same metrics. `stop_after_epoch` ends the run early as a kill would (for
    tests of resumption).
    """
    ctx = distributed.setup(params["run"]["device"])
    try:
        return _train(ctx, params, data_dir, out_dir, log, progress, stop_after_epoch)
    finally:
        ctx.close()


def _train(ctx: distributed.DistContext, params: dict[str, Any], data_dir: Path, out_dir: Path,
           log: logging.Logger, progress: bool, stop_after_epoch: int | None) -> dict[str, Any]:
    cfg, run = params["train_cls"], params["run"]
    device = ctx.device
    loop = ResumableTraining("train_cls", ctx, out_dir, log, run["seed"])
    info = loop.info

    train_set = VOCDataset(data_dir, cfg["train_split"])
    val_set = VOCDataset(data_dir, cfg["val_split"])
    data = ClassificationData(train_set, cfg["crop_size"], tuple(cfg["scale_range"]), run["seed"],
                              cache=cfg["cache_images"])
    batch = cfg["batch_size"]

    def sampler(epoch: int) -> distributed.GlobalBatchSampler:
        # the permutation DataLoader(shuffle=True, generator=Generator().manual_seed(seed * 1000 + epoch)) drew
        return distributed.GlobalBatchSampler(len(data), batch, run["seed"] * 1000 + epoch, cfg["drop_last"],
                                              ctx.rank, ctx.world_size, key="train_cls.batch_size")

    steps_per_epoch = len(sampler(0))
    if steps_per_epoch == 0:
        raise ValueError(f"train_cls.batch_size = {batch} exceeds the {len(data)} training images (drop_last)")
    total_steps = steps_per_epoch * cfg["epochs"]

    model = channels_last(build_model(params, train_set.num_classes - 1).to(device))
    if ctx.distributed:
        if cfg.get("sync_bn", False):
            model = distributed.convert_sync_batchnorm(model, ctx)
        model.distribute(ctx.group)
    # method cam never uses the side convs (no PACAM): DDP must not wait for their gradients
    net = distributed.wrap_ddp(model, ctx, find_unused_parameters=params["params"]["method"] == "cam")
    loop.optimise(model, param_groups(model, cfg["lr"], cfg["new_layer_lr_mult"]), cfg, total_steps,
                  cfg["warmup_steps"])
    meta = model_meta(params, train_set)
    state = loop.resume(config_fingerprint(params["params"], cfg, run["seed"], params["data"]))
    start_epoch, history = (state["epoch"], list(state["history"])) if state else (0, [])
    if ctx.distributed:
        info("DDP: %d processes (%s), %d images per process and step, sync_bn %s", ctx.world_size,
             "nccl" if device.type == "cuda" else "gloo", batch // ctx.world_size, bool(cfg.get("sync_bn", False)))

    model.train()
    for epoch in range(start_epoch, cfg["epochs"]):
        data.set_epoch(epoch)
        batches = sampler(epoch)
        loader = loop.loader(data, batches, run["num_workers"], epoch)
        terms, t0 = EpochMeans(("loss", "loss_cls", "loss_self")), time.perf_counter()
        bar = tqdm(loader, desc=f"train_cls epoch {epoch + 1}/{cfg['epochs']}", disable=not (progress and ctx.is_main),
                   leave=False)
        for step, (images, targets, valid, _) in enumerate(bar):
            images, targets = channels_last(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
            valid = valid.to(device, non_blocking=True) if cfg["mask_padding"] else None
            with torch.autocast(device_type=device.type, enabled=loop.use_amp):
                out = net(images, targets, valid)
            loss = out["loss"]
            n = images.shape[0]
            if ctx.distributed and n * ctx.world_size != batches.global_size(step):
                # a partial last batch: weight this rank's mean so DDP's average is the global batch mean
                loss = loss * (n * ctx.world_size / batches.global_size(step))
            loop.step(loss, model.parameters(), cfg["grad_clip"])  # SIPE clips the gradient norm at 1
            terms.add(out, n)
            bar.set_postfix(loss=f"{terms.loss:.4f}")
        record = loop.epoch_record(epoch, terms, t0)
        val_map = evaluate_map(model, val_set, device, cfg["batch_size"]) if ctx.is_main else None
        record["val_map"] = ctx.broadcast_float(val_map)
        if loop.end_epoch(epoch, cfg["epochs"], record, history, meta, stop_after_epoch):
            return {"stopped_after_epoch": epoch + 1}

    return loop.finish(model, meta, {"epochs": cfg["epochs"], "val_map": history[-1]["val_map"] if history else None},
                       history)
