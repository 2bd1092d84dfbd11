"""Stage `train_seg`: train DeepLab on pseudo-masks (--labels) or ground truth (--ground-truth, the upper bound).

Multi-GPU (DDP): with params run.nproc_per_node N > 1 this command re-executes itself as
`torchrun --standalone --nproc_per_node N -m stages.train_seg -- <same arguments>`; calling torchrun that way
by hand works too. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (see cpal/core/distributed.py); rank 0 writes
every output.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.core.distributed import relaunch_under_torchrun, stage_argv
from cpal.seg.train import skip_without_ground_truth, train_segmenter
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="folder of pseudo-mask PNGs <id>.png (255 = ignore)")
    labels.add_argument("--ground-truth", action="store_true", help="train on the dataset's ground-truth masks")
    p.add_argument("--out", required=True, help="output folder: model.pt, metrics.json, timing.json, dvclive/")
    p.add_argument("--no-progress", action="store_true")
    own = stage_argv(argv)
    args = p.parse_args(own)
    log, params = start(args, "train_seg")
    if "seg" not in params:
        log.error("%s has no section 'seg' (DeepLab settings)", args.params)
        raise SystemExit(2)
    if args.ground_truth and skip_without_ground_truth(params, Path(args.data), Path(args.out), log):
        return 0
    rc = relaunch_under_torchrun("stages.train_seg", own,
                                 params["run"].get("nproc_per_node", 1), log, replace=argv is None)
    if rc is not None:
        return rc
    labels_dir = None if args.ground_truth else Path(args.labels)
    metrics = train_segmenter(params, Path(args.data), labels_dir, Path(args.out), log,
                              progress=not args.no_progress)
    log.info("trained on %s: %d steps, final loss %.4f", metrics["labels"], metrics["steps"], metrics["final_loss"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
