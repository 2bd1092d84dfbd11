"""environment.yml (conda users) and pyproject.toml (everyone else) must name the same packages."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge name -> PyPI name where they differ
CONDA_TO_PYPI = {"pytorch": "torch", "pydensecrf": "pydensecrf2"}
CONDA_ONLY = {"python"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()


def test_environment_and_pyproject_agree() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {CONDA_TO_PYPI.get(_name(d), _name(d)) for d in env["dependencies"] if isinstance(d, str)}
    conda -= CONDA_ONLY
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pypi = {_name(d) for d in project["dependencies"]}
    pypi |= {_name(d) for d in project["optional-dependencies"]["dev"]}
    assert conda == pypi, f"only in environment.yml: {conda - pypi}; only in pyproject: {pypi - conda}"


def test_environment_pins_python_311() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]


def test_torch_versions_agree() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for conda_name, pypi_name in (("pytorch", "torch"), ("torchvision", "torchvision")):
        conda_pin = next(d for d in env["dependencies"] if _name(d) == conda_name).split("=")[-1]
        pypi_pin = next(d for d in project if _name(d) == pypi_name).split("==")[-1]
        assert conda_pin == pypi_pin
