"""The Snakefile and the DVC files (dvc.yaml, hosts/dvc.yaml) describe the same DAG: the same jobs, commands,
inputs, outputs and params sections, each stage module declared once per engine, the same default path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_workspace import DVC_FILES, dvc_repro_plan, dvc_stages, engine_env, tiny_workspace

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE_PARAMS = "--params outputs/params.snakemake.yaml"  # the Snakefile's written merged config
CODE_PREFIXES = ("stages/", "cpal/")
# Every branch output: with `all`, every job the pipeline has (the IRN branch on the classifier's maps, AMN's).
BRANCH_TARGETS = ("results/eval_irn.json", "results/eval_amn_seeds.json", "results/eval_amn_crf.json",
                  "results/eval_amn_irn.json")
MAX_PIPELINE_LINES = 800  # Snakefile, any rules/*.smk and the DVC files, together


def snakemake_jobs(*targets: str, extra: tuple[str, ...] = (), cwd: Path = ROOT) -> dict[frozenset, dict]:
    """Outputs -> rule, command, inputs of each job of a forced dry run with printed shell commands (default
    targets: every job, the IRN and AMN branches included)."""
    targets = targets or ("all", *BRANCH_TARGETS)
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-F", "--cores", "2", *targets, *extra],
        cwd=cwd, capture_output=True, text=True, check=True, env=engine_env(),
    ).stdout
    jobs: list[dict] = []
    for line in out.splitlines():
        if m := re.match(r"^rule (\w+):$", line):
            jobs.append({"rule": m.group(1), "input": [], "output": [], "cmd": None})
        elif jobs and (m := re.match(r"^\s+(input|output): (.*)$", line)):
            jobs[-1][m.group(1)] = [p.strip() for p in m.group(2).split(",")]
        elif jobs and line.startswith("Shell command: "):
            cmd = line[len("Shell command: "):].strip()
            jobs[-1]["cmd"] = None if cmd == "None" else cmd.replace(SNAKEMAKE_PARAMS, "--params params.yaml")
    return {frozenset(job["output"]): job for job in jobs if job["rule"] != "all"}


def dvc_plan(cwd: Path, *targets: str) -> set[frozenset]:
    """The outputs of every stage `dvc repro [targets]` runs (default target: the root dvc.yaml)."""
    stages = dvc_stages(cwd)
    return {frozenset(stages[name]["outs"]) for name in dvc_repro_plan(cwd, *targets)}


def module_of(cmd: str) -> str:
    return re.search(r"python -m stages\.(\w+)", cmd).group(1)


def snakefile_rules() -> dict[str, str]:
    """Rule name -> its text, from the Snakefile and any included rules/*.smk."""
    text = "\n".join(p.read_text() for p in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))])
    return {block.split(":", 1)[0].strip(): block for block in re.split(r"^rule ", text, flags=re.M)[1:]}


def snakefile_param_sections() -> dict[str, set[str]]:
    """Rule -> the params.yaml sections (`irn`) and section keys (`irn.beta`) it declares with sections(...), for
    all its jobs alike; a keyword argument names a tuple of keys the Snakefile defines."""
    text = (ROOT / "Snakefile").read_text()
    found = {}
    for name, block in snakefile_rules().items():
        call = re.search(r"\*\*sections\(([^)]*)\)", block)
        found[name] = set(re.findall(r'"(\w+)"', call.group(1))) if call else set()
        for section, constant in re.findall(r"(\w+)=(\w+)", call.group(1) if call else ""):
            keys = re.search(rf"^{constant} = \(([^)]*)\)", text, flags=re.M).group(1)
            found[name] |= {f"{section}.{key}" for key in re.findall(r'"(\w+)"', keys)}
    return found


@pytest.fixture(scope="module")
def both() -> tuple[dict, dict]:
    dvc = {frozenset(stage["outs"]): stage for stage in dvc_stages().values()}
    return snakemake_jobs(), dvc


def test_same_jobs(both: tuple[dict, dict]) -> None:
    smk, dvc = both
    assert set(smk) == set(dvc)
    for outs, job in smk.items():
        assert module_of(job["cmd"]) == module_of(dvc[outs]["cmd"]) == job["rule"], sorted(outs)


def test_same_commands(both: tuple[dict, dict]) -> None:
    smk, dvc = both
    for outs, job in smk.items():
        assert job["cmd"] == dvc[outs]["cmd"], sorted(outs)


def test_same_outputs_and_data_inputs(both: tuple[dict, dict]) -> None:
    smk, dvc = both
    for outs, job in smk.items():
        data_deps = {d for d in dvc[outs]["deps"] if not d.startswith(CODE_PREFIXES)}
        assert set(job["input"]) == data_deps, sorted(outs)


def test_same_params_sections(both: tuple[dict, dict]) -> None:
    smk, dvc = both
    sections = snakefile_param_sections()
    for outs, job in smk.items():
        assert sections[job["rule"]] == dvc[outs]["params"], sorted(outs)


def test_the_irn_stages_declare_the_keys_their_code_reads() -> None:
    """Per-key params for IRN (a walk setting does not retrain the boundary network): the keys each rule declares
    are the tuple its code fingerprints its work with."""
    from cpal.irn.labels import LABEL_KEYS
    from cpal.irn.refine import REFINE_KEYS
    from cpal.irn.train import TRAIN_KEYS

    declared = snakefile_param_sections()
    for rule, keys in (("ir_labels", LABEL_KEYS), ("train_irn", TRAIN_KEYS), ("refine_irn", REFINE_KEYS)):
        assert {k.split(".", 1)[1] for k in declared[rule] if k.startswith("irn.")} == set(keys), rule
        assert "irn" not in declared[rule], rule


def test_each_stage_module_is_declared_once_per_engine() -> None:
    """A stage that runs on several hosts' maps, or on ground truth, is one rule with a wildcard and one DVC
    stage with foreach: no module is named by two Snakemake rules or two DVC declarations."""
    rules: dict[str, list[str]] = {}
    for name, block in snakefile_rules().items():
        if m := re.search(r"python -m stages\.(\w+)", block):
            rules.setdefault(m.group(1), []).append(name)
    declared: dict[str, list[str]] = {}
    for path in DVC_FILES:
        for name, stage in yaml.safe_load((ROOT / path).read_text())["stages"].items():
            declared.setdefault(module_of((stage.get("do") or stage)["cmd"]), []).append(f"{path}:{name}")
    modules = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__", "common"}
    assert set(rules) == set(declared) == modules
    assert all(len(names) == 1 for names in rules.values()), rules
    assert all(len(names) == 1 for names in declared.values()), declared
    assert all(rules[module] == [module] for module in rules), rules  # each rule is named after its module


def test_pipeline_files_stay_short() -> None:
    files = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk")), *(ROOT / p for p in DVC_FILES)]
    lines = sum(len(f.read_text().splitlines()) for f in files)
    assert lines <= MAX_PIPELINE_LINES, f"{lines} lines in {', '.join(str(f.relative_to(ROOT)) for f in files)}"


def test_dvc_declares_each_stage_script(both: tuple[dict, dict]) -> None:
    _, dvc = both
    for stage in dvc.values():
        assert f"stages/{module_of(stage['cmd'])}.py" in stage["deps"], stage["name"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline in a git + DVC repository of its own, whose params.yaml a test may edit."""
    return tiny_workspace(tmp_path_factory.mktemp("engines") / "ws")


def _with_source(ws: Path, source: str) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["pseudo"]["source"] = source
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_both_engines_run_the_same_default_path(workspace: Path) -> None:
    """`snakemake` and `dvc repro` without targets plan the same jobs: the classifier's maps through the CRF and
    DeepLab, with neither branch."""
    _with_source(workspace, "crf")
    default = set(snakemake_jobs("all", cwd=workspace))
    assert dvc_plan(workspace) == default
    rules = {job["rule"] for job in snakemake_jobs("all", cwd=workspace).values()}
    assert {"ir_labels", "train_irn", "refine_irn", "train_amn", "make_amn_seeds"}.isdisjoint(rules)
    outputs = {path for outs in default for path in outs}
    assert {"results/eval_crf.json", "results/eval_seg_full.json", "results/report.md"} <= outputs
    assert not any("irn" in path or "amn" in path for path in outputs)


@pytest.mark.parametrize(("source", "branch"), [
    ("irn", {"outputs/irn/ir_labels", "outputs/irn/model.pt", "outputs/irn/maps"}),
    ("amn_crf", {"outputs/irn/ir_labels", "outputs/amn/model.pt", "outputs/amn/maps", "outputs/amn_crf/maps"}),
    ("amn_irn", {"outputs/amn/maps", "outputs/amn_irn/ir_labels", "outputs/amn_irn/model.pt",
                 "outputs/amn_irn/maps"}),
])
def test_pseudo_source_switches_its_branch_on_in_both_engines(workspace: Path, source: str, branch: set[str]) -> None:
    """pseudo.source naming a branch's maps makes pseudo_labels need them: both engines then run that branch's
    stages up to those maps (not its evaluations), and no other branch."""
    _with_source(workspace, source)
    planned = set(snakemake_jobs("all", cwd=workspace))
    assert dvc_plan(workspace) == planned
    outputs = {path for outs in planned for path in outs}
    assert branch <= outputs
    assert not {"results/eval_irn.json", "results/eval_amn_crf.json", "results/eval_amn_irn.json"} & outputs
    if source != "amn_irn":
        assert "outputs/amn_irn/maps" not in outputs
    if not source.startswith("amn"):
        assert "outputs/amn/maps" not in outputs


def test_a_branch_target_runs_that_branch_only(workspace: Path) -> None:
    """Asked for by a target (Snakemake: its output; DVC: its stage), a branch runs with what it needs: AMN's
    second pass needs the classifier's IR labels (AMN trains on them), not its IRN."""
    _with_source(workspace, "crf")
    planned = set(snakemake_jobs("results/eval_amn_irn.json", cwd=workspace))
    assert dvc_plan(workspace, "hosts/dvc.yaml:eval_pseudo@amn_irn") == planned
    outputs = {path for outs in planned for path in outs}
    assert {"outputs/irn/ir_labels", "outputs/amn/maps", "outputs/amn_irn/maps"} <= outputs
    assert not {"outputs/irn/model.pt", "outputs/crf/maps", "outputs/seg/model.pt"} & outputs


def test_an_unknown_host_is_refused_before_any_job_naming_the_hosts() -> None:
    for target in ("results/eval_foo_crf.json", "results/eval_foo_seeds.json", "outputs/foo_irn/maps"):
        res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", target], cwd=ROOT,
                             capture_output=True, text=True, env=engine_env())
        assert res.returncode != 0, target
        assert "no host writes outputs with the prefix 'foo_'; the hosts are cls (no prefix), amn (amn_)" in \
            res.stdout + res.stderr, target


def test_an_unknown_pseudo_source_is_refused_naming_the_sources(tmp_path: Path, default_params: dict) -> None:
    """pseudo.source is how params switch a branch on: a map no host makes stops both engines' params check
    (Snakemake's at parse time, each stage's before any work), naming the sources there are."""
    from cpal.core.config import ParamsError, validate_params

    allowed = "'foo_crf' is not one of ['seeds', 'crf', 'irn', 'amn_crf', 'amn_irn']"
    default_params["pseudo"]["source"] = "foo_crf"
    with pytest.raises(ParamsError, match=re.escape(f"pseudo.source = 'foo_crf' is invalid: {allowed}")):
        validate_params(default_params)
    override = tmp_path / "bad.yaml"
    override.write_text("pseudo:\n  source: foo_crf\n")
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(override)],
                         cwd=ROOT, capture_output=True, text=True, env=engine_env())
    assert res.returncode != 0 and allowed in res.stdout + res.stderr and "Nothing to be done" not in res.stdout


def test_every_host_map_can_feed_the_pseudo_masks(both: tuple[dict, dict]) -> None:
    """pseudo.source allows the classifier's seeds and exactly the maps eval_pseudo scores (each host's CRF and
    IRN maps): a new host's maps become a source with it."""
    from cpal.core.config import load_schema
    from cpal.pseudo.labels import SOURCES

    _, dvc = both
    scored = {s["name"].split("@")[1] for s in dvc.values() if s["name"].startswith("eval_pseudo@")} - {"pseudo"}
    schema = load_schema()["properties"]["pseudo"]["properties"]["source"]["enum"]
    assert set(schema) == set(SOURCES) == {"seeds"} | scored


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
