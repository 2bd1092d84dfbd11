"""The stage entry points on CUDA: train_cls under `torchrun --nproc_per_node 1` (NCCL, the DDP wrapper,
CUDA SyncBatchNorm and the bank's collectives at world size 1), make_seeds as its own process, and the CUDA
peak memory both record in their logs and timing files."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch
import yaml
from gpu_helpers import GPU_MARKS, gpu_params, run_checked

from cpal.core.distributed import torchrun_command
from cpal.core.training import load_checkpoint

pytestmark = GPU_MARKS
FINISHED = re.compile(r"finished start=\S+ end=\S+ wall_s=\S+ peak_rss_mib=\d+ cuda_peak_mib=(\d+)")


def _cuda_peak_logged(log: Path) -> int:
    """The CUDA peak of the stage's last log line (stages/common.py writes it at exit)."""
    match = FINISHED.search(log.read_text().splitlines()[-1])
    assert match, f"{log}: no cuda_peak_mib on its last line:\n{log.read_text()[-1500:]}"
    return int(match.group(1))


def test_train_cls_under_torchrun_with_nccl_then_make_seeds(tiny_params: dict, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    params = gpu_params(tiny_params, "cpal", epochs=1)
    # ResNet-18 (from scratch: no download) so sync_bn converts to torch's CUDA SyncBatchNorm
    params["train_cls"].update(backbone="resnet18", pretrained=False, sync_bn=True)
    params["run"]["device"] = "cuda"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    out, log = tmp_path / "cls", tmp_path / "train_cls.log"
    run_checked(torchrun_command(1, ["-m", "stages.train_cls", "--", "--params", str(params_file), "--data",
                                     str(tiny_data), "--out", str(out), "--log", str(log), "--no-progress"]))
    text = log.read_text()
    assert "DDP: 1 processes (nccl)" in text and "sync_bn True" in text
    assert _cuda_peak_logged(log) > 0
    timing = json.loads((out / "timing.json").read_text())
    assert timing["device"] == "cuda:0" and timing["amp"] is True and timing["cuda_peak_mib"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["final_loss"])
    state = load_checkpoint(out / "model.pt")["model"]
    assert int(state["cpal.bank.count"].sum()) > 0  # filled through the NCCL all-gather
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    seeds_log, seeds_timing = tmp_path / "make_seeds.log", tmp_path / "seeds_timing.json"
    run_checked([sys.executable, "-m", "stages.make_seeds", "--params", str(params_file), "--data", str(tiny_data),
                 "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "seeds"), "--timing",
                 str(seeds_timing), "--log", str(seeds_log), "--no-progress"])
    assert _cuda_peak_logged(seeds_log) > 0
    timing = json.loads(seeds_timing.read_text())
    assert timing["device"] == "cuda" and timing["amp"] is True and timing["cuda_peak_mib"] > 0
    assert timing["images"] == len((tiny_data / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
