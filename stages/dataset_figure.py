"""Stage `dataset_figure`: sample images beside their ground-truth masks, for docs/pipeline.md."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.core.runtime import machine_description
from cpal.data.figure import plot_dataset_samples
from stages.common import parser, start

REPRODUCE = "snakemake --cores 2 results/dataset_samples.png  (or: dvc repro dataset_figure)"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--split", default="train")
    p.add_argument("-n", type=int, default=8, help="number of samples")
    args = p.parse_args(argv)
    log, params = start(args, "dataset_figure")
    data = params["data"]
    footer = (
        f"data.source={data['source']}, data.seed={data['seed']} (one seed), split {args.split}. "
        f"Machine: {machine_description()}.\nReproduce: {REPRODUCE}"
    )
    plot_dataset_samples(Path(args.data), args.split, Path(args.out), n=args.n, footer=footer)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
