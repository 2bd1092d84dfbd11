"""DVC experiments as a result table: `dvc exp show --json` -> one row per experiment, plot per swept param.

A metric counts only where the experiment actually produced it. `dvc exp run ... hosts/dvc.yaml:eval_pseudo@crf`
leaves later result files (results/eval_seg.json, ...) as the workspace had them; reporting those
against the experiment's params would be wrong, and the params alone cannot tell (train_seg declares no
`params` section, yet reads pseudo-masks made with `params.K`). So a metric is kept only if, in the
experiment's dvc.lock, the stage that wrote the file and every stage upstream of it are up to date:
each dep produced by another stage carries the hash that stage recorded for that output, and each
stage's recorded params equal the experiment's. Otherwise it is left empty and named in `stale`.

Two rows are not experiments: the baseline commit, labelled "(committed)" (numbers only where the
commit's own dvc.lock vouches for them; pipeline results are not committed, so usually none), and
`workspace`, the user's working copy (its dvc.lock and result files, e.g. after `dvc repro`).
"""

from __future__ import annotations

import json
import numbers
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cpal.core.config import load_yaml
from cpal.core.io import atomic_path


@dataclass(frozen=True)
class Metric:
    label: str
    path: str
    keys: tuple[str, ...]
    alt: tuple[str, ...] | None = None  # keys read where `keys` are absent (a cam run's seeds: no pacam)
    scale: float = 100.0  # stored -> shown: fractions to percent; 1 for seconds and MiB

    @property
    def is_miou(self) -> bool:
        """An mIoU (stored as a fraction, shown in %), not a cost (seconds, MiB)."""
        return self.scale != 1.0


# Headline numbers of the pipeline, first to last stage (mIoU as stored: fractions).
METRICS: tuple[Metric, ...] = (
    Metric("seeds_cam", "results/eval_seeds.json", ("cam", "miou")),
    Metric("seeds_pacam", "results/eval_seeds.json", ("pacam", "miou")),
    Metric("crf", "results/eval_crf.json", ("miou",)),
    Metric("irn", "results/eval_irn.json", ("miou",)),
    Metric("amn_seeds", "results/eval_amn_seeds.json", ("cam", "miou")),
    Metric("amn_crf", "results/eval_amn_crf.json", ("miou",)),
    Metric("amn_irn", "results/eval_amn_irn.json", ("miou",)),
    Metric("pseudo", "results/eval_pseudo.json", ("miou",)),
    Metric("deeplab", "results/eval_seg.json", ("miou",)),
    Metric("deeplab_crf", "results/eval_seg.json", ("crf", "miou")),
    Metric("upper_bound", "results/eval_seg_full.json", ("miou",)),
)
PARAMS_FILE = "params.yaml"


def run_exp_show(repo: Path) -> list[dict[str, Any]]:
    """`dvc exp show --json` of the repository (the baseline commit and all its experiments)."""
    out = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`dvc exp show --json` failed in {repo}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


WORKSPACE = "workspace"


def git_lock_reader(repo: Path) -> Callable[[str], dict[str, Any] | None]:
    """Reads dvc.lock as committed at a revision, or on disk for "workspace" (None where there is none), with
    the stages of the pipeline's other locks merged in (hosts/dvc.lock: the stages on a host's seed maps, the
    default path's among them; any other <folder>/dvc.lock likewise), so their metrics can be vouched for
    like the root's."""

    def show(rev: str, path: str) -> dict[str, Any] | None:
        if rev == WORKSPACE:
            file = Path(repo) / path
            return load_yaml(file.read_text()) if file.is_file() else None
        out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
        return load_yaml(out.stdout) if out.returncode == 0 else None

    def other_locks(rev: str) -> list[str]:
        if rev == WORKSPACE:
            return sorted(str(p.relative_to(repo)) for pattern in ("*/dvc.lock", "*/*/dvc.lock")
                          for p in Path(repo).glob(pattern))
        out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], cwd=repo, capture_output=True, text=True)
        return sorted(p for p in out.stdout.split() if p.endswith("/dvc.lock")) if out.returncode == 0 else []

    def read(rev: str) -> dict[str, Any] | None:
        lock = show(rev, "dvc.lock")
        for path in other_locks(rev):
            other = show(rev, path)
            if other and other.get("stages"):
                lock = lock or {"schema": other.get("schema"), "stages": {}}
                lock.setdefault("stages", {}).update(other["stages"])
        return lock

    return read


