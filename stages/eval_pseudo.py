"""Stage `eval_pseudo`: pseudo-mask mIoU against ground truth (train split), per-class IoU, ignored share."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.core.io import write_json
from cpal.data.voc import VOCDataset
from cpal.pseudo.labels import evaluate_pseudo_labels
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--pseudo", required=True, help="folder of pseudo-mask PNGs")
    p.add_argument("--metrics", required=True, help="JSON for dvc metrics")
    p.add_argument("--label", default=None, help="what the masks are (seeds | crf | irn); default: pseudo.source")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "eval_pseudo")
    dataset = VOCDataset(args.data, params["seeds"]["split"])
    results = evaluate_pseudo_labels(dataset, Path(args.pseudo), progress=not args.no_progress)
    results["source"] = args.label or params["pseudo"]["source"]
    results["method"] = params["params"]["method"]
    write_json(args.metrics, results)
    log.info("pseudo-masks (%s): mIoU %.4f, confident-pixel mIoU %.4f, %.2f%% ignored", results["source"],
             results["miou"] or float("nan"), results["miou_confident"] or float("nan"),
             100 * results["ignored_fraction"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
