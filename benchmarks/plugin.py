"""CPAL as a plug-in, measured: host cam | amn x plugin none | classifier | loss | both x several seeds,
through seeds, CRF, AMN's IRN pass, pseudo-masks and DeepLab. Writes results/plugin.md, results/plugin.csv
and results/plugin_per_class.csv.

Not a test. The cam host is benchmarks/chain.py's work (its workspaces `cam_seed<N>` and `cpal_seed<N>`
under --chain-work: plain CAM is plugin none; the CPAL classifier is plugin both, since on this host the
classifier is the host and CPAL is its L_self and PACAM at once). The amn host runs the AMN branch of the
pipeline's own Snakefile (`pseudo.source: amn_crf`, so the pseudo-masks and DeepLab come from AMN's maps
through the CRF) in a fresh copy of the committed tree per (plugin, seed), starting from that seed's chain
classifier and seed maps (copied, so train_cls and make_seeds do not run again): plugin none and loss
learn from the CAM classifier's IR labels, classifier and both from the CPAL classifier's. `--bank-off`
adds `loss, bank off`: plugin loss with `params.context_weight: 0`, i.e. the plug-in's instance prototypes
only (the support bank is filled but never read), which is what the context part adds inside AMN.

A finished workspace is kept and reused, so an interrupted run continues; the tables are rewritten after
every workspace.

    python benchmarks/chain.py --methods cam cpal --seeds 0 1 2 --work /tmp/chain/work
    python benchmarks/plugin.py --chain-work /tmp/chain/work --seeds 0 1 2 --bank-off
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

import pandas as pd
import yaml

from cpal.core.config import load_params
from cpal.core.io import atomic_path, write_text
from cpal.core.runtime import machine_description
from cpal.report.summary import stage_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the siblings, also when loaded by file path
from chain import fmt, new_workspace, paired  # noqa: E402  (workspaces; mean ± std; per-seed differences)
from suite import extract_tree  # noqa: E402  (the committed tree without results/, outputs/, data/)

PLUGINS = ("none", "classifier", "loss", "both")
BANK_OFF = "loss, bank off"
REFINED = ["results/eval_amn_seeds.json", "results/eval_amn_crf.json", "results/eval_amn_irn.json"]
TARGETS = REFINED + ["results/eval_pseudo.json", "results/eval_seg.json"]
AMN_TIMED = ("ir_labels", "train_amn", "make_amn_seeds", "refine_amn_crf", "amn_ir_labels", "train_amn_irn",
             "refine_amn_irn", "pseudo_labels", "train_seg", "eval_seg")
CAM_TIMED = ("train_cls", "make_seeds", "refine_crf", "pseudo_labels", "train_seg", "eval_seg")
# what each cam-host plugin value is in benchmarks/chain.py's terms
CAM_HOST = {"none": "cam", "both": "cpal"}


def classifier_of(plugin: str) -> str:
    """The classifier (params.method) whose maps make AMN's IR labels (bank off: the CAM's, as for loss)."""
    return "cpal" if plugin in ("classifier", "both") else "cam"


def override(plugin: str, seed: int) -> str:
    amn_plugin = "loss" if plugin == BANK_OFF else plugin
    lines = [f"params:\n  method: {classifier_of(plugin)}\n"]
    if plugin == BANK_OFF:
        lines.append("  context_weight: 0.0\n")
    lines += [f"run:\n  seed: {seed}\n", f"amn:\n  plugin: {amn_plugin}\n", "pseudo:\n  source: amn_crf\n"]
    return "".join(lines)


def copy_fresh(src: Path, dest: Path) -> None:
    """A copy whose files are all new (modification time now), so Snakemake by mtime keeps them."""
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=shutil.copy)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)


def prepare(ws: Path, plugin: str, seed: int, data_dir: Path, chain_work: Path, work: Path) -> None:
    """The committed tree, the overrides, the data linked, the chain's classifier and seed maps copied in
    that order (each newer than its inputs); the IR labels too when another workspace made them already."""
    method = classifier_of(plugin)
    src = chain_work / f"{method}_seed{seed}"
    if not (src / "outputs" / "seeds" / "maps").is_dir():
        raise FileNotFoundError(f"--chain-work: no {src / 'outputs/seeds/maps'} (run benchmarks/chain.py "
                                f"--methods cam cpal --seeds {seed} first)")
    new_workspace(ws, data_dir, override(plugin, seed))
    for part in ("train_cls", "seeds"):
        copy_fresh(src / "outputs" / part, ws / "outputs" / part)
    for other in sorted(work.glob(f"*_seed{seed}")):
        labels = other / "outputs" / "irn" / "ir_labels"
        if other != ws and (other / ".plugin-done").is_file() and labels.is_dir() \
                and json.loads((other / ".plugin-done").read_text())["classifier"] == method:
            copy_fresh(labels, ws / "outputs" / "irn" / "ir_labels")
            break


def targets_of(plugin: str) -> list[str]:
    """The bank-off ablation stops at the refinements: it asks what the context part adds to AMN's maps."""
    return REFINED if plugin == BANK_OFF else TARGETS


