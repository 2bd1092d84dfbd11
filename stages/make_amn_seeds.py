"""Stage `make_amn_seeds`: AMN's maps (softmax over scales and flips, min-max where the classifier's IR label is not
background) as seed .npz files in the format of cpal/seeds/store.py, so CRF, IRN and pseudo_labels read them."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.amn.seeds import make_amn_seeds
from cpal.amn.train import load_amn
from cpal.core.training import resolve_device
from cpal.data.voc import VOCDataset
from stages.common import parser, start, write_timing


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--checkpoint", required=True, help="model.pt from train_amn")
    p.add_argument("--ir-labels", required=True, help="the classifier's IR labels (the folder train_amn read)")
    p.add_argument("--out", required=True, help="folder of <id>.npz seed files")
    p.add_argument("--timing", required=True, help="JSON file for images/s")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "make_amn_seeds")
    dataset = VOCDataset(args.data, params["seeds"]["split"])
    device = resolve_device(params["run"]["device"])
    model, meta = load_amn(Path(args.checkpoint), params, dataset.classes, device)
    timing = make_amn_seeds(model, dataset, Path(args.ir_labels), Path(args.out), params["amn"],
                            params["seeds"]["batch_size"], device, log, seed=params["run"]["seed"],
                            progress=not args.no_progress)
    timing.update(device=str(device), plugin=meta["plugin"])
    write_timing(args.timing, timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
