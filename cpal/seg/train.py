"""DeepLab training on pseudo-masks or ground truth (stage `train_seg`).

Resumable like train_cls: a checkpoint after every epoch holds model, optimizer, scheduler, scaler and
RNG states, tagged with a fingerprint of the settings and of the labels (their per-class pixel counts);
a rerun with the same fingerprint continues and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cpal.core import distributed
from cpal.core.io import write_json
from cpal.core.loop import ResumableTraining
from cpal.core.training import (
    CheckpointError,
    channels_last,
    config_fingerprint,
    load_checkpoint,
    load_for_new_images,
    save_checkpoint,
)
from cpal.data.voc import IGNORE_INDEX, VOCDataset
from cpal.seg.data import SegmentationData, class_balanced_weights
from cpal.seg.evaluate import evaluate_segmenter
from cpal.seg.model import Segmenter, build_segmenter, param_groups

CHECKPOINT_FORMAT = 3  # 2: backbone stages as `stages.*` (cpal.backbone); 3: meta records `dilated` and `kind`
# Keys that only change evaluation: editing them must not invalidate a half-finished training run.
EVAL_KEYS = ("val_split", "scales", "flip", "crf", "crf_params", "val_every")
# The per-epoch validation curve (seg.val_every): one scale, no flip, no CRF, so it is cheap; eval_seg reports
# the final numbers with the full protocol.
CURVE_PROTOCOL = {"scales": [1.0], "flip": False, "crf": False}


def training_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a trained DeepLab depends on: the seg section without the keys that only change evaluation (the
    resume fingerprint's part of it)."""
    return {k: v for k, v in cfg.items() if k not in EVAL_KEYS}


def seg_config(params: dict[str, Any]) -> dict[str, Any]:
    """The `seg` section, with a clear error when the params file has none."""
    if "seg" not in params:
        raise KeyError("params has no section 'seg' (DeepLab settings); add it to the params file")
    return params["seg"]


def seg_meta(cfg: dict[str, Any], classes: list[str], labels: str) -> dict[str, Any]:
    """What a DeepLab checkpoint records: architecture, initialisation and what it was trained on."""
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": "train_seg",  # the classifier's format is 3 too: cpal-predict tells them apart by this
        "backbone": cfg["backbone"],
        "head": cfg["head"],
        "init": cfg["init"],
        "dilated": cfg["dilated"],
        "num_classes": len(classes),
        "classes": list(classes),
        "labels": labels,
    }


def check_seg_meta(meta: dict[str, Any], cfg: dict[str, Any], classes: list[str], path: Path) -> None:
    """A checkpoint made for another architecture, initialisation or class list is refused with a reason."""
    expected = {"format": CHECKPOINT_FORMAT, "backbone": cfg["backbone"], "head": cfg["head"], "init": cfg["init"],
                "dilated": cfg["dilated"], "classes": list(classes)}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CheckpointError(
                f"{path} was trained with {key} = {meta.get(key)!r}, but the current settings need "
                f"{key} = {value!r}; retrain (rerun train_seg) or change params"
            )


class TrainingSkipped(RuntimeError):
    """The checkpoint records that training was skipped (the upper bound without masks); str() says why."""


def skip_without_ground_truth(params: dict[str, Any], data_dir: Path, out_dir: Path, log: logging.Logger) -> bool:
    """Upper bound (`--ground-truth`) on a training split without masks: record why, in place of a model.

    model.pt then holds only the meta with `skipped` (load_segmenter raises TrainingSkipped, so eval_seg_full
    records the reason), metrics.json and timing.json say the same. The same command does this under
    Snakemake and DVC, so both engines leave the same files. Returns whether it skipped.
    """
    cfg = seg_config(params)
    train_set = VOCDataset(data_dir, cfg["train_split"])
    if train_set.has_ground_truth():
        return False
    reason = (f"upper bound not trained: split {cfg['train_split']!r} of {data_dir} has no ground-truth masks "
              "(the fully supervised model needs them)")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "model.pt", {"meta": {**seg_meta(cfg, train_set.classes, "ground_truth"),
                                                    "skipped": reason}})
    write_json(out_dir / "metrics.json", {"skipped": reason, "labels": "ground_truth", "steps": 0})
    write_json(out_dir / "timing.json", {"skipped": reason})
    log.warning("%s", reason)
    return True


def load_segmenter(
    path: Path, cfg: dict[str, Any], classes: list[str], device: torch.device
) -> tuple[Segmenter, dict[str, Any]]:
    """(model in eval mode, checkpoint meta) of a train_seg checkpoint, checked against params and classes."""
    ckpt = load_checkpoint(path, map_location="cpu")
    meta = ckpt.get("meta", {})
    if meta.get("skipped"):
        raise TrainingSkipped(meta["skipped"])
    check_seg_meta(meta, cfg, classes, path)
    return _segmenter_from(ckpt, cfg, device), meta