def workspace_name(plugin: str, seed: int) -> str:
    return f"amn_{plugin.replace(', ', '_').replace(' ', '_')}_seed{seed}"


def run_one(work: Path, plugin: str, seed: int, data_dir: Path, chain_work: Path, cores: int) -> Path:
    ws = work / workspace_name(plugin, seed)
    done, targets = ws / ".plugin-done", targets_of(plugin)
    if done.is_file() and all((ws / t).is_file() for t in targets):
        return ws
    if (ws / "override.yaml").is_file():  # started or finished before: continue with today's code, outputs kept
        extract_tree(ws)
    else:
        prepare(ws, plugin, seed, data_dir, chain_work, work)
    t0 = time.perf_counter()
    # targets go before --configfile, which takes every following word as a config file
    subprocess.run([sys.executable, "-m", "snakemake", *targets, "--cores", str(cores), "--rerun-triggers",
                    "mtime", "--rerun-incomplete", "--configfile", "override.yaml"], cwd=ws, check=True)
    seconds = time.perf_counter() - t0
    before = json.loads(done.read_text())["seconds"] if done.is_file() else 0.0
    done.write_text(json.dumps({"seconds": before + seconds, "classifier": classifier_of(plugin)}))
    print(f"amn {plugin} seed {seed}: {seconds:.0f} s", flush=True)
    return ws


def crf_plane_rows(ws: Path, host: str, plugin: str, seed: int, planes: list[float], data_dir: Path) -> list[dict]:
    """AMN's maps through the CRF at other background planes (`crf.bg_threshold` was chosen on CAM maps): a
    diagnostic with ground truth, not a setting. Files under outputs/crf_planes/ and results/crf_planes/."""
    out = []
    for plane in planes:
        metrics = ws / "results" / "crf_planes" / f"eval_amn_crf_{plane:g}.json"
        if not metrics.is_file():
            folder = ws / "outputs" / "crf_planes" / f"{plane:g}"
            folder.mkdir(parents=True, exist_ok=True)
            params = yaml.safe_load((ws / "outputs" / "params.snakemake.yaml").read_text())
            params["crf"]["bg_threshold"] = plane
            (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            common = ["--params", str(folder / "params.yaml"), "--data", str(data_dir), "--no-progress"]
            subprocess.run([sys.executable, "-m", "stages.refine_crf", *common, "--seeds", "outputs/amn/maps",
                            "--out", str(folder / "maps"), "--workers", "2", "--timing", str(folder / "timing.json"),
                            "--map", "cam", "--log", str(folder / "refine_crf.log")], cwd=ws, check=True)
            metrics.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "stages.eval_pseudo", *common, "--pseudo", str(folder / "maps"),
                            "--label", "amn_crf", "--metrics", str(metrics), "--log", str(folder / "eval.log")],
                           cwd=ws, check=True)
        out.append({"host": host, "plugin": plugin, "seed": seed, "step": f"crf@{plane:g}",
                    "miou": load(metrics)["miou"]})
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def seed_map(seeds: dict) -> str:
    """The map a seed evaluation is read by: PACAM where the host has one, else the CAM (AMN's maps too)."""
    return "pacam" if "pacam" in seeds else "cam"


def step_rows(results: Path, seeds_file: str, crf_file: str, irn_file: str | None) -> dict[str, float | None]:
    """mIoU per step of one workspace (fractions; None where the step did not run)."""
    def miou(name: str, *keys: str) -> float | None:
        path = results / name
        if not path.is_file():  # a step this column does not run
            return None
        value = load(path)
        for key in keys:
            value = value.get(key) or {}
        return value.get("miou")

    return {"seeds": miou(seeds_file, seed_map(load(results / seeds_file))),
            "seeds_fixed": miou(seeds_file, "cam_fixed"),
            "crf": miou(crf_file),
            "irn": miou(irn_file) if irn_file else None,
            "pseudo": miou("eval_pseudo.json"),
            "deeplab": miou("eval_seg.json"),
            "deeplab_crf": miou("eval_seg.json", "crf")}


