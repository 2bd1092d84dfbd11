"""Stage `train_irn`: IRN's boundary branch on the frozen backbone, from inter-pixel relation labels."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.irn.train import train_irn
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--ir-labels", required=True, help="folder of <id>.png IR labels from ir_labels")
    p.add_argument("--classifier", default=None,
                   help="model.pt from train_cls (its backbone is used when irn.backbone_from = classifier)")
    p.add_argument("--out", required=True, help="output folder: model.pt, metrics.json, timing.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "train_irn")
    classifier = Path(args.classifier) if args.classifier else None
    metrics = train_irn(params, Path(args.data), Path(args.ir_labels), classifier, Path(args.out), log,
                        progress=not args.no_progress)
    log.info("final affinity loss %.4f after %d steps", metrics["final_loss"], metrics["steps"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
