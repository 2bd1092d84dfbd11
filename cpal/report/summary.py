"""The report stage: one table from every stage's metrics, per-class IoU bars and a qualitative grid.

Reads only files the pipeline wrote. Published VOC numbers sit in their own, labelled column: they
come from other papers' tables on PASCAL VOC and are never results of this code.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

# (stage label, published VOC number, source) - PASCAL VOC 2012, mIoU %, as the papers report them. Each source is
# one a reader can open (paper and table, or repository and file); a number nobody here could open is labelled
# unverified and not printed as a reference (docs/published.md lists them all, with what was checked).
PUBLISHED_VOC = {
    "CAM seeds": (48.8, "CAM (IRN's ResNet-50), VOC train: LPCAM (CVPR 2023) Table 2"),
    "PACAM seeds": (None, "CPAL (CVPR 2024): no table of its CAM-based seeds opened; 62.5 unverified "
                          "(docs/published.md)"),
    "PACAM seeds, own background": (58.65, "SIPE (CVPR 2022), VOC train: chenqi1126/SIPE README, localization maps"),
    "+CRF": (None, ""),
    "+IRN": (66.5, "IRN's masks from CAM, VOC train: LPCAM (CVPR 2023) Table 2"),
    "pseudo-masks": (None, ""),
    "DeepLab": (68.8, "SIPE (CVPR 2022), DeepLab-R101, VOC val: chenqi1126/SIPE README, segmentation maps"),
    "DeepLab+CRF": (None, ""),
    "upper bound": (76.35, "DeepLabV2 fully supervised, VOC val (77.69 with CRF): kazuto1011/deeplab-pytorch README"),
}
_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ")


def stage_seconds(log: Path) -> float | None:
    """Wall time of a stage from the first and last timestamps of its log (None if not logged)."""
    if not log.is_file():
        return None
    stamps = [m.group(1) for line in log.read_text().splitlines() if (m := _TIME.match(line))]
    if len(stamps) < 1:
        return None
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def ordered_per_class(per_class: dict[str, Any], classes: list[str] | None) -> dict[str, Any]:
    """``per_class`` in the dataset's own class order (background first); the eval JSONs are written with sorted
    keys, which put VOC's background between aeroplane and bicycle. Names the dataset does not list keep their
    order after it."""
    if not classes:
        return dict(per_class)
    known = {c: per_class[c] for c in classes if c in per_class}
    return {**known, **{k: v for k, v in per_class.items() if k not in known}}


def collect_rows(results: Path, logs: Path, with_irn: bool = True, classes: list[str] | None = None,
                 splits: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per stage that has run: mIoU, per-class IoU, seconds, published VOC reference.

    A row's split is the split its evaluation recorded (VOC's seeds run on train_aug, not train); ``splits``
    (``{"train": seeds.split, "val": seg.val_split}``) only fills in for a file written before splits were
    recorded. ``classes`` (the dataset's, background first) orders every per-class dict.
    A stage evaluated without ground truth (your own data without masks) or skipped (the upper bound without
    training masks) gets a row with mIoU None and a `note` saying which, never a made-up number.
    ``with_irn`` False leaves out results/eval_irn.json: the report stage does not depend on the IRN branch
    (off the default path), so a file left there by an earlier run may not belong to this one.
    """
    splits = {"train": "train", "val": "val", **(splits or {})}
    seeds = _load(results / "eval_seeds.json") or {}
    seg = _load(results / "eval_seg.json")
    full = _load(results / "eval_seg_full.json")

    def per_class(d: dict[str, Any] | None) -> dict[str, float | None]:
        if not d:
            return {}
        if "per_class_iou" in d:
            return ordered_per_class(d["per_class_iou"], classes)
        return ordered_per_class({k: v["iou"] for k, v in d.get("per_class", {}).items()}, classes)

    # (label, evaluation, the file that holds its split, stage whose log times it, side)
    entries = [
        ("CAM seeds", seeds.get("cam"), seeds, "make_seeds", "train"),
        ("PACAM seeds", seeds.get("pacam"), seeds, "make_seeds", "train"),
        ("PACAM seeds, own background", seeds.get("pacam_argmax"), seeds, "make_seeds", "train"),
        ("+CRF", _load(results / "eval_crf.json"), None, "refine_crf", "train"),
        ("+IRN", _load(results / "eval_irn.json") if with_irn else None, None, "refine_irn", "train"),
        ("pseudo-masks", _load(results / "eval_pseudo.json"), None, "pseudo_labels", "train"),
        ("DeepLab", seg, None, "train_seg", "val"),
        ("DeepLab+CRF", seg.get("crf") if seg else None, seg, "eval_seg", "val"),
        ("upper bound", full, None, "train_seg_full", "val"),
    ]
    rows = []
    for label, data, owner, stage, side in entries:
        if not data:
            continue
        top = owner if owner is not None else data
        note = _note(data, top)
        if data.get("miou") is None and not note:
            continue
        ref, source = PUBLISHED_VOC[label]
        rows.append({"stage": label, "split": data.get("split") or top.get("split") or splits[side],
                     "miou": data["miou"], "per_class": per_class(data),
                     "seconds": stage_seconds(logs / f"{stage}.log"), "voc_published": ref, "voc_source": source,
                     "note": note, "side": side})
    bound = full["miou"] if full else None
    for row in rows:
        row["of_upper_bound"] = row["miou"] / bound if bound and row["miou"] is not None and row["side"] == "val" \
            else None
        del row["side"]
    return rows


