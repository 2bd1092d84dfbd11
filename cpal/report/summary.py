"""The report stage: one table from every stage's metrics, per-class IoU bars and a qualitative grid.

Reads only files the pipeline wrote. Published VOC numbers sit in their own, labelled column: they
come from other papers' tables on PASCAL VOC and are never results of this code.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

# (stage label, published VOC number, source) - PASCAL VOC 2012, mIoU %, as the papers report them.
PUBLISHED_VOC = {
    "CAM seeds": (48.3, "IRN (CVPR 2019), VOC train"),
    "PACAM seeds": (62.5, "CPAL (CVPR 2024), CAM-based, VOC train"),
    "PACAM seeds, own background": (58.65, "SIPE (CVPR 2022), its IS-CAM argmax with its own background, VOC train"),
    "+CRF": (None, ""),
    "+IRN": (66.5, "IRN masks (CVPR 2019), VOC train"),
    "pseudo-masks": (None, ""),
    "DeepLab": (68.8, "SIPE (CVPR 2022), DeepLab-R101, VOC val; CPAL's 74.5 is CLIP-ES-based (I+L), not comparable"),
    "DeepLab+CRF": (None, ""),
    "upper bound": (76.35, "DeepLabV2 fully supervised, VOC val (77.69 with CRF)"),
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


def collect_rows(results: Path, logs: Path, with_irn: bool = True) -> list[dict[str, Any]]:
    """One row per stage that has run: mIoU, per-class IoU, seconds, published VOC reference.

    A stage evaluated without ground truth (your own data without masks) or skipped (the upper bound without
    training masks) gets a row with mIoU None and a `note` saying which, never a made-up number.
    ``with_irn`` False leaves out results/eval_irn.json: the report stage does not depend on the IRN branch
    (off the default path), so a file left there by an earlier run may not belong to this one.
    """
    seeds = _load(results / "eval_seeds.json") or {}
    seg = _load(results / "eval_seg.json")
    full = _load(results / "eval_seg_full.json")

    def per_class(d: dict[str, Any] | None) -> dict[str, float | None]:
        if not d:
            return {}
        if "per_class_iou" in d:
            return d["per_class_iou"]
        return {k: v["iou"] for k, v in d.get("per_class", {}).items()}

    entries = [
        ("CAM seeds", seeds.get("cam"), "make_seeds", "train"),
        ("PACAM seeds", seeds.get("pacam"), "make_seeds", "train"),
        ("PACAM seeds, own background", seeds.get("pacam_argmax"), "make_seeds", "train"),
        ("+CRF", _load(results / "eval_crf.json"), "refine_crf", "train"),
        ("+IRN", _load(results / "eval_irn.json") if with_irn else None, "refine_irn", "train"),
        ("pseudo-masks", _load(results / "eval_pseudo.json"), "pseudo_labels", "train"),
        ("DeepLab", seg, "train_seg", "val"),
        ("DeepLab+CRF", seg.get("crf") if seg else None, "eval_seg", "val"),
        ("upper bound", full, "train_seg_full", "val"),
    ]
    rows = []
    for label, data, stage, split in entries:
        if not data:
            continue
        top = seeds if label.endswith("seeds") else data
        note = _note(data, top)
        if data.get("miou") is None and not note:
            continue
        ref, source = PUBLISHED_VOC[label]
        rows.append({"stage": label, "split": split, "miou": data["miou"], "per_class": per_class(data),
                     "seconds": stage_seconds(logs / f"{stage}.log"), "voc_published": ref, "voc_source": source,
                     "note": note})
    bound = full["miou"] if full else None
    for row in rows:
        row["of_upper_bound"] = row["miou"] / bound if bound and row["miou"] is not None and row["split"] == "val" \
            else None
    return rows


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
        ref = f"{r['voc_published']:.1f}" if r["voc_published"] is not None else ""
        lines.append(f"| {r['stage']} | {r['split']} | {_miou_cell(r)} | {frac} | {secs} | {ref} | "
                     f"{r['voc_source']} |")
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
        "`dvc repro branches/irn/dvc.yaml` writes its numbers to results/eval_irn.json.",
        "",
        "![per-class IoU](report_per_class.png)",
        "",
        "![image, ground truth, CAM, PACAM, pseudo-mask, prediction](report_grid.png)",
    ]
    return "\n".join(lines) + "\n"


def plot_per_class(rows: list[dict[str, Any]], out: Path, footer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpal.core.io import atomic_path

    rows = [r for r in rows if r["per_class"]]
    classes = list(rows[0]["per_class"]) if rows else []
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
