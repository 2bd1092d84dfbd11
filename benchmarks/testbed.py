"""The testbed calibration: does the embedded data reproduce what the field knows about refinement and hosts?

On PASCAL VOC, IRN's random walk lifts CAM seeds far more than a dense CRF alone, and AMN's masks beat plain
CAM's. Each regime of benchmarks/testbed.yaml (image size, generator version and its photo-like levers, the
refinements' pixel-unit settings) runs plain CAM -> CRF, CAM -> IRN and AMN -> CRF / IRN through the pipeline's
own Snakefile, in its own folder under --work holding only that regime's params.yaml (the code is this
checkout's). A finished folder is skipped, an interrupted one resumes where Snakemake stopped. Writes
results/testbed.csv, results/testbed.md and results/testbed.png.

    python benchmarks/testbed.py --regimes v1_128 v2_128 --seeds 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cpal.core.config import load_params, load_yaml, merge, validate_params
from cpal.core.io import write_text
from cpal.core.runtime import machine_description
from cpal.report.bench import snakemake_in, stage_costs
from cpal.report.experiments import METRICS, save_with_footer
from cpal.report.summary import stage_seconds

ROOT = Path(__file__).resolve().parents[1]
# step -> (metric label of cpal.report.experiments.METRICS, stages whose time it costs), per column
STEPS = {
    "cam": {"seeds": ("seeds_cam", ["train_cls", "make_seeds"]), "crf": ("crf", ["refine_crf"]),
            "irn": ("irn", ["ir_labels", "train_irn", "refine_irn"])},
    "amn": {"seeds": ("amn_seeds", ["train_amn", "make_amn_seeds"]), "crf": ("amn_crf", ["refine_amn_crf"]),
            "irn": ("amn_irn", ["amn_ir_labels", "train_amn_irn", "refine_amn_irn"])},
}
DONE = "testbed.done"  # written when a folder's targets (and CRF sweep) are complete
COLUMNS = ["regime", "image_size", "grid", "column", "seed", "step", "miou", "seconds"]


def regime_params(spec: dict, regime: str, seed: int) -> dict:
    """params.yaml + the spec's base + the regime + run.seed, validated: a bad override stops before any run."""
    if regime not in spec["regimes"]:
        raise SystemExit(f"unknown regime {regime!r}; benchmarks/testbed.yaml has: {', '.join(spec['regimes'])}")
    params = merge(merge(load_params(ROOT / "params.yaml"), spec.get("base") or {}), spec["regimes"][regime] or {})
    params = merge(params, {"run": {"seed": seed}})
    try:
        return validate_params(params, source=f"benchmarks/testbed.yaml regime {regime!r}")
    except ValueError as error:
        raise SystemExit(str(error)) from None


def crf_sweep(work: Path, params: dict, planes: list[float]) -> dict[str, float]:
    """The CRF's background plane picked with ground truth, as crf.bg_threshold was for the embedded default
    (docs/method.md): CAM +CRF mIoU per plane, then the best plane written into the folder's params.yaml
    (so its eval_crf.json is the best plane's; IRN and AMN do not read crf.bg_threshold)."""
    done = work / "crf_sweep.json"
    sweep = load_yaml(done.read_text()) if done.is_file() else {}
    for plane in planes:
        if str(plane) in sweep:
            continue
        snakemake_in(work, params, ["results/eval_crf.json"], extra={"crf": {"bg_threshold": plane}})
        sweep[str(plane)] = load_yaml((work / "results" / "eval_crf.json").read_text())["miou"]
        write_text(done, yaml.safe_dump(sweep))
    best = max(sweep, key=sweep.get)
    snakemake_in(work, merge(params, {"crf": {"bg_threshold": float(best)}}), ["results/eval_crf.json"])
    return sweep


