"""Stage `report`: results/report.md and .csv (one row per stage), per-class IoU bars, qualitative grid and
the self-contained gallery page (results/gallery.html)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from cpal.core.io import atomic_path, write_text
from cpal.core.runtime import machine_description
from cpal.core.training import resolve_device
from cpal.data.voc import VOCDataset
from cpal.report.gallery import COLUMNS, collect_panels, grid_rows, seed_thresholds, write_gallery
from cpal.report.summary import collect_rows, markdown, plot_grid, plot_per_class, reproduce_command
from cpal.seg.train import load_segmenter
from stages.common import parser, start


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--results", required=True, help="folder of the eval_*.json files")
    p.add_argument("--logs", required=True, help="folder of the stage logs (stage times)")
    p.add_argument("--seeds", required=True, help="seed .npz folder")
    p.add_argument("--pseudo", required=True, help="pseudo-mask folder")
    p.add_argument("--seg", required=True, help="DeepLab checkpoint trained on the pseudo-masks")
    p.add_argument("--out", required=True, help="report.md to write (report.csv and PNGs beside it)")
    p.add_argument("--gallery", required=True, help="gallery.html to write (report.gallery_images images)")
    p.add_argument("--grid", type=int, default=4, help="images in the qualitative grid (the first ids)")
    args = p.parse_args(argv)
    log, params = start(args, "report")
    out = Path(args.out)
    seg_cfg = params["seg"]
    dataset = VOCDataset(args.data, params["seeds"]["split"])
    rows = collect_rows(Path(args.results), Path(args.logs), with_irn=False, classes=dataset.classes,
                        splits={"train": params["seeds"]["split"], "val": seg_cfg["val_split"]})
    command = reproduce_command(args.params)
    footer = f"{machine_description()}; one run. Reproduce: {command}"
    write_text(out, markdown(rows, params["params"]["method"], machine_description(), command, seg_cfg["init"]))
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "per_class"} for r in rows])
    with atomic_path(out.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False, float_format="%.5f")
    plot_per_class(rows, out.with_name(out.stem + "_per_class.png"), footer)

    device = resolve_device(params["run"]["device"])
    model, _ = load_segmenter(Path(args.seg), seg_cfg, dataset.classes, device)
    shown = dataset.ids[:max(args.grid, params["report"]["gallery_images"])]
    panels = collect_panels(dataset, shown, Path(args.seeds), Path(args.pseudo), model, seg_cfg,
                            seed_thresholds(Path(args.results)), device)
    plot_grid(grid_rows(panels[:args.grid]), list(COLUMNS), out.with_name(out.stem + "_grid.png"), footer)
    gallery = panels[:params["report"]["gallery_images"]]
    title = f"CPAL run gallery: method {params['params']['method']}, {len(gallery)} images of split {dataset.split}"
    write_gallery(Path(args.gallery), gallery, dataset.classes, title,
                  f"{footer}. CAM and PACAM seeds at the background threshold eval_seeds picked; the pseudo-masks "
                  f"DeepLab trained on; DeepLab with the eval settings (scales {seg_cfg['scales']}, flip "
                  f"{seg_cfg['flip']}, no CRF). mIoU per image over the classes in its ground truth or map.")
    log.info("wrote %s (%d stages)", out, len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
