"""Refinement benchmark for the refinement issue: seeds, +CRF, +IRN for each method (one seed each).

Not a test. Each method runs the pipeline up to eval_crf / eval_irn in its own copy of the committed
tree (`git archive HEAD`), with `params.method` overridden through Snakemake's --configfile, so the
checkout's own outputs are untouched. `--reuse METHOD=DIR` takes a workspace that already ran (e.g.
the checkout after `bash run.sh`, whose params.method is cpal). Writes results/pseudo.md and .csv.

    python benchmarks/refinement.py --methods cam sipe --reuse cpal=.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from cpal.io import atomic_path, write_text
from cpal.runtime import machine_description

TARGETS = ["results/eval_seeds.json", "results/eval_crf.json", "results/eval_irn.json"]


def run_method(method: str, work: Path, cores: int) -> Path:
    ws = work / method
    if not (ws / ".refinement-done").is_file():
        ws.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ws)], input=archive, check=True)
        (ws / "override.yaml").write_text(f"params:\n  method: {method}\n")
        t0 = time.perf_counter()
        # force the targets' whole DAG (a fresh workspace, but never trust what an archive holds); targets go before
        # --configfile, which takes every following word as a config file
        subprocess.run([sys.executable, "-m", "snakemake", *TARGETS, "--forceall", "--cores", str(cores),
                        "--configfile", "override.yaml"], cwd=ws, check=True)
        (ws / ".refinement-done").write_text("")
        print(f"{method}: {time.perf_counter() - t0:.0f} s", flush=True)
    return ws


def row(method: str, ws: Path) -> dict:
    seeds = json.loads((ws / "results" / "eval_seeds.json").read_text())
    crf = json.loads((ws / "results" / "eval_crf.json").read_text())
    irn = json.loads((ws / "results" / "eval_irn.json").read_text())
    crf_t = json.loads((ws / "outputs" / "crf" / "timing.json").read_text())
    irn_t = json.loads((ws / "outputs" / "irn" / "refine_timing.json").read_text())
    kind = "pacam" if "pacam" in seeds else "cam"
    return {
        "method": method, "seed_map": kind, "seeds_miou": seeds[kind]["miou"], "cam_miou": seeds["cam"]["miou"],
        "crf_miou": crf["miou"], "irn_miou": irn["miou"],
        "crf_s_per_image": crf_t.get("wall_seconds_per_image"), "crf_workers": crf_t.get("workers"),
        "irn_s_per_image": irn_t.get("seconds_per_image", irn_t.get("wall_seconds_per_image")),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=["cam", "sipe", "cpal"])
    p.add_argument("--reuse", nargs="*", default=[], metavar="METHOD=DIR")
    p.add_argument("--work", default="outputs/benchmarks/refinement")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out-md", default="results/pseudo.md")
    args = p.parse_args(argv)
    workspaces = {m: run_method(m, Path(args.work), args.cores) for m in args.methods}
    workspaces.update({k: Path(v) for k, v in (r.split("=", 1) for r in args.reuse)})
    df = pd.DataFrame([row(m, ws) for m, ws in workspaces.items()])
    with atomic_path(Path(args.out_md).with_suffix(".csv")) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5f")
    command = "python benchmarks/refinement.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# Refinement: seeds, +CRF, +IRN per method on the embedded default",
        "",
        f"Machine: {machine_description()}. One run per method (`run.seed` 0), the pipeline's own stages",
        "(refine_crf, ir_labels / train_irn / refine_irn) with params.yaml's settings; mIoU on the 800 train images.",
        "Seeds: the method's own map (PACAM for sipe / cpal, CAM for cam) at the best background threshold.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| method | seeds map | seeds mIoU | +CRF | +IRN | CRF s / image | IRN s / image (boundary + walk) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in df.itertuples():
        crf_t = f"{r.crf_s_per_image:.3f} ({r.crf_workers} workers)" if r.crf_s_per_image == r.crf_s_per_image else ""
        irn_t = f"{r.irn_s_per_image:.3f}" if r.irn_s_per_image == r.irn_s_per_image else ""
        lines.append(f"| {r.method} | {r.seed_map} | {100 * r.seeds_miou:.1f} | {100 * r.crf_miou:.1f} | "
                     f"{100 * r.irn_miou:.1f} | {crf_t} | {irn_t} |")
    write_text(args.out_md, "\n".join(lines) + "\n")
    print(Path(args.out_md).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
