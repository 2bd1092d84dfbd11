"""make_seeds on CUDA against the CPU for the same checkpoint: float32 maps agree to 1e-3, AMP seeds to 0.5
mIoU points.

A cpal classifier is trained on CUDA (64 generated images of 128 px, 2 epochs), then the same checkpoint
makes seeds on the CPU, on CUDA in float32 and on CUDA under AMP. The float32 comparison turns TF32 off
(cuDNN convolutions use TF32 by default on Ampere and later GPUs: 10 mantissa bits, errors of 1e-3 and
more, which is a precision choice, not a bug); AMP runs with torch's defaults, as the stage does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gpu_helpers import GPU_MARKS, LOG, gpu_params

from cpal.backbone import for_inference
from cpal.cls.train import load_trained_model, train_classifier
from cpal.data.sources import prepare_dataset
from cpal.data.torch_data import image_batch
from cpal.data.voc import VOCDataset
from cpal.seeds.evaluate import evaluate_seeds, thresholds_from
from cpal.seeds.make import make_seeds, multiscale_maps
from cpal.seeds.store import load_seeds, seed_path

pytestmark = GPU_MARKS

MAP_TOL = 1e-3  # float32 on CUDA (TF32 off) vs CPU, maps in [0, 1]
FP16_STEP = 2.0**-11  # seed files store float16: one rounding step in [0.5, 1) on either side of the comparison
MIOU_TOL = 0.005  # AMP vs CPU seed mIoU (0.5 points)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def trained(tiny_params: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """(params, data folder, model.pt): 64 + 16 images of 128 px, cpal trained 2 epochs on CUDA under AMP."""
    params = gpu_params(tiny_params)
    params["data"]["embedded"].update(image_size=128, n_train=64, n_val=16)
    params["train_cls"]["crop_size"] = 128
    root = tmp_path_factory.mktemp("gpu_seeds")
    prepare_dataset(root / "data", params["data"], progress=False)
    train_classifier(params, root / "data", root / "cls", LOG, progress=False)
    return params, root / "data", root / "cls" / "model.pt"


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _seeds(trained: tuple[dict, Path, Path], device: torch.device, amp: bool, out: Path) -> dict:
    params, data, ckpt = trained
    cfg = dict(params["seeds"], amp=amp)
    ds = VOCDataset(data, cfg["split"])
    timing = make_seeds(load_trained_model(ckpt, params, ds, device), ds, out, cfg, device, LOG, progress=False)
    assert timing["amp"] is (amp and device.type == "cuda")
    return timing


def test_float32_maps_on_cuda_match_the_cpu(trained: tuple[dict, Path, Path], tmp_path: Path, no_tf32) -> None:
    params, data, ckpt = trained
    ds = VOCDataset(data, params["seeds"]["split"])
    # in memory: the summed multi-scale + flip maps of one batch, each class map over its peak
    ids = ds.size_batches(params["seeds"]["batch_size"])[0]
    labels = torch.from_numpy(np.stack([ds.multi_hot(i) for i in ids]))
    maps = {}
    for name, device in (("cpu", CPU), ("cuda", CUDA)):
        model = for_inference(load_trained_model(ckpt, params, ds, device))
        cam, pacam = multiscale_maps(model, image_batch((ds.image(i) for i in ids), device), labels.to(device),
                                     params["seeds"]["scales"], params["seeds"]["flip"])
        maps[name] = [m.cpu() / m.flatten(2).amax(2).clamp_min(1e-5)[:, :, None, None] for m in (cam, pacam)]
    for a, b in zip(maps["cpu"], maps["cuda"], strict=True):
        assert (a - b).abs().max() <= MAP_TOL
    # through the stage function: every stored map of every image
    timing = _seeds(trained, CUDA, False, tmp_path / "cuda")
    assert timing["cuda_peak_mib"] > 0
    _seeds(trained, CPU, False, tmp_path / "cpu")
    worst = 0.0
    for image_id in ds.ids:
        a, b = load_seeds(seed_path(tmp_path / "cpu", image_id)), load_seeds(seed_path(tmp_path / "cuda", image_id))
        assert sorted(a) == sorted(b) and np.array_equal(a["keys"], b["keys"])
        for kind in ("cam", "pacam", "pacam_bg"):
            worst = max(worst, float(np.abs(a[kind].astype(np.float32) - b[kind].astype(np.float32)).max()))
    assert worst <= MAP_TOL + FP16_STEP, worst


def test_amp_seeds_score_as_the_cpu_ones(trained: tuple[dict, Path, Path], tmp_path: Path) -> None:
    params, data, _ = trained
    ds = VOCDataset(data, params["seeds"]["split"])
    _seeds(trained, CPU, False, tmp_path / "cpu")
    _seeds(trained, CUDA, True, tmp_path / "amp")
    thresholds = thresholds_from(params["seeds"])
    cpu = evaluate_seeds(ds, tmp_path / "cpu", thresholds, LOG, progress=False)
    amp = evaluate_seeds(ds, tmp_path / "amp", thresholds, LOG, progress=False)
    for kind in ("cam", "pacam"):
        assert cpu[kind]["miou"] > 0.05, (kind, cpu[kind]["miou"])  # something to compare
        assert abs(amp[kind]["miou"] - cpu[kind]["miou"]) <= MIOU_TOL, (kind, cpu[kind]["miou"], amp[kind]["miou"])
    assert abs(amp["pacam_argmax"]["miou"] - cpu["pacam_argmax"]["miou"]) <= MIOU_TOL