def host_of(params: dict[str, Any]) -> str:
    """Which network made the pseudo-masks, and where CPAL sits in it: `<method> classifier` or
    `amn (plugin <amn.plugin>)` when pseudo.source is amn_crf or amn_irn."""
    if (params.get("pseudo") or {}).get("source") in ("amn_crf", "amn_irn"):
        return f"amn (plugin {(params.get('amn') or {}).get('plugin')})"
    return f"{(params.get('params') or {}).get('method')} classifier"


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def _dig(data: Any, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def _hash(entry: dict[str, Any]) -> str | None:
    """The content hash dvc.lock records for a dep or out (md5 for local files and folders)."""
    for key in ("md5", "etag", "checksum"):
        if entry.get(key):
            return str(entry[key])
    return None


_MISSING = object()


def _param(params: dict[str, Any], key: str) -> Any:
    """The value a lock's params key names: a whole section (`irn`) or, dotted, one key of it (`irn.beta`, as
    the IRN stages declare theirs); a key the params lack is never equal to a recorded value."""
    value: Any = params
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _fresh(path: str, lock: dict[str, Any] | None, params: dict[str, Any]) -> bool:
    """True if the lock names the stage that wrote `path` and it is up to date along its whole upstream
    chain: every stage on it recorded with these params, every dep with the hash its producer recorded."""
    if lock is None:
        return False
    stages = lock.get("stages") or {}
    producers = {out.get("path"): (name, out) for name, stage in stages.items() for out in stage.get("outs") or []}
    if path not in producers:
        return False
    verdict: dict[str, bool] = {}

    def up_to_date(name: str) -> bool:
        if name not in verdict:
            verdict[name] = False  # a cycle (not a valid DAG) is not fresh
            stage = stages[name]
            recorded = (stage.get("params") or {}).get(PARAMS_FILE) or {}
            ok = all(_param(params, key) == value for key, value in recorded.items())
            for dep in (stage.get("deps") or []) if ok else []:
                producer = producers.get(dep.get("path"))
                if producer is None:  # code or raw input: no stage to be stale against
                    continue
                upstream, out = producer
                if _hash(dep) is None or _hash(dep) != _hash(out) or not up_to_date(upstream):
                    ok = False
                    break
            verdict[name] = ok
        return verdict[name]

    return up_to_date(producers[path][0])


def exp_rows(exp_show: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any], str]]:
    """(name, rev, data, state) for the baseline commit(s) and every experiment with data.

    state: "baseline", "workspace", or the queue's state of the experiment ("success", "queued",
    "running", "failed"; "success" for experiments run outside the queue).
    """
    rows = []
    for commit in exp_show:
        if commit.get("rev") == WORKSPACE:
            if commit.get("data"):
                rows.append((WORKSPACE, WORKSPACE, commit["data"], WORKSPACE))
            continue
        if commit.get("data"):
            rows.append((commit.get("name") or commit["rev"][:7], commit["rev"], commit["data"], "baseline"))
        for exp in commit.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state") or "success"
            for rev in exp.get("revs") or []:
                if rev.get("data") and not rev.get("error"):
                    name = exp.get("name") or rev.get("name") or rev["rev"][:7]
                    rows.append((name, rev["rev"], rev["data"], state))
    return rows


