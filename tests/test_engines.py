"""Snakefile and dvc.yaml must describe the same DAG: stages, commands, inputs, outputs, params sections."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE_PARAMS = "--params outputs/params.snakemake.yaml"  # the Snakefile's written merged config
CODE_PREFIXES = ("stages/", "cpal/")


def snakemake_jobs() -> dict[str, dict]:
    """Rule name -> command, inputs, outputs, from a forced dry run with printed shell commands."""
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-F", "--cores", "2"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    jobs: dict[str, dict] = {}
    current = None
    for line in out.splitlines():
        if m := re.match(r"^rule (\w+):$", line):
            current = jobs.setdefault(m.group(1), {"input": [], "output": [], "cmd": None})
        elif current is not None and (m := re.match(r"^\s+(input|output): (.*)$", line)):
            current[m.group(1)] = [p.strip() for p in m.group(2).split(",")]
        elif current is not None and line.startswith("Shell command: "):
            cmd = line[len("Shell command: "):].strip()
            current["cmd"] = None if cmd == "None" else cmd.replace(SNAKEMAKE_PARAMS, "--params params.yaml")
    jobs.pop("all", None)
    return jobs


def snakefile_param_sections() -> dict[str, set[str]]:
    text = (ROOT / "Snakefile").read_text()
    sections: dict[str, set[str]] = {}
    for block in re.split(r"^rule ", text, flags=re.M)[1:]:
        name = block.split(":", 1)[0].strip()
        sections[name] = set(re.findall(r'=config\["(\w+)"\]', block))
    sections.pop("all", None)
    return sections


def dvc_stages() -> dict[str, dict]:
    from dvc.repo import Repo

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    repo = Repo(str(ROOT))
    stages = {}
    for stage in repo.index.stages:
        stages[stage.name] = {
            "cmd": stage.cmd,
            "deps": [str(Path(d.def_path)) for d in stage.deps if not hasattr(d, "params")],
            "outs": [str(Path(o.def_path)) for o in stage.outs],
            "params": {k for d in stage.deps if hasattr(d, "params") for k in d.params},
        }
    assert params  # the templating above read params.yaml
    return stages


@pytest.fixture(scope="module")
def both() -> tuple[dict, dict]:
    return snakemake_jobs(), dvc_stages()


def test_same_stages(both: tuple[dict, dict]) -> None:
    smk, dvc = both
    assert set(smk) == set(dvc)


def test_same_commands(both: tuple[dict, dict]) -> None:
    smk, dvc = both
    for name in smk:
        assert smk[name]["cmd"] == dvc[name]["cmd"], name


def test_same_outputs_and_data_inputs(both: tuple[dict, dict]) -> None:
    smk, dvc = both
    for name in smk:
        assert set(smk[name]["output"]) == set(dvc[name]["outs"]), name
        data_deps = {d for d in dvc[name]["deps"] if not d.startswith(CODE_PREFIXES)}
        assert set(smk[name]["input"]) == data_deps, name


def test_same_params_sections(both: tuple[dict, dict]) -> None:
    _, dvc = both
    smk_params = snakefile_param_sections()
    for name, sections in smk_params.items():
        assert sections == dvc[name]["params"], name


def test_dvc_declares_each_stage_script(both: tuple[dict, dict]) -> None:
    _, dvc = both
    for name, stage in dvc.items():
        module = re.search(r"python -m stages\.(\w+)", stage["cmd"]).group(1)
        assert f"stages/{module}.py" in stage["deps"], name


def test_snakemake_lint_is_clean() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr


def test_generated_paths_are_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for path in ("/data/", "/outputs/", "/.snakemake/", "/.venv/"):
        assert path in ignored
    assert ".snakemake/" in (ROOT / ".dvcignore").read_text().split()
