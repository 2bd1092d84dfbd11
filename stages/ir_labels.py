"""Stage `ir_labels`: confident foreground / background / unsure labels from seeds through the CRF (IRN)."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.irn.labels import make_ir_labels
from cpal.seeds.refinement import refinement_inputs
from cpal.seeds.store import MAP_KEYS
from stages.common import add_map_argument, parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--seeds", required=True, help="folder of <id>.npz seed files from make_seeds")
    p.add_argument("--out", required=True, help="folder of <id>.png IR labels (255 = unsure)")
    p.add_argument("--workers", type=int, default=0, help="CRF processes (0: in this process)")
    add_map_argument(p, "irn", MAP_KEYS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "ir_labels")
    dataset, cfg = refinement_inputs(params, "irn", args.data, args.map)
    make_ir_labels(dataset, Path(args.seeds), Path(args.out), cfg, args.workers, log,
                   progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
