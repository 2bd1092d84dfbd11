"""DeepLab recipes on a finished workspace: the val mIoU curve per epoch, the final multi-scale val mIoU and
the training time of each recipe, on ground truth (the upper bound) and on the workspace's pseudo-masks.
Writes results/seg_recipe.md and results/seg_recipe.csv (one row per recipe, labels and epoch).

Not a test. The settings chosen here are chosen with validation ground truth (docs/method.md says so).
Each recipe is a set of `seg.*` overrides over the workspace's params; runs are sequential (one torch
job at a time) and each trains from scratch into outputs/benchmarks/seg_recipe/<name>/<labels>/; a
finished run is reused, so an interrupted sweep continues.

    python benchmarks/seg_recipe.py --workspace /path/to/finished/run \
        --recipe today:epochs=3 --recipe e12:epochs=12 --labels gt pseudo
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from cpal.core.config import load_params, validate_params
from cpal.core.io import write_json, write_text
from cpal.core.runtime import keep_freed_memory, machine_description
from cpal.core.training import resolve_device
from cpal.data.voc import VOCDataset
from cpal.seg.evaluate import evaluate_segmenter
from cpal.seg.train import load_segmenter, train_segmenter, training_settings


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """`name:key=value,key=[1,2]` (values read as YAML) -> (name, overrides of the seg section); the key
    `labels` (gt | pseudo | [gt, pseudo]) limits that recipe to those labels."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, re.split(r",(?=\s*\w+=)", rest)):  # a comma inside a list value stays
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def eval_protocol(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"scales": list(cfg["scales"]), "flip": bool(cfg["flip"])}


def run_one(params: dict[str, Any], overrides: dict[str, Any], data_dir: Path, labels_dir: Path | None, out: Path,
            log: logging.Logger) -> dict[str, Any]:
    """Train (or reuse) one DeepLab and evaluate it with the pipeline's own protocol (eval_seg, no CRF).

    A finished run is reused only if it was trained with the same settings, the whole seg section but its
    evaluation keys (else: an error naming both), so a recipe keeps its meaning when params.yaml's defaults
    move; evaluated under another protocol (params' seg.scales / seg.flip), its saved model is evaluated again.
    """
    result_file = out / "result.json"
    cfg = params["seg"]
    settings = training_settings(cfg)
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result is not None and result.get("settings") != settings:
        raise ValueError(f"{out} was trained with seg {result.get('settings')} (overrides {result.get('overrides')}), "
                         f"not {settings}: give this recipe another name")
    if result is None:
        t0 = time.perf_counter()
        metrics = train_segmenter(params, data_dir, labels_dir, out, log, progress=False)
        result = {"overrides": overrides, "settings": settings, "train_seconds": time.perf_counter() - t0,
                  "steps": metrics["steps"], "epochs": metrics["epochs"],
                  "curve": [h.get("val_miou") for h in metrics["history"]]}
    if result.get("protocol") != eval_protocol(cfg):
        device = resolve_device(params["run"]["device"])
        val = VOCDataset(data_dir, cfg["val_split"])
        model, _ = load_segmenter(out / "model.pt", cfg, val.classes, device)
        scores = evaluate_segmenter(model, val, {**cfg, "crf": False}, device, log, progress=False)
        result.update(overrides=overrides, val_miou=scores["miou"], protocol=eval_protocol(cfg))
        write_json(result_file, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, required=True, help="a finished pipeline run (data/, outputs/pseudo)")
    p.add_argument("--params", type=Path, default=None, help="params file (default: WORKSPACE/params.yaml)")
    p.add_argument("--recipe", action="append", required=True, help="name:seg_key=value,... (repeatable)")
    p.add_argument("--labels", nargs="+", default=["gt", "pseudo"], choices=["gt", "pseudo"])
    p.add_argument("--out", type=Path, default=Path("results/seg_recipe"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: params run.torch_threads)")
    p.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the report as written")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("seg_recipe")
    ws = args.workspace.resolve()
    base = load_params(args.params or ws / "params.yaml")
    keep_freed_memory()  # as the stages run (stages/common.py)
    threads = args.threads or base["run"].get("torch_threads")
    if threads:
        torch.set_num_threads(threads)
    data_dir = ws / base["data"]["dir"]
    pseudo_dir = ws / "outputs" / "pseudo" / "labels"
    work = ws / "outputs" / "benchmarks" / "seg_recipe"
    rows = []
    for text in args.recipe:
        name, overrides = parse_recipe(text)
        only = overrides.pop("labels", None)  # `labels=gt`: this recipe on these labels only
        params = copy.deepcopy(base)
        params["seg"].update(overrides, val_every=1)
        validate_params(params, source=f"recipe {name}")
        for labels in [only] if isinstance(only, str) else (only or args.labels):
            log.info("recipe %s (%s) on %s", name, overrides, labels)
            res = run_one(params, overrides, data_dir, None if labels == "gt" else pseudo_dir, work / name / labels,
                          log)
            for epoch, miou in enumerate(res["curve"], start=1):
                rows.append({"recipe": name, "overrides": json.dumps(overrides), "labels": labels, "epoch": epoch,
                             "curve_miou": miou, "final_val_miou": res["val_miou"], "steps": res["steps"],
                             "train_seconds": res["train_seconds"]})
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    final = (table.groupby(["recipe", "labels"], sort=False)
             .agg(overrides=("overrides", "first"), steps=("steps", "first"), epochs=("epoch", "max"),
                  val_miou=("final_val_miou", "first"), train_s=("train_seconds", "first")).reset_index())
    final["val_miou"] = (100 * final["val_miou"]).round(1)
    final["train_s"] = final["train_s"].round(0).astype(int)
    command = "python benchmarks/seg_recipe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    md = ["# DeepLab recipes on the embedded default", "",
          f"Machine: {machine_description()}. One seed (run.seed {base['run']['seed']}); the workspace's "
          f"pseudo-masks ({base['params']['method']}). Command: `{command}`.", "",
          f"val mIoU (%): the pipeline's eval_seg protocol (scales {base['seg']['scales']}, flip "
          f"{base['seg']['flip']}, no CRF). Curves "
          "(one scale, no flip) per epoch in the CSV. Chosen with validation ground truth.", "",
          final.to_markdown(index=False), ""]
    if args.notes is not None:
        md += [args.notes.read_text().rstrip(), ""]
    write_text(args.out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
