"""Training steps on CUDA under AMP with the grad scaler: the classifier (each method), DeepLab and IRN.

Each run stops after epoch 1 (its resume file holds the scaler's state: empty when the scaler was off),
then finishes epoch 2 from it, so the test sees that the scaler was live, that the losses stay finite and
that epoch 2's float16 steps moved the weights (a scaler skipping every step on inf/nan gradients would
leave them where epoch 1 ended).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from gpu_helpers import GPU_MARKS, LOG, gpu_params

from cpal.core.training import load_checkpoint

pytestmark = GPU_MARKS


def _moved(before: dict, after: dict, prefix: str | tuple[str, ...] = "") -> list[str]:
    """Floating-point entries (under ``prefix``) that changed; every one must be finite."""
    changed = []
    for key, value in after.items():
        if key.startswith(prefix) and value.is_floating_point():
            assert torch.isfinite(value).all(), f"{key} holds inf/nan after AMP training"
            if not torch.equal(value.cpu(), before[key].cpu()):
                changed.append(key)
    return changed


def _check_amp_run(out: Path, epoch_one: dict, prefix: str | tuple[str, ...] = "") -> None:
    """The scaler was live in epoch 1; the finished run's weights moved after it; timing says AMP on CUDA."""
    assert epoch_one["scaler"], "the grad scaler was disabled (its state_dict is empty): AMP did not run"
    assert epoch_one["scaler"]["scale"] > 1.0  # inf/nan gradients in every step would halve it towards 0
    final = load_checkpoint(out / "model.pt")["model"]
    moved = _moved(epoch_one["model"], final, prefix)
    assert moved, "no weight changed in epoch 2: every AMP step was skipped"
    timing = json.loads((out / "timing.json").read_text())
    assert timing["device"].startswith("cuda") and timing["amp"] is True
    assert timing["cuda_peak_mib"] > 0 and timing["images_per_s"] > 0


def test_device_auto_picks_cuda() -> None:
    from cpal.core import distributed
    from cpal.core.training import resolve_device

    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda").type == "cuda"
    assert distributed.setup("auto").device.type == "cuda"


@pytest.mark.parametrize("method", ["cam", "sipe", "cpal"])
def test_train_cls_under_amp(tiny_params: dict, tiny_data: Path, tmp_path: Path, method: str) -> None:
    from cpal.cls.train import train_classifier

    params = gpu_params(tiny_params, method)
    assert train_classifier(params, tiny_data, tmp_path, LOG, progress=False, stop_after_epoch=1) == {
        "stopped_after_epoch": 1}
    epoch_one = load_checkpoint(tmp_path / "resume.pt")
    assert all(math.isfinite(h["loss"]) for h in epoch_one["history"])
    metrics = train_classifier(params, tiny_data, tmp_path, LOG, progress=False)
    assert math.isfinite(metrics["final_loss"]) and len(metrics["history"]) == 2
    if method != "cam":  # SIPE and CPAL take their self-supervision loss under AMP too
        assert all(math.isfinite(h["loss_self"]) and h["loss_self"] > 0 for h in metrics["history"])
    _check_amp_run(tmp_path, epoch_one, prefix="backbone.")
    final = load_checkpoint(tmp_path / "model.pt")["model"]
    filled = int(final["cpal.bank.count"].sum())
    if method == "cam":
        assert filled == 0
    else:  # the bank (float32) takes the float16 batch's prototypes
        assert filled > 0
        bank = final["cpal.bank.prototypes"]
        assert bank.dtype == torch.float32 and torch.isfinite(bank).all() and bank.abs().sum() > 0


def test_deeplab_under_amp(tiny_params: dict, tiny_data: Path, tmp_path: Path) -> None:
    from cpal.seg.train import train_segmenter

    params = gpu_params(tiny_params)
    params["seg"]["epochs"] = 2
    # ground-truth masks (the upper bound's labels): no pseudo-masks needed
    assert train_segmenter(params, tiny_data, None, tmp_path, LOG, progress=False, stop_after_epoch=1) == {
        "stopped_after_epoch": 1}
    epoch_one = load_checkpoint(tmp_path / "resume.pt")
    metrics = train_segmenter(params, tiny_data, None, tmp_path, LOG, progress=False)
    assert all(math.isfinite(h["loss"]) for h in metrics["history"]) and len(metrics["history"]) == 2
    _check_amp_run(tmp_path, epoch_one)


def test_irn_loss_under_amp_matches_float32(gpu_classifier: Path, tiny_data: Path) -> None:
    """Same weights, same batch: the AMP loss is finite and within 2 % of float32's, and its scaled
    backward gives finite head gradients. A boundary map saturated in float16 would make the loss inf."""
    import numpy as np

    from cpal.core.io import load_label_png
    from cpal.data.torch_data import image_batch
    from cpal.data.voc import VOCDataset
    from cpal.irn.model import STRIDE
    from cpal.irn.path_index import PathIndex
    from cpal.irn.train import affinity_loss, build_boundary_net, runnable

    torch.manual_seed(0)
    cuda = torch.device("cuda")
    params = {"irn": {"backbone_from": "classifier"}}
    model, _ = runnable(build_boundary_net(params, gpu_classifier)[0].to(cuda))
    ds = VOCDataset(tiny_data, "train")
    ids = ds.ids[:8]
    images = image_batch((ds.image(i) for i in ids), cuda)
    labels = torch.from_numpy(np.stack([load_label_png(tiny_data / "SegmentationClass" / f"{i}.png") for i in ids])
                              .astype(np.int64))[:, STRIDE // 2::STRIDE, STRIDE // 2::STRIDE].contiguous().to(cuda)
    index = PathIndex.of(5)
    full = affinity_loss(model, images, labels, index, amp=False)
    half = affinity_loss(model, images, labels, index, amp=True)
    for key in ("loss", "bg_pos", "fg_pos", "neg"):
        assert torch.isfinite(half[key]), key
        assert half[key].dtype == torch.float32, key
        a, b = float(half[key].detach()), float(full[key].detach())
        assert abs(a - b) <= 0.02 * abs(b) + 1e-4, (key, a, b)
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(half["loss"]).backward()
    grads = [p.grad for p in model.head_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_train_irn_under_amp(tiny_params: dict, tiny_data: Path, gpu_classifier: Path, tmp_path: Path) -> None:
    from cpal.irn.train import train_irn

    params = gpu_params(tiny_params)
    params["irn"]["epochs"] = 2
    labels = tiny_data / "SegmentationClass"  # ground truth stands in for IR labels
    assert train_irn(params, tiny_data, labels, gpu_classifier, tmp_path, LOG, progress=False,
                     stop_after_epoch=1) == {"stopped_after_epoch": 1}
    epoch_one = load_checkpoint(tmp_path / "resume.pt")
    metrics = train_irn(params, tiny_data, labels, gpu_classifier, tmp_path, LOG, progress=False)
    assert all(math.isfinite(h["loss"]) for h in metrics["history"]) and len(metrics["history"]) == 2
    _check_amp_run(tmp_path, epoch_one, prefix=("side.", "fuse."))  # the head; the backbone is frozen