def reproduce_command(params_file: str | Path, presets: str | Path = "configs") -> str:
    """The command that reproduces this run, from the params file the stage was given.

    Snakemake hands stages its merged config, whose first line (cpal.core.config.write_resolved_params) names
    the configfiles it merged; DVC hands them params.yaml itself, named as the preset it equals if it does.
    """
    from cpal.core.config import RESOLVED_HEADER, load_yaml

    path = Path(params_file)
    text = path.read_text() if path.is_file() else ""
    first = text.splitlines()[0] if text else ""
    if first.startswith(RESOLVED_HEADER) and path.name != "params.yaml":  # a copy of it run by DVC is DVC's
        files = [f for f in shlex.split(first[len(RESOLVED_HEADER):]) if f != "params.yaml"]
        return "snakemake --cores 2" + (" --configfile " + shlex.join(files) if files else "")
    folder = Path(presets)
    if text and folder.is_dir():
        mine = load_yaml(text)
        for preset in sorted(folder.glob("*.yaml")):
            if load_yaml(preset.read_text()) == mine:
                return f"cp {folder.name}/{preset.name} {path.name} && dvc repro report"
    return "dvc repro report" if path.name == "params.yaml" else f"cp {path} params.yaml && dvc repro report"


def _note(data: dict[str, Any], top: dict[str, Any]) -> str:
    """Why a row has no mIoU: the stage was skipped, or its split has no ground truth ('' when it has one)."""
    if data.get("skipped"):
        return "skipped: " + str(data["skipped"])
    if top.get("ground_truth") is False:
        return "no ground truth"
    return ""


def _miou_cell(r: dict[str, Any]) -> str:
    if r["miou"] is not None:
        return f"{100 * r['miou']:.1f}"
    return "skipped" if r["note"].startswith("skipped") else r["note"]


