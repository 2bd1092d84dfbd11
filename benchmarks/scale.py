"""How the per-image stages grow with the number of images: seconds per image and peak RSS per stage at
1,000, 4,000 and 10,000 images (VOC's train_aug has 10,582), for the embedded generator and a photo folder.

    python benchmarks/scale.py --classifier outputs/train_cls/model.pt --segmenter outputs/seg/model.pt
    python benchmarks/scale.py --sizes 1000 4000 10000 --work /tmp/scale ...   # the committed table

Every stage runs alone, as its own process with the command its rule runs (explicit paths, params.yaml plus
the size), on one classifier and one DeepLab trained beforehand (the default run's): a stage's cost does not
depend on how well its network was trained. Seconds and peak RSS come from the process itself (os.wait4).
The folder source runs its data stage (the conversion: decoding every photo); the stages after it read the
same VOC layout either way. Writes results/scale.csv (images, source, stage, seconds, peak_rss_mib, per-image
seconds) and results/scale.md with the 10,000-against-1,000 ratios the goals are set on.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpal.core.config import load_params, validate_params  # noqa: E402
from cpal.core.io import write_text  # noqa: E402
from cpal.core.runtime import machine_description  # noqa: E402

STAGES = ("data", "make_seeds", "eval_seeds", "refine_crf", "pseudo_labels", "eval_pseudo", "predict")
GOAL_SECONDS, GOAL_RSS, RSS_CAP_MIB = 1.3, 1.5, 4096


def measure(cmd: list[str], log: Path) -> dict[str, float]:
    """Run ``cmd`` alone; wall seconds and the process's own peak RSS (MiB) from the kernel."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def params_for(base: dict[str, Any], images: int, data_dir: Path) -> dict[str, Any]:
    """params.yaml with ``images`` embedded images, 80 % train and 20 % val as the default's 800 + 200."""
    params = copy.deepcopy(base)
    n_val = images // 5
    params["data"]["embedded"].update(n_train=images - n_val, n_val=n_val)
    params["data"]["dir"] = str(data_dir)
    return validate_params(params, source=f"scale {images}")