def class_rows(ws: Path, host: str, plugin: str, seed: int) -> list[dict]:
    """IoU, precision and recall per class of the seeds and the CRF masks: where a host's gain comes from."""
    results = ws / "results"
    seeds = load(results / ("eval_amn_seeds.json" if host == "amn" else "eval_seeds.json"))
    crf = load(results / ("eval_amn_crf.json" if host == "amn" else "eval_crf.json"))
    out = []
    for step, d in (("seeds", seeds[seed_map(seeds)]), ("crf", crf)):
        for name, iou in d["per_class_iou"].items():
            out.append({"host": host, "plugin": plugin, "seed": seed, "step": step, "class": name, "iou": iou,
                        "precision": d["per_class_precision"][name], "recall": d["per_class_recall"][name]})
    return out


def class_table(classes: pd.DataFrame) -> list[str]:
    """Per class, mean over seeds: IoU (precision / recall) of the seeds and +CRF for the main columns."""
    classes = classes.assign(variant=classes.host + " " + classes.plugin)
    have = set(zip(classes.variant, classes.step, strict=True))
    cols = [(v, step) for step in ("seeds", "crf") for v in ("cam none", "cam both", "amn none", "amn both")
            if (v, step) in have]
    if not cols:
        return []
    lines = ["", "## Per class (mean over the seeds): IoU (precision / recall), in %", "",
             "| class | " + " | ".join(f"{v} {LABELS[step]}" for v, step in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    means = classes.groupby(["variant", "step", "class"], sort=False)[["iou", "precision", "recall"]].mean() * 100
    for name in classes["class"].unique():
        cells = []
        for v, step in cols:
            r = means.loc[(v, step, name)]
            cells.append(f"{r.iou:.1f} ({r.precision:.0f} / {r.recall:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def rows_of(ws: Path, host: str, plugin: str, seed: int) -> list[dict]:
    results, logs = ws / "results", ws / "outputs" / "logs"
    if host == "amn":
        values = step_rows(results, "eval_amn_seeds.json", "eval_amn_crf.json", "eval_amn_irn.json")
        timed = AMN_TIMED
    else:
        values = step_rows(results, "eval_seeds.json", "eval_crf.json", "eval_irn.json")
        timed = CAM_TIMED
    out = [{"host": host, "plugin": plugin, "seed": seed, "step": step, "miou": v}
           for step, v in values.items() if v is not None]
    for stage in timed:
        secs = stage_seconds(logs / f"{stage}.log")
        if secs is not None:
            out.append({"host": host, "plugin": plugin, "seed": seed, "step": f"time:{stage}", "miou": None,
                        "seconds": secs})
    full = results / "eval_seg_full.json"
    if host == "cam" and full.is_file():
        out.append({"host": "upper bound", "plugin": "", "seed": seed, "step": "deeplab", "miou": load(full)["miou"]})
    return out


PUBLISHED = [  # VOC 2012, ResNet hosts; for scale only (another dataset, backbone and image size); docs/published.md
    ("cam none", "seeds", "48.8", "CAM seeds (IRN's ResNet-50), VOC train: LPCAM (CVPR 2023) Table 2"),
    ("amn none", "seeds", "62.1", "AMN (CVPR 2022) seeds, VOC train: LPCAM (CVPR 2023) Table 2"),
    ("amn none", "pseudo-masks", "72.2", "AMN's masks after its second IR-label pass and IRN, VOC train: LPCAM "
                                          "(CVPR 2023) Table 2 (users' reruns 70.7-71.7: gaviotas/AMN issues 2 and 8)"),
    ("amn none", "DeepLab", "about 70", "unverified: AMN (CVPR 2022), DeepLab on its masks, VOC val; no table opened"),
    ("amn both", "seeds", "65.7", "unverified: AMN's 62.1 + the +3.6 a summary of the CPAL paper gives; no CPAL "
                                  "table opened"),
]
LABELS = {"seeds": "seeds (sweep)", "seeds_fixed": "seeds at AMN's fixed 0.25", "crf": "+CRF", "irn": "+IRN",
          "pseudo": "pseudo-masks", "deeplab": "DeepLab", "deeplab_crf": "DeepLab+CRF"}


def variants(df: pd.DataFrame) -> list[str]:
    order = [f"cam {p}" for p in CAM_HOST] + [f"amn {p}" for p in (*PLUGINS, BANK_OFF)]
    have = set(df.variant)
    return [v for v in order if v in have]


def report(df: pd.DataFrame, command: str, chain_work: Path, classes: pd.DataFrame | None = None) -> str:
    """results/plugin.md from the rows: the table per step, the paired differences, time per stage."""
    if "seconds" not in df:
        df = df.assign(seconds=None)
    df = df.assign(variant=df.host + " " + df.plugin.fillna(""))
    runs = df.assign(method=df.variant)  # chain.paired keys on `method`
    names = variants(df)
    seeds_of = {v: sorted(df[df.variant == v].seed.unique().tolist()) for v in names}
    lines = [
        "# CPAL as a plug-in: the CAM host and the AMN host, without and with CPAL",
        "",
        f"Machine: {machine_description()}. Seeds (`run.seed`) per column: "
        + ", ".join(f"{v} {seeds_of[v]}" for v in names) + ". mIoU in %, mean ± std over the seeds.",
        "Embedded default (params.yaml at the commit that ran): EfficientNet-Lite0 ImageNet classifier, AMN and",
        "DeepLab encoder; seeds, +CRF and pseudo-masks on the 800 train images, DeepLab on the 200 val images.",
        "",
        "Columns. cam: benchmarks/chain.py's classifiers (`" + chain_work.as_posix() + "`): `none` plain CAM,",
        "`both` the CPAL classifier (on this host the classifier is the host, so CPAL's L_self and its PACAM",
        "seeds are one plug-in point). amn: the AMN branch (docs/method.md, \"AMN host\") trained on the IR",
        "labels of that seed's cam (`none`, `loss`) or cpal (`classifier`, `both`) classifier; `loss` and",
        "`both` add CPAL's L_self on AMN's features and maps; `loss, bank off` is `loss` with",
        "`params.context_weight: 0` (instance prototypes only: what the context part adds inside AMN; run",
        "through the refinements only). AMN's pseudo-masks are its maps through the CRF (`pseudo.source:",
        "amn_crf`, background plane `crf.bg_threshold`); +IRN is AMN's second pass (its maps -> IR labels at",
        "planes derived from them, `irn.*: auto` -> IRN -> masks; AMN itself uses 0.45 / 0.15), measured beside",
        "it and not sent to DeepLab. The cam columns have no +IRN here (the chain ran without --irn).",
        "Seeds: the best background threshold of the sweep (picked with ground truth, as papers report seeds);",
        "the fixed-0.25 row is AMN's own protocol, no ground truth.",
        "",
        f"Reproduce: `{command}` (after `python benchmarks/chain.py --methods cam cpal --seeds ... "
        f"--work {chain_work.as_posix()}`)",
        "",
        "| step | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for step, label in LABELS.items():
        cells = [fmt(df[(df.variant == v) & (df.step == step)].miou) for v in names]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ub = df[(df.host == "upper bound") & (df.step == "deeplab")].miou
    if len(ub):
        lines += ["", f"Upper bound (DeepLab on ground-truth masks, the same recipe; chain's runs): {fmt(ub)} "
                  f"({len(ub)} seeds)."]

    lines += ["", "## Paired by seed (points, mean ± std over the seeds both have; per seed in brackets)", ""]
    goals = {("amn none", "cam none", "seeds"): 5.0, ("amn both", "amn none", "seeds"): 3.0,
             ("amn both", "amn none", "pseudo"): 2.0}
    pairs = [("amn none", "cam none", "AMN over plain CAM"),
             ("amn classifier", "amn none", "CPAL's classifier under AMN"),
             ("amn loss", "amn none", "CPAL's L_self inside AMN"),
             ("amn both", "amn none", "CPAL at both points on AMN"),
             ("amn both", "cam both", "AMN over the CPAL classifier"),
             ("cam both", "cam none", "CPAL on the CAM host"),
             ("amn loss", "amn loss, bank off", "the context part (bank) inside AMN")]
    for a, b, what in pairs:
        if not {a, b} <= set(names):
            continue
        cells = []
        for step in LABELS:
            gain = paired(runs, (a, step), (b, step))
            if not len(gain):
                continue
            spread = f" ± {gain.std(ddof=1):.1f}" if len(gain) > 1 else ""
            goal = goals.get((a, b, step))
            verdict = "" if goal is None else f", goal >= +{goal:.0f}: {'met' if gain.mean() >= goal else 'NOT met'}"
            cells.append(f"{LABELS[step]} {gain.mean():+.1f}{spread} "
                         f"[{', '.join(f'{g:+.1f}' for g in gain)}{verdict}]")
        lines.append(f"- {what} ({a} minus {b}): " + "; ".join(cells) + ".")

    planes = sorted({float(step[4:]) for step in df.step if step.startswith("crf@")})
    if planes:
        lines += ["", "## AMN's maps through the CRF at other background planes (a diagnostic, with ground truth)", "",
                  "`crf.bg_threshold` (0.4 on the embedded default) was chosen on CAM maps. The same maps at other",
                  "planes, mIoU on train:", "",
                  "| column | the setting (+CRF) | " + " | ".join(f"plane {t:g}" for t in planes) + " |",
                  "| --- | --- |" + " --- |" * len(planes)]
        for v in names:
            cells = [fmt(df[(df.variant == v) & (df.step == f"crf@{t:g}")].miou) for t in planes]
            if any(cells):
                cells.insert(0, fmt(df[(df.variant == v) & (df.step == "crf")].miou))
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if classes is not None and len(classes):
        lines += class_table(classes)

    lines += ["", "## Time per stage (seconds, mean over the seeds; from the stage logs)", "",
              "| stage | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for stage in dict.fromkeys(CAM_TIMED + AMN_TIMED):
        cells = [fmt(df[(df.variant == v) & (df.step == f"time:{stage}")].seconds, scale=1.0, digits=0)
                 for v in names]
        if any(cells):
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "AMN columns reuse the chain's classifier and seed maps (no train_cls / make_seeds of their own); "
              "ir_labels runs once per classifier and seed and is copied to the other AMN workspaces of that seed.",
              "", "## Published, for scale (VOC 2012, ResNet-50/101 at 512 px: not comparable to the numbers above)",
              "", "| column | step | VOC mIoU | source |", "| --- | --- | --- | --- |"]
    lines += [f"| {v} | {step} | {value} | {source} |" for v, step, value, source in PUBLISHED]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain-work", type=Path, required=True,
                   help="benchmarks/chain.py's --work: cam_seed<N>/ and cpal_seed<N>/ finished")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--plugins", nargs="+", default=list(PLUGINS), choices=PLUGINS)
    p.add_argument("--bank-off", action="store_true", help="also plugin loss with params.context_weight 0")
    p.add_argument("--crf-planes", nargs="*", type=float, default=[],
                   help="diagnostic: AMN's maps (plugin none, both) also through the CRF at these background planes")
    p.add_argument("--params", default="params.yaml", help="for data.dir (the workspaces use their own copy)")
    p.add_argument("--work", type=Path, default=Path("outputs/benchmarks/plugin"))
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out-md", type=Path, default=Path("results/plugin.md"))
    p.add_argument("--notes", type=Path, default=None, help="a Markdown file appended to the report as written")
    args = p.parse_args(argv)
    data_dir = Path(load_params(args.params)["data"]["dir"])
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: the chain's dataset (run `snakemake --cores 1 {data_dir}`)")
    command = "python benchmarks/plugin.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    plugins = list(args.plugins) + ([BANK_OFF] if args.bank_off else [])
    rows: list[dict] = []
    per_class: list[dict] = []
    for seed in args.seeds:  # seed-major: every variant of one seed before the next seed
        for plugin, method in CAM_HOST.items():
            ws = args.chain_work / f"{method}_seed{seed}"
            if (ws / "results" / "eval_seg.json").is_file():
                rows += rows_of(ws, "cam", plugin, seed)
                per_class += class_rows(ws, "cam", plugin, seed)
        for plugin in plugins:
            ws = run_one(args.work, plugin, seed, data_dir, args.chain_work, args.cores)
            rows += rows_of(ws, "amn", plugin, seed)
            per_class += class_rows(ws, "amn", plugin, seed)
            if args.crf_planes and plugin in ("none", "both"):
                rows += crf_plane_rows(ws, "amn", plugin, seed, args.crf_planes, data_dir)
            df, classes = pd.DataFrame(rows), pd.DataFrame(per_class)
            with atomic_path(args.out_md.with_suffix(".csv")) as tmp:
                df.to_csv(tmp, index=False, float_format="%.5f")
            with atomic_path(args.out_md.with_name(args.out_md.stem + "_per_class.csv")) as tmp:
                classes.to_csv(tmp, index=False, float_format="%.5f")
            notes = "" if args.notes is None else "\n" + args.notes.read_text().rstrip() + "\n"
            write_text(args.out_md, report(df, command, args.chain_work, classes) + notes)
    print(args.out_md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
