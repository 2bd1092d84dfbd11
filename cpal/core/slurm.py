"""Checks a SLURM run makes before its first sbatch (the Snakefile's onstart, executor `slurm` only).

A partition name the cluster does not have is refused by sbatch only when the first job asking for it is
submitted: with profiles/slurm that is train_cls, after the data stage ran (hours on VOC), and the plugin's
message is one line inside a long sbatch call. Comparing the partitions the run's jobs ask for against
`sinfo` up front names the bad one, and the rules that ask for it, before any job is submitted.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping


class PartitionError(RuntimeError):
    """A job asks for a partition the SLURM cluster does not have; raised before any job is submitted."""


def slurm_partitions(timeout: float = 15.0) -> set[str] | None:
    """The partitions `sinfo -h -o %P` lists (the default one's trailing `*` dropped); None when sinfo is
    missing, fails or does not answer in `timeout` seconds (then sbatch's own error is what the user sees)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()}


def check_partitions(requested: Mapping[str, str | None], available: Iterable[str]) -> None:
    """Raise PartitionError naming every partition in ``requested`` (rule -> slurm_partition; None: the
    cluster's default) that is not in ``available``, with the rules asking for it and the ones that exist."""
    available = set(available)
    missing: dict[str, list[str]] = {}
    for rule, partition in sorted(requested.items()):
        if partition not in (None, "") and str(partition) not in available:
            missing.setdefault(str(partition), []).append(rule)
    if missing:
        lines = [f"partition '{p}' (rules: {', '.join(rules)})" for p, rules in sorted(missing.items())]
        raise PartitionError(
            "SLURM has no " + "; no ".join(lines) + f". Partitions here: {', '.join(sorted(available)) or 'none'}"
            " (sinfo -s). Set slurm_partition in your profile's default-resources / set-resources, or"
            " --default-resources slurm_partition=<name>. Nothing was submitted.")


def check_job_partitions(jobs: Iterable) -> None:
    """check_partitions for the jobs of a run that go to sbatch (Snakemake jobs: `.rule.name`, `.resources`;
    local and no-run jobs such as `all` are skipped); no check when sinfo does not answer."""
    requested = {job.rule.name: job.resources.get("slurm_partition") for job in jobs
                 if not getattr(job, "is_local", False) and not getattr(job, "is_norun", False)}
    if not any(requested.values()):
        return
    available = slurm_partitions()
    if available is not None:
        check_partitions(requested, available)
