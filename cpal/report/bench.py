"""Benchmarks as DVC experiments: a benchmark is a YAML file of param overrides (its columns) run over several
`run.seed`s; each (column, seed) is one `dvc exp run --temp` named `<benchmark>-<column>-s<seed>`.

Why experiments rather than copies of the tree: each runs this repository's pipeline (HEAD plus the
uncommitted changes to tracked files) in a folder DVC makes and removes, so the workspace is untouched;
DVC's run-cache restores every stage whose command, deps and params an earlier run already had (the dataset,
a classifier several columns share), so a column costs only the stages it changes; and an experiment already
recorded with its params and every metric the benchmark reads is not run again, so an interrupted benchmark
resumes where it stopped. The table reads only what the experiments recorded (`dvc exp show`), each number
vouched for by its experiment's dvc.lock as in cpal-compare (cpal.report.experiments).

    cpal-bench run benchmarks/chain.yaml             # run what is missing, then write the table
    cpal-bench run benchmarks/chain.yaml --dry-run   # validate every experiment and list them, run nothing
    cpal-bench table benchmarks/chain.yaml           # the table alone, from what is recorded

A benchmark file holds: `title`, `about` (what the reader should know), `out` (the results stem: writes
STEM.md, STEM.csv, STEM.png), `seeds` (values of run.seed), `targets` (the DVC stages to reproduce), `base`
(overrides for every column, optional), `columns` (name -> overrides), `metrics` (labels of METRICS, the rows),
and optionally `pairs` ([column a, column b]: a - b paired by seed), `gains` ([metric a, metric b]: a - b within
each column, paired by seed: what a step of the chain adds), `ratios` ([metric a, metric b]) and `goals`: {pair:
[column a, column b], metric: m, at_least: x} (the paired gain a - b on m) or {gain: [metric a, metric b], column:
c, at_most: x} (the step a - b in column c), each met when its mean over the seeds is >= x (at_least) or <= x
(at_most). Top-level keys starting `x-` only hold YAML anchors the columns share.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cpal.core.config import ParamsError, load_params, load_yaml, merge, validate_params
from cpal.core.io import atomic_path, write_text
from cpal.core.runtime import machine_description
from cpal.report.experiments import (
    METRICS,
    PARAMS_FILE,
    Metric,
    exp_rows,
    experiment_table,
    flatten,
    git_lock_reader,
    keep_notes,
    run_exp_show,
    save_with_footer,
)

# The timing file of each stage that writes one (a DVC metric): its seconds and, as `peak_rss_mib`, its peak
# resident memory (stages.common.write_timing; cpal.core.training.timing_summary for the training stages).
TIMING_FILES = {
    "train_cls": "outputs/train_cls/timing.json", "make_seeds": "outputs/seeds/timing.json",
    "refine_crf": "outputs/crf/timing.json", "train_irn": "outputs/irn/timing.json",
    "refine_irn": "outputs/irn/refine_timing.json", "train_amn": "outputs/amn/timing.json",
    "make_amn_seeds": "outputs/amn/seed_timing.json", "train_seg": "outputs/seg/timing.json",
}
# What a benchmark can tabulate: the pipeline's headline numbers, plus seed-map figures and costs (`s_` seconds,
# `mib_` peak resident memory in MiB).
BENCH_METRICS: tuple[Metric, ...] = METRICS + (
    Metric("seeds", "results/eval_seeds.json", ("pacam", "miou"), alt=("cam", "miou")),
    Metric("seeds_own_bg", "results/eval_seeds.json", ("pacam_argmax", "miou")),
    Metric("s_train_cls_epoch", TIMING_FILES["train_cls"], ("seconds_per_epoch",), scale=1.0),
    Metric("s_make_seeds", TIMING_FILES["make_seeds"], ("seconds",), scale=1.0),
    Metric("s_refine_crf", TIMING_FILES["refine_crf"], ("wall_seconds",), scale=1.0),
    Metric("s_train_seg", TIMING_FILES["train_seg"], ("total_seconds",), scale=1.0),
) + tuple(Metric(f"mib_{stage}", path, ("peak_rss_mib",), scale=1.0) for stage, path in TIMING_FILES.items())
BY_LABEL = {m.label: m for m in BENCH_METRICS}
SPEC_KEYS = {"title", "about", "out", "seeds", "targets", "base", "columns", "metrics", "pairs", "gains", "ratios",
             "goals"}
BOUNDS = ("at_least", "at_most")
REQUIRED = {"title", "out", "seeds", "targets", "columns", "metrics"}
NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class BenchError(ValueError):
    """A benchmark file that cannot run: the message names the key or override at fault."""


@dataclass(frozen=True)
class Goal:
    """A gain the benchmark promises to report against, paired by seed: column a minus column b on `metric`,
    or (`column` set) metric a minus metric b within that column; met when the mean is on the bound's side."""
    a: str
    b: str
    metric: str | None
    column: str | None
    bound: float
    at_most: bool = False

    def gains(self, done: pd.DataFrame) -> np.ndarray:
        if self.column is not None:
            return _within(done, self.column, self.a, self.b)
        return _paired(done, self.a, self.b, self.metric)

    def what(self) -> str:
        return f"{self.column}: {self.a} minus {self.b}" if self.column else f"{self.a} minus {self.b}, {self.metric}"

    def rule(self) -> str:
        return f"goal {'<=' if self.at_most else '>='} {self.bound:+.1f}"

    def met(self, mean: float) -> bool:
        return mean <= self.bound if self.at_most else mean >= self.bound