def load_segmenter_as_trained(path: Path, classes: list[str] | None, device: torch.device, source: str = "--classes"
                              ) -> tuple[Segmenter, dict[str, Any]]:
    """(model in eval mode, meta) of a train_seg checkpoint built as its meta records (no params file: for new
    images); `classes` (None: the checkpoint's own) must equal the list it was trained for."""
    ckpt, meta = load_for_new_images(path, CHECKPOINT_FORMAT, "train_seg", classes, source)
    return _segmenter_from(ckpt, meta, device), meta


def _segmenter_from(ckpt: dict[str, Any], cfg: dict[str, Any], device: torch.device) -> Segmenter:
    """The checkpoint's weights in the architecture of cfg (backbone, head) for its class count."""
    num_classes = len(ckpt.get("meta", {}).get("classes", []))
    model = build_segmenter({**cfg, "init": "none"}, num_classes)  # weights come from the file: no download
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def train_segmenter(
    params: dict[str, Any],
    data_dir: Path,
    labels_dir: Path | None,
    out_dir: Path,
    log: logging.Logger,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train, checkpoint every epoch, write `model.pt`, `metrics.json`, `timing.json` into out_dir.

    `labels_dir` None trains on ground truth (upper bound). `seg.iterations`, when set, overrides
    `seg.epochs`: training stops after that many steps, the poly schedule spanning them.
    Under torchrun (see cpal.core.distributed; with one process too) every process calls this: DDP, `seg.batch_size`
    the global batch split evenly, the loss normalised by the global batch's labelled pixels, BatchNorm
    synchronised if `seg.sync_bn`; rank 0 alone writes files; every rank returns the same metrics.
    `stop_after_epoch` ends the run early as a kill would (for tests of resumption).
    """
    ctx = distributed.setup(params["run"]["device"])
    try:
        return _train(ctx, params, data_dir, labels_dir, out_dir, log, progress, stop_after_epoch)
    finally:
        ctx.close()


def _train(ctx: distributed.DistContext, params: dict[str, Any], data_dir: Path, labels_dir: Path | None,
           out_dir: Path, log: logging.Logger, progress: bool, stop_after_epoch: int | None) -> dict[str, Any]:
    cfg, run = seg_config(params), params["run"]
    device = ctx.device
    loop = ResumableTraining("train_seg", ctx, out_dir, log, run["seed"])
    info = loop.info

    train_set = VOCDataset(data_dir, cfg["train_split"])
    val_set = VOCDataset(data_dir, cfg["val_split"]) if cfg.get("val_every") else None
    if val_set is not None and not val_set.has_ground_truth():  # your own data without masks: no curve
        info("seg.val_every: split %r has no ground-truth masks, no val mIoU curve", cfg["val_split"])
        val_set = None
    data = SegmentationData(train_set, labels_dir, cfg["crop_size"], tuple(cfg["scale_range"]), run["seed"],
                            cache=cfg.get("cache_images", True))
    batch = cfg["batch_size"]
    sync_bn = bool(cfg.get("sync_bn", False)) and ctx.distributed
    steps_per_epoch = len(data) // batch  # drop_last: BatchNorm in the head needs batches of two or more
    if steps_per_epoch == 0 or batch < 2:
        raise ValueError(f"seg.batch_size = {batch} must lie in 2..{len(data)} (the training images of split "
                         f"{cfg['train_split']!r})")
    if ctx.distributed and distributed.local_batch_size(batch, ctx, "seg.batch_size") < 2 and not sync_bn:
        raise ValueError(f"seg.batch_size = {batch} over {ctx.world_size} processes leaves 1 image per process, "
                         "too few for BatchNorm: raise seg.batch_size or set seg.sync_bn true")

    def sampler(epoch: int) -> distributed.GlobalBatchSampler:
        # the permutation DataLoader(shuffle=True, generator=Generator().manual_seed(seed * 1000 + epoch)) drew
        return distributed.GlobalBatchSampler(len(data), batch, run["seed"] * 1000 + epoch, True, ctx.rank,
                                              ctx.world_size, key="seg.batch_size")

    iterations = cfg.get("iterations")
    total_steps = int(iterations) if iterations else steps_per_epoch * cfg["epochs"]
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    num_classes = train_set.num_classes
    model = channels_last(build_segmenter(cfg, num_classes).to(device))
    if sync_bn:
        model = distributed.convert_sync_batchnorm(model, ctx)
    net = distributed.wrap_ddp(model, ctx)
    loop.optimise(model, param_groups(model, cfg["lr"], cfg["head_lr_mult"]), cfg, total_steps)
    weights = class_balanced_weights(data.class_pixels) if cfg["class_balanced"] else None
    weight_t = torch.from_numpy(weights).to(device) if weights is not None else None
    meta = seg_meta(cfg, train_set.classes, data.source)
    state = loop.resume(config_fingerprint(training_settings(cfg), run["seed"], params.get("data"), data.source,
                                           data.class_pixels.tolist(), train_set.ids))
    start_epoch, step, history = (state["epoch"], state["step"], list(state["history"])) if state else (0, 0, [])

    info("train_seg: %s/%s init=%s on %s, %d images, %d steps (%d epochs), device %s", cfg["backbone"],
         cfg["head"], cfg["init"], data.source, len(data), total_steps, n_epochs, device)
    if ctx.distributed:
        info("DDP: %d processes (%s), %d images per process and step, sync_bn %s", ctx.world_size,
             "nccl" if device.type == "cuda" else "gloo", batch // ctx.world_size, sync_bn)
    model.train()
    for epoch in range(start_epoch, n_epochs):
        data.set_epoch(epoch)
        loader = loop.loader(data, sampler(epoch), run["num_workers"], epoch)
        loss_sum, correct, labelled, seen, t0 = 0.0, 0, 0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"train_seg epoch {epoch + 1}/{n_epochs}", disable=not (progress and ctx.is_main),
                   leave=False)
        for images, labels, _ in bar:
            if step >= total_steps:
                break
            images, labels = channels_last(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=loop.use_amp):
                logits = net(images)
            n = images.shape[0]
            if ctx.distributed:  # step_loss: this rank's share of the global batch's mean loss
                loss, step_loss = _global_mean_loss(logits, labels, weight_t, ctx)
            else:
                loss = F.cross_entropy(logits.float(), labels, weight=weight_t, ignore_index=IGNORE_INDEX)
                step_loss = float(loss.detach())
            loop.step(loss)
            step += 1
            seen += n
            loss_sum += step_loss * (n * ctx.world_size)  # (global batch mean) x (global batch size), summed over ranks
            valid = labels != IGNORE_INDEX
            correct += int((logits.detach().argmax(1) == labels)[valid].sum())
            labelled += int(valid.sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        if ctx.distributed:  # every rank's share: the single-process epoch sums
            loss_sum, correct, labelled, seen = ctx.all_reduce_sum([loss_sum, correct, labelled, seen])
            correct, labelled, seen = int(round(correct)), int(round(labelled)), int(round(seen))
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "step": step, "loss": loss_sum / max(seen, 1),
                  "pixel_acc": correct / max(labelled, 1), "lr": loop.lr,
                  "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}
        val_every = int(cfg.get("val_every") or 0) if val_set is not None else 0
        if val_every and ((epoch + 1) % val_every == 0 or epoch + 1 == n_epochs):
            miou = None
            if ctx.is_main:
                scores = evaluate_segmenter(model, val_set, {**CURVE_PROTOCOL, "amp": cfg["amp"]}, device, log,
                                            progress=False)
                miou = scores["miou"]
            record["val_miou"] = ctx.broadcast_float(miou)
        if loop.end_epoch(epoch, n_epochs, record, history, meta, stop_after_epoch, step=step):
            return {"stopped_after_epoch": epoch + 1}

    metrics = {
        "backbone": cfg["backbone"],
        "head": cfg["head"],
        "init": cfg["init"],
        "labels": data.source,
        "epochs": n_epochs,
        "steps": step,
        "train_images": len(data),
        "class_pixels": dict(zip(train_set.classes, data.class_pixels.tolist(), strict=True)),
        "class_weights": (dict(zip(train_set.classes, weights.tolist(), strict=True))
                          if weights is not None else None),
    }
    return loop.finish(model, meta, metrics, history, total_seconds=float(sum(h["seconds"] for h in history)))


def _global_mean_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None,
                      ctx: distributed.DistContext) -> tuple[torch.Tensor, float]:
    """This rank's loss for backward and the global batch's loss value, under DDP.

    Cross-entropy's mean runs over labelled pixels (weighted by class weights), whose count differs
    between ranks: each rank takes its pixel sum over the GLOBAL denominator, times the world size,
    so that DDP's gradient average equals the single-process gradient of the global batch's mean.
    """
    total = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = labels != IGNORE_INDEX
    local = weight[labels[valid]].sum() if weight is not None else valid.sum()
    denominator = distributed.loss_normaliser(local, ctx)
    share = total / denominator.to(total.dtype)
    return share * ctx.world_size, float(share.detach())
