"""Stage `refine_crf`: dense-CRF label maps from the seeds (one palette PNG per id) and a timing JSON."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.crf.refine import refine_with_crf
from cpal.seeds.refinement import refinement_inputs
from cpal.seeds.store import MAP_KEYS
from stages.common import add_map_argument, parser, start, write_timing


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--seeds", required=True, help="folder of seed .npz files")
    p.add_argument("--out", required=True, help="folder of refined label PNGs (replaced as a whole)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (Snakemake threads)")
    p.add_argument("--timing", required=True, help="JSON of seconds per image")
    add_map_argument(p, "crf", MAP_KEYS)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "refine_crf")
    dataset, cfg = refinement_inputs(params, "crf", args.data, args.map)
    timing = refine_with_crf(dataset, Path(args.seeds), Path(args.out), cfg, args.workers, log,
                             progress=not args.no_progress)
    write_timing(args.timing, timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
