"""The report stage's pictures of a run: each image beside its ground truth (when there is one), CAM and
PACAM seeds, pseudo-mask and DeepLab prediction, as the qualitative grid (PNG) and `results/gallery.html`.

The gallery is one self-contained file: images are embedded as data URIs, the style is inline, there is
no script, so it opens from disk, from a DVC cache or an e-mail attachment alike. Each row gives the
image's own mIoU against its ground truth, or says that it has none (data without masks).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cpal.core.io import load_label_png, voc_palette, write_text
from cpal.core.metrics import miou
from cpal.data.voc import IGNORE_INDEX, VOCDataset
from cpal.seeds.store import labels_from_maps, load_seeds, seed_path
from cpal.seg.evaluate import predict_probs

COLUMNS = ("image", "ground truth", "CAM seed", "PACAM seed", "pseudo-mask", "DeepLab")
THUMB = 256  # long side of the embedded pictures (a VOC gallery of 12 rows stays near 2 MB)


@dataclass
class Panels:
    """One image of the run, its label maps (class ids; gt None when the data have no mask for it) and its
    image-level tags (class ids: all the supervision the method had)."""

    image_id: str
    image: np.ndarray
    gt: np.ndarray | None
    cam: np.ndarray
    pacam: np.ndarray
    pseudo: np.ndarray
    pred: np.ndarray
    tags: tuple[int, ...] = ()

    def maps(self) -> list[np.ndarray | None]:
        """The label maps in COLUMNS order after the image."""
        return [self.gt, self.cam, self.pacam, self.pseudo, self.pred]


def seed_thresholds(results: Path) -> dict[str, float]:
    """The background threshold eval_seeds picked for each seed map (cam, pacam): the sweep's best where there is
    ground truth, the one derived without it (Otsu) where there is none."""
    data = json.loads((Path(results) / "eval_seeds.json").read_text())
    return {k: data[k].get("best_threshold", data[k].get("otsu_threshold", 0.5))
            for k in ("cam", "pacam") if k in data and data[k]}


def collect_panels(dataset: VOCDataset, ids: list[str], seeds_dir: Path, pseudo_dir: Path, model: torch.nn.Module,
                   seg_cfg: dict[str, Any], thresholds: dict[str, float], device: torch.device,
                   progress: bool = True) -> list[Panels]:
    """Panels of `ids`: seeds thresholded as eval_seeds found best, DeepLab with the eval settings."""
    out = []
    for image_id in tqdm(ids, desc="report panels", disable=not progress, leave=False):
        image = dataset.image(image_id)
        seeds = load_seeds(seed_path(seeds_dir, image_id), expected_size=image.shape[:2])
        cam, pacam = (labels_from_maps(seeds[k], seeds["keys"], thresholds.get(k, 0.5)) if k in seeds
                      else np.zeros(image.shape[:2], np.uint8) for k in ("cam", "pacam"))
        with torch.no_grad():
            pred = predict_probs(model, image, seg_cfg["scales"], seg_cfg["flip"], device).argmax(0).numpy()
        gt = dataset.mask(image_id) if dataset.mask_path(image_id).is_file() else None
        out.append(Panels(image_id, image, gt, cam, pacam, load_label_png(Path(pseudo_dir) / f"{image_id}.png"),
                          pred.astype(np.uint8), tuple(int(k) for k in seeds["keys"])))
    return out


def grid_rows(panels: list[Panels]) -> list[tuple[str, list[np.ndarray]]]:
    """plot_grid's rows; a missing ground truth is drawn as an all-ignore map."""
    return [(p.image_id, [p.image, *(np.full(p.image.shape[:2], IGNORE_INDEX, np.uint8) if m is None else m
                                     for m in p.maps())]) for p in panels]


