"""Stage `train_amn`: train AMN on the IR labels of ir_labels (params amn; CPAL's L_self with plugin loss | both)."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.amn.train import train_amn
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--ir-labels", required=True, help="folder of <id>.png IR labels from ir_labels (255 = unsure)")
    p.add_argument("--out", required=True, help="output folder: model.pt, metrics.json, timing.json, dvclive/")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "train_amn")
    metrics = train_amn(params, Path(args.data), Path(args.ir_labels), Path(args.out), log,
                        progress=not args.no_progress)
    log.info("final loss %.4f after %d steps", metrics["final_loss"], metrics["steps"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
