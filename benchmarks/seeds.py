"""Seed benchmark: CAM vs SIPE vs CPAL on the embedded data, several seeds, per backbone regime.

Not a test: it trains 3 methods x N seeds (about 4-8 minutes each on 2 CPU cores) and writes
results/seeds.md and results/seeds_benchmark.csv. Every number in them is measured by this script.

    python benchmarks/seeds.py --params params.yaml --data data/embedded --seeds 0 1 2

Rows are keyed by (method label, seed, base settings): `base_settings` is a fingerprint of the params
file's method, classifier and seed settings (without `params.method` and `run.seed`), so a run measured
under other settings is never reused as the current default's; runs of other settings already in the
CSV (the from-scratch ResNet-18 default of the first release among them) are kept and shown as their
own labelled groups. For CPAL models it also measures the PACAM with the context part switched off at seed time
(instance prototypes only, same weights): what the support bank adds at inference. Prototype maps are
reported under two protocols: `pacam` (best background threshold of the sweep, as for CAM) and
`pacam_argmax` (the map's own background channel, no threshold: the protocol SIPE reports).
`--variant` adds rows for a changed setting (the ablation section compares each with its base method
at the same seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from cpal.cls.train import build_model, load_trained_model, train_classifier
from cpal.core.config import load_params, merge, validate_params
from cpal.core.io import atomic_path, write_text
from cpal.core.runtime import machine_description
from cpal.core.training import config_fingerprint, load_checkpoint, resolve_device
from cpal.data.voc import VOCDataset
from cpal.seeds.evaluate import evaluate_seeds, thresholds_from
from cpal.seeds.make import make_seeds

METHODS = ("cam", "sipe", "cpal")


INERT = {"bank_clusters": 0}  # switches added after runs were measured, at their "off" value


def settings_id(params: dict) -> str:
    """Fingerprint of what a seed run depends on besides the method and the seed. A switch added later
    and left off (INERT) leaves it unchanged: it changes nothing the run computes."""
    method = {k: v for k, v in params["params"].items() if k != "method" and INERT.get(k, object()) != v}
    return config_fingerprint(method, params["train_cls"], params["seeds"], params["data"])[:10]

LEGACY = "first-release"  # rows written before fingerprints: ResNet-18 from scratch, 10 epochs
GOALS = (  # (what, (method, map), (method, map), minimum paired gain in points): this project's goal
    ("SIPE over plain CAM", ("sipe", "pacam"), ("cam", "cam"), 6.0),
    ("CPAL over SIPE (the context part)", ("cpal", "pacam"), ("sipe", "pacam"), 2.0),
    ("CPAL over plain CAM", ("cpal", "pacam"), ("cam", "cam"), 8.0),
)


def run_one(params: dict, data: Path, work: Path, log: logging.Logger, label: str) -> list[dict]:
    """Train one model and evaluate its seed maps; one row per (map, context) evaluated."""
    seed = params["run"]["seed"]
    out = work / f"{label}_seed{seed}"
    t0 = time.perf_counter()
    train_classifier(params, data, out, log, progress=False)
    train_s = time.perf_counter() - t0
    timing = json.loads((out / "timing.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    device = resolve_device(params["run"]["device"])
    dataset = VOCDataset(data, params["seeds"]["split"])
    model = load_trained_model(out / "model.pt", params, dataset, device)
    # bank off at seed time: for the main CPAL rows only (an ablation variant does not need it)
    variants = [("default", None)] + ([("no_context", False)] if label == "cpal" else [])
    rows = []
    regime = {"backbone": params["train_cls"]["backbone"], "pretrained": bool(params["train_cls"]["pretrained"])}
    for name, context in variants:
        seed_dir = out / f"seeds_{name}"
        seed_timing = make_seeds(model, dataset, seed_dir, params["seeds"], device, log, progress=False,
                                 context=context)
        results = evaluate_seeds(dataset, seed_dir, thresholds_from(params["seeds"]), log, progress=False)
        for kind in ("cam", "pacam", "pacam_argmax"):
            if kind not in results:
                continue
            if name == "no_context" and kind == "cam":
                continue  # the CAM does not depend on the bank
            rows.append({
                "method": label, "seed": seed, **regime,
                "map": kind if name == "default" else kind.replace("pacam", "pacam_no_context"),
                "miou": results[kind]["miou"], "best_threshold": results[kind].get("best_threshold"),
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
    regime = {"backbone": params["train_cls"]["backbone"], "pretrained": bool(params["train_cls"]["pretrained"])}
    return [{"method": "cam", "seed": seed, **regime, "map": "pacam_training_free", "miou": results["pacam"]["miou"],
             "best_threshold": results["pacam"]["best_threshold"], "val_map": metrics["val_map"],
             "train_seconds": None, "seconds_per_epoch": t["seconds_per_epoch"],
             "train_images_per_s": t["images_per_s"], "seed_images_per_s": timing["images_per_s"],
             **{f"iou_{c}": v for c, v in results["pacam"]["per_class_iou"].items()}}]


def _stats(x: pd.Series) -> str:
    std = x.std() if len(x) > 1 else 0.0
    return f"{100 * x.mean():.1f} ± {100 * std:.1f}"


def paired_diff(df: pd.DataFrame, a: tuple[str, str], b: tuple[str, str]) -> pd.Series:
    """Points of (method, map) a minus b, per seed present in both."""
    x = df[(df["method"] == a[0]) & (df["map"] == a[1])].set_index("seed")["miou"]
    y = df[(df["method"] == b[0]) & (df["map"] == b[1])].set_index("seed")["miou"]
    common = x.index.intersection(y.index)
    return 100 * (x[common] - y[common])


def _fmt_diff(d: pd.Series) -> str:
    if len(d) == 0:
        return "n/a"
    std = d.std() if len(d) > 1 else 0.0
    return f"{d.mean():+.1f} ± {std:.1f} points (per seed: {', '.join(f'{v:+.1f}' for v in d)})"


def _table(df: pd.DataFrame) -> list[str]:
    lines = ["| method | map | seeds | seed mIoU (mean ± std) | best bg threshold (median) | val mAP | s / epoch "
             "| seed images / s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, kind), g in df[df["method"].isin(METHODS)].groupby(["method", "map"], sort=True):
        thr = g["best_threshold"].median()
        lines.append(f"| {method} | {kind} | {g['seed'].nunique()} | {_stats(g['miou'])} | "
                     f"{'argmax' if pd.isna(thr) else f'{thr:.2f}'} | {g['val_map'].mean():.3f} | "
                     f"{g['seconds_per_epoch'].median():.1f} | {g['seed_images_per_s'].median():.1f} |")
    return lines


def _differences(df: pd.DataFrame) -> list[str]:
    lines = ["Differences, paired by seed (mean ± std over seeds); `pacam` is the sweep protocol, "
             "`pacam_argmax` SIPE's:", ""]
    for what, a, b in (
        ("SIPE pacam vs the plain CAM baseline", ("sipe", "pacam"), ("cam", "cam")),
        ("SIPE pacam_argmax (its own background) vs the plain CAM baseline", ("sipe", "pacam_argmax"),
         ("cam", "cam")),
        ("CPAL pacam vs the plain CAM baseline", ("cpal", "pacam"), ("cam", "cam")),
        ("CPAL pacam_argmax vs the plain CAM baseline", ("cpal", "pacam_argmax"), ("cam", "cam")),
        ("What the context part adds: CPAL pacam vs SIPE pacam", ("cpal", "pacam"), ("sipe", "pacam")),
        ("The same under SIPE's protocol: CPAL pacam_argmax vs SIPE pacam_argmax", ("cpal", "pacam_argmax"),
         ("sipe", "pacam_argmax")),
        ("Context at seed time only (same CPAL weights, bank on vs off)", ("cpal", "pacam"),
         ("cpal", "pacam_no_context")),
        ("Prototype inference alone (plain CAM weights, instance prototypes, no prototype training)",
         ("cam", "pacam_training_free"), ("cam", "cam")),
        ("What L_self training does to the CAM: CPAL cam vs the plain CAM baseline", ("cpal", "cam"),
         ("cam", "cam")),
    ):
        d = paired_diff(df, a, b)
        if len(d):
            lines.append(f"- {what}: {_fmt_diff(d)}")
    return lines


def _goals(df: pd.DataFrame) -> list[str]:
    lines = ["Goals of this project (paired by seed, mean of the seeds, sweep protocol for every map):", ""]
    for what, a, b, goal in GOALS:
        d = paired_diff(df, a, b)
        if len(d) == 0:
            lines.append(f"- {what}: not measured")
            continue
        verdict = "met" if d.mean() >= goal else "NOT met"
        # two decimals: a mean of +5.98 printed as +6.0 next to "NOT met" reads as a contradiction
        lines.append(f"- {what}: {d.mean():+.2f} ± {(d.std() if len(d) > 1 else 0.0):.2f} "
                     f"(goal >= +{goal:.0f}): {verdict}")
    return lines


def _ablation(df: pd.DataFrame) -> list[str]:
    """Each variant against its base method at the same seed (cam, pacam and pacam_argmax)."""
    variants = sorted(set(df["method"]) - set(METHODS))
    if not variants:
        return []
    lines = ["| variant | setting changed | seed | cam | pacam | pacam_argmax | val mAP |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label in variants:
        v = df[df["method"] == label]
        base = v["base_method"].iloc[0]
        override = v["override"].iloc[0] if "override" in v else ""
        cells = []
        for kind in ("cam", "pacam", "pacam_argmax"):
            d = paired_diff(df, (label, kind), (base, kind))
            mine = v[v["map"] == kind]["miou"]
            if len(mine) == 0:
                cells.append("–")
            else:
                cells.append(f"{100 * mine.mean():.1f} " + ("(no base run)" if len(d) == 0 else f"({d.mean():+.1f})"))
        seeds = ", ".join(str(x) for x in sorted(v["seed"].unique()))
        lines.append(f"| {label} | `{override}` (base: {base}) | {seeds} | {' | '.join(cells)} | "
                     f"{v['val_map'].mean():.3f} |")
    spread = []
    for method in METHODS:
        for kind in ("cam", "pacam"):
            x = df[(df["method"] == method) & (df["map"] == kind)]["miou"]
            if len(x) > 1:
                spread.append(f"{method} {kind} {100 * x.std():.1f}")
    lines += ["", "Cells: the variant's seed mIoU (its difference to the base method at the same seed, points). "
              "Seed-to-seed std of the base runs, for scale: " + (", ".join(spread) or "n/a") + "."]
    return lines


def summarise(df: pd.DataFrame, command: str, machine: str, cfg: dict, n_images: int) -> str:
    df = df.copy()
    df["pretrained"] = df["pretrained"].astype(str).str.lower().eq("true")
    backbone, pretrained = cfg["train_cls"]["backbone"], bool(cfg["train_cls"]["pretrained"])
    current = df[df["base_settings"] == settings_id(cfg)]
    tc = cfg["train_cls"]
    lines = [
        "# Seed quality: CAM vs SIPE vs CPAL on the embedded data",
        "",
        f"Machine: {machine}. Same dataset for every run (`data.seed` {cfg['data']['seed']}); `run.seed` varies. "
        f"Seed mIoU on the `{cfg['seeds']['split']}` split ({n_images} images), scales "
        f"{cfg['seeds']['scales']} with flips. Two protocols: the best background threshold of the sweep "
        f"{cfg['seeds']['bg_threshold_min']}..{cfg['seeds']['bg_threshold_max']} (picked with ground truth, "
        "which flatters every map alike; `cam`, `pacam`), and SIPE's argmax over the prototype map's own "
        "background channel (`pacam_argmax`, no threshold).",
        "",
        f"Reproduce: `{command}`",
        "",
        f"## Current default: {backbone}, ImageNet-pretrained: {pretrained} (settings `{settings_id(cfg)}`)",
        "",
        f"Output stride {tc['output_stride']}, frozen stages {tc['freeze_stages']}, frozen BatchNorm "
        f"{tc['freeze_bn']}, {tc['epochs']} epochs, {tc['optimizer']} lr {tc['lr']} (new layers x"
        f"{tc['new_layer_lr_mult']}), grad clip {tc['grad_clip']}, padding masked {tc['mask_padding']}; "
        f"seeds `{cfg['params']['seed_mode']}` (background x{cfg['params']['seed_bg_scale']}), lambda_self "
        f"{cfg['params']['lambda_self']}, centring {cfg['params']['center_features']}, bank "
        f"{cfg['params']['bank_size']}, K {cfg['params']['K']}.",
        "",
        *_table(current), "", *_goals(current), "", *_differences(current), "",
    ]
    ablation = _ablation(current)
    if ablation:
        lines += ["### Ablation: one setting changed from the default (SIPE-faithful switches and others)", "",
                  *ablation, ""]
    for (settings, bb, pt), g in df.groupby(["base_settings", "backbone", "pretrained"]):
        if settings == settings_id(cfg):
            continue
        what = ("the first release's default: ResNet-18 from scratch, 10 epochs, AdamW lr 0.002, argmax seeds, "
                "lambda 0.5" if settings == LEGACY else "see git history of params.yaml for its settings")
        lines += [f"## Other settings: {bb}, ImageNet-pretrained: {pt} (settings `{settings}`)", "",
                  f"Kept for comparison ({what}).", "", *_table(g), "", *_differences(g), ""]
    lines.append("Per-class IoU of every run is in `results/seeds_benchmark.csv`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", default="data/embedded")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:METHOD:YAML",
                   help="an extra row, e.g. 'cpal_lambda0:cpal:{params: {lambda_self: 0}}' (repeatable)")
    p.add_argument("--variant-seeds", type=int, nargs="+", default=None,
                   help="seeds for the --variant runs (default: --seeds)")
    p.add_argument("--training-free", action="store_true",
                   help="also prototype maps on the plain CAM weights (one more seed pass per seed)")
    p.add_argument("--work", default="outputs/benchmarks/seeds", help="scratch folder for models and seeds")
    p.add_argument("--out-md", default="results/seeds.md")
    p.add_argument("--out-csv", default="results/seeds_benchmark.csv")
    p.add_argument("--fresh", action="store_true", help="ignore runs already in --out-csv")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: run.torch_threads); 1 lets two benchmark processes share "
                        "2 cores without oversubscribing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench")
    base = load_params(args.params)
    threads = base["run"]["torch_threads"] if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    if not Path(args.data).is_dir():
        raise SystemExit(f"{args.data}: dataset not found; run `snakemake --cores 2 {args.data}` first")
    rows: list[dict] = []
    if Path(args.out_csv).is_file() and not args.fresh:  # resume: keep runs already measured
        old = pd.read_csv(args.out_csv)
        # rows of the first release carry no regime columns: ResNet-18 from scratch
        defaults = {"backbone": "resnet18", "pretrained": False, "base_method": old["method"], "override": "",
                    "base_settings": LEGACY}
        for col, value in defaults.items():
            old[col] = old[col].fillna(value) if col in old else value
        old["pretrained"] = old["pretrained"].astype(str).str.lower().eq("true")
        rows = old.to_dict("records")
    current = settings_id(base)
    done = {(r["method"], int(r["seed"]), r["base_settings"]) for r in rows}
    runs = [(m, m, {}, args.seeds) for m in args.methods]
    for spec in args.variant:
        label, method, override = spec.split(":", 2)
        runs.append((label, method, yaml.safe_load(override), args.variant_seeds or args.seeds))
    work = Path(args.work) / current
    for label, method, override, seeds in runs:
        for seed in seeds:
            if (label, seed, current) in done:
                log.info("%s, seed %d: already in %s", label, seed, args.out_csv)
                continue
            params = validate_params(merge(merge(base, override),
                                           {"params": {"method": method}, "run": {"seed": seed}}))
            log.info("%s (method %s), seed %d", label, method, seed)
            text = yaml.safe_dump(override, default_flow_style=True, width=10**6).strip() if override else ""
            rows += [{**r, "base_method": method, "override": text, "base_settings": current,
                      "settings": settings_id(params)} for r in run_one(params, Path(args.data), work, log, label)]
            with atomic_path(args.out_csv) as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.5f")
    if args.training_free and "cam" in args.methods:
        for seed in args.seeds:
            have = {(r["method"], r["seed"], r["map"], r["base_settings"]) for r in rows}
            if ("cam", seed, "pacam_training_free", current) not in have:
                rows += [{**r, "base_method": "cam", "override": "", "base_settings": current,
                          "settings": current} for r in training_free_rows(
                    validate_params(merge(base, {"params": {"method": "cam"}})), Path(args.data), work, log, seed)]
                with atomic_path(args.out_csv) as tmp:
                    pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.5f")
    command = "python benchmarks/seeds.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    n_images = len(VOCDataset(args.data, base["seeds"]["split"]))
    write_text(args.out_md, summarise(pd.DataFrame(rows), command, machine_description(), base, n_images))
    print(Path(args.out_md).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
