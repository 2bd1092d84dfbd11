"""Stage `data`: write the dataset named by params `data.source` in VOC layout."""

from __future__ import annotations

import sys
import time

from cpal.core.config import check_splits
from cpal.data.sources import prepare_dataset
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="dataset folder to write (params data.dir)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    log, params = start(args, "data", check_splits)  # a split the source does not write: before any work
    t0 = time.perf_counter()
    summary = prepare_dataset(args.out, params["data"], progress=not args.no_progress,
                              workers=params["run"]["num_workers"])
    log.info("wrote %s dataset to %s in %.1f s", params["data"]["source"], args.out, time.perf_counter() - t0)
    log.info("summary: %s", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
