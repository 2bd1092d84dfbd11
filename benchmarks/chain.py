"""The whole chain per method: cam, sipe and cpal through seeds, +CRF, +IRN, pseudo-masks, DeepLab,
DeepLab+CRF and the upper bound, for several `run.seed`s. Writes results/chain.md and results/chain.csv.

Not a test. Each (method, seed) runs the pipeline's own Snakefile in its own copy of the committed tree
(`git archive HEAD`) under outputs/benchmarks/chain/, with `params.method` and `run.seed` overridden
through --configfile; the checkout's outputs are untouched and the dataset folder is linked, not
regenerated. The fully supervised upper bound does not depend on the method: it runs once per seed, in
the first method's workspace. A finished workspace is kept and reused, so an interrupted run continues;
the tables are rewritten after every workspace.

`--classifiers DIR` takes trained classifiers from DIR/<method>_seed<N>/ (benchmarks/seeds.py's work
folder, the same train_cls settings) instead of training them again: the chain then starts at
make_seeds, and the train_cls time is left out of the time table.

    python benchmarks/chain.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cpal.core.config import load_params
from cpal.core.io import atomic_path, write_text
from cpal.core.runtime import machine_description
from cpal.report.summary import collect_rows, stage_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling suite, also when loaded by file path
from suite import fresh_copy  # noqa: E402  (the committed tree without results/, outputs/, data/)

METHODS = ("cam", "sipe", "cpal")
TARGETS = ["results/eval_seeds.json", "results/eval_crf.json", "results/eval_pseudo.json", "results/eval_seg.json"]
IRN = "results/eval_irn.json"  # the IRN branch (off the default path): with --irn
UPPER = "results/eval_seg_full.json"
STEPS = ["seeds", "+CRF", "+IRN", "pseudo-masks", "DeepLab", "DeepLab+CRF", "upper bound"]
TIMED = ["make_seeds", "train_cls", "refine_crf", "ir_labels", "train_irn", "refine_irn", "pseudo_labels",
         "train_seg", "eval_seg", "train_seg_full", "eval_seg_full"]


def new_workspace(ws: Path, data_dir: Path, override: str) -> None:
    """A fresh copy of the committed tree, `override` as its override.yaml, the dataset linked, not copied."""
    fresh_copy(ws)
    (ws / "override.yaml").write_text(override)
    link = ws / data_dir
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(data_dir.resolve(), target_is_directory=True)


def prepare(ws: Path, method: str, seed: int, data_dir: Path, classifiers: Path | None) -> list[str]:
    """A fresh copy of the committed tree with the overrides; returns extra Snakemake arguments."""
    new_workspace(ws, data_dir, f"params:\n  method: {method}\nrun:\n  seed: {seed}\n")
    if classifiers is None:
        return []
    src = classifiers / f"{method}_seed{seed}"
    if not (src / "model.pt").is_file():
        raise FileNotFoundError(f"--classifiers: no {src / 'model.pt'} (run benchmarks/seeds.py for this seed)")
    dest = ws / "outputs" / "train_cls"
    dest.mkdir(parents=True)
    for name in ("model.pt", "metrics.json", "timing.json"):
        shutil.copy(src / name, dest / name)  # newer than the data: Snakemake by mtime keeps them
    return ["--rerun-triggers", "mtime"]


def run_one(work: Path, method: str, seed: int, upper: bool, data_dir: Path, classifiers: Path | None,
            cores: int, irn: bool = False) -> Path:
    ws = work / f"{method}_seed{seed}"
    done = ws / ".chain-done"
    if done.is_file():
        return ws
    extra = prepare(ws, method, seed, data_dir, classifiers)
    targets = TARGETS + ([IRN] if irn else []) + ([UPPER] if upper else [])
    t0 = time.perf_counter()
    # targets go before --configfile, which takes every following word as a config file
    subprocess.run([sys.executable, "-m", "snakemake", *targets, "--cores", str(cores), *extra,
                    "--configfile", "override.yaml"], cwd=ws, check=True)
    done.write_text(json.dumps({"seconds": time.perf_counter() - t0, "reused_classifier": classifiers is not None}))
    print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return ws


def rows_of(ws: Path, method: str, seed: int) -> list[dict]:
    """mIoU per step of one workspace, and the seconds of every timed stage."""
    out = []
    seeds = json.loads((ws / "results" / "eval_seeds.json").read_text())
    names = {"CAM seeds": "seeds"} if method == "cam" else {"PACAM seeds": "seeds"}
    for r in collect_rows(ws / "results", ws / "outputs" / "logs"):
        step = names.get(r["stage"], r["stage"])
        if step in STEPS:
            out.append({"method": method, "seed": seed, "step": step, "miou": r["miou"]})
    if method != "cam" and "pacam_argmax" in seeds:
        out.append({"method": method, "seed": seed, "step": "seeds, own background",
                    "miou": seeds["pacam_argmax"]["miou"]})
    for stage in TIMED:
        secs = stage_seconds(ws / "outputs" / "logs" / f"{stage}.log")
        if secs is not None:
            out.append({"method": method, "seed": seed, "step": f"time:{stage}", "miou": None, "seconds": secs})
    return out


def fmt(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    v = values.dropna().to_numpy(dtype=float) * scale
    if len(v) == 0:
        return ""
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def paired(df: pd.DataFrame, a: tuple[str, str], b: tuple[str, str]) -> np.ndarray:
    """Per-seed a - b (points) over the seeds both have."""
    x = df[(df.method == a[0]) & (df.step == a[1])].set_index("seed").miou
    y = df[(df.method == b[0]) & (df.step == b[1])].set_index("seed").miou
    common = x.index.intersection(y.index)
    return 100 * (x[common] - y[common]).to_numpy(dtype=float)


def upper_bounds(df: pd.DataFrame) -> pd.Series:
    return df[df.step == "upper bound"].groupby("seed").miou.first()


def report(df: pd.DataFrame, methods: list[str], command: str, classifiers: Path | None) -> str:
    if "seconds" not in df:
        df = df.assign(seconds=None)
    seeds_done = {m: sorted(df[df.method == m].seed.unique().tolist()) for m in methods}
    ub = upper_bounds(df)
    lines = [
        "# The whole chain per method: seeds to DeepLab",
        "",
        f"Machine: {machine_description()}. Seeds (`run.seed`) run per method: "
        + ", ".join(f"{m} {seeds_done[m]}" for m in methods) + ". Pipeline settings: params.yaml at the commit",
        "that ran (embedded default: EfficientNet-Lite0 ImageNet classifier and DeepLab encoder, IRN planes `auto`,",
        "`pseudo.source` crf; the +IRN row only with --irn). mIoU in %, mean ± std over the seeds (one value: one",
        "seed). Seeds, +CRF, +IRN and",
        "pseudo-masks on the 800 train images; DeepLab, DeepLab+CRF and the upper bound (DeepLab trained on",
        "ground-truth masks, the same network and schedule) on the 200 val images. Seeds: the method's own map",
        "(CAM for cam, PACAM for sipe / cpal) at the best background threshold of the sweep (picked with ground",
        "truth, as WSSS papers report seeds); \"own background\": the argmax with the prototype map's own",
        "background channel, no threshold. Everything after the seeds uses no ground truth except the",
        "settings docs/method.md lists (crf.bg_threshold among them).",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    if classifiers is not None:
        lines += [f"Classifiers: reused from `{classifiers.as_posix()}` (trained with the same train_cls settings: "
                  "benchmarks/seeds.py's work folder or an earlier chain's), so the train_cls row of the time table "
                  "is empty.", ""]
    lines += ["| step | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for step in ["seeds", "seeds, own background", *STEPS[1:]]:
        cells = [fmt(df[(df.method == m) & (df.step == step)].miou) for m in methods]
        if step == "upper bound":
            cells = [fmt(ub[ub.index.isin(seeds_done[m])]) for m in methods]
        if any(cells):  # +IRN only when the branch ran (--irn)
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    ratio = []
    for m in methods:
        seg = df[(df.method == m) & (df.step == "DeepLab")].set_index("seed").miou
        common = seg.index.intersection(ub.index)
        ratio.append(fmt(seg[common] / ub[common], scale=1.0, digits=2))
    lines.append("| DeepLab / upper bound | " + " | ".join(ratio) + " |")
    lines += ["", "## After DeepLab (paired by seed)", ""]
    for m in methods:
        seg = df[(df.method == m) & (df.step == "DeepLab")].set_index("seed").miou
        masks = df[(df.method == m) & (df.step == "pseudo-masks")].set_index("seed").miou
        common = seg.index.intersection(masks.index)
        if len(common):
            r = (seg[common] / masks[common]).to_numpy(dtype=float)
            spread = ""
            if len(seg) > 1:  # one seed has no spread to judge
                std = 100 * seg.std(ddof=1)
                verdict = "met" if std <= 1.5 else "NOT met"
                spread = f"; DeepLab seed-to-seed std {std:.1f} points (goal <= 1.5: {verdict})"
            lines.append(f"- {m}: DeepLab val / pseudo-masks train {r.mean():.2f} (per seed "
                         f"{', '.join(f'{x:.2f}' for x in r)}; goal 0.9: {'met' if r.mean() >= 0.9 else 'NOT met'})"
                         f"{spread}.")
    for a, b in [("cpal", "cam"), ("sipe", "cam"), ("cpal", "sipe")]:
        if {a, b} <= set(methods):
            for step in ("pseudo-masks", "DeepLab", "DeepLab+CRF"):
                gain = paired(df, (a, step), (b, step))
                if len(gain):
                    spread = f" ± {gain.std(ddof=1):.1f}" if len(gain) > 1 else ""
                    lines.append(f"- {a} minus {b}, {step}: {gain.mean():+.1f}{spread} points "
                                 f"(per seed {', '.join(f'{g:+.1f}' for g in gain)}).")
    for m in methods:
        gain = paired(df, (m, "+IRN"), (m, "+CRF"))
        if len(gain):
            lines.append(f"- {m}: +IRN minus +CRF {gain.mean():+.1f} points "
                         f"({'IRN above CRF' if gain.mean() > 0 else 'CRF above IRN'}; seeds {len(gain)}).")
    lines += ["", "## Time per stage (seconds, mean over the seeds; from the stage logs)", "",
              "| stage | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for stage in TIMED:
        cells = [fmt(df[(df.method == m) & (df.step == f"time:{stage}")].seconds, scale=1.0, digits=0)
                 for m in methods]
        if any(cells):
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "The upper bound (train_seg_full, eval_seg_full) runs once per seed, in the first method's "
              "workspace; its mIoU is shared by every method's row of that seed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--params", default="params.yaml", help="for data.dir (the workspaces use their own copy)")
    p.add_argument("--classifiers", type=Path, default=None, help="DIR/<method>_seed<N>/model.pt to reuse")
    p.add_argument("--work", type=Path, default=Path("outputs/benchmarks/chain"))
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--irn", action="store_true", help="also run the IRN branch (the +IRN row)")
    p.add_argument("--out-md", type=Path, default=Path("results/chain.md"))
    args = p.parse_args(argv)
    data_dir = Path(load_params(args.params)["data"]["dir"])
    if not data_dir.is_dir():
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", str(data_dir)], check=True)
    command = "python benchmarks/chain.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows: list[dict] = []
    for seed in args.seeds:  # seed-major: every method of one seed before the next seed
        for i, method in enumerate(args.methods):
            ws = run_one(args.work, method, seed, i == 0, data_dir, args.classifiers, args.cores, args.irn)
            rows += rows_of(ws, method, seed)
            df = pd.DataFrame(rows)
            with atomic_path(args.out_md.with_suffix(".csv")) as tmp:
                df.to_csv(tmp, index=False, float_format="%.5f")
            write_text(args.out_md, report(df, args.methods, command, args.classifiers))
    print(args.out_md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
