"""Stage `refine_irn`: seeds propagated by IRN's random walk up to the predicted boundaries."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.irn.refine import refine_irn
from cpal.seeds.store import MAP_KEYS
from stages.common import add_map_argument, parser, start, write_timing


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--seeds", required=True, help="folder of <id>.npz seed files from make_seeds")
    p.add_argument("--irn", required=True, help="model.pt from train_irn")
    p.add_argument("--out", required=True, help="folder of <id>.png label maps")
    p.add_argument("--timing", required=True, help="JSON file: seconds per image, peak memory")
    add_map_argument(p, "irn", MAP_KEYS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "refine_irn")
    timing = refine_irn(params, Path(args.data), Path(args.seeds), Path(args.irn), Path(args.out), log,
                        progress=not args.no_progress, map_key=args.map)
    write_timing(args.timing, timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
