"""Subprocess plumbing for the reliability tests: stage CLIs, workspaces, watching and killing processes."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
EPOCHS = 3  # classifier epochs of the stage-CLI tests (three epochs of the tiny preset)


def env(workspace: bool = False) -> dict[str, str]:
    """Environment of every process these tests start.

    One OpenMP thread for whatever runs before a stage applies `run.torch_threads` (the stages then set
    torch's thread count from params, so results do not depend on this environment or on Snakemake's
    OMP_NUM_THREADS). Stage CLIs import cpal from the repository; workspace runs
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


def reproduce_side_by_side(base: Path, timeout: float = 900) -> dict:
    """Two tiny workspaces under ``base`` reproduced by `dvc repro` at the same time, and while the first runs a
    third `dvc repro` tried in it (it must be refused). Returns the workspaces `first` and `second`, the refused
    run's result (`concurrent`) and whether the first was still busy when it was tried (`first_busy`)."""
    from pipeline_workspace import tiny_workspace

    dvc = [PYTHON, "-m", "dvc", "repro"]
    workspaces = {name: tiny_workspace(base / name / "ws") for name in ("first", "second")}
    procs = {}
    for name, ws in workspaces.items():
        with open(ws.parent / "repro.out", "w") as out:  # the child keeps its own copy of the descriptor
            procs[name] = subprocess.Popen(dvc, cwd=ws, env=env(workspace=True), stdout=out, stderr=subprocess.STDOUT)
    first = workspaces["first"]
    wait_for(lambda: (first / "outputs" / "logs" / "train_cls.log").is_file(), timeout, "train_cls to start",
             procs["first"])
    concurrent = subprocess.run(dvc, cwd=first, env=env(workspace=True), capture_output=True, text=True,
                                timeout=timeout)
    first_busy = procs["first"].poll() is None
    for name, proc in procs.items():
        rc = proc.wait(timeout=timeout)
        ws = workspaces[name]
        assert rc == 0, f"dvc repro in {ws} failed:\n{(ws.parent / 'repro.out').read_text()[-4000:]}"
    return {**workspaces, "concurrent": concurrent, "first_busy": first_busy}
