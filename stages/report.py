"""Stage `report`: results/report.md and .csv (one row per stage), per-class IoU bars, qualitative grid."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cpal.core.io import atomic_path, load_label_png, write_text
from cpal.core.runtime import machine_description
from cpal.core.training import resolve_device
from cpal.data.voc import VOCDataset
from cpal.report.summary import collect_rows, markdown, plot_grid, plot_per_class
from cpal.seeds.store import labels_from_maps, load_seeds, seed_path
from cpal.seg.evaluate import predict_probs
from cpal.seg.train import load_segmenter
from stages.common import parser, start

COMMAND = "snakemake --cores 2 results/report.md  (or: dvc repro report)"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--results", required=True, help="folder of the eval_*.json files")
    p.add_argument("--logs", required=True, help="folder of the stage logs (stage times)")
    p.add_argument("--seeds", required=True, help="seed .npz folder")
    p.add_argument("--pseudo", required=True, help="pseudo-mask folder")
    p.add_argument("--seg", required=True, help="DeepLab checkpoint trained on the pseudo-masks")
    p.add_argument("--out", required=True, help="report.md to write (report.csv and PNGs beside it)")
    p.add_argument("--grid", type=int, default=4, help="images in the qualitative grid (the first ids)")
    args = p.parse_args(argv)
    log, params = start(args, "report")
    out = Path(args.out)
    rows = collect_rows(Path(args.results), Path(args.logs))
    footer = f"{machine_description()}; one run. Reproduce: {COMMAND}"
    seg_cfg = params["seg"]
    write_text(out, markdown(rows, params["params"]["method"], machine_description(), COMMAND, seg_cfg["init"]))
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "per_class"} for r in rows])
    with atomic_path(out.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False, float_format="%.5f")
    plot_per_class(rows, out.with_name(out.stem + "_per_class.png"), footer)

    dataset = VOCDataset(args.data, params["seeds"]["split"])
    device = resolve_device(params["run"]["device"])
    model, _ = load_segmenter(Path(args.seg), seg_cfg, dataset.classes, device)
    # the sweep's best threshold where there is ground truth, the one derived without it (Otsu) where there is none
    thresholds = {kind: r.get("best_threshold", r.get("otsu_threshold", 0.5))
                  for kind, r in _seed_results(Path(args.results)).items()}
    truth = dataset.has_ground_truth()
    panels = []
    for image_id in dataset.ids[:args.grid]:
        image = dataset.image(image_id)
        seeds = load_seeds(seed_path(args.seeds, image_id), expected_size=image.shape[:2])
        maps = [labels_from_maps(seeds[k], seeds["keys"], thresholds.get(k, 0.5)) if k in seeds
                else np.zeros(image.shape[:2], np.uint8) for k in ("cam", "pacam")]
        with torch.no_grad():
            pred = predict_probs(model, image, seg_cfg["scales"], seg_cfg["flip"], device).argmax(0).numpy()
        panels.append((image_id, [image, dataset.mask(image_id) if truth else None, *maps,
                                  load_label_png(Path(args.pseudo) / f"{image_id}.png"), pred.astype(np.uint8)]))
    plot_grid(panels, ["image", "ground truth", "CAM seed", "PACAM seed", "pseudo-mask", "DeepLab"],
              out.with_name(out.stem + "_grid.png"), footer)
    log.info("wrote %s (%d stages)", out, len(rows))
    return 0


def _seed_results(results: Path) -> dict:
    import json

    data = json.loads((results / "eval_seeds.json").read_text())
    return {k: data[k] for k in ("cam", "pacam") if k in data}


if __name__ == "__main__":
    sys.exit(main())
