"""The whole tiny DAG under the engines: concurrent runs refused by their locks, a no-op rerun that is fast,
and two runs with the same seed that write byte-identical metrics.

Two DVC workspaces run `dvc repro` side by side (each stage single-threaded, see helpers.env); while the
first runs, a second `dvc repro` in the same workspace must be refused. A Snakemake workspace starts two
runs at the same moment, then a third while the winner works: Snakemake locks the files a run will
write or read (an overlapping second run is refused; every rule reads the dataset, so every target
overlaps a running one). Costs about three tiny-DAG runs.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_workspace import DVC_FILES, dvc_repro_plan, dvc_stages, tiny_workspace

from .helpers import env, wait_for

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TIMEOUT = 900
SECOND_REPRO_LIMIT_S = 3.0


def metrics_files() -> list[str]:
    """Every metrics or plots data file of the stages `dvc repro` runs, timing files and images excluded."""
    stages = dvc_stages()
    return sorted(name for stage in dvc_repro_plan() for name in stages[stage]["metrics"]
                  if "timing" not in Path(name).name and Path(name).suffix in (".json", ".csv"))


def _run(cmd: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(workspace=True), capture_output=True, text=True, timeout=timeout)


def _start(cmd: list[str], cwd: Path, name: str) -> subprocess.Popen:
    with open(cwd.parent / f"{name}.out", "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=cwd, env=env(workspace=True), stdout=out, stderr=subprocess.STDOUT)


def _output(cwd: Path, name: str) -> str:
    return (cwd.parent / f"{name}.out").read_text()


@pytest.fixture(scope="module")
def dvc_runs(dvc_pair: dict) -> dict:
    """Workspaces `first` and `second` reproduced side by side; a concurrent `dvc repro` tried in `first`
    (tests/conftest.py: the end-to-end and remote tests copy them rather than run the DAG again)."""
    return dvc_pair


def test_concurrent_dvc_repro_is_refused(dvc_runs: dict) -> None:
    res = dvc_runs["concurrent"]
    assert dvc_runs["first_busy"], "the first dvc repro had ended before the second was tried"
    assert res.returncode != 0, res.stdout[-2000:]
    text = res.stdout + res.stderr
    assert "is busy, it is being blocked by" in text or "Unable to acquire lock" in text, text[-2000:]
    assert "Running stage" not in text


def test_second_dvc_repro_does_nothing_fast(dvc_runs: dict) -> None:
    ws = dvc_runs["first"]
    start = time.perf_counter()
    res = _run(DVC + ["repro"], ws)
    seconds = time.perf_counter() - start
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Running stage" not in res.stdout
    assert "Data and pipelines are up to date." in res.stdout, res.stdout[-2000:]
    print(f"second dvc repro: {seconds:.2f} s")
    assert seconds < SECOND_REPRO_LIMIT_S, f"a no-op dvc repro took {seconds:.2f} s"


def _without_column(text: str, column: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows and column in rows[0]
    return [{k: v for k, v in row.items() if k != column} for row in rows]


def test_same_seed_gives_byte_identical_metrics(dvc_runs: dict) -> None:
    """Every metrics file of two runs with the same seed, byte for byte.

    results/report.csv holds a `seconds` column (stage wall time from the logs) beside the mIoUs: it is
    compared without that column, and must differ in nothing else.
    """
    first, second = dvc_runs["first"], dvc_runs["second"]
    files = metrics_files()
    assert len(files) >= 10, files  # the default DAG's (IRN's eval_pseudo@irn is off it)
    print("compared:", ", ".join(files))
    for name in files:
        a, b = (first / name).read_bytes(), (second / name).read_bytes()
        if name == "results/report.csv":
            assert _without_column(a.decode(), "seconds") == _without_column(b.decode(), "seconds"), name
        else:
            assert a == b, name


def _cached_outs(ws: Path) -> dict[str, str]:
    """Hash of every output DVC caches (timing files and the machine-stamped results/ excluded), from the lock of
    each DVC file."""
    stages = [stage for path in DVC_FILES for stage in yaml.safe_load((ws / path).with_suffix(".lock").read_text())
              ["stages"].values()]
    return {o["path"]: o["md5"] for stage in stages for o in stage.get("outs", [])
            if "timing" not in o["path"] and not o["path"].startswith("results/")}


def test_same_seed_gives_identical_cached_outputs(dvc_runs: dict) -> None:
    """Beyond metrics: dataset, seeds, label maps byte for byte; checkpoints tensor for tensor."""
    from cpal.core.training import load_checkpoint

    a, b = _cached_outs(dvc_runs["first"]), _cached_outs(dvc_runs["second"])
    assert len(a) >= 10 and a.keys() == b.keys()
    assert {k for k in a if a[k] != b[k] and not k.endswith(".pt")} == set()
    for name in (k for k in a if k.endswith(".pt")):
        _assert_same(load_checkpoint(dvc_runs["first"] / name), load_checkpoint(dvc_runs["second"] / name), name)


def _assert_same(a, b, where: str) -> None:
    import torch

    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}:{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_same_seed_gives_byte_identical_checkpoints(dvc_runs: dict) -> None:
    """Equal weights must give equal bytes, or DVC reruns everything downstream of an unchanged model."""
    a, b = _cached_outs(dvc_runs["first"]), _cached_outs(dvc_runs["second"])
    assert {k for k in a if k.endswith(".pt") and a[k] != b[k]} == set()


# ----------------------------------------------------------------------------------------------
# Snakemake

TARGET = "results/eval_seeds.json"  # data, train_cls, make_seeds, eval_seeds
LOCK_MESSAGE = "Error: Directory cannot be locked."


@pytest.fixture(scope="module")
def snakemake_race(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ws = tiny_workspace(tmp_path_factory.mktemp("smk") / "ws")
    cmd = SNAKEMAKE + ["--cores", "1", TARGET]
    procs = [_start(cmd, ws, "run0"), _start(cmd, ws, "run1")]
    wait_for(lambda: any(p.poll() is not None for p in procs), TIMEOUT, "one of the two runs to end")
    ended = [i for i, p in enumerate(procs) if p.poll() is not None]
    winner = procs[1 - ended[0]] if len(ended) == 1 else None
    third = None
    winner_busy = False
    if winner is not None:
        third = _run(SNAKEMAKE + ["--cores", "1"], ws)  # the whole DAG, while the winner works
        winner_busy = winner.poll() is None
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
    return {"ws": ws, "codes": codes, "outputs": [_output(ws, f"run{i}") for i in range(2)], "third": third,
            "winner_busy": winner_busy}


def test_two_snakemake_runs_started_together_one_is_refused(snakemake_race: dict) -> None:
    codes, outputs = snakemake_race["codes"], snakemake_race["outputs"]
    assert sorted(code == 0 for code in codes) == [False, True], (codes, [o[-2000:] for o in outputs])
    loser = outputs[codes.index(next(c for c in codes if c != 0))]
    assert LOCK_MESSAGE in loser, loser[-2000:]
    assert "rule " not in loser  # refused before any job


def test_snakemake_run_during_another_is_refused(snakemake_race: dict) -> None:
    third = snakemake_race["third"]
    assert third is not None and snakemake_race["winner_busy"], "the winner had ended before the third run"
    assert third.returncode != 0 and LOCK_MESSAGE in third.stdout + third.stderr, third.stderr[-2000:]


def test_the_winner_left_a_complete_valid_result(snakemake_race: dict, dvc_runs: dict) -> None:
    ws = snakemake_race["ws"]
    locks = ws / ".snakemake" / "locks"
    assert not locks.exists() or not any(locks.iterdir()), "the winner left its locks behind"
    dry = _run(SNAKEMAKE + ["-n", "--cores", "1", TARGET], ws)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]
    for name in ("outputs/train_cls/metrics.json", "results/eval_seeds.json", "results/eval_seeds_curve.csv"):
        assert (ws / name).read_bytes() == (dvc_runs["first"] / name).read_bytes(), name


def test_run_lock_taken_by_another_process_refuses_before_any_job(tmp_path: Path) -> None:
    """The deterministic half of the race above: Snakemake's own lock is a check then a write, so two runs
    started at one instant can both pass it (CI saw both run, overwrite each other and fail). The
    Snakefile's onstart flock is what refuses the second; here another process holds it."""
    ws = tiny_workspace(tmp_path / "ws")
    lock = ws / ".snakemake" / "cpal-run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cpal.core.runtime import hold_run_lock; "
         "hold_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(lock)],
        env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _run(SNAKEMAKE + ["--cores", "1", TARGET], ws)
        text = refused.stdout + refused.stderr
        assert refused.returncode != 0 and LOCK_MESSAGE in text, text[-2000:]
        assert f"pid {holder.pid}" in text and "rule " not in text, text[-2000:]
        assert not (ws / "data").exists() and not (ws / "outputs" / "logs").exists()
        dry = _run(SNAKEMAKE + ["-n", "--cores", "1", TARGET], ws)  # planning is never refused
        assert dry.returncode == 0 and "rule data:" in dry.stdout, dry.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    assert _run(SNAKEMAKE + ["--cores", "1", "data"], ws).returncode == 0  # the kernel dropped the lock
