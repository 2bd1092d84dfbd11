"""Subprocess plumbing for the reliability tests: stage CLIs, workspaces, watching and killing processes."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
EPOCHS = 3  # classifier epochs of the stage-CLI tests (issue 8: three epochs of the tiny preset)
PIPELINE_FILES = ["Snakefile", "dvc.yaml", ".dvcignore", ".gitignore", "environment.yml", "cpal", "stages", "configs"]


def env(workspace: bool = False) -> dict[str, str]:
    """Environment of every process these tests start.

    One intra-op thread: CPU results depend on the thread count (same seed, 1 vs 2 threads gives
    different metrics), and on a loaded 2-core machine two spinning OpenMP threads run training
    up to 50x slower than one. Snakemake sets OMP_NUM_THREADS itself (to the rule's threads, at most
    --cores), so its runs use `--cores 1`. Stage CLIs import cpal from the repository; workspace runs
    (Snakemake, DVC) import it from the workspace copy.
    """
    out = dict(os.environ)
    out["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{out.get('PATH', '')}"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        out[var] = "1"
    if workspace:
        out.pop("PYTHONPATH", None)
    else:
        out["PYTHONPATH"] = str(ROOT)
    return out


def write_params(path: Path, params: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_cmd(stage: str, *args: str | os.PathLike[str]) -> list[str]:
    return [PYTHON, "-m", f"stages.{stage}", *map(str, args)]


def run_stage(stage: str, *args: str | os.PathLike[str], cwd: Path, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    """A stage CLI as the engines run it (cwd outside the repository: no stray files in it)."""
    return subprocess.run(stage_cmd(stage, *args), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def check(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"{' '.join(map(str, res.args))} failed ({res.returncode}):\n{res.stderr[-4000:]}"
    return res


def workspace(dest: Path) -> Path:
    """A git repository holding the pipeline with configs/tiny.yaml as params.yaml (as test_pipeline_e2e)."""
    dest.mkdir(parents=True)
    for name in PIPELINE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    shutil.copy2(ROOT / "configs" / "tiny.yaml", dest / "params.yaml")
    (dest / ".dvc").mkdir()
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env(workspace=True), capture_output=True)
    return dest


def wait_for(condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
             interval: float = 0.02) -> None:
    """Poll `condition`; fail naming `what` on timeout or when `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


TQDM = re.compile(r"epoch (?P<epoch>\d+)/\d+:\s+\d+%\|[^|\n]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


def kill_on_progress(proc: subprocess.Popen, epoch: int, timeout: float = 240) -> str:
    """SIGKILL `proc` as soon as its tqdm bar (stderr) shows a finished step of `epoch` with steps left.

    Returns the stderr read so far. The kill lands mid-epoch: after at least one optimiser step of the
    epoch and before its last one (callers check the resume checkpoint to prove it).
    """
    fd = proc.stderr.fileno()
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"process ended (rc {proc.wait()}) before epoch {epoch} progress:\n{text[-3000:]}")
        text += chunk.decode(errors="replace")
        for m in TQDM.finditer(text.replace("\r", "\n")):
            if int(m["epoch"]) == epoch and 0 < int(m["n"]) < int(m["total"]):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return text
    proc.kill()
    raise AssertionError(f"no progress of epoch {epoch} within {timeout} s:\n{text[-3000:]}")