def rows_of(work: Path, regime: str, params: dict, seed: int) -> list[dict]:
    size = int(params["data"]["embedded"]["image_size"])
    grid = f"{size // int(params['train_cls']['output_stride'])}x{size // int(params['train_cls']['output_stride'])}"
    metrics = {m.label: m for m in METRICS}
    rows = []
    for column, steps in STEPS.items():
        for step, (label, stages) in steps.items():
            m = metrics[label]
            path = work / m.path
            if not path.is_file():
                continue
            value = load_yaml(path.read_text())
            for key in m.keys:
                value = value[key]
            secs = [stage_seconds(work / "outputs" / "logs" / f"{s}.log") for s in stages]
            rows.append({"regime": regime, "image_size": size, "grid": grid, "column": column, "seed": seed,
                         "step": step, "miou": round(100 * float(value), 4),
                         "seconds": sum(s for s in secs if s is not None)})
    return rows


def orderings(df: pd.DataFrame) -> pd.DataFrame:
    """Per regime and seed: the field's orderings as paired differences (points)."""
    wide = df.pivot_table(index=["regime", "seed"], columns=["column", "step"], values="miou")
    out = pd.DataFrame(index=wide.index)
    cam_best = wide[[("cam", "crf"), ("cam", "irn")]].max(axis=1)
    out["crf_over_seeds"] = wide[("cam", "crf")] - wide[("cam", "seeds")]
    out["irn_over_crf"] = wide[("cam", "irn")] - wide[("cam", "crf")]
    out["amn_masks_over_cam_best"] = wide[("amn", "irn")] - cam_best
    out["amn_seeds_over_cam"] = wide[("amn", "seeds")] - wide[("cam", "seeds")]
    return out