def experiment_table(exp_show: list[dict[str, Any]], read_lock: Callable[[str], dict[str, Any] | None],
                     metrics: tuple[Metric, ...] = METRICS) -> pd.DataFrame:
    """One row per experiment: changed params (against the first baseline), metrics in percent, stale list.

    The baseline commit is named "<name> (committed)" and the working copy "workspace" (both have
    `baseline` True). Every row, these two included, shows a metric only where its dvc.lock vouches
    for it (see _fresh): a commit without dvc.lock shows none, whatever result files it holds.
    """
    rows = exp_rows(exp_show)
    commits = [row for row in rows if row[3] == "baseline"]
    if not commits:
        raise ValueError("`dvc exp show` lists no commit with params: is this a DVC repository with params.yaml?")
    base_params = flatten(((commits[0][2].get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {})
    records = []
    for name, rev, data, state in rows:
        is_base = state in ("baseline", WORKSPACE)
        params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
        flat = flatten(params)
        lock = read_lock(rev)
        label = f"{name} (committed)" if state == "baseline" else name
        record: dict[str, Any] = {"experiment": label, "rev": "" if state == WORKSPACE else rev[:7],
                                  "baseline": is_base, "state": state}
        record["host"] = host_of(params)
        record["changed"] = ", ".join(f"{k}={flat.get(k)}" for k in sorted(flat) if flat.get(k) != base_params.get(k))
        record.update({k: flat.get(k) for k in flat})
        stale = []
        for metric in metrics:
            stored = ((data.get("metrics") or {}).get(metric.path) or {}).get("data")
            value = _dig(stored, metric.keys)
            if value is None and metric.alt:
                value = _dig(stored, metric.alt)
            trusted = _fresh(metric.path, lock, params)
            if value is not None and (not trusted or state not in ("baseline", WORKSPACE, "success")):
                stale.append(metric.label)
                value = None
            record[metric.label] = None if value is None else round(metric.scale * value, 2)
        record["stale"] = ", ".join(stale)
        records.append(record)
    table = pd.DataFrame.from_records(records)
    table.attrs["baseline_params"] = base_params
    return table


def swept_params(table: pd.DataFrame) -> list[str]:
    """Params that differ between rows, in params.yaml order."""
    skip = {"experiment", "rev", "baseline", "state", "changed", "stale", "host"} | {m.label for m in METRICS}
    return [c for c in table.columns if c not in skip and table[c].astype(str).nunique() > 1]


def _is_number(value: Any) -> bool:
    """Numbers (numpy's included, as pandas hands them out), not booleans."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def sort_rows(table: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """Baseline first, then experiments grouped by the param they change, in order of its value."""
    base = table.attrs.get("baseline_params") or {}

    def key(i: int) -> tuple:
        row = table.loc[i]
        changed = [p for p in swept if str(row[p]) != str(base.get(p))]
        value = row[changed[0]] if changed else 0
        numeric = _is_number(value)
        rank = {"baseline": 0, WORKSPACE: 1}.get(row["state"], 2)  # committed, workspace, experiments
        return (rank, ",".join(changed), 0 if numeric else 1, value if numeric else str(value))

    ordered = table.loc[sorted(table.index, key=key)].reset_index(drop=True)
    ordered.attrs = dict(table.attrs)
    return ordered


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [m.label for m in METRICS if m.label in table and table[m.label].notna().any()]


def to_markdown(table: pd.DataFrame, swept: list[str], header: str) -> str:
    cols = ["experiment", "rev", "host"] + swept + metric_columns(table) + (["stale"] if table["stale"].any() else [])
    view = table[cols].copy()
    lines = [header.rstrip(), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in view.iterrows():
        cells = []
        for col in cols:
            value = row[col]
            cells.append("" if value is None or (isinstance(value, float) and pd.isna(value))
                         else f"{value:.1f}" if isinstance(value, float) and col in metric_columns(table)
                         else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweeps(table: pd.DataFrame, swept: list[str], out: Path, footer: str) -> None:
    """One panel per swept param: each metric against the param's values (baseline included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_columns(table)
    if not swept or not metrics:
        raise ValueError("nothing to plot: no param varies between the experiments or no metric was found")
    base = table.attrs.get("baseline_params") or table.iloc[0].to_dict()
    fig, axes = plt.subplots(1, len(swept), figsize=(4.2 * len(swept), 3.6), squeeze=False)
    for ax, param in zip(axes[0], swept, strict=True):
        others = [p for p in swept if p != param]
        # rows that change only this param (others at the baseline value)
        mask = pd.Series(True, index=table.index)
        for p in others:
            mask &= table[p].astype(str) == str(base[p])
        sub = table[mask].copy()
        values = sub[param].tolist()
        numeric = all(_is_number(v) for v in values)
        order = sorted(range(len(values)), key=lambda i: values[i] if numeric else str(values[i]))
        sub = sub.iloc[order]
        x = list(range(len(sub)))
        for metric in metrics:
            ax.plot(x, sub[metric].tolist(), marker="o", label=metric)
        ax.set_xticks(x, [str(v) for v in sub[param]])
        ax.set_xlabel(param)
        ax.set_ylabel("mIoU (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_with_footer(fig, out, footer)


def save_with_footer(fig: Any, out: Path, footer: str, fontsize: int = 7, top: float = 1.0) -> None:
    """A figure saved atomically as PNG with the line that says where it came from (machine, seeds, command)
    along its bottom edge, and closed."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.005, footer, fontsize=fontsize, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, top))  # top < 1 leaves room for a suptitle
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


NOTES_MARKER = "<!-- notes: kept when this file is regenerated -->"


def keep_notes(old: Path) -> str:
    """The hand-written part of an existing report (after NOTES_MARKER), so a rerun loses nothing."""
    if not old.exists():
        return NOTES_MARKER + "\n"
    text = old.read_text()
    return text[text.index(NOTES_MARKER):] if NOTES_MARKER in text else NOTES_MARKER + "\n"
