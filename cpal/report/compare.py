"""`cpal-compare` (or `python -m cpal.report.compare`): DVC experiments -> results/<name>.md, .csv and .png.

    dvc exp run --queue -S params.K=1 ...; dvc queue start; (wait)
    cpal-compare --out results/experiments
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from cpal.core.io import atomic_path, write_text
from cpal.core.runtime import machine_description
from cpal.report.experiments import (
    METRICS,
    WORKSPACE,
    experiment_table,
    git_lock_reader,
    keep_notes,
    plot_sweeps,
    run_exp_show,
    sort_rows,
    swept_params,
    to_markdown,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: here)")
    p.add_argument("--json", type=Path, default=None,
                   help="read this saved `dvc exp show --json` output instead of running dvc")
    p.add_argument("--out", type=Path, default=Path("results/experiments"),
                   help="output stem: writes STEM.md, STEM.csv and STEM.png")
    p.add_argument("--only", default=None,
                   help="keep experiments whose name starts with this prefix (and the baseline rows)")
    p.add_argument("--no-baseline", action="store_true",
                   help="leave the baseline rows (the committed baseline and the workspace) out of the table")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated subset of {','.join(m.label for m in METRICS)} (default: all found)")
    p.add_argument("--title", default="DVC experiments")
    p.add_argument("--machine", default=None,
                   help="where the experiments ran (default: this machine, as compare assumes they ran here)")
    p.add_argument("--command", default=None, help="the command(s) that ran the experiments, for the header")
    args = p.parse_args(argv)

    exp_show = json.loads(args.json.read_text()) if args.json else run_exp_show(args.repo)
    metrics = METRICS
    if args.metrics:
        wanted = args.metrics.split(",")
        unknown = set(wanted) - {m.label for m in METRICS}
        if unknown:
            p.error(f"--metrics: unknown {sorted(unknown)}; known: {[m.label for m in METRICS]}")
        metrics = tuple(m for m in METRICS if m.label in wanted)
    table = experiment_table(exp_show, git_lock_reader(args.repo), metrics)
    if args.only:
        table = table[table["experiment"].str.startswith(args.only) | table["baseline"]]
    if args.no_baseline:
        table = table[~table["baseline"]]
    shown = ["baseline", WORKSPACE, "success"]
    unfinished = table[~table["state"].isin(shown)]
    for _, row in unfinished.iterrows():
        print(f"note: {row['experiment']} is {row['state']}: left out", file=sys.stderr)
    table = table[table["state"].isin(shown)]
    if table.empty:
        print("error: no experiment left to compare", file=sys.stderr)
        return 1
    swept = swept_params(table)
    table = sort_rows(table, swept)
    seeds = sorted({str(s) for s in table.get("run.seed", [])})
    machine = args.machine or machine_description()
    command = args.command or "dvc exp run ... (see docs/engines.md)"
    this = shareable_command(argv if argv is not None else sys.argv[1:], args.repo)
    footer = f"{machine}; run.seed {', '.join(seeds)}; {this}"
    header = "\n".join([
        f"# {args.title}", "",
        f"Machine: {machine}. Seeds: {len(seeds)} (run.seed = {', '.join(seeds)}), one run per row.",
        f"Experiments: `{command}`.",
        f"Table and plot: `{this}` (mIoU in percent; {', '.join(m.label for m in metrics)} where measured).",
        "A metric is shown only where the row's dvc.lock has the stage that wrote it, and every stage upstream,",
        "up to date with the row's params; otherwise it is left empty and named under `stale`. "
        "`<name> (committed)` is the baseline commit (numbers only where its own dvc.lock vouches for them);",
        "`workspace` is the working copy the table was made in (its own `dvc repro`).",
        "", f"![sweep]({args.out.name}.png)" if swept else "",
    ])
    out_md, out_csv, out_png = (args.out.with_suffix(s) for s in (".md", ".csv", ".png"))
    out_md.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    if swept:
        plot_sweeps(table, swept, out_png, footer)
    write_text(out_md, to_markdown(table, swept, header) + "\n" + keep_notes(out_md))
    print(to_markdown(table, swept, f"{len(table)} rows -> {out_md}, {out_csv}" + (f", {out_png}" if swept else "")))
    return 0


def shareable_command(argv: list[str], repo: Path) -> str:
    """The command as someone can paste it in their own clone: `--json FILE` (a saved `dvc exp show`,
    the same as running dvc there) and `--repo` are dropped, paths inside the repository made relative."""
    root = Path(repo).resolve()
    out, skip = ["cpal-compare"], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--json", "--repo"):
            skip = "=" not in arg
            continue
        if i and argv[i - 1] == "--out" or name == "--out" and "=" in arg:
            value = arg.split("=", 1)[1] if name == "--out" else arg
            path = Path(value).resolve()
            if path.is_relative_to(root):
                value = os.path.relpath(path, root)
            arg = f"--out={value}" if name == "--out" else value
        out.append(arg)
    return " ".join(shlex.quote(a) for a in out)


if __name__ == "__main__":
    raise SystemExit(main())
