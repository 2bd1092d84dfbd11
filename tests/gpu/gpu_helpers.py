"""Helpers of the CUDA-only tests (tests/gpu): their marks, tiny params on the GPU, subprocess environment.

Every module here sets `pytestmark = GPU_MARKS`: marked `gpu` (registered in pyproject.toml) and skipped
without CUDA, so a CPU run collects them and reports each as skipped with the reason. Run them alone with
`python -m pytest tests/gpu -rs` (benchmarks/gpu.sh does, first).
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LOG = logging.getLogger("test_gpu")
SKIP_REASON = "needs a CUDA device (torch.cuda.is_available() is False): the GPU path cannot run here"
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=SKIP_REASON)]


def gpu_params(tiny_params: dict, method: str = "cpal", epochs: int = 2) -> dict:
    """configs/tiny.yaml on CUDA with AMP everywhere (`device: auto`, so each run also checks that auto
    picks the GPU), `epochs` epochs of the classifier."""
    p = copy.deepcopy(tiny_params)
    p["params"]["method"] = method
    p["train_cls"].update(epochs=epochs, amp=True)
    p["seeds"]["amp"] = True
    p["irn"]["amp"] = True
    p["seg"]["amp"] = True
    p["run"]["device"] = "auto"
    return p


def subprocess_env() -> dict[str, str]:
    """This checkout first on the path, the caller's PYTHONPATH kept (benchmarks/gpu.sh puts its wheels there),
    no torchrun variables inherited."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_checked(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command from the repository root; a failure shows its output."""
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done
