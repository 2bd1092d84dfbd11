"""Shared fixtures: a tiny params file for the stage CLIs and one uninterrupted classifier run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from .helpers import EPOCHS, check, run_stage, write_params


@pytest.fixture(scope="session")
def cli_params(tiny_params: dict, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """configs/tiny.yaml on the session's tiny dataset, 3 epochs of 8 steps (batch 4), on CPU."""
    params = copy.deepcopy(tiny_params)
    params["data"]["dir"] = str(tiny_data)
    params["train_cls"].update(epochs=EPOCHS, batch_size=4)
    params["run"]["device"] = "cpu"
    return params


@pytest.fixture(scope="session")
def cli_params_file(cli_params: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_params(tmp_path_factory.mktemp("params") / "params.yaml", cli_params)


@pytest.fixture(scope="session")
def trained(cli_params_file: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`stages.train_cls` run once without interruption: the reference the killed runs must match."""
    work = tmp_path_factory.mktemp("uninterrupted")
    check(run_stage("train_cls", "--params", cli_params_file, "--data", tiny_data, "--out", work / "train_cls",
                    "--log", work / "train_cls.log", "--no-progress", cwd=work))
    return work / "train_cls"
