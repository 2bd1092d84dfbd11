"""Stage `eval_seg`: val mIoU and per-class IoU of a DeepLab checkpoint (multi-scale + flip, optional CRF)."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.core.io import write_json
from cpal.core.training import resolve_device
from cpal.data.voc import VOCDataset
from cpal.seg.evaluate import evaluate_segmenter, skipped_result
from cpal.seg.train import TrainingSkipped, load_segmenter
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--checkpoint", required=True, help="model.pt written by train_seg")
    p.add_argument("--metrics", required=True, help="JSON for dvc metrics")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "eval_seg")
    if "seg" not in params:
        log.error("%s has no section 'seg' (DeepLab settings)", args.params)
        raise SystemExit(2)
    cfg = params["seg"]
    device = resolve_device(params["run"]["device"])
    dataset = VOCDataset(args.data, cfg["val_split"])
    try:
        model, meta = load_segmenter(Path(args.checkpoint), cfg, dataset.classes, device)
    except TrainingSkipped as skipped:  # the upper bound without training masks: record why, score nothing
        log.warning("%s: %s", args.checkpoint, skipped)
        write_json(args.metrics, skipped_result(dataset, str(skipped)))
        return 0
    results = evaluate_segmenter(model, dataset, cfg, device, log, progress=not args.no_progress)
    results.update({key: meta[key] for key in ("backbone", "head", "init", "labels")})
    write_json(args.metrics, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