@dataclass(frozen=True)
class Spec:
    name: str
    path: Path
    title: str
    about: str
    out: Path
    seeds: tuple[int, ...]
    targets: tuple[str, ...]
    base: dict[str, Any]
    columns: dict[str, dict[str, Any]]
    metrics: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    ratios: tuple[tuple[str, str], ...]
    goals: tuple[Goal, ...] = ()
    gains: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Experiment:
    name: str
    column: str
    seed: int
    overrides: dict[str, Any]  # flat `section.key` -> value, as `dvc exp run -S` takes them
    params: dict[str, Any]  # the whole params.yaml the experiment runs with (validated)


def load_spec(path: Path) -> Spec:
    """Read and check a benchmark file (structure only; the params each column gives are checked by
    `experiments`)."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"benchmark file not found: {path}") from None
    where = path.as_posix()
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    # keys starting `x-` only hold YAML anchors the columns share (as in Compose files); nothing reads them
    unknown = {k for k in raw if not str(k).startswith("x-")} - SPEC_KEYS
    missing = REQUIRED - set(raw)
    if unknown or missing:
        raise BenchError(f"{where}: " + "; ".join(
            ([f"unknown keys {sorted(unknown)}"] if unknown else []) + ([f"missing keys {sorted(missing)}"]
                                                                      if missing else []))
                         + f" (a benchmark has {', '.join(sorted(SPEC_KEYS))})")
    name = path.stem
    if not NAME.match(name):
        raise BenchError(f"{where}: the file name {name!r} names the experiments; use lower case, digits and _")
    columns = raw["columns"]
    if not isinstance(columns, dict) or not columns:
        raise BenchError(f"{where}: columns must map a name to its overrides")
    for col, over in columns.items():
        if not NAME.match(str(col)):
            raise BenchError(f"{where}: column {col!r}: use lower case, digits and _ (it is part of the "
                             "experiment's name)")
        if over is not None and not isinstance(over, dict):
            raise BenchError(f"{where}: column {col!r}: overrides must be a mapping of params sections")
    metrics = tuple(raw["metrics"])
    bad = [m for m in metrics if m not in BY_LABEL]
    if bad:
        raise BenchError(f"{where}: unknown metrics {bad}; known: {', '.join(BY_LABEL)}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise BenchError(f"{where}: seeds must be a list of run.seed values (integers >= 0), got {seeds!r}")
    pairs = tuple(tuple(p) for p in raw.get("pairs") or [])
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= set(columns):
            raise BenchError(f"{where}: pair {list(pair)} must name two columns of {sorted(columns)}")
    ratios = tuple(tuple(r) for r in raw.get("ratios") or [])
    for ratio in ratios:
        if len(ratio) != 2 or not set(ratio) <= set(metrics):
            raise BenchError(f"{where}: ratio {list(ratio)} must name two of the benchmark's metrics")
    gains = tuple(tuple(g) for g in raw.get("gains") or [])
    miou = [m for m in metrics if BY_LABEL[m].is_miou]
    for gain in gains:
        if len(gain) != 2 or not set(gain) <= set(miou):
            raise BenchError(f"{where}: gain {list(gain)} must name two of the benchmark's mIoU metrics {miou}")
    goals = tuple(_goal(g, where, set(columns), metrics) for g in raw.get("goals") or [])
    return Spec(name=name, path=path, title=str(raw["title"]), about=str(raw.get("about") or "").strip(),
                out=Path(raw["out"]), seeds=tuple(seeds), targets=tuple(raw["targets"]), base=raw.get("base") or {},
                columns={str(c): o or {} for c, o in columns.items()}, metrics=metrics, pairs=pairs,
                ratios=ratios, goals=goals, gains=gains)


def _goal(raw: Any, where: str, columns: set[str], metrics: tuple[str, ...]) -> Goal:
    forms = ("{pair: [column a, column b], metric: <an mIoU metric>, at_least or at_most: <points>} or "
             "{gain: [mIoU metric a, mIoU metric b], column: <a column>, at_least or at_most: <points>}")
    miou = {m for m in metrics if BY_LABEL[m].is_miou}
    bounds = [k for k in BOUNDS if isinstance(raw, dict) and k in raw]
    bad = f"{where}: goal {raw!r} must be {forms}; columns {sorted(columns)}, mIoU metrics {sorted(miou)}"
    if not isinstance(raw, dict) or len(bounds) != 1:
        raise BenchError(bad)
    bound = raw[bounds[0]]
    if isinstance(bound, bool) or not isinstance(bound, (int, float)):
        raise BenchError(bad)
    if set(raw) == {"pair", "metric", bounds[0]}:
        pair, metric = raw["pair"], raw["metric"]
        if isinstance(pair, list) and len(pair) == 2 and set(pair) <= columns and metric in miou:
            return Goal(pair[0], pair[1], metric, None, float(bound), bounds[0] == "at_most")
    elif set(raw) == {"gain", "column", bounds[0]}:
        gain, column = raw["gain"], raw["column"]
        if isinstance(gain, list) and len(gain) == 2 and set(gain) <= miou and column in columns:
            return Goal(gain[0], gain[1], None, column, float(bound), bounds[0] == "at_most")
    raise BenchError(bad)


def set_value(value: Any) -> str:
    """A value as `dvc exp run -S key=value` reads it (YAML): lists and null in flow style."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def experiments(spec: Spec, params_file: Path) -> list[Experiment]:
    """Every (seed, column) of the benchmark with its params, each validated against the schema: an override
    that is not a valid setting stops here, before anything runs, naming the column and the override."""
    base = load_params(params_file)
    out = []
    for seed in spec.seeds:
        for column, over in spec.columns.items():
            changes = merge(merge(spec.base, over), {"run": {"seed": seed}})
            params = merge(base, changes)
            flat = _flat(changes, base=base)
            try:
                validate_params(params, source=f"{spec.path.as_posix()} column {column!r} "
                                               f"({', '.join(f'{k}={set_value(v)}' for k, v in flat.items())})")
            except ParamsError as error:
                raise BenchError(str(error)) from None
            out.append(Experiment(f"{spec.name}-{column}-s{seed}", column, seed, flat, params))
    return out


