"""profiles/slurm: Snakemake accepts it (dry run with the SLURM executor plugin) and routes GPU rules right."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_rules() -> set[str]:
    """Rules of the Snakefile that declare a `gpu` resource: the ones that run a network."""
    text = (ROOT / "Snakefile").read_text()
    return {block.split(":", 1)[0].strip() for block in re.split(r"^rule ", text, flags=re.M)[1:]
            if re.search(r"^\s+gpu=", block, flags=re.M)}


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
