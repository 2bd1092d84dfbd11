"""profiles/slurm: Snakemake accepts it (dry run with the SLURM executor plugin) and routes GPU rules right;
profiles/slurm-local stays in step with it; the Snakefile's partition check (cpal/core/slurm.py). Running the
DAG on a real cluster: tests/test_slurm_cluster.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cpal.core.slurm import PartitionError, check_job_partitions, check_partitions, slurm_partitions

ROOT = Path(__file__).resolve().parents[1]


def gpu_rules() -> set[str]:
    """Rules of the Snakefile that declare a `gpu` resource: the ones that run a network."""
    text = (ROOT / "Snakefile").read_text()
    return {block.split(":", 1)[0].strip() for block in re.split(r"^rule ", text, flags=re.M)[1:]
            if re.search(r"^\s+resources:.*\bgpu=", block, flags=re.M)}


def test_slurm_profile_dry_run_routes_gpu_rules_to_the_gpu_partition() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-F", "all", "results/eval_irn.json", "results/eval_amn_seeds.json",
         "results/eval_amn_crf.json", "results/eval_amn_irn.json", "--profile", "profiles/slurm"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    text = out.stdout + out.stderr
    assert "Using profile profiles/slurm" in text
    resources: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^rule (\w+):$", line):
            current = m.group(1)
        elif current and (m := re.match(r"^\s+resources: (.*)$", line)):
            resources[current] = m.group(1)
    gpu = gpu_rules()
    assert gpu >= {"train_cls", "make_seeds", "train_seg"}
    assert set(resources) >= gpu, "the dry run did not list every rule"
    for rule, res in resources.items():
        if rule == "all":
            continue
        want = "gpu" if rule in gpu else "cpu"
        assert f"slurm_partition={want}" in res, f"{rule}: {res}"
        assert ("gpu=1" in res) == (rule in gpu), f"{rule}: {res}"


def test_profile_names_only_existing_rules() -> None:
    import yaml

    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    text = (ROOT / "Snakefile").read_text()
    rules = set(re.findall(r"^rule (\w+):", text, flags=re.M))
    named = set(profile["set-resources"]) | set(profile["set-threads"])
    assert named <= rules, f"profile names unknown rules: {named - rules}"
    assert profile["executor"] == "slurm"


# profiles/slurm-local: the same profile for a small cluster (scripts/slurm_local.sh: one node, 2 CPUs, no GPU).
LOCAL_CPUS = 2
LOCAL_MAX_MEM_MB = 8000


def _profile(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def test_local_profile_stays_in_step_with_the_cluster_profile() -> None:
    """Profiles cannot inherit: slurm-local is a full copy, so it must name the same rules and override the
    same keys as profiles/slurm (a rule added there is added here), with numbers a 2-CPU node without GPU
    can give."""
    real, local = _profile("slurm"), _profile("slurm-local")
    assert local["executor"] == real["executor"] == "slurm"
    assert set(local["set-threads"]) == set(real["set-threads"])
    assert set(local["set-resources"]) == set(real["set-resources"])
    for rule, resources in real["set-resources"].items():
        assert set(local["set-resources"][rule]) == set(resources), rule
    assert set(local["default-resources"]) == set(real["default-resources"])
    for rule, threads in local["set-threads"].items():
        assert 1 <= threads <= LOCAL_CPUS, rule
    for rule, resources in [("default", local["default-resources"]), *local["set-resources"].items()]:
        assert resources.get("slurm_partition", "cpu") == "cpu", rule
        assert resources.get("gpu", 0) == 0, rule
        assert resources.get("mem_mb", 0) <= LOCAL_MAX_MEM_MB, rule
    # no slurmdbd on the local cluster: job states from squeue, the logs kept for the test and the user
    assert local["slurm-status-command"] == "squeue"
    assert local["slurm-keep-successful-logs"] is True


def test_local_profile_dry_run_puts_every_rule_on_the_cpu_partition() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-F", "all", "results/eval_irn.json", "results/eval_amn_irn.json",
         "--profile", "profiles/slurm-local"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    text = out.stdout + out.stderr
    assert "Using profile profiles/slurm-local" in text
    rules = re.findall(r"^rule (\w+):$", text, flags=re.M)
    resources = re.findall(r"^\s+resources: (.*)$", text, flags=re.M)
    assert len(rules) == len(resources) and {"train_cls", "train_seg", "train_amn"} <= set(rules)
    for rule, res in zip(rules, resources, strict=True):
        assert "slurm_partition=cpu" in res and "gpu=1" not in res, f"{rule}: {res}"


def test_partition_check_names_the_missing_partition_and_its_rules() -> None:
    check_partitions({"data": "cpu", "train_cls": "gpu", "report": None}, {"cpu", "gpu"})
    with pytest.raises(PartitionError) as err:
        check_partitions({"data": "cpu", "train_cls": "gpu-a100", "train_seg": "gpu-a100", "eval_seg": "gpu"},
                         {"cpu", "gpu"})
    msg = str(err.value)
    assert "SLURM has no partition 'gpu-a100' (rules: train_cls, train_seg)" in msg
    assert "Partitions here: cpu, gpu" in msg and "Nothing was submitted" in msg


def test_partition_check_is_skipped_without_sinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo: nothing to compare with, sbatch will say
    assert slurm_partitions() is None
    job = SimpleNamespace(rule=SimpleNamespace(name="train_cls"), resources={"slurm_partition": "nosuch"},
                          is_local=False, is_norun=False)
    check_job_partitions([job])
    fake = tmp_path / "sinfo"
    fake.write_text("#!/bin/sh\nprintf 'cpu*\\ngpu\\n'\n")
    fake.chmod(0o755)
    assert slurm_partitions() == {"cpu", "gpu"}
    with pytest.raises(PartitionError, match="no partition 'nosuch' \\(rules: train_cls\\)"):
        check_job_partitions([job])
    norun = SimpleNamespace(rule=SimpleNamespace(name="all"), resources={"slurm_partition": "nosuch"},
                            is_local=False, is_norun=True)
    check_job_partitions([norun])  # `all` is never submitted
