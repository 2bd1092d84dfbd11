"""A fresh clone plans every stage: nothing committed may pass for a pipeline output.

`results/report.md` and friends were once committed: Snakemake took them as up to date on a fresh clone
and ran nothing, and the user read someone else's numbers. This clones the repository as it stands
(working tree included, ignored files excluded: what a commit of it would hold) and asks both engines
what they would run there. Dry runs only: nothing is trained.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_workspace import dvc_repro_plan, dvc_stages

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`git clone` of a commit holding exactly what `git add -A && git commit` would commit here."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    base = tmp_path_factory.mktemp("fresh")
    src = base / "src"
    src.mkdir()
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for name in filter(None, files):
        path = ROOT / name
        if path.is_file() and not path.is_symlink():  # deleted-but-staged files are skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    _git("init", "-q", cwd=src)
    _git("add", "-A", cwd=src)
    _git("commit", "-qm", "working tree", cwd=src)
    dest = base / "clone"
    _git("clone", "-q", str(src), str(dest), cwd=base)
    return dest


def _default_rules(clone: Path) -> set[str]:
    """The stages `dvc repro` runs there, by the name of their declaration (a foreach stage's `train_seg@seg` is
    train_seg): the Snakefile's rule names."""
    return {address.split(":")[-1].split("@")[0] for address in dvc_repro_plan(clone)}


def test_nothing_generated_is_committed(clone: Path) -> None:
    for name in ("data", "outputs", ".snakemake", "dvc.lock", "hosts/dvc.lock"):
        assert not (clone / name).exists(), name
    committed = {p.name for p in (clone / "results").iterdir() if p.is_file()}
    assert not committed & {"report.md", "report.csv", "dataset_samples.png", "eval_seeds.json"}


@pytest.mark.parametrize("configfile", [None, "configs/tiny.yaml", "configs/voc12.yaml", "configs/coco14.yaml",
                                        "configs/embedded_gpu.yaml"])
def test_snakemake_plans_every_rule(clone: Path, configfile: str | None) -> None:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "2"]
    if configfile:
        cmd += ["--configfile", configfile]
    res = subprocess.run(cmd, cwd=clone, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Nothing to be done" not in out
    planned = set(re.findall(r"^(?:local)?rule (\w+):$", out, re.M))
    default = _default_rules(clone)
    assert planned == default | {"all"}, sorted(default ^ (planned - {"all"}))


def test_every_declared_output_is_git_ignored(clone: Path) -> None:
    """What a stage writes must never be committable (DVC caches it instead); results/reference/ is."""
    outs = [out for stage in dvc_stages(clone).values() for out in stage["outs"]]  # metrics and plots too
    res = subprocess.run(["git", "check-ignore", "--no-index", *outs], cwd=clone, capture_output=True, text=True)
    assert set(res.stdout.split()) == set(outs)
    res = subprocess.run(["git", "check-ignore", "--no-index", "results/reference/report.md"], cwd=clone)
    assert res.returncode == 1  # not ignored


def test_dvc_status_lists_every_stage(clone: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    changed = yaml.safe_load(res.stdout)  # JSON is YAML
    stages = set(dvc_stages(clone))  # those off the default path (IRN, AMN) too
    assert "hosts/dvc.yaml:refine_irn@amn" in stages and set(changed) == stages
