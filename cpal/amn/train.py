"""AMN training on IR labels (stage `train_amn`), resumable like train_cls (cpal.core.loop.ResumableTraining).

AMN's recipe (step/train_amn.py): random rescale 0.5-1.5, flip, crop (image padded with the mean, label with
255), the image-level labels as conditioning, L_pcl against the IR labels resized to the logit grid, Adam at
a constant rate (backbone 5e-6, new layers 1e-4, weight decay 1e-4), 5 epochs of batch 16, final weights
kept. With ``amn.plugin`` loss | both, L_self of the CPAL plug-in is added (cpal/amn/network.py) and the
support bank is saved with the weights. One process only (no DDP).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cpal.amn.network import AMNNet, aspp_rates
from cpal.cls.train import param_groups
from cpal.core import distributed
from cpal.core.io import inputs_stamp
from cpal.core.loop import ResumableTraining
from cpal.core.training import EpochMeans, channels_last, check_meta_keys, config_fingerprint, load_checkpoint
from cpal.data.labelled import SegmentationData
from cpal.data.voc import VOCDataset

CHECKPOINT_FORMAT = 1
PLUGINS = ("none", "classifier", "loss", "both")
# Keys that only change inference: editing them must not invalidate a half-finished training run.
INFERENCE_KEYS = ("keep_dropout_at_inference", "seed_threshold", "scales", "flip")


def amn_config(params: dict[str, Any]) -> dict[str, Any]:
    """The `amn` section, with a clear error when the params file has none."""
    if "amn" not in params:
        raise KeyError("params has no section 'amn' (the AMN host); copy it from params.yaml into the params file")
    cfg = params["amn"]
    if cfg["plugin"] not in PLUGINS:
        raise ValueError(f"amn.plugin = {cfg['plugin']!r} is not one of {' | '.join(PLUGINS)}")
    return cfg


def uses_loss(plugin: str) -> bool:
    """Whether CPAL's L_self is part of AMN's training."""
    return plugin in ("loss", "both")


def check_label_source(params: dict[str, Any]) -> None:
    """``amn.plugin`` records whether the IR labels came from CPAL's classifier; params.method made them."""
    plugin, method = amn_config(params)["plugin"], params["params"]["method"]
    claims = plugin in ("classifier", "both")
    if claims and method != "cpal":
        raise ValueError(f"amn.plugin = {plugin!r} records IR labels from CPAL's classifier, but params.method = "
                         f"{method!r} made them; set params.method: cpal, or amn.plugin: "
                         f"{'loss' if plugin == 'both' else 'none'}")
    if not claims and method == "cpal":
        fix = "both" if plugin == "loss" else "classifier"
        raise ValueError(f"amn.plugin = {plugin!r} records IR labels from a classifier without CPAL, but "
                         f"params.method = 'cpal' made them; set amn.plugin: {fix}, or params.method: cam")


def build_amn(params: dict[str, Any], num_classes: int, pretrained: bool | None = None,
              rates: tuple[int, ...] | None = None, cpal_cfg: dict[str, Any] | None = None) -> AMNNet:
    """AMN of params `amn` for ``num_classes`` foreground classes. ``rates`` None: scaled from the crop;
    ``cpal_cfg`` None: the params section when the plug-in's loss is on (a checkpoint passes its own)."""
    cfg = amn_config(params)
    if cpal_cfg is None and uses_loss(cfg["plugin"]):
        cpal_cfg = params["params"]
    pretrained = cfg["pretrained"] if pretrained is None else pretrained
    return AMNNet(num_classes, backbone=cfg["backbone"], pretrained=pretrained,
                  output_stride=cfg["output_stride"], freeze_bn=cfg["freeze_bn"], dropout=cfg["dropout"],
                  rates=rates or aspp_rates(cfg["crop_size"], cfg["output_stride"]),
                  keep_dropout_at_inference=cfg["keep_dropout_at_inference"], eps=cfg["eps"],
                  lambda_self=cfg["lambda_self"], cpal_cfg=cpal_cfg)


def amn_meta(params: dict[str, Any], model: AMNNet, classes: list[str], labels: str) -> dict[str, Any]:
    """What an AMN checkpoint records; :func:`load_amn` checks the first six against the settings."""
    cfg = amn_config(params)
    return {"format": CHECKPOINT_FORMAT, "backbone": cfg["backbone"], "output_stride": cfg["output_stride"],
            "num_classes": len(classes) - 1, "classes": list(classes), "plugin": cfg["plugin"],
            "aspp_rates": list(model.rates), "cpal": params["params"] if model.cpal is not None else None,
            "ir_labels": labels}


