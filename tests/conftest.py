"""Shared fixtures. Tests never touch the network (loopback servers they start themselves excepted)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def default_params() -> dict:
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    """configs/tiny.yaml, the preset the end-to-end tests run."""
    from cpal.core.config import load_params

    return load_params(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, tiny_params: dict) -> Path:
    """The tiny embedded dataset, generated once per test session."""
    from cpal.data.sources import prepare_dataset

    out = tmp_path_factory.mktemp("tiny") / "data"
    prepare_dataset(out, tiny_params["data"], progress=False)
    return out


@pytest.fixture(autouse=True)
def _restore_library_logger():
    """Stages run in-process attach their log handlers to the `cpal` package logger (and stop it
    propagating); put it back afterwards so later tests (caplog included) see a clean logger."""
    logger = logging.getLogger("cpal")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and spinning OpenMP threads on a busy 2-core box cost 10-30x.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dvc_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny default DAG reproduced by `dvc repro` in two workspaces side by side (`first`, `second`), a
    concurrent `dvc repro` tried in the first (reliability.helpers.reproduce_side_by_side). Run once per
    session: the determinism tests compare the two, and the end-to-end and remote tests copy one
    (pipeline_workspace.copy_workspace) instead of running the DAG again."""
    from reliability.helpers import reproduce_side_by_side

    return reproduce_side_by_side(tmp_path_factory.mktemp("dvc_pair"))
