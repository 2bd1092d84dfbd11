"""Fixtures of the CUDA-only tests (tests/gpu); helpers and marks live in gpu_helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_helpers import LOG, SKIP_REASON, gpu_params


@pytest.fixture(scope="session")
def gpu_classifier(tiny_params: dict, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cpal classifier trained on CUDA under AMP (configs/tiny.yaml, 2 epochs): model.pt."""
    if not torch.cuda.is_available():
        pytest.skip(SKIP_REASON)
    from cpal.cls.train import train_classifier

    out = tmp_path_factory.mktemp("gpu_classifier")
    train_classifier(gpu_params(tiny_params), tiny_data, out, LOG, progress=False)
    return out / "model.pt"
