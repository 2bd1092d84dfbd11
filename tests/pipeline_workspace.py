"""A throwaway git repository holding the pipeline with configs/tiny.yaml as params.yaml.

Shared by the end-to-end tests (tests/test_pipeline_e2e.py) and the fault-injection tests
(tests/reliability/); pytest puts tests/ on sys.path, so both import it as `pipeline_workspace`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The DVC pipeline files: the default path's own stages, and those that run on a host's seed maps.
DVC_FILES = ("dvc.yaml", "hosts/dvc.yaml")
PIPELINE_FILES = ["Snakefile", "dvc.yaml", "hosts", ".dvcignore", ".gitignore", "environment.yml", "cpal", "stages",
                  "configs", "report"]


def tiny_workspace(dest: Path) -> Path:
    """Copy the pipeline into `dest`, tiny preset as params.yaml, .dvc/ as committed, one git commit."""
    dest.mkdir(parents=True)
    for name in PIPELINE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    shutil.copy2(ROOT / "configs" / "tiny.yaml", dest / "params.yaml")
    (dest / ".dvc").mkdir()
    # config, and .gitignore as the repository commits it (keeps .dvc/config.local, the cache and tmp out of git)
    for name in ("config", ".gitignore"):
        shutil.copy2(ROOT / ".dvc" / name, dest / ".dvc" / name)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def copy_workspace(src: Path, dest: Path) -> Path:
    """A finished workspace copied whole (git history, DVC cache, outputs, locks) to work on without touching
    it. DVC's state database (.dvc/tmp) stays behind: it keys file hashes by inode, which a copy changes."""
    shutil.copytree(src, dest, symlinks=True, ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc"
                    else [])
    return dest


def engine_env() -> dict[str, str]:
    """The environment the engines run in: this Python's bin first, no PYTHONPATH (stages must import cpal from
    the workspace itself), a git identity for `dvc exp run`'s commits."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    for who in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{who}_NAME", "t")
        env.setdefault(f"GIT_{who}_EMAIL", "t@t")
    return env


def run_in(ws: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    """Run an engine command in ``ws``; a failure shows the end of its output."""
    res = subprocess.run(cmd, cwd=ws, env=engine_env(), capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def dvc_stages(root: Path = ROOT) -> dict[str, dict]:
    """Every DVC stage of the pipeline in ``root`` as DVC resolves it (a foreach stage's items one by one, named
    ``stage@item``; ${...} filled in from params.yaml), by the address DVC's commands take and print (`train_seg@seg`,
    `hosts/dvc.yaml:eval_seeds@cls`): its name, file, cmd, deps (paths), params (section names), outs (its outs,
    metrics and plots) and metrics (its metrics and plots)."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            file = os.path.relpath(stage.path, repo.root_dir)
            stages[stage.name if file == "dvc.yaml" else f"{file}:{stage.name}"] = {
                "name": stage.name, "file": file, "cmd": stage.cmd,
                "deps": [str(Path(d.def_path)) for d in stage.deps if not hasattr(d, "params")],
                "params": {k for d in stage.deps if hasattr(d, "params") for k in d.params},
                "outs": [str(Path(o.def_path)) for o in stage.outs],
                "metrics": [str(Path(o.def_path)) for o in stage.outs if o.metric or o.plot]}
    return stages


def dvc_repro_plan(root: Path = ROOT, *targets: str) -> list[str]:
    """The stages `dvc repro [targets]` runs in ``root`` (without targets: the root dvc.yaml's and the stages they
    need), by address, from a forced dry run: nothing runs."""
    out = subprocess.run([sys.executable, "-m", "dvc", "repro", "--dry", "-f", *targets], cwd=root,
                         capture_output=True, text=True, check=True, env=engine_env()).stdout
    return re.findall(r"^Running stage '([\w/.:@]+)':", out, flags=re.M)