def export_folder(data_dir: Path, dest: Path, classes: list[str], broken: bool = False) -> dict[str, Any]:
    """The embedded dataset as a user's photo folder: JPEGs in per-split sub-folders and a tags CSV with a split
    column (what the folder source reads); ``broken``: one photo truncated, as a failed copy leaves it."""
    if dest.exists():
        shutil.rmtree(dest)
    labels = json.loads((data_dir / "cls_labels.json").read_text())
    rows = []
    for split in ("train", "val"):
        ids = (data_dir / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        (dest / "photos" / split).mkdir(parents=True)
        for image_id in ids:
            os.link(data_dir / "JPEGImages" / f"{image_id}.jpg", dest / "photos" / split / f"{image_id}.jpg")
            rows.append((f"{split}/{image_id}.jpg", ";".join(classes[c] for c in labels[image_id]), split))
    if broken:
        victim = dest / "photos" / rows[len(rows) // 2][0]
        data = victim.read_bytes()
        victim.unlink()  # a hard link: do not truncate the embedded original
        victim.write_bytes(data[: len(data) // 3])
    with open(dest / "tags.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels", "split"])
        writer.writerows(rows)
    return {"images": str(dest / "photos"), "labels": str(dest / "tags.csv"), "classes": classes[1:],
            "masks": None, "max_side": None}


def run_size(base: dict[str, Any], images: int, work: Path, classifier: Path, segmenter: Path,
             stages: tuple[str, ...] = STAGES, folder: bool = True) -> list[dict]:
    """The per-image ``stages`` at ``images`` images (embedded), then (``folder``) the folder source's conversion;
    a stage left out must have run before in ``work`` if a later one reads its output."""
    root = work / str(images)
    data_dir = root / "data"
    params = params_for(base, images, data_dir)
    pfile = root / "params.yaml"
    root.mkdir(parents=True, exist_ok=True)
    pfile.write_text(yaml.safe_dump(params))
    py = [sys.executable, "-m"]
    logs = root / "logs"
    out = root / "outputs"
    n_train, n_val = params["data"]["embedded"]["n_train"], params["data"]["embedded"]["n_val"]
    val_dir = root / "val_images"
    commands = {
        "data": (py + ["stages.data", "--params", str(pfile), "--out", str(data_dir), "--no-progress"], images),
        "make_seeds": (py + ["stages.make_seeds", "--params", str(pfile), "--data", str(data_dir), "--checkpoint",
                             str(classifier), "--out", str(out / "seeds"), "--timing", str(out / "seeds.json"),
                             "--no-progress"], n_train),
        "eval_seeds": (py + ["stages.eval_seeds", "--params", str(pfile), "--data", str(data_dir), "--seeds",
                             str(out / "seeds"), "--metrics", str(out / "eval_seeds.json"), "--curve",
                             str(out / "curve.csv"), "--plot", str(out / "curve.png"), "--no-progress"], n_train),
        "refine_crf": (py + ["stages.refine_crf", "--params", str(pfile), "--data", str(data_dir), "--seeds",
                             str(out / "seeds"), "--out", str(out / "crf"), "--workers", "2", "--timing",
                             str(out / "crf.json"), "--no-progress"], n_train),
        "pseudo_labels": (py + ["stages.pseudo_labels", "--params", str(pfile), "--data", str(data_dir),
                                "--source-dir", str(out / "crf"), "--out", str(out / "pseudo"), "--no-progress"],
                          n_train),
        "eval_pseudo": (py + ["stages.eval_pseudo", "--params", str(pfile), "--data", str(data_dir), "--pseudo",
                              str(out / "pseudo"), "--metrics", str(out / "eval_pseudo.json"), "--no-progress"],
                        n_train),
        "predict": (py + ["cpal.seg.predict", str(val_dir), "--checkpoint", str(segmenter), "--out",
                          str(out / "predict"), "--device", "cpu", "--quiet"], n_val),
    }
    rows = []
    for stage in stages:
        cmd, count = commands[stage]
        if stage == "predict":  # the val photos as a user's folder
            shutil.rmtree(val_dir, ignore_errors=True)
            val_dir.mkdir()
            for image_id in (data_dir / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
                os.link(data_dir / "JPEGImages" / f"{image_id}.jpg", val_dir / f"{image_id}.jpg")
        cost = measure(cmd + (["--log", str(logs / f"{stage}.log")] if stage != "predict" else []),
                       logs / f"{stage}.out")
        rows.append({"images": images, "source": "embedded", "stage": stage, "count": count, **cost})
        print(f"{images:>6} embedded {stage:<14} {cost['seconds']:8.1f} s {cost['peak_rss_mib']:7.0f} MiB", flush=True)
    if not folder:
        return rows

    classes = json.loads((data_dir / "dataset.json").read_text())["classes"]
    folder_params = copy.deepcopy(params)
    folder_params["data"].update(source="folder", dir=str(root / "folder_data"),
                                 folder={**export_folder(data_dir, root / "user", classes), "val_fraction": 0.2})
    ffile = root / "params_folder.yaml"
    ffile.write_text(yaml.safe_dump(validate_params(folder_params, source="scale folder")))
    cost = measure(py + ["stages.data", "--params", str(ffile), "--out", str(root / "folder_data"), "--no-progress",
                         "--log", str(logs / "data_folder.log")], logs / "data_folder.out")
    rows.append({"images": images, "source": "folder", "stage": "data", "count": images, **cost})
    print(f"{images:>6} folder   data           {cost['seconds']:8.1f} s {cost['peak_rss_mib']:7.0f} MiB", flush=True)
    shutil.rmtree(root / "user")
    shutil.rmtree(root / "folder_data", ignore_errors=True)
    return rows


def broken_folder(base: dict[str, Any], images: int, work: Path) -> str:
    """A folder of ``images`` photos with one truncated: the data stage must refuse it naming the file, and leave
    no dataset behind. Returns the message the user sees."""
    root = work / str(images)
    data_dir = root / "data"
    classes = json.loads((data_dir / "dataset.json").read_text())["classes"]
    params = params_for(base, images, data_dir)
    params["data"].update(source="folder", dir=str(root / "broken_data"),
                          folder={**export_folder(data_dir, root / "broken_user", classes, broken=True),
                                  "val_fraction": 0.2})
    pfile = root / "params_broken.yaml"
    pfile.write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, "-m", "stages.data", "--params", str(pfile), "--out",
                          str(root / "broken_data"), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    left = (root / "broken_data").exists()
    shutil.rmtree(root / "broken_user")
    lines = [line for line in (res.stdout + res.stderr).splitlines() if "error" in line.lower() or ".jpg" in line]
    return (f"exit {res.returncode}, dataset folder left: {left}; " + (lines[-1].strip() if lines else "(no message)"))


def table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)[["images", "source", "stage", "count", "seconds", "peak_rss_mib"]]
    df["seconds_per_image"] = df["seconds"] / df["count"]
    return df


def markdown(df: pd.DataFrame, commands: list[str], broken: str | None, history: list[str] | None = None) -> str:
    sizes = sorted(df["images"].unique())
    small, large = sizes[0], sizes[-1]
    lines = [
        "# Scale: seconds per image and peak memory of the per-image stages",
        "",
        f"Machine: {machine_description()}. One run per size (each stage alone, 2 torch threads, CRF with 2",
        "workers). Reproduce: " + ", then ".join(f"`{c}`" for c in commands) + " (the checkpoints: a default",
        "`bash run.sh`'s outputs/train_cls/model.pt and outputs/seg/model.pt). Embedded images of 128 px: 80 % train",
        "(the stages on the seed split count those), 20 % val (predict counts those); `data` counts all. Peak RSS",
        "is the stage process's own (the CRF's two worker processes hold one image each).",
        "",
        "| source | stage | " + " | ".join(f"{n:,} images: ms / image" for n in sizes) + " | "
        + " | ".join(f"{n:,}: peak RSS MiB" for n in sizes) + f" | {large:,} / {small:,} time | "
        f"{large:,} / {small:,} RSS | goal (<= {GOAL_SECONDS}x, <= {GOAL_RSS}x, < 4 GB) |",
        "| --- | --- |" + " --- |" * (2 * len(sizes) + 3),
    ]
    for (source, stage), group in df.groupby(["source", "stage"], sort=False):
        by = group.set_index("images")
        per = [f"{1000 * by.loc[n, 'seconds_per_image']:.2f}" if n in by.index else "" for n in sizes]
        rss = [f"{by.loc[n, 'peak_rss_mib']:.0f}" if n in by.index else "" for n in sizes]
        if small in by.index and large in by.index:
            t = by.loc[large, "seconds_per_image"] / by.loc[small, "seconds_per_image"]
            r = by.loc[large, "peak_rss_mib"] / by.loc[small, "peak_rss_mib"]
            met = t <= GOAL_SECONDS and r <= GOAL_RSS and by.loc[large, "peak_rss_mib"] < RSS_CAP_MIB
            ratios = [f"{t:.2f}", f"{r:.2f}", "met" if met else "**NOT met**"]
        else:
            ratios = ["", "", ""]
        lines.append(f"| {source} | {stage} | " + " | ".join(per + rss + ratios) + " |")
    if broken:
        lines += ["", f"A folder of {large:,} photos with one truncated JPEG: {broken}."]
    lines += ["", *history] if history else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", type=Path, help="a train_cls model.pt (the default run's)")
    p.add_argument("--segmenter", type=Path, help="a train_seg model.pt (the default run's)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    p.add_argument("--work", type=Path, default=Path("/tmp/cpal-scale"))
    p.add_argument("--out", type=Path, default=ROOT / "results" / "scale")
    p.add_argument("--no-broken", action="store_true", help="skip the truncated-photo check at the largest size")
    p.add_argument("--table-only", action="store_true", help="rewrite the .md from the .csv and .json, measure nothing")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="measure these stages again (their inputs must be in --work from an earlier run) and replace "
                        "their rows in the existing table; the folder source only with data")
    args = p.parse_args(argv)
    base = load_params(ROOT / "params.yaml")
    csv_path, md_path, notes_path = (args.out.with_suffix(ext) for ext in (".csv", ".md", ".json"))
    if args.table_only:
        notes = json.loads(notes_path.read_text())
        write_text(md_path, markdown(table(pd.read_csv(csv_path).to_dict("records")), notes["commands"],
                                     notes["broken"], notes.get("history")))
        return 0
    if args.classifier is None or args.segmenter is None:
        p.error("--classifier and --segmenter are needed to measure (a default run's checkpoints)")
    partial = tuple(args.stages) != STAGES
    kept: list[dict] = []
    notes = json.loads(notes_path.read_text()) if partial and notes_path.is_file() else {"commands": [], "broken": None}
    if partial and csv_path.is_file():
        old = pd.read_csv(csv_path)
        redo = old["images"].isin(args.sizes) & old["stage"].isin(args.stages) & (old["source"] == "embedded")
        kept = old[~redo].drop(columns=["seconds_per_image"]).to_dict("records")
    rows: list[dict] = []
    for images in args.sizes:
        rows += run_size(base, images, args.work, args.classifier.resolve(), args.segmenter.resolve(),
                         tuple(args.stages), folder=not partial)
        df = table(kept + rows)
        df.to_csv(csv_path, index=False, float_format="%.4f")
    if not args.no_broken:
        notes["broken"] = broken_folder(base, max(args.sizes), args.work)
    notes["commands"].append("python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv))
    write_text(notes_path, json.dumps(notes, indent=2) + "\n")
    order = {(src, st): i for i, (src, st) in enumerate([("embedded", st) for st in STAGES] + [("folder", "data")])}
    df = table(kept + rows)
    df = df.iloc[sorted(range(len(df)), key=lambda i: (order[(df["source"].iloc[i], df["stage"].iloc[i])],
                                                       df["images"].iloc[i]))]
    write_text(md_path, markdown(df, notes["commands"], notes["broken"], notes.get("history")))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