def load_amn(path: Path, params: dict[str, Any], classes: list[str],
             device: torch.device) -> tuple[AMNNet, dict[str, Any]]:
    """(model in eval mode, meta) of a train_amn checkpoint. One made with another backbone, output stride,
    class list or plug-in setting is refused, naming both values; the ASPP dilations and the plug-in's
    settings (its bank's shape) come from the checkpoint itself."""
    ckpt = load_checkpoint(path, map_location="cpu")
    meta = ckpt.get("meta", {})
    cfg = amn_config(params)
    check_meta_keys(meta, {"format": CHECKPOINT_FORMAT, "backbone": cfg["backbone"],
                           "output_stride": cfg["output_stride"], "num_classes": len(classes) - 1,
                           "classes": list(classes), "plugin": cfg["plugin"]}, path, "train_amn")
    model = build_amn(params, len(classes) - 1, pretrained=False, rates=tuple(meta["aspp_rates"]),
                      cpal_cfg=meta["cpal"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), meta


class IRLabelData(SegmentationData):
    """(image, IR label (255 unsure), image-level multi-hot labels, index): AMN's training pairs.

    Every IR label is checked before training (present, the image's size, class ids within the dataset's
    classes), and a bad one is named by file.
    """

    KIND, PRODUCER, TAG = "IR label", "ir_labels", "ir_labels"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        image, label, _ = super().__getitem__(index)
        return image, label, torch.from_numpy(self.dataset.multi_hot(self.dataset.ids[index])), index


def train_amn(params: dict[str, Any], data_dir: Path, ir_label_dir: Path, out_dir: Path, log: logging.Logger,
              progress: bool = True, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train AMN on the IR labels of split `seeds.split`; write model.pt, metrics.json, timing.json.

    ``stop_after_epoch`` ends the run early as a kill would (for tests of resumption).
    """
    check_label_source(params)
    ctx = distributed.setup(params["run"]["device"])
    try:
        if ctx.distributed:
            raise RuntimeError("train_amn runs in one process (no DDP); start it without torchrun")
        return _train(ctx, params, Path(data_dir), Path(ir_label_dir), Path(out_dir), log, progress,
                      stop_after_epoch)
    finally:
        ctx.close()


def _train(ctx: distributed.DistContext, params: dict[str, Any], data_dir: Path, ir_label_dir: Path, out_dir: Path,
           log: logging.Logger, progress: bool, stop_after_epoch: int | None) -> dict[str, Any]:
    cfg, run = amn_config(params), params["run"]
    device = ctx.device
    loop = ResumableTraining("train_amn", ctx, out_dir, log, run["seed"])

    train_set = VOCDataset(data_dir, params["seeds"]["split"])
    data = IRLabelData(train_set, ir_label_dir, cfg["crop_size"], tuple(cfg["scale_range"]), run["seed"])
    batch = cfg["batch_size"]

    def sampler(epoch: int) -> distributed.GlobalBatchSampler:
        return distributed.GlobalBatchSampler(len(data), batch, run["seed"] * 1000 + epoch, True, key="amn.batch_size")

    steps_per_epoch = len(sampler(0))
    if steps_per_epoch == 0:
        raise ValueError(f"amn.batch_size = {batch} exceeds the {len(data)} training images of split "
                         f"{train_set.split!r} (AMN drops the last partial batch)")
    total_steps = steps_per_epoch * cfg["epochs"]

    model = channels_last(build_amn(params, train_set.num_classes - 1).to(device))
    # AMN: Adam at a constant rate (a poly schedule of power 0), weight decay on both groups
    adam = {"optimizer": "adam", "lr": cfg["lr"], "momentum": 0.0, "weight_decay": cfg["weight_decay"],
            "poly_power": 0.0, "amp": cfg["amp"]}
    loop.optimise(model, param_groups(model, cfg["lr"], cfg["new_layer_lr_mult"]), adam, total_steps)
    meta = amn_meta(params, model, train_set.classes, data.source)
    train_cfg = {k: v for k, v in cfg.items() if k not in INFERENCE_KEYS}
    label_files = [data.label_path(i) for i in train_set.ids]
    state = loop.resume(config_fingerprint(train_cfg, meta["cpal"], run["seed"], params.get("data"), train_set.ids,
                                           inputs_stamp(label_files)))
    start_epoch, history = (state["epoch"], list(state["history"])) if state else (0, [])
    loop.info("train_amn: %s, grid %d px, ASPP dilations %s, plugin %s, %d images (%s), %d steps, device %s",
              cfg["backbone"], cfg["crop_size"] // cfg["output_stride"], model.rates, cfg["plugin"], len(data),
              data.source, total_steps, device)

    model.train()
    for epoch in range(start_epoch, cfg["epochs"]):
        data.set_epoch(epoch)
        loader = loop.loader(data, sampler(epoch), run["num_workers"], epoch)
        terms, t0 = EpochMeans(("loss", "loss_pcl", "loss_self")), time.perf_counter()
        bar = tqdm(loader, desc=f"train_amn epoch {epoch + 1}/{cfg['epochs']}", disable=not progress, leave=False)
        for images, ir_labels, labels, _ in bar:
            images = channels_last(images.to(device, non_blocking=True))
            ir_labels, labels = ir_labels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=loop.use_amp):
                out = model(images, labels, ir_labels)
            loop.step(out["loss"])
            n = images.shape[0]
            terms.add(out, n)
            bar.set_postfix(loss=f"{terms.loss:.4f}")
        record = loop.epoch_record(epoch, terms, t0)
        if loop.end_epoch(epoch, cfg["epochs"], record, history, meta, stop_after_epoch):
            return {"stopped_after_epoch": epoch + 1}

    metrics = {
        "backbone": cfg["backbone"],
        "plugin": cfg["plugin"],
        "ir_labels": data.source,
        "aspp_rates": list(model.rates),
        "epochs": cfg["epochs"],
        "steps": total_steps,
        "train_images": len(data),
        "class_pixels": dict(zip(train_set.classes, data.class_pixels.tolist(), strict=True)),
        "bank_filled": (dict(zip(train_set.classes[1:], model.cpal.bank.count.tolist(), strict=True))
                        if model.cpal is not None else None),
    }
    return loop.finish(model, meta, metrics, history)
