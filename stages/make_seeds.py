"""Stage `make_seeds`: multi-scale + flip CAM and PACAM per image, float16 .npz (see cpal/seeds/store.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.cls.train import load_trained_model
from cpal.core.training import resolve_device
from cpal.data.voc import VOCDataset
from cpal.seeds.make import make_seeds
from stages.common import parser, start, write_timing


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--checkpoint", required=True, help="model.pt from train_cls")
    p.add_argument("--out", required=True, help="folder of <id>.npz seed files")
    p.add_argument("--timing", required=True, help="JSON file for images/s")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "make_seeds")
    cfg = params["seeds"]
    dataset = VOCDataset(args.data, cfg["split"])
    device = resolve_device(params["run"]["device"])
    model = load_trained_model(Path(args.checkpoint), params, dataset, device)
    timing = make_seeds(model, dataset, Path(args.out), cfg, device, log, progress=not args.no_progress)
    timing["device"] = str(device)
    write_timing(args.timing, timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
