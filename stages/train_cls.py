"""Stage `train_cls`: train the CAM / SIPE / CPAL classifier (params.method); resumes if killed."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.train_cls import train_classifier
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--out", required=True, help="output folder: model.pt, metrics.json, timing.json, dvclive/")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "train_cls")
    metrics = train_classifier(params, Path(args.data), Path(args.out), log, progress=not args.no_progress)
    log.info("val mAP %.4f, final loss %.4f", metrics["val_map"], metrics["final_loss"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