def _data_uri(array: np.ndarray, is_label: bool) -> str:
    """A picture as a base64 data URI: a label map as a palette PNG (exact colours), a photo as JPEG."""
    h, w = array.shape[:2]
    scale = min(1.0, THUMB / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    buf = io.BytesIO()
    if is_label:
        img = Image.fromarray(array, mode="P")
        img.putpalette(voc_palette().tobytes())
        img.resize(size, Image.Resampling.NEAREST).save(buf, format="PNG", optimize=True)
        kind = "png"
    else:
        Image.fromarray(array).resize(size, Image.Resampling.BOX).save(buf, format="JPEG", quality=88)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _chips(label: np.ndarray, classes: list[str]) -> str:
    """The foreground classes a map shows, each with its colour."""
    palette = voc_palette()
    present = [int(c) for c in np.unique(label) if 0 < c < len(classes)]
    if not present:
        return '<span class="none">background only</span>'
    return " ".join(f'<span class="chip"><i style="background:rgb{tuple(palette[c].tolist())}"></i>'
                    f"{html.escape(classes[c])}</span>" for c in present)


def _score(label: np.ndarray, gt: np.ndarray | None, n: int) -> float | None:
    return None if gt is None else miou(label, gt, n)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 6px; }
p.meta { font-size: 12px; color: #555; margin: 0 0 14px; max-width: 1300px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 0 0 18px; font-size: 13px; max-width: 1300px; }
.chip { white-space: nowrap; font-size: 12px; }
.chip i, .legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px;
  border: 1px solid #333; }
table { border-collapse: collapse; }
th { font-size: 13px; text-align: left; padding: 4px 8px; position: sticky; top: 0; background: #fafafa; }
td { vertical-align: top; padding: 6px 8px; border-top: 1px solid #ddd; }
td.info { width: 170px; font-size: 13px; }
td.info div { margin-top: 3px; }
td.info b { display: block; font-size: 14px; margin-bottom: 4px; word-break: break-all; }
img { width: 168px; height: auto; display: block; border: 1px solid #ccc; background: #fff; }
img.label { image-rendering: pixelated; }
.score { font-size: 12px; margin-top: 3px; }
.none { color: #888; font-size: 12px; }
.nogt { width: 168px; height: 168px; display: flex; align-items: center; justify-content: center; color: #888;
  border: 1px dashed #bbb; font-size: 13px; }
"""


def gallery_html(panels: list[Panels], classes: list[str], title: str, note: str) -> str:
    """The page: a legend of every class colour, then one row per image (info, picture, five label maps)."""
    palette = voc_palette()
    n = len(classes)
    legend = "".join(f'<span><i style="background:rgb{tuple(palette[c].tolist())}"></i>{html.escape(name)}</span>'
                     for c, name in enumerate(classes))
    legend += f'<span><i style="background:rgb{tuple(palette[IGNORE_INDEX].tolist())}"></i>ignore / uncertain</span>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("", *COLUMNS))
    rows = []
    for p in panels:
        tags = ", ".join(html.escape(classes[k]) for k in p.tags) or "none"
        if p.gt is None:
            info = '<div class="none">no ground truth</div>'
        else:
            info = (f'<div class="score">DeepLab mIoU {_pct(_score(p.pred, p.gt, n))}</div>'
                    f'<div class="score">pseudo-mask mIoU {_pct(_score(p.pseudo, p.gt, n))}</div>')
        cells = [f'<td class="info"><b>{html.escape(p.image_id)}</b><div class="score">tags: {tags}</div>{info}</td>',
                 f'<td><img src="{_data_uri(p.image, False)}" alt="image {html.escape(p.image_id)}"></td>']
        for column, label in zip(COLUMNS[1:], p.maps(), strict=True):
            if label is None:
                cells.append('<td><div class="nogt">no ground truth</div></td>')
                continue
            score = "" if column == "ground truth" or p.gt is None else \
                f'<div class="score">mIoU {_pct(_score(label, p.gt, n))}</div>'
            cells.append(f'<td><img class="label" src="{_data_uri(label, True)}" alt="{html.escape(column)}">'
                         f"{score}<div>{_chips(label, classes)}</div></td>")
        rows.append(f'<tr class="row">{"".join(cells)}</tr>')
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(note)}"
            f'</p><div class="legend">{legend}</div>\n<table><thead><tr>{head}</tr></thead><tbody>\n'
            + "\n".join(rows) + "\n</tbody></table></body></html>\n")


def write_gallery(path: Path, panels: list[Panels], classes: list[str], title: str, note: str) -> None:
    write_text(path, gallery_html(panels, classes, title, note))
