"""The tiny preset through a real SLURM cluster: every rule one sbatch job, with profiles/slurm-local.

Needs a SLURM controller that answers (`sudo scripts/slurm_local.sh start` makes a one-node one here,
docs/cluster.md) with a partition `cpu`; skipped with the reason otherwise (CI has no SLURM). Run it with

    python -m pytest tests/test_slurm_cluster.py -m slurm -rs
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_workspace import ROOT, engine_env, run_in, tiny_workspace

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = "profiles/slurm-local"


def cluster_missing() -> str | None:
    """Why no SLURM cluster can take jobs here, or None when sinfo answers within seconds and lists `cpu`."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no SLURM client (sbatch, sinfo) on PATH: start a local cluster with `sudo scripts/slurm_local.sh start`"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 5 s: no SLURM controller (sudo scripts/slurm_local.sh start)"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()[:200]} (sudo scripts/slurm_local.sh start)"
    partitions = {line.split()[0].rstrip("*") for line in out.stdout.splitlines() if line.strip()}
    if "cpu" not in partitions:
        return f"the SLURM cluster has no partition 'cpu' ({', '.join(sorted(partitions))}), which {PROFILE} uses"
    return None


def default_stages() -> set[str]:
    return set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def slurm_workspace(dest: Path) -> Path:
    ws = tiny_workspace(dest)
    shutil.copytree(ROOT / "profiles", ws / "profiles")
    return ws


@pytest.fixture(scope="module")
def cluster() -> None:
    reason = cluster_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_run(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    ws = slurm_workspace(tmp_path_factory.mktemp("slurm") / "ws")
    start = time.monotonic()
    res = run_in(ws, [sys.executable, "-m", "snakemake", "--profile", PROFILE, "--configfile", "configs/tiny.yaml"])
    return ws, res.stdout + res.stderr, time.monotonic() - start


def test_tiny_preset_runs_every_stage_as_a_slurm_job(slurm_run: tuple[Path, str, float]) -> None:
    ws, output, seconds = slurm_run
    stages = default_stages()
    # every stage of the default DAG ran and its log (README: outputs/logs/<rule>.log) ends with 'finished'
    logs = ws / "outputs" / "logs"
    assert {p.stem for p in logs.glob("*.log")} == stages
    for log in logs.glob("*.log"):
        assert " finished " in log.read_text().splitlines()[-1], log.name
    assert (ws / "results" / "report.md").is_file()
    # ... each as its own sbatch job, which the plugin submitted and saw finish
    submitted = dict(re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: .*?/rule_(\w+)/", output))
    assert set(submitted.values()) == stages, output[-3000:]
    slurm_logs = ws / ".snakemake" / "slurm_logs"
    assert {p.name for p in slurm_logs.iterdir()} == {f"rule_{s}" for s in stages}
    for jobid, rule in submitted.items():
        log = slurm_logs / f"rule_{rule}" / f"{jobid}.log"  # kept: slurm-keep-successful-logs
        assert log.is_file(), log
        assert "1 of 1 steps (100%) done" in log.read_text(), log.read_text()[-2000:]
    assert set(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", output)) >= stages
    assert f"{len(stages) + 1} of {len(stages) + 1} steps (100%) done" in output  # + rule all
    print(f"tiny preset through SLURM: {len(submitted)} jobs in {seconds:.0f} s")


def test_a_partition_slurm_lacks_is_named_before_any_job(cluster: None, tmp_path: Path) -> None:
    ws = slurm_workspace(tmp_path / "ws")
    res = subprocess.run([sys.executable, "-m", "snakemake", "--profile", PROFILE, "--configfile", "configs/tiny.yaml",
                          "--set-resources", "train_cls:slurm_partition=nosuch"],
                         cwd=ws, env=engine_env(), capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "SLURM has no partition 'nosuch' (rules: train_cls)" in text, text[-3000:]
    assert re.search(r"Partitions here: .*\bcpu\b", text), text[-3000:]
    assert "has been submitted with SLURM jobid" not in text  # nothing reached sbatch, not even rule data
    assert not (ws / ".snakemake" / "slurm_logs").exists()
    assert not (ws / "outputs" / "logs").exists()


def test_without_the_check_sbatch_itself_names_the_partition(cluster: None, tmp_path: Path) -> None:
    """What a workflow without the Snakefile's check shows: sbatch's refusal, through the plugin."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "Snakefile").write_text('rule all:\n    output: "x"\n    shell: "touch {output}"\n')
    res = subprocess.run([sys.executable, "-m", "snakemake", "--executor", "slurm", "--jobs", "1",
                          "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
                          "--default-resources", "slurm_partition=nosuch"],
                         cwd=ws, env=engine_env(), capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "invalid partition specified: nosuch" in text, text[-3000:]
    assert not (ws / "x").exists()
