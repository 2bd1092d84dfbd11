"""Seed benchmark for the CPAL issue: CAM vs SIPE vs CPAL on the embedded default, several seeds.

Not a test: it trains 3 methods x N seeds (about 2-4 minutes each on 2 CPU cores) and writes
results/seeds.md and results/seeds_benchmark.csv. Every number in them is measured by this script.

    python benchmarks/seeds.py --params params.yaml --data data/embedded --seeds 0 1 2

For CPAL models it also measures the PACAM with the context part switched off at seed time
(instance prototypes only, same weights): what the support bank adds at inference.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cpal.config import load_params, merge, validate_params
from cpal.data.voc import VOCDataset
from cpal.io import atomic_path, write_text
from cpal.runtime import machine_description
from cpal.seed_eval import evaluate_seeds, thresholds_from
from cpal.seeds import make_seeds
from cpal.train_cls import build_model, load_trained_model, train_classifier
from cpal.training import load_checkpoint, resolve_device

METHODS = ("cam", "sipe", "cpal")


def run_one(params: dict, data: Path, work: Path, log: logging.Logger, label: str) -> list[dict]:
    """Train one model and evaluate its seed maps; one row per (map, context) evaluated."""
    method, seed = params["params"]["method"], params["run"]["seed"]
    out = work / f"{label}_seed{seed}"
    t0 = time.perf_counter()
    train_classifier(params, data, out, log, progress=False)
    train_s = time.perf_counter() - t0
    timing = json.loads((out / "timing.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    device = resolve_device(params["run"]["device"])
    dataset = VOCDataset(data, params["seeds"]["split"])
    model = load_trained_model(out / "model.pt", params, dataset, device)
    variants = [("default", None)] + ([("no_context", False)] if method == "cpal" else [])
    rows = []
    for name, context in variants:
        seed_dir = out / f"seeds_{name}"
        seed_timing = make_seeds(model, dataset, seed_dir, params["seeds"], device, log, progress=False,
                                 context=context)
        results = evaluate_seeds(dataset, seed_dir, thresholds_from(params["seeds"]), log, progress=False)
        for kind in ("cam", "pacam"):
            if kind not in results:
                continue
            if name == "no_context" and kind == "cam":
                continue  # the CAM does not depend on the bank
            rows.append({
                "method": label, "seed": seed, "map": kind if name == "default" else "pacam_no_context",
                "miou": results[kind]["miou"], "best_threshold": results[kind]["best_threshold"],
                "val_map": metrics["val_map"], "train_seconds": train_s,
                "seconds_per_epoch": timing["seconds_per_epoch"], "train_images_per_s": timing["images_per_s"],
                "seed_images_per_s": seed_timing["images_per_s"],
                **{f"iou_{c}": v for c, v in results[kind]["per_class_iou"].items()},
            })
    return rows


def training_free_rows(params: dict, data: Path, work: Path, log: logging.Logger, seed: int) -> list[dict]:
    """Instance-prototype maps (SIPE-style inference) on a plain-CAM model, with no prototype training.

    The side convs of a `cam` model are never trained (L_self is off), so its features are fixed random
    projections of the backbone stages: this measures what prototype inference alone adds to a CAM.
    """
    out = work / f"cam_seed{seed}"
    sipe = merge(params, {"params": {"method": "sipe"}, "run": {"seed": seed}})
    device = resolve_device(params["run"]["device"])
    dataset = VOCDataset(data, params["seeds"]["split"])
    model = build_model(sipe, dataset.num_classes - 1)
    model.load_state_dict(load_checkpoint(out / "model.pt")["model"])
    model.to(device).eval()
    seed_dir = out / "seeds_training_free"
    timing = make_seeds(model, dataset, seed_dir, params["seeds"], device, log, progress=False)
    results = evaluate_seeds(dataset, seed_dir, thresholds_from(params["seeds"]), log, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    t = json.loads((out / "timing.json").read_text())
    return [{"method": "cam", "seed": seed, "map": "pacam_training_free", "miou": results["pacam"]["miou"],
             "best_threshold": results["pacam"]["best_threshold"], "val_map": metrics["val_map"],
             "train_seconds": None, "seconds_per_epoch": t["seconds_per_epoch"],
             "train_images_per_s": t["images_per_s"], "seed_images_per_s": timing["images_per_s"],
             **{f"iou_{c}": v for c, v in results["pacam"]["per_class_iou"].items()}}]


def summarise(df: pd.DataFrame, command: str, machine: str, n_seeds: int, cfg: dict) -> str:
    g = df.groupby(["method", "map"])
    table = g.agg(miou_mean=("miou", "mean"), miou_std=("miou", "std"), best_threshold=("best_threshold", "median"),
                  val_map=("val_map", "mean"), seconds_per_epoch=("seconds_per_epoch", "median"),
                  seed_images_per_s=("seed_images_per_s", "median")).reset_index()
    lines = [
        "# Seed quality: CAM vs SIPE vs CPAL on the embedded default",
        "",
        f"Machine: {machine}. Seeds (`run.seed`): {n_seeds} per method, same dataset (`data.seed` "
        f"{cfg['data']['seed']}). Backbone {cfg['train_cls']['backbone']} "
        f"(pretrained: {cfg['train_cls']['pretrained']}), {cfg['train_cls']['epochs']} epochs, "
        f"optimizer {cfg['train_cls']['optimizer']} lr {cfg['train_cls']['lr']}. Seed mIoU on the "
        f"`{cfg['seeds']['split']}` split, best background threshold of the sweep "
        f"{cfg['seeds']['bg_threshold_min']}..{cfg['seeds']['bg_threshold_max']}.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| method | map | seed mIoU (mean ± std) | best bg threshold (median) | val mAP | s / epoch "
        "| seed images / s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table.itertuples():
        std = 0.0 if np.isnan(r.miou_std) else r.miou_std
        lines.append(f"| {r.method} | {r.map} | {100 * r.miou_mean:.1f} ± {100 * std:.1f} | {r.best_threshold:.2f} | "
                     f"{r.val_map:.3f} | {r.seconds_per_epoch:.1f} | {r.seed_images_per_s:.1f} |")

    def paired(a: tuple[str, str], b: tuple[str, str]) -> str:
        x = df[(df["method"] == a[0]) & (df["map"] == a[1])].set_index("seed")["miou"]
        y = df[(df["method"] == b[0]) & (df["map"] == b[1])].set_index("seed")["miou"]
        common = x.index.intersection(y.index)
        if len(common) == 0:
            return "n/a"
        d = 100 * (x[common] - y[common])
        std = d.std() if len(d) > 1 else 0.0
        return f"{d.mean():+.1f} ± {std:.1f} points (per seed: {', '.join(f'{v:+.1f}' for v in d)})"

    best_cpal = table[table.method == "cpal"].sort_values("miou_mean").iloc[-1]["map"] if "cpal" in set(
        table.method) else None
    lines += [
        "",
        "Differences, paired by seed (mean ± std over seeds):",
        "",
        f"- CPAL ({best_cpal}) vs the plain CAM baseline (cam, cam): {paired(('cpal', best_cpal), ('cam', 'cam'))}",
        f"- What the context part adds: CPAL pacam vs SIPE pacam: {paired(('cpal', 'pacam'), ('sipe', 'pacam'))}",
        f"- Context at seed time only (same CPAL weights, bank on vs off): "
        f"{paired(('cpal', 'pacam'), ('cpal', 'pacam_no_context'))}",
        f"- SIPE pacam vs the plain CAM baseline: {paired(('sipe', 'pacam'), ('cam', 'cam'))}",
        f"- Prototype inference alone (plain CAM weights, instance prototypes, no prototype training): "
        f"{paired(('cam', 'pacam_training_free'), ('cam', 'cam'))}",
        f"- What L_self training does to the CAM: CPAL cam vs the plain CAM baseline: "
        f"{paired(('cpal', 'cam'), ('cam', 'cam'))}",
    ]
    for label in sorted(set(df.method) - set(METHODS)):
        lines.append(f"- Variant `{label}` (pacam) vs the plain CAM baseline: "
                     f"{paired((label, 'pacam'), ('cam', 'cam'))}")
    lines += [
        "",
        "Per-class IoU (mean over seeds) is in `results/seeds_benchmark.csv`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", default="data/embedded")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:METHOD:YAML",
                   help="an extra row, e.g. 'cpal_lambda0:cpal:{params: {lambda_self: 0}}' (repeatable)")
    p.add_argument("--work", default="outputs/benchmarks/seeds", help="scratch folder for models and seeds")
    p.add_argument("--out-md", default="results/seeds.md")
    p.add_argument("--out-csv", default="results/seeds_benchmark.csv")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in --out-csv")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench")
    base = load_params(args.params)
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: dataset not found; run `snakemake --cores 2 {args.data}` first")
    rows: list[dict] = []
    if Path(args.out_csv).is_file() and not args.fresh:  # resume: keep (method, seed) runs already measured
        rows = pd.read_csv(args.out_csv).to_dict("records")
    done = {(r["method"], r["seed"]) for r in rows}
    runs = [(m, m, {}) for m in args.methods]
    for spec in args.variant:
        label, method, override = spec.split(":", 2)
        runs.append((label, method, yaml.safe_load(override)))
    for seed in args.seeds:
        for label, method, override in runs:
            if (label, seed) in done:
                log.info("%s, seed %d: already in %s", label, seed, args.out_csv)
                continue
            params = validate_params(merge(merge(base, override),
                                           {"params": {"method": method}, "run": {"seed": seed}}))
            log.info("%s (method %s), seed %d", label, method, seed)
            rows += run_one(params, Path(args.data), Path(args.work), log, label)
            df = pd.DataFrame(rows)
            with atomic_path(args.out_csv) as tmp:
                df.to_csv(tmp, index=False, float_format="%.5f")
    for seed in args.seeds:
        have = {(r["method"], r["seed"], r["map"]) for r in rows}
        if "cam" in args.methods and ("cam", seed, "pacam_training_free") not in have:
            rows += training_free_rows(validate_params(merge(base, {"params": {"method": "cam"}})),
                                       Path(args.data), Path(args.work), log, seed)
            with atomic_path(args.out_csv) as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.5f")
    command = "python benchmarks/seeds.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_text(args.out_md, summarise(pd.DataFrame(rows), command, machine_description(), len(args.seeds), base))
    print(Path(args.out_md).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