def markdown(rows: list[dict[str, Any]], method: str, machine: str, command: str, init: str | None) -> str:
    lines = [
        f"# Pipeline report: method `{method}`",
        "",
        f"Machine: {machine}. One run (`run.seed` as in params). DeepLab initialisation: `{init}`.",
        f"Reproduce: `{command}`",
        "",
        "| stage | split | mIoU (%) | of upper bound | stage seconds | published VOC (%) | published source |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        frac = f"{r['of_upper_bound']:.2f}" if r["of_upper_bound"] is not None else ""
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else ""
        ref = f"{r['voc_published']:g}" if r["voc_published"] is not None else ""
        lines.append(f"| {r['stage']} | {r['split']} | {_miou_cell(r)} | {frac} | {secs} | {ref} | "
                     f"{r['voc_source']} |")
    lines += per_class_table(rows)
    unscored = [r for r in rows if r["miou"] is None]
    if unscored:
        lines += ["", "**No ground truth.** " + "; ".join(f"{r['stage']} ({r['split']}): {r['note']}" for r in unscored)
                  + ". These rows ran but could not be scored: the data has no ground-truth masks for their split. "
                  "The DeepLab model was trained all the same (outputs/seg/model.pt); every threshold the pipeline "
                  "used there was derived without masks (docs/method.md, \"Without ground truth\")."]
    lines += [
        "",
        "Ours: the embedded dataset or whichever data `params.yaml` names. The published column is PASCAL VOC 2012",
        "from the papers named there, for orientation only: different data, backbones and budgets. Stage seconds",
        "come from the stage logs (first to last line). Seed rows: best background threshold of the sweep (picked",
        "with ground truth), except \"own background\": SIPE's protocol, the argmax over the prototype map's",
        "background channel and the classes, no threshold. This is one draw: how much a rerun with another",
        "`run.seed` moves the seed rows is in `results/seeds.md` (seed-to-seed std of the 3-seed benchmark).",
        "The IRN branch is off the default path and not in this table (with `pseudo.source: irn` the",
        "pseudo-mask row is IRN's): `snakemake --cores 2 results/eval_irn.json` or",
        "`dvc repro hosts/dvc.yaml:eval_pseudo@irn` writes its numbers to results/eval_irn.json.",
        "",
        "![per-class IoU](report_per_class.png)",
        "",
        "![image, ground truth, CAM, PACAM, pseudo-mask, prediction](report_grid.png)",
    ]
    return "\n".join(lines) + "\n"


def per_class_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per-class IoU (%) of every scored row, one line per class in the dataset's order
    (collect_rows ordered them, background first); none when no row has per-class numbers."""
    scored = [r for r in rows if r["per_class"]]
    if not scored:
        return []
    fullest = max(scored, key=lambda r: len(r["per_class"]))  # seed rows may lack classes no image showed
    classes = list(dict.fromkeys([*fullest["per_class"], *(c for r in scored for c in r["per_class"])]))
    lines = ["", "Per-class IoU (%):", "",
             "| class | " + " | ".join(f"{r['stage']} ({r['split']})" for r in scored) + " |",
             "| --- |" + " --- |" * len(scored)]
    for c in classes:
        cells = [r["per_class"].get(c) for r in scored]
        lines.append(f"| {c} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    return lines


def plot_per_class(rows: list[dict[str, Any]], out: Path, footer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpal.core.io import atomic_path

    rows = [r for r in rows if r["per_class"]]
    classes = list(max(rows, key=lambda r: len(r["per_class"]))["per_class"]) if rows else []
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(classes) + 2), 4.2))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [np.nan if r["per_class"].get(c) is None else r["per_class"][c] for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, vals, width, label=f"{r['stage']} ({r['split']})")
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30, ha="right")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    if rows:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no ground-truth masks: no per-class IoU", ha="center", va="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, footer, fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_grid(panels: list[tuple[str, list[np.ndarray | None]]], titles: list[str], out: Path, footer: str) -> None:
    """Rows of (id, [image, gt, cam, pacam, pseudo, prediction]) label maps shown in the VOC palette (None: no mask)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpal.core.io import atomic_path, voc_palette

    palette = voc_palette()
    fig, axes = plt.subplots(len(panels), len(titles), figsize=(1.9 * len(titles), 1.9 * len(panels) + 0.5),
                             squeeze=False)
    for r, (image_id, images) in enumerate(panels):
        for c, img in enumerate(images):
            ax = axes[r][c]
            if img is None:  # no ground-truth mask
                ax.text(0.5, 0.5, "no mask", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                ax.imshow(img if img.ndim == 3 else palette[img])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(image_id, fontsize=7)
    fig.text(0.01, 0.005, footer, fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def terminal_table(csv_path: str | Path) -> str:
    """The report's table as plain aligned text (stage, split, mIoU %, stage seconds) from report.csv,
    so that `bash run.sh` ends by showing the user the numbers their own run produced."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = ["stage", "split", "mIoU (%)", "seconds"]
    cells = [[r["stage"], r["split"], f"{100 * float(r['miou']):.1f}" if r["miou"] else _short(r.get("note", "")),
              f"{float(r['seconds']):.0f}" if r.get("seconds") else ""] for r in rows]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, cells)])


def _short(note: str) -> str:
    return "skipped" if note.startswith("skipped") else note or "-"


def main(argv: list[str] | None = None) -> int:
    """`python -m cpal.report.summary [results/report.csv]`: print the report's table (run.sh calls it last)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "results/report.csv")
    if not path.is_file():
        print(f"(no {path}: the report stage has not run here)")
        return 0
    print(terminal_table(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
