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


BRANCH_IRN = {"ir_labels", "train_irn", "refine_irn", "eval_irn"}  # off the default path (branches/irn/dvc.yaml)
BRANCH_AMN = {"train_amn", "make_amn_seeds", "eval_amn_seeds", "refine_amn_crf", "eval_amn_crf",  # branches/amn
              "amn_ir_labels", "train_amn_irn", "refine_amn_irn", "eval_amn_irn"}


def snakemake_jobs(*targets: str, extra: tuple[str, ...] = ()) -> dict[str, dict]:
    """Rule name -> command, inputs, outputs, from a forced dry run with printed shell commands (default
    targets: every rule, the IRN and AMN branches included)."""
    targets = targets or ("all", "results/eval_irn.json", "results/eval_amn_seeds.json", "results/eval_amn_crf.json",
                          "results/eval_amn_irn.json")
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-F", "--cores", "2", *targets, *extra],
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


def test_irn_branch_runs_only_when_asked_for_or_needed(tmp_path: Path) -> None:
    default = snakemake_jobs("all")
    assert BRANCH_IRN.isdisjoint(default) and {"refine_crf", "train_seg", "report"} <= set(default)
    override = tmp_path / "irn.yaml"
    override.write_text("pseudo:\n  source: irn\n")
    needed = snakemake_jobs("all", extra=("--configfile", str(override)))
    assert BRANCH_IRN - {"eval_irn"} <= set(needed)  # pseudo_labels reads outputs/irn/maps
    root_stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    branch_stages = set(yaml.safe_load((ROOT / "branches" / "irn" / "dvc.yaml").read_text())["stages"])
    assert branch_stages == BRANCH_IRN and root_stages.isdisjoint(BRANCH_IRN)


def test_amn_branch_runs_only_when_asked_for_or_needed(tmp_path: Path) -> None:
    default = snakemake_jobs("all")
    assert BRANCH_AMN.isdisjoint(default)
    asked = snakemake_jobs("results/eval_amn_seeds.json")
    assert {"ir_labels", "train_amn", "make_amn_seeds", "eval_amn_seeds"} <= set(asked)
    override = tmp_path / "amn.yaml"
    override.write_text("pseudo:\n  source: amn_crf\n")
    needed = snakemake_jobs("all", extra=("--configfile", str(override)))
    assert {"ir_labels", "train_amn", "make_amn_seeds", "refine_amn_crf"} <= set(needed)  # pseudo_labels reads them
    assert {"amn_ir_labels", "train_amn_irn", "refine_amn_irn"}.isdisjoint(needed)
    override.write_text("pseudo:\n  source: amn_irn\n")  # AMN's second pass: its maps -> IR labels -> IRN
    needed = snakemake_jobs("all", extra=("--configfile", str(override)))
    assert {"ir_labels", "train_amn", "make_amn_seeds", "amn_ir_labels", "train_amn_irn", "refine_amn_irn"} <= set(
        needed)
    assert "outputs/amn/maps" in needed["amn_ir_labels"]["input"]  # AMN's maps, not the classifier's
    branch_stages = set(yaml.safe_load((ROOT / "branches" / "amn" / "dvc.yaml").read_text())["stages"])
    root_stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert branch_stages == BRANCH_AMN and root_stages.isdisjoint(BRANCH_AMN)


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