def _flat(obj: dict[str, Any], prefix: str = "", base: Any = None) -> dict[str, Any]:
    """Nested overrides -> `section.key` -> value. Lists and nulls are kept whole (they replace, never merge),
    and so is a mapping where `base` (the params it overrides) holds no mapping (data.embedded.photo over
    null): `-S` cannot set a key inside a null."""
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        under = base.get(key) if isinstance(base, dict) else None
        if isinstance(value, dict) and value and (base is None or isinstance(under, dict)):
            flat.update(_flat(value, f"{prefix}{key}.", under if base is not None else None))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_targets(spec: Spec, repo: Path) -> None:
    """Every target is a stage DVC knows (a typo would otherwise fail only when the first experiment starts)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        known = set()
        for stage in dvc_repo.index.stages:
            file = Path(stage.path).resolve().relative_to(Path(dvc_repo.root_dir).resolve()).as_posix()
            known.add(stage.name if file == "dvc.yaml" else f"{file}:{stage.name}")
    bad = [t for t in spec.targets if t not in known]
    if bad:
        raise BenchError(f"{spec.path.as_posix()}: unknown targets {bad}; DVC's stages are: {', '.join(sorted(known))}")


def recorded(spec: Spec, exps: list[Experiment], exp_show: list[dict[str, Any]], repo: Path) -> pd.DataFrame:
    """The benchmark's experiments as recorded: one row per experiment run with its expected params (compared as
    `dvc exp show` recorded them, not as a table column holds them), metrics as cpal.report.experiments
    vouches for them (percent; seconds for time metrics)."""
    metrics = tuple(BY_LABEL[m] for m in spec.metrics)
    table = experiment_table(exp_show, git_lock_reader(repo), metrics)
    # experiment_table has one row per exp_rows entry, in its order
    recorded_params = {}
    for (name, _, data, state), (_, row) in zip(exp_rows(exp_show), table.iterrows(), strict=True):
        if state == "success":
            recorded_params.setdefault(name, []).append(
                (flatten(((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}), row))
    rows = []
    for exp in exps:
        expected = flatten(exp.params)
        for got, row in recorded_params.get(exp.name, []):
            if all(got.get(k) == v for k, v in expected.items()):  # the params it was meant to run
                rows.append({"experiment": exp.name, "column": exp.column, "seed": exp.seed, "rev": row["rev"],
                             **{m: row[m] for m in spec.metrics}})
                break
    return pd.DataFrame(rows, columns=["experiment", "column", "seed", "rev", *spec.metrics])


def finished_names(exp_show: list[dict[str, Any]]) -> set[str]:
    """Names of finished experiments: a run killed mid-way can linger as "running", which is no experiment to
    remove (DVC refuses the name) and is run again."""
    return {e.get("name") for c in exp_show for e in (c.get("experiments") or [])
            if (e.get("executor") or {}).get("state", "success") == "success"}


def missing(spec: Spec, exps: list[Experiment], done: pd.DataFrame) -> list[Experiment]:
    """Experiments not yet recorded with every metric the benchmark reads."""
    complete = set(done.dropna(subset=[m for m in spec.metrics if BY_LABEL[m].is_miou])["experiment"])
    return [e for e in exps if e.name not in complete]


def unreadable_metrics(spec: Spec, done: pd.DataFrame) -> str | None:
    """Why experiments that ran with the benchmark's params show no metric at all, if that is so: `dvc exp show`
    reads the metrics files from the DVC cache, so a clone without the cache they were stored in sees none."""
    if done.empty or done[list(spec.metrics)].notna().any().any():
        return None
    return (f"{len(done)} experiment(s) ran with this benchmark's params but none of their metrics could be read "
            "(`dvc exp show` reads metrics files from the DVC cache: in a clone, point it at the cache they were "
            "stored in with `dvc cache dir --local <path>`); they count as not recorded")


def run_experiment(exp: Experiment, spec: Spec, repo: Path, existing: set[str]) -> None:
    if exp.name in existing:  # recorded but incomplete or with other params: replaced
        subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", exp.name], cwd=repo, check=True)
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", exp.name]
    for key, value in exp.overrides.items():
        cmd += ["-S", f"{key}={set_value(value)}"]
    print(f"[cpal-bench] {exp.name}: {' '.join(cmd[3:])} {' '.join(spec.targets)}", flush=True)
    code = subprocess.run([*cmd, *spec.targets], cwd=repo).returncode
    if code != 0:
        raise SystemExit(f"[cpal-bench] {exp.name} failed (dvc exit {code}); rerun the same command to resume")


FINISHED = re.compile(r"finished start=([\d.]+) end=([\d.]+) wall_s=([\d.]+) peak_rss_mib=(\d+)"
                      r"(?: cuda_peak_mib=(\d+))?")


def stage_costs(logs: Path) -> dict[str, dict[str, float | None]]:
    """Per stage log in ``logs``, what its last run's `finished` line (cpal.core.runtime.process_cost) says: start
    and end (epoch s), wall_s, peak_rss_mib of the stage process, cuda_peak_mib (None where it used no CUDA)."""
    costs = {}
    for log in sorted(Path(logs).glob("*.log")):
        matches = list(FINISHED.finditer(log.read_text()))
        if matches:
            match = matches[-1]
            start, end, wall, rss = (float(g) for g in match.groups()[:4])
            cuda = None if match.group(5) is None else float(match.group(5))
            costs[log.stem] = {"start": start, "end": end, "wall_s": wall, "peak_rss_mib": rss, "cuda_peak_mib": cuda}
    return costs


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn``: how the benchmark scripts time a part."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def optimizer_step(loss_fn: Callable[[], Any], optimizer: Any) -> Callable[[], None]:
    """One plain training step to time (loss, zero_grad, backward, step: cpal.core.training.scaled_step without
    AMP, clipping or schedule)."""
    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _cell(values: pd.Series, digits: int = 1) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return ""
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _paired(done: pd.DataFrame, a: str, b: str, metric: str) -> np.ndarray:
    x = done[done.column == a].set_index("seed")[metric].dropna()
    y = done[done.column == b].set_index("seed")[metric].dropna()
    common = x.index.intersection(y.index)
    return (x[common] - y[common]).to_numpy(dtype=float)


def _within(done: pd.DataFrame, column: str, a: str, b: str) -> np.ndarray:
    sub = done[done.column == column]
    return (sub[a] - sub[b]).dropna().to_numpy(dtype=float)


def _gain_line(what: str, gain: np.ndarray) -> str:
    spread = f" ± {gain.std(ddof=1):.1f}" if len(gain) > 1 else ""
    return f"- {what}: {gain.mean():+.1f}{spread} points (per seed {', '.join(f'{g:+.1f}' for g in gain)})."


def to_markdown(spec: Spec, done: pd.DataFrame, machine: str, commit: str) -> str:
    cols = list(spec.columns)
    seeds = {c: sorted(done[done.column == c].seed.tolist()) for c in cols}
    lines = [f"# {spec.title}", ""]
    if spec.about:
        lines += [spec.about, ""]
    lines += [
        f"Machine: {machine}. Code: commit {commit} (the experiments' baseline). Seeds (`run.seed`) recorded per "
        "column: " + ", ".join(f"{c} {seeds[c]}" for c in cols) + ".",
        f"Run: `cpal-bench run {spec.path.as_posix()}` (DVC experiments `{spec.name}-<column>-s<seed>`; "
        f"what is recorded is not run again). Table alone: `cpal-bench table {spec.path.as_posix()}`.",
        "mIoU in %, mean ± std over the seeds (one value: one seed); rows starting `s_` are seconds, `mib_` a "
        "stage's peak resident memory in MiB. A cell is "
        "empty where no experiment of that column recorded the metric fresh (its dvc.lock up to date).",
        ""]
    if spec.base:
        lines += ["Every column: " + ", ".join(f"`{k}={set_value(v)}`" for k, v in _flat(spec.base).items()) + ".", ""]
    lines += ["| column | its own overrides of params.yaml (and run.seed) |", "| --- | --- |"]
    for col, over in spec.columns.items():
        lines.append(f"| {col} | " + (", ".join(f"`{k}={set_value(v)}`" for k, v in _flat(over).items()) or "none")
                     + " |")
    lines += ["", "| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for metric in spec.metrics:
        digits = 1 if BY_LABEL[metric].is_miou else 0
        cells = [_cell(done[done.column == c][metric], digits) for c in cols]
        if any(cells):
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    for a, b in spec.ratios:
        cells = [_cell(done[done.column == c][a] / done[done.column == c][b], 2) for c in cols]
        if any(cells):
            lines.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    notes = []
    for a, b in spec.pairs:
        for metric in spec.metrics:
            if not BY_LABEL[metric].is_miou:
                continue
            gain = _paired(done, a, b, metric)
            if len(gain) and np.any(gain != 0):  # exactly equal: the same stage output, restored for both
                notes.append(_gain_line(f"{a} minus {b}, {metric}", gain))
    steps = [_gain_line(f"{col}: {a} minus {b}", gain) for col in cols for a, b in spec.gains
             if len(gain := _within(done, col, a, b))]
    goals = []
    for goal in spec.goals:
        gain = goal.gains(done)
        if len(gain) == 0:
            goals.append(f"- {goal.what()} ({goal.rule()}): not measured.")
            continue
        spread = f" ± {gain.std(ddof=1):.2f}" if len(gain) > 1 else ""
        verdict = "met" if goal.met(gain.mean()) else "NOT met"
        goals.append(f"- {goal.what()}: {gain.mean():+.2f}{spread} over {len(gain)} seed{'s' if len(gain) > 1 else ''}"
                     f" ({goal.rule()}): {verdict}.")
    if goals:
        lines += ["", "## Goals", "", "Paired by seed, the mean of the per-seed gains against the goal.", "", *goals]
    if notes:
        lines += ["", "## Paired by seed", "", "Metrics exactly equal in both columns (a stage the run-cache restored "
                  "for both) are not listed.", "", *notes]
    if steps:
        lines += ["", "## Steps within each column, paired by seed", "", *steps]
    lines += ["", f"![{spec.name}]({spec.out.name}.png)"]
    return "\n".join(lines) + "\n"


def plot(spec: Spec, done: pd.DataFrame, out: Path, footer: str) -> None:
    """Bars: each mIoU metric per column, mean over the seeds with the std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in spec.metrics if BY_LABEL[m].is_miou and done[m].notna().any()]
    cols = list(spec.columns)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(metrics) * max(1, len(cols)) / 2 + 2), 3.8))
    width = 0.8 / max(1, len(cols))
    for i, col in enumerate(cols):
        sub = done[done.column == col]
        means = [sub[m].mean() for m in metrics]
        stds = [sub[m].std(ddof=1) if sub[m].notna().sum() > 1 else 0.0 for m in metrics]
        ax.bar(np.arange(len(metrics)) + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=2, label=col)
    ax.set_xticks(np.arange(len(metrics)), metrics, rotation=20, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(spec.title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    save_with_footer(fig, out, footer, fontsize=6)


def write_table(spec: Spec, done: pd.DataFrame, repo: Path, machine: str) -> Path:
    """STEM.md (hand-written notes after the marker kept), STEM.csv (one row per experiment), STEM.png."""
    stem = repo / spec.out
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    md, csv, png = (stem.with_suffix(s) for s in (".md", ".csv", ".png"))
    md.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(csv) as tmp:
        done.to_csv(tmp, index=False, float_format="%.2f")
    if not done.empty:
        plot(spec, done, png, f"{machine}; seeds {list(spec.seeds)}; cpal-bench table {spec.path.as_posix()}")
    write_text(md, to_markdown(spec, done, machine, commit) + "\n" + keep_notes(md))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cpal-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "table"], help="run: the missing experiments, then the table")
    p.add_argument("spec", type=Path, help="the benchmark file (benchmarks/<name>.yaml)")
    p.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: here)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the experiments; run nothing")
    p.add_argument("--machine", default=None, help="where the experiments ran (default: this machine)")
    args = p.parse_args(argv)
    repo = args.repo.resolve()
    try:
        spec = load_spec(args.spec if args.spec.is_absolute() else repo / args.spec)
        if spec.path.resolve().is_relative_to(repo):  # quoted as a path any clone has
            spec = dataclasses.replace(spec, path=spec.path.resolve().relative_to(repo))
        exps = experiments(spec, repo / "params.yaml")
        if args.action == "run":
            check_targets(spec, repo)
    except (BenchError, ParamsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    show = run_exp_show(repo)
    done = recorded(spec, exps, show, repo)
    todo = missing(spec, exps, done)
    print(f"[cpal-bench] {spec.name}: {len(exps)} experiments, {len(exps) - len(todo)} recorded, "
          f"{len(todo)} to run", flush=True)
    if unreadable := unreadable_metrics(spec, done):
        print(f"[cpal-bench] warning: {unreadable}", file=sys.stderr, flush=True)
    if args.action == "run":
        if args.dry_run:
            for exp in todo:
                print(f"  {exp.name}: " + " ".join(f"-S {k}={set_value(v)}" for k, v in exp.overrides.items()))
            return 0
        existing = finished_names(show)
        for exp in todo:
            run_experiment(exp, spec, repo, existing)
        done = recorded(spec, exps, run_exp_show(repo), repo)
    md = write_table(spec, done, repo, args.machine or machine_description())
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