def write_tables(df: pd.DataFrame, out_dir: Path, command: str, peaks: dict[str, tuple[str, float]]) -> None:
    df.to_csv(out_dir / "testbed.csv", index=False)
    order = list(dict.fromkeys(df["regime"]))
    mean = df.groupby(["regime", "column", "step"])["miou"].agg(["mean", "std", "count"])
    secs = df.groupby(["regime"])["seconds"].sum() / df.groupby("regime")["seed"].nunique()
    o = orderings(df)
    lines = [
        "# Testbed calibration: the field's orderings on the embedded data", "",
        f"Machine: {machine_description()}. Reproduce: `{command}`", "",
        "Plain CAM, the dense CRF, IRN and AMN only (params.method cam, amn.plugin none): no CPAL or SIPE ran "
        "while choosing the regime. mIoU in % on the 800 train images, mean ± std over the seeds (n). Seeds at "
        "the best background threshold of the sweep; AMN's masks are its maps through IRN (the AMN paper's "
        "pseudo-masks), +CRF beside them. Regimes: benchmarks/testbed.yaml.", "",
        "| regime | size | grid | CAM seeds | CAM +CRF | CAM +IRN | AMN seeds | AMN +CRF | AMN +IRN | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for regime in order:
        first = df[df.regime == regime].iloc[0]
        cells = []
        for column, step in [("cam", "seeds"), ("cam", "crf"), ("cam", "irn"), ("amn", "seeds"), ("amn", "crf"),
                             ("amn", "irn")]:
            if (regime, column, step) in mean.index:
                r = mean.loc[(regime, column, step)]
                spread = f" ± {r['std']:.1f}" if r["count"] > 1 else ""
                cells.append(f"{r['mean']:.1f}{spread} ({int(r['count'])})")
            else:
                cells.append("")
        lines.append(f"| {regime} | {first.image_size} | {first.grid} | " + " | ".join(cells)
                     + f" | {secs[regime]:.0f} |")
    lines += ["", "## The orderings, paired by seed (points; VOC: CRF alone about +5, IRN well above the CRF, "
              "AMN's masks above CAM's)", "",
              "| regime | CRF over CAM seeds (goal <= +10) | IRN over CRF (goal >= +3) | AMN masks over CAM's best "
              "(goal >= +2) | AMN seeds over CAM's | largest stage peak RSS, MiB (stage) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for regime in order:
        if regime not in o.index.get_level_values(0):
            continue
        sub = o.loc[regime]
        cell = [f"{sub[c].mean():+.1f}" + (f" ± {sub[c].std():.1f}" if len(sub) > 1 else "")
                for c in o.columns]
        stage, mib = peaks.get(regime, ("", float("nan")))
        lines.append(f"| {regime} | " + " | ".join(cell) + f" | {mib:.0f} ({stage}) |")
    lines += ["", "![orderings per regime](testbed.png)", ""]
    write_text(out_dir / "testbed.md", "\n".join(lines))
    plot(o, order, out_dir / "testbed.png", command)


def plot(o: pd.DataFrame, order: list[str], out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"crf_over_seeds": ("CRF over CAM seeds", 10, "le"), "irn_over_crf": ("IRN over CRF", 3, "ge"),
             "amn_masks_over_cam_best": ("AMN masks over CAM's best", 2, "ge")}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    regimes = [r for r in order if r in o.index.get_level_values(0)]
    for ax, (col, (title, goal, sense)) in zip(axes, names.items(), strict=True):
        means = [o.loc[r][col].mean() for r in regimes]
        stds = [o.loc[r][col].std() if len(o.loc[r]) > 1 else 0 for r in regimes]
        ax.bar(range(len(regimes)), means, yerr=stds, color=["#4c72b0" if "v1" in r else "#dd8452" for r in regimes])
        ax.axhline(goal, color="k", ls="--", lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(regimes)), regimes, rotation=30, ha="right")
        ax.set_title(f"{title} ({'<=' if sense == 'le' else '>='} {goal:+d} goal)")
        ax.set_ylabel("points")
    fig.suptitle("Testbed orderings per regime (mean ± std over seeds)", fontsize=10)
    save_with_footer(fig, out, f"{machine_description()}; {command}", fontsize=6, top=0.95)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "benchmarks" / "testbed.yaml")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "benchmarks" / "testbed")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--crf-planes", nargs="*", type=float, default=[0.3, 0.4, 0.5, 0.6],
                    help="crf.bg_threshold values swept per regime (picked with ground truth); none: params' own")
    args = ap.parse_args(argv)
    spec = load_yaml(args.spec.read_text())
    plan = [(r, s, regime_params(spec, r, s)) for r in args.regimes for s in args.seeds]  # all checked first
    for regime, seed, params in plan:
        work = args.work / regime / f"seed{seed}"
        start = time.perf_counter()
        print(f"[testbed] {regime} seed {seed} in {work}", flush=True)
        sweep = work / "crf_sweep.json"
        if sweep.is_file():  # a finished sweep's best plane, so the resumed run changes nothing
            best = load_yaml(sweep.read_text())
            params = merge(params, {"crf": {"bg_threshold": float(max(best, key=best.get))}})
        snakemake_in(work, params, spec["targets"])
        if args.crf_planes:
            crf_sweep(work, params, args.crf_planes)
        (work / DONE).write_text("finished\n")
        print(f"[testbed] {regime} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        collect(spec, args.work, args.out, args.crf_planes)
    return 0


def log_peak(logs: Path) -> tuple[str, float]:
    """(stage, MiB) of the largest peak RSS the stage logs of the folder record (each stage logs its own)."""
    costs = stage_costs(logs)
    return max(((stage, c["peak_rss_mib"]) for stage, c in costs.items()), key=lambda b: b[1], default=("", 0.0))


def collect(spec: dict, work_root: Path, out: Path, planes: list[float]) -> None:
    """Tables from every finished folder under work_root (regimes in the spec's order), not only this call's."""
    rows, peaks, done = [], {}, {}
    for regime in spec["regimes"]:
        for work in sorted((work_root / regime).glob("seed*")):
            if not (work / DONE).is_file():
                continue
            seed = int(work.name[4:])
            rows += rows_of(work, regime, load_params(work / "params.yaml"), seed)
            stage, mib = log_peak(work / "outputs" / "logs")
            if mib > peaks.get(regime, ("", 0.0))[1]:
                peaks[regime] = (stage, mib)
            done.setdefault(regime, []).append(seed)
    if rows:
        seeds = sorted({s for v in done.values() for s in v})
        command = ("python benchmarks/testbed.py --regimes " + " ".join(done) + " --seeds "
                   + " ".join(map(str, seeds)) + " --crf-planes " + " ".join(map(str, planes)))
        write_tables(pd.DataFrame(rows, columns=COLUMNS), out, command, peaks)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
