"""Stage `train_cls`: train the CAM / SIPE / CPAL classifier (params.method); resumes if killed.

Multi-GPU (DDP): with params run.nproc_per_node N > 1 this command re-executes itself as
`torchrun --standalone --nproc_per_node N -m stages.train_cls -- <same arguments>`; calling torchrun that way
by hand works too. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (see cpal/core/distributed.py); rank 0 writes
every output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.cls.train import train_classifier
from cpal.core.distributed import relaunch_under_torchrun, stage_argv
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--out", required=True, help="output folder: model.pt, metrics.json, timing.json, dvclive/")
    p.add_argument("--no-progress", action="store_true")
    own = stage_argv(argv)
    args = p.parse_args(own)
    log, params = start(args, "train_cls")
    rc = relaunch_under_torchrun("stages.train_cls", own,
                                 params["run"].get("nproc_per_node", 1), log, replace=argv is None)
    if rc is not None:
        return rc
    metrics = train_classifier(params, Path(args.data), Path(args.out), log, progress=not args.no_progress)
    log.info("val mAP %.4f, final loss %.4f", metrics["val_map"], metrics["final_loss"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
