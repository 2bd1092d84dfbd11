"""Stage `eval_seeds`: CAM and PACAM seed mIoU with the background-threshold sweep (JSON, CSV, PNG).

`--fixed-threshold T` also reports the maps at one fixed background threshold (a host's own protocol, AMN's
0.25); `--host NAME` records which network made the seeds (default: the classifier of params.method).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.core.io import write_json
from cpal.data.voc import VOCDataset
from cpal.seeds.evaluate import evaluate_seeds, plot_threshold_curve, thresholds_from, write_curve_csv  # noqa: I001
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--seeds", required=True, help="folder of seed .npz files")
    p.add_argument("--metrics", required=True, help="JSON for dvc metrics")
    p.add_argument("--curve", required=True, help="CSV of mIoU against background threshold")
    p.add_argument("--plot", required=True, help="PNG of the curve")
    p.add_argument("--fixed-threshold", type=float, default=None, help="also report this background threshold")
    p.add_argument("--host", default=None, help="the network that made the seeds, when not the classifier")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "eval_seeds")
    dataset = VOCDataset(args.data, params["seeds"]["split"])
    results = evaluate_seeds(dataset, Path(args.seeds), thresholds_from(params["seeds"]), log,
                             progress=not args.no_progress, fixed_threshold=args.fixed_threshold)
    method = params["params"]["method"]
    results["method"] = method if args.host is None else f"{args.host} ({method} classifier)"
    write_json(args.metrics, results)
    write_curve_csv(results, Path(args.curve))
    plot_threshold_curve(results, Path(args.plot), command="snakemake --cores 2 " + args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
