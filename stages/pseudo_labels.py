"""Stage `pseudo_labels`: pseudo-masks (palette PNG, 255 = uncertain) from seeds, CRF or IRN maps."""

from __future__ import annotations

import sys
from pathlib import Path

from cpal.data.voc import VOCDataset
from cpal.pseudo.labels import make_pseudo_labels
from cpal.seeds.store import resolve_map
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="dataset folder (params data.dir)")
    p.add_argument("--source-dir", required=True, help="seed folder or refined-map folder of params pseudo.source")
    p.add_argument("--out", required=True, help="folder of pseudo-mask PNGs (replaced as a whole)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log, params = start(args, "pseudo_labels")
    dataset = VOCDataset(args.data, params["seeds"]["split"])
    cfg = resolve_map(params["pseudo"], params["params"]["method"])
    make_pseudo_labels(dataset, cfg["source"], Path(args.source_dir), Path(args.out), cfg, log,
                       progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
